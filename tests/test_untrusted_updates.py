"""What one bad participant can send, and what it must never do: stop the round, be coerced into
something plausible, or poison the global state. Strict update headers, the safetensors table
read before loading, the rank the server sent, overflow and norm bounds, SVD fall-backs."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from fedlora.federated import ClientUpdate
from fedlora.federated.validation import FACTOR_NORM_LIMIT, norm_outliers, update_sizes, validate_update
from fedlora.strategies import FedAvg, FFALoRA, FlexLoRA, FLoRA, HetLoRA
from fedlora.strategies import flexlora as flexlora_module

from .fl_helpers import SHAPES, random_update, rel, updates_for, weighted_delta64

Q = "model.layers.0.self_attn.q_proj"
KEY = "fedlora.update"


# ------------------------------------------------------------ blob surgery
def _split(blob: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + size]), blob[8 + size:]


def _join(table: dict | str, body: bytes) -> bytes:
    raw = (table if isinstance(table, str) else json.dumps(table)).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _with_header_text(blob: bytes, edit) -> bytes:
    """The blob with its update header's JSON text replaced by edit(text)."""
    table, body = _split(blob)
    table["__metadata__"][KEY] = edit(table["__metadata__"][KEY])
    return _join(table, body)


def _with_field(blob: bytes, field: str, raw_json: str) -> bytes:
    """The update header with ``field`` set to the raw JSON text ``raw_json`` (e.g. 1e999, Infinity)."""
    def edit(text):
        header = json.loads(text)
        header[field] = "__PLACEHOLDER__"
        return json.dumps(header).replace('"__PLACEHOLDER__"', raw_json)
    return _with_header_text(blob, edit)


GOOD = random_update("c0", 4, n=12, alpha=8.0)


@pytest.mark.parametrize("field, raw, message", [
    ("num_examples", "3.7", "num_examples must be an integer, got float 3.7"),
    ("num_examples", '"12"', "num_examples must be an integer, got str '12'"),
    ("num_examples", "true", "num_examples must be an integer, got bool True"),
    ("num_examples", "1e999", "num_examples must be an integer, got float inf"),
    ("num_examples", "Infinity", "num_examples must be an integer, got float inf"),
    ("num_examples", "0", r"num_examples must be in \[1, "),
    ("rank", "2.9", "rank must be an integer, got float 2.9"),
    ("rank", '"4"', "rank must be an integer, got str"),
    ("use_rslora", '"false"', "use_rslora must be true or false, got str 'false'"),
    ("use_rslora", "0", "use_rslora must be true or false, got int 0"),
    ("client_id", "null", "client_id must be a string, got NoneType"),
    ("client_id", "7", "client_id must be a string, got int 7"),
    ("client_id", '""', "client_id must be a non-empty string"),
    ("metrics", "[1, 2]", "metrics must be a mapping, got list"),
    ("metrics", '{"loss": "low"}', "metric loss must be a number, got str"),
    ("alphas", "[]", "alphas must be a mapping, got list"),
    ("version", "true", "format version True"),
])
def test_header_fields_are_parsed_strictly(field, raw, message):
    with pytest.raises(ValueError, match=message):
        ClientUpdate.from_bytes(_with_field(GOOD.to_bytes(), field, raw))


@pytest.mark.parametrize("raw, message", [("16", None), ('"16"', "alpha of .* must be a number, got str"),
                                          ("true", "alpha of .* must be a number, got bool"),
                                          ("Infinity", "must be a finite number, got inf"),
                                          ("-1", "must be > 0, got -1")])
def test_alphas_are_positive_finite_numbers(raw, message):
    def edit(text):
        header = json.loads(text)
        header["alphas"][Q] = "__X__"
        return json.dumps(header).replace('"__X__"', raw)
    blob = _with_header_text(GOOD.to_bytes(), edit)
    if message is None:  # an int alpha is a number: accepted as the float it is
        assert ClientUpdate.from_bytes(blob).modules[Q][2] == 16.0
    else:
        with pytest.raises(ValueError, match=message):
            ClientUpdate.from_bytes(blob)


def test_header_fields_missing_or_unknown_are_errors():
    def drop(text):
        header = json.loads(text)
        del header["use_rslora"]
        return json.dumps(header)

    def add(text):
        return json.dumps({**json.loads(text), "weight": 100.0})
    with pytest.raises(ValueError, match=r"update header lacks \['use_rslora'\]"):
        ClientUpdate.from_bytes(_with_header_text(GOOD.to_bytes(), drop))
    with pytest.raises(ValueError, match=r"unknown fields \['weight'\]"):
        ClientUpdate.from_bytes(_with_header_text(GOOD.to_bytes(), add))


def test_nan_metric_is_reported_not_refused():
    upd = random_update("c0", 2)
    upd.metrics = {"train_loss": float("nan")}
    back = ClientUpdate.from_bytes(upd.to_bytes())
    assert back.metrics["train_loss"] != back.metrics["train_loss"]  # NaN: a client that took no step


def test_metadata_that_is_not_a_string_is_refused():
    table, body = _split(GOOD.to_bytes())
    table["__metadata__"][KEY] = json.loads(table["__metadata__"][KEY])  # an object, not its JSON text
    with pytest.raises(ValueError, match="metadata must map names to strings"):
        ClientUpdate.from_bytes(_join(table, body))


@pytest.mark.parametrize("where", ["header", "table"])
def test_deeply_nested_json_is_a_reason_not_a_recursion_error(where):
    deep = "[" * 100_000 + "]" * 100_000
    if where == "header":
        blob = _with_header_text(GOOD.to_bytes(), lambda text: deep)
    else:
        _, body = _split(GOOD.to_bytes())
        blob = _join('{"x": ' + deep + "}", body)
    with pytest.raises(ValueError, match="nested too deeply"):
        ClientUpdate.from_bytes(blob)


def test_float8_and_integer_tensors_are_refused_before_loading(monkeypatch):
    header = json.loads(_split(GOOD.to_bytes())[0]["__metadata__"][KEY])
    tensors = {f"{n}.lora_{k}": t for n, (a, b, _) in GOOD.modules.items() for k, t in (("A", a), ("B", b))}
    loaded = []
    monkeypatch.setattr("fedlora.federated.update.st_load", lambda data: loaded.append(1))
    for dtype, name in ((torch.float8_e4m3fn, "F8_E4M3"), (torch.int64, "I64")):
        bad = dict(tensors, **{f"{Q}.lora_A": tensors[f"{Q}.lora_A"].to(dtype)})
        blob = st_save(bad, metadata={KEY: json.dumps(header)})
        with pytest.raises(ValueError, match=f"lora_A has dtype {name}; an update holds"):
            ClientUpdate.from_bytes(blob)
    assert loaded == []


@pytest.mark.parametrize("shape, message", [([2**60, 2**60], "more elements than the blob"),
                                            ([4.0, 40], "expected non-negative integers"),
                                            ([-1, 40], "expected non-negative integers"),
                                            ([160], "factors are 2-D")])
def test_absurd_shapes_in_the_tensor_table_are_refused_before_loading(shape, message, monkeypatch):
    table, body = _split(GOOD.to_bytes())
    table[f"{Q}.lora_A"]["shape"] = shape
    monkeypatch.setattr("fedlora.federated.update.st_load", pytest.fail)
    with pytest.raises(ValueError, match=message):
        ClientUpdate.from_bytes(_join(table, body))


def test_offsets_outside_the_blob_are_refused():
    table, body = _split(GOOD.to_bytes())
    table[f"{Q}.lora_A"]["data_offsets"] = [0, len(body) + 1]
    with pytest.raises(ValueError, match="outside the blob"):
        ClientUpdate.from_bytes(_join(table, body))


# ------------------------------------------------- the rank the server sent
def test_an_upload_must_come_back_at_the_rank_it_was_sent():
    served = dict.fromkeys(SHAPES, 4)
    assert validate_update(random_update("c", 4), SHAPES, served=served) is None
    assert validate_update(random_update("c", 8), SHAPES, served=served) == \
        f"{sorted(SHAPES)[0]}: rank 8 differs from the rank 4 the server sent this client"
    lower = random_update("c", 4, module_ranks={Q: 2})
    assert validate_update(lower, SHAPES, served=served) == f"{Q}: rank 2 differs from the rank 4 the server sent " \
                                                            "this client"
    claims = random_update("c", 4)
    claims.rank = 16
    assert validate_update(claims, SHAPES, served=served) == "rank 16 differs from the rank 4 the server sent " \
                                                             "this client"


@pytest.mark.parametrize("make", [lambda: FlexLoRA(), lambda: FLoRA(), lambda: HetLoRA()])
def test_strategies_refuse_a_higher_rank_upload_than_served(make):
    s = make()
    s.init_global(SHAPES, rank=16)
    ups = updates_for([4, 8, 16])
    served = {"c0": dict.fromkeys(SHAPES, 4), "c1": dict.fromkeys(SHAPES, 4), "c2": dict.fromkeys(SHAPES, 16)}
    res = s.aggregate(ups, served=served)
    assert res.accepted == ["c0", "c2"] and set(res.rejected) == {"c1"}
    assert "rank 8 differs from the rank 4 the server sent this client" in res.rejected["c1"]
    ref = make()
    ref.init_global(SHAPES, rank=16)
    ref.aggregate([ups[0], ups[2]])
    _assert_same_state(s, ref)
    unsent = s.aggregate(updates_for([4]), served={"c9": dict.fromkeys(SHAPES, 4)})
    assert unsent.rejected == {"c0": "the server sent this client no work this round"} and not unsent.changed


# ---------------------------------------------------------------- numerics
STRATEGIES = {"fedavg": lambda **kw: FedAvg(**kw), "hetlora": lambda **kw: HetLoRA(**kw),
              "flexlora": lambda **kw: FlexLoRA(**kw), "flora": lambda **kw: FLoRA(**kw),
              "ffalora": lambda **kw: FFALoRA(**kw)}


def _fresh(name, **kw):
    s = STRATEGIES[name](**kw)
    s.init_global(SHAPES, rank=4)
    return s


def _honest(s, name):
    """Three rank-4 updates the strategy accepts (FFA-LoRA's carry its frozen A)."""
    ups = updates_for([4, 4, 4])
    if name == "ffalora":
        for u in ups:
            u.modules = {n: (s._tensors[f"{n}.A"].clone(), b, al) for n, (_, b, al) in u.modules.items()}
    return ups


def _scaled(update, cid, a_factor, b_factor):
    mods = {n: (a * a_factor, b * b_factor, al) for n, (a, b, al) in update.modules.items()}
    return ClientUpdate(cid, update.num_examples, update.rank, mods, update.use_rslora)


def _assert_same_state(got, want):
    assert got.round == want.round
    assert got._tensors.keys() == want._tensors.keys()
    for key in want._tensors:
        assert torch.equal(got._tensors[key], want._tensors[key]), key


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_product_overflowing_float32_is_rejected_and_the_state_stays_clean(name):
    """Finite float32 factors (1e20 x entries ~0.1) whose product would be ~1e39: past float32's 3.4e38."""
    s = _fresh(name)
    ups = _honest(s, name)
    a_factor = 1.0 if name == "ffalora" else 1e20  # FFA-LoRA's A is frozen: the huge factor is B there
    bad = _scaled(ups[0], "evil", a_factor, 1e20 if name != "ffalora" else 1e38)
    assert all(torch.isfinite(t).all() for a, b, _ in bad.modules.values() for t in (a, b))
    res = s.aggregate([*ups, bad])
    assert res.changed and res.accepted == ["c0", "c1", "c2"]
    assert "could overflow float32" in res.rejected["evil"]
    ref = _fresh(name)
    ref.aggregate(_honest(ref, name))
    _assert_same_state(s, ref)
    assert all(torch.isfinite(d).all() for d in s.global_deltas().values())


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_finite_but_enormous_update_is_rejected_by_the_median_bound(name):
    s = _fresh(name)
    ups = _honest(s, name)
    big = _scaled(ups[1], "big", 1.0, 1e6)  # 1e6 x the others: a finite product, far under the overflow limit
    res = s.aggregate([*ups, big])
    assert res.accepted == ["c0", "c1", "c2"]
    assert "the round's median" in res.rejected["big"] and "above the bound of 10x" in res.rejected["big"]
    ref = _fresh(name)
    ref.aggregate(_honest(ref, name))
    _assert_same_state(s, ref)
    # switched off, the same update counts (and its weight shows in the state)
    off = _fresh(name, max_norm_ratio=0)
    res = off.aggregate([*_honest(off, name), big])
    assert res.accepted == ["c0", "c1", "c2", "big"] and res.changed


def test_factor_rescaling_is_caught_for_factor_averaging_rules():
    """A c, B / c leaves the client's own product alone but FedAvg's cross terms B_j (c A) grow by c."""
    s = _fresh("fedavg")
    ups = _honest(s, "fedavg")
    sneaky = _scaled(ups[2], "sneaky", 1e12, 1e-12)
    assert update_sizes(sneaky)[0] == pytest.approx(update_sizes(ups[2])[0], rel=1e-5)
    res = s.aggregate([*ups, sneaky])
    assert res.rejected["sneaky"].startswith("A norm")
    assert "sneaky" in norm_outliers([*ups, sneaky], 10.0)


def test_the_lower_median_is_robust_to_one_update_among_two():
    ups = updates_for([4, 4])
    big = _scaled(ups[1], "big", 1.0, 1e3)
    assert set(norm_outliers([ups[0], big], 10.0)) == {"big"}
    assert norm_outliers(ups, 10.0) == {}  # honest pairs differ by far less than 10x


def test_factor_norm_limit_keeps_products_and_sums_inside_float32():
    # The bound validation.py claims: two limit-norm factors multiply to 2**110, 2**17 under float32's largest.
    assert FACTOR_NORM_LIMIT**2 * 2**17 <= torch.finfo(torch.float32).max
    at = FACTOR_NORM_LIMIT / 2
    upd = random_update("c", 2)
    a, b, alpha = upd.modules[Q]
    upd.modules[Q] = (a / a.double().norm().float() * at, b, alpha)
    assert validate_update(upd, SHAPES) is None
    upd.modules[Q] = (a / a.double().norm().float() * at * 4, b, alpha)
    assert "could overflow float32" in validate_update(upd, SHAPES)


def test_a_non_finite_aggregate_keeps_the_previous_state(monkeypatch):
    s = _fresh("flora")
    s.aggregate(updates_for([4, 4, 4], seed=1))
    before = {k: v.clone() for k, v in s._tensors.items()}
    real = FLoRA._aggregate

    def poisoned(self, updates, weights):
        real(self, updates, weights)
        key = next(iter(self._tensors))
        self._tensors[key] = self._tensors[key] * float("inf")
    monkeypatch.setattr(FLoRA, "_aggregate", poisoned)
    res = s.aggregate(updates_for([4, 4, 4], seed=2))
    assert not res.changed and res.accepted == [] and s.round == 1
    assert all(reason.startswith("round not aggregated: aggregation made") for reason in res.rejected.values())
    assert set(res.rejected) == {"c0", "c1", "c2"}
    for key, value in before.items():
        assert torch.equal(s._tensors[key], value)


def test_an_object_that_breaks_validation_is_that_clients_rejection():
    s = _fresh("flexlora")
    class Exploding(dict):
        def __getitem__(self, key):
            raise RuntimeError("boom")
    broken = random_update("broken", 4)
    broken.modules = Exploding(broken.modules)  # reading a module raises inside validation
    res = s.aggregate([*updates_for([4, 4]), broken])
    assert res.accepted == ["c0", "c1"] and res.rejected["broken"] == "invalid update: RuntimeError: boom"


# ------------------------------------------------------- FlexLoRA's SVD
def _failing_svd(monkeypatch, fail):
    """ops.lowrank_svd raising LinAlgError whenever fail(dtype, method) is true; returns the calls made."""
    real, calls = flexlora_module.ops.lowrank_svd, []

    def svd(banks, weights=None, rank=None, method="auto", **kw):
        calls.append((banks[0].dtype, method))
        if fail(banks[0].dtype, method):
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(banks, weights=weights, rank=rank, method=method, **kw)
    monkeypatch.setattr(flexlora_module.ops, "lowrank_svd", svd)
    return calls


@pytest.mark.parametrize("svd_method, asked", [("exact", "factored"), (None, "auto")])  # None: the default
def test_flexlora_svd_falls_back_to_float64_then_dense(monkeypatch, svd_method, asked):
    ups = updates_for([2, 4, 8])
    for fail, tried in (
        (lambda dt, m: dt == torch.float32, [(torch.float32, asked), (torch.float64, asked)]),
        (lambda dt, m: m != "dense", [(torch.float32, asked), (torch.float64, asked), (torch.float64, "dense")]),
    ):
        s = FlexLoRA() if svd_method is None else FlexLoRA(svd_method=svd_method)
        s.init_global(SHAPES)
        calls = _failing_svd(monkeypatch, fail)
        res = s.aggregate(ups)
        assert res.changed and res.accepted == ["c0", "c1", "c2"]
        assert calls[:len(tried)] == tried
        for name in SHAPES:  # K = 8 of a total rank 14: the best rank-8 approximation, fp32 state
            U, S, Vh = torch.linalg.svd(weighted_delta64(ups, name), full_matrices=False)
            assert rel(s.global_delta(name), (U[:, :8] * S[:8]) @ Vh[:8]) < 2e-6  # fp32 rounding of a float64 SVD
        monkeypatch.undo()


def test_flexlora_round_where_every_svd_fails_is_rejected_not_fatal(monkeypatch):
    s = FlexLoRA()
    s.init_global(SHAPES)
    s.aggregate(updates_for([2, 4], seed=3))
    before = {k: v.clone() for k, v in s._tensors.items()}
    _failing_svd(monkeypatch, lambda dt, m: True)
    res = s.aggregate(updates_for([2, 4, 8]))
    assert not res.changed and s.round == 1
    reason = res.rejected["c0"]
    assert reason.startswith("round not aggregated: aggregation failed: RuntimeError: SVD failed in every precision")
    assert "float32 auto: LinAlgError" in reason and "float64 dense: LinAlgError" in reason
    for key, value in before.items():
        assert torch.equal(s._tensors[key], value)
