"""The command line a newcomer meets: `fedlora --help` without heavy imports, `fedlora simulate --help`
and `--print-config` generated from SimConfig's fields, and the validation read from the same fields."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from fedlora.cli import main
from fedlora.simulation.config import GROUPS, SimConfig, allowed_values, bounds_of, settings_by_group

FIELDS = dataclasses.fields(SimConfig)


def flat(text: str) -> str:
    """Help text with argparse's line wrapping undone."""
    return " ".join(text.split())


def test_every_setting_carries_its_reference():
    assert [f for _, fields in settings_by_group() for f in fields] == list(FIELDS)  # each in one group
    for f in FIELDS:
        doc = f.metadata["doc"]
        assert doc and "\n" not in doc and len(doc) < 160, f.name
        assert f.metadata["group"] in GROUPS


def test_simulate_help_lists_every_setting(capsys):
    assert main(["simulate", "--help"]) == 0
    text = flat(capsys.readouterr().out)
    defaults = SimConfig()
    for f in FIELDS:
        assert f"--{f.name}" in text, f.name
        assert flat(f.metadata["doc"]) in text, f.name
        if allowed_values(f):
            assert flat(allowed_values(f)) in text, f.name
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            assert f"--{f.name} true|false" in text
        elif isinstance(default, list) and default:
            assert f"(default: {','.join(map(str, default))})" in text, f.name
        elif not isinstance(default, (list, dict)):
            assert f"(default: {default})" in text, f.name
    for group in GROUPS:
        assert f"{group}:" in text
    assert "--print-config" in text and "--config FILE" in text


def test_print_config_is_the_full_default_toml(capsys, tmp_path):
    assert main(["simulate", "--print-config"]) == 0
    text = capsys.readouterr().out
    for f in FIELDS:
        assert f"\n{f.name} = " in text, f.name
    path = tmp_path / "defaults.toml"
    path.write_text(text)
    assert SimConfig.load(path) == SimConfig()


def test_print_config_shows_the_settings_given(capsys, tmp_path):
    args = ["--rounds", "7", "--rank_pattern.layers\\.0\\..*", "2", "--strategy_options.max_rank", "8",
            "--target_modules", "q_proj,k_proj", "--output_dir", "runs/x \"quoted\""]
    assert main(["simulate", "--print-config", *args]) == 0
    path = tmp_path / "run.toml"
    path.write_text(capsys.readouterr().out)
    assert SimConfig.load(path) == SimConfig.load(None, args)


# Values outside every field's choices or bounds: the validation reads the same rule as the help shows.
def _outside(f: dataclasses.Field) -> list:
    rule, kind = f.metadata["rule"], str(f.type)
    if rule["choices"] is not None:
        return ["no-such-" + f.name]
    if kind == "int | float":  # a count below 1, a fraction not below 1
        return [0, 1.5]
    values = []
    if rule["low"] is not None:
        low = rule["low"]
        integral = kind in ("int", "list[int]")
        values.append(low if rule["low_open"] else (low - 1 if integral else low - 0.5))
    if rule["high"] is not None:
        values.append(rule["high"] if rule["high_open"] else rule["high"] + 1)
    if kind == "float":
        values.append(float("nan"))
    return [[v] if kind.startswith("list") else v for v in values]


CHECKED = [f for f in FIELDS if _outside(f)]


@pytest.mark.parametrize("f", CHECKED, ids=[f.name for f in CHECKED])
def test_validation_follows_the_field_reference(f):
    rule, allowed = f.metadata["rule"], allowed_values(f)
    # What the help says is allowed is what the error says: each choice, or the range in the same words.
    fragments = list(rule["choices"]) if rule["choices"] is not None else [
        bounds_of(rule) if str(f.type) != "int | float" else None]
    for bad in _outside(f):
        with pytest.raises(ValueError, match=rf"^config: {f.name}") as err:
            SimConfig.from_dict({f.name: bad})
        message = str(err.value)
        if str(f.type) == "int | float":
            fragments = [">= 1" if isinstance(bad, int) else bounds_of(rule)]
        if bad != bad:  # NaN: refused as not finite
            assert "finite" in message
            continue
        for fragment in fragments:
            assert fragment in message and fragment in allowed, (fragment, message, allowed)
    assert allowed in flat(_help_text())


def _help_text() -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["simulate", "--help"])
    return out.getvalue()


def test_fedlora_help_imports_nothing_heavy():
    """`fedlora --help` must answer at once: torch, transformers, numpy are imported only by the commands."""
    heavy = ('torch', 'transformers', 'numpy', 'triton', 'peft', 'flwr')
    code = ("import sys\nfrom fedlora.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "simulate" in out and out.strip().endswith("[]"), out


def test_lazy_package_still_exports_the_public_surface():
    code = ("import fedlora\nprint(fedlora.AdapterBank.__module__, fedlora.MultiLoRALinear.__name__, "
            "fedlora.ops.segmented_lora.__name__, callable(fedlora.patch_peft))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["fedlora.bank", "MultiLoRALinear", "segmented_lora", "True"]
