"""LoRA layers: PEFT eager vs patched PEFT vs MultiLoRALinear, 16-bit and NF4 bases.

Two families of groups, each timed for the forward alone (under no_grad) and for
forward + backward (dx and the LoRA parameters' grads via autograd.grad with a
fixed dY; the base is frozen):

  layer  one LLaMA-7B-like projection, one adapter of rank 16 (alpha 32):
           peft          role=baseline  PEFT's own lora.Linear / lora.bnb.Linear4bit
           peft_patched                 the same module after fedlora.patch_peft
           multilora                    fedlora.MultiLoRALinear over the same base and factors
           base                role=floor the frozen base layer alone
  mixed  16 adapters of ranks 4/8/16/32 over one layer, the batch split into 16
         equal runs of sequences, one per adapter:
           peft_separate role=baseline  16 PEFT passes, set_adapter(i) then its rows
                                        (how the FL papers' code trains clients)
           peft_adapter_names           PEFT's own mixed batch (adapter_names=, forward only:
                                        PEFT refuses it in training)
           peft_patched                 the patched PEFT layer inside fedlora.adapter_batch
           multilora                    MultiLoRALinear with the 16 adapters packed

Before timing, every variant's y (and dx, LoRA grads) is checked against PEFT's.
Adapters are fp32, as PEFT makes them by default (autocast_adapter_dtype) even
over a 16-bit base; the activations and the base are in the bench dtype.

Shape sets (bench/conftest.py): gpu: 4096 -> 4096 and 4096 -> 11008, T = 4096,
16384, bf16; cpu: 512 -> 512 and 512 -> 1376 (7B's ratio), T = 512, 2048, fp32.
"""
from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import fedlora
from fedlora import MultiLoRALinear

from .conftest import DEVICE, DTYPE, SHAPE_SET, device_name, sync

SHAPES = {
    "gpu": {"d_in": 4096, "d_outs": (4096, 11008), "Ts": (4096, 16384), "seq": 512},
    "cpu": {"d_in": 512, "d_outs": (512, 1376), "Ts": (512, 2048), "seq": 64},
}[SHAPE_SET]
RANK, ALPHA = 16, 32.0
MIXED_RANKS = [4, 8, 16, 32] * 4  # 16 adapters
BASES = ("16bit", "nf4") if DTYPE != torch.float32 else ("fp32", "nf4")
MODES = ("fwd", "fwd_bwd")
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPE_NAME = str(DTYPE).removeprefix("torch.")


class _Holder(nn.Module):
    """A one-layer model for get_peft_model; is_loaded_in_4bit routes PEFT to its bnb layer."""

    def __init__(self, proj: nn.Module, four_bit: bool):
        super().__init__()
        self.proj = proj
        self.is_loaded_in_4bit = four_bit

    def forward(self, x):
        return self.proj(x)


def _base(kind: str, d_in: int, d_out: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    if kind == "nf4":
        q = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=DTYPE, quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        return q.to(DEVICE)
    lin = nn.Linear(d_in, d_out, bias=False, device=DEVICE, dtype=DTYPE)
    lin.weight.data.copy_(weight)
    return lin.requires_grad_(False)


def _peft_layer(kind: str, d_in: int, d_out: int, ranks, seed: int):
    """A PEFT LoRA layer holding adapters a0..a{n-1} of ``ranks`` (random A and B)."""
    torch.manual_seed(seed)
    cfgs = [LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False) for r in ranks]
    model = get_peft_model(_Holder(_base(kind, d_in, d_out, seed), kind == "nf4"), cfgs[0], adapter_name="a0")
    for i, cfg in enumerate(cfgs[1:], start=1):
        model.add_adapter(f"a{i}", cfg)
    model.to(DEVICE)
    layer = model.base_model.model.proj
    layer.requires_grad_(False)
    for name in layer.lora_A:
        layer.lora_A[name].requires_grad_(True)
        layer.lora_B[name].requires_grad_(True)
    return layer


def _multilora(layer) -> MultiLoRALinear:
    names = list(layer.lora_A)
    factors = [(layer.lora_A[n].weight.detach(), layer.lora_B[n].weight.detach()) for n in names]
    return MultiLoRALinear(layer.base_layer, factors=factors, scalings=[layer.scaling[n] for n in names])


def _lora_params(module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _runner(fn, params, x, dy, mode):
    """run(): fn's output, plus (dx, *param grads) in fwd_bwd; ends with a device sync."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                y = fn(x)
            sync()
            return y, ()
        return run
    xg = x.detach().clone().requires_grad_()

    def run():
        y = fn(xg)
        grads = torch.autograd.grad(y, [xg, *params], dy)
        sync()
        return y, grads
    return run


def _rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return math.inf if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


def _check(variant, got, ref):
    tol = REL_TOL[DTYPE]
    errs = [_rel_err(got[0], ref[0])] + [_rel_err(g, r) for g, r in zip(got[1], ref[1])]
    assert len(got[1]) == len(ref[1]) and max(errs) <= tol, f"{variant} disagrees with PEFT: {errs} > {tol}"
    return float(f"{max(errs):.3g}")


def _inputs(T, d_in, d_out, seq, seed):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T // seq, seq, d_in, generator=g).to(DEVICE, DTYPE)
    dy = torch.randn(T // seq, seq, d_out, generator=g).to(DEVICE, DTYPE)
    return x, dy


def _timed(benchmark, run, group, variant, role, info, err):
    run()  # warm-up beyond the checked call (Triton autotuning, allocator)
    benchmark.group = group
    benchmark.extra_info.update({"variant": variant, "role": role, "max_rel_err_vs_peft": err, **info})
    benchmark(run)


# ------------------------------------------------------------------- one layer
LAYER_VARIANTS = {"peft": "baseline", "peft_patched": "candidate", "multilora": "candidate", "base": "floor"}


def _layer_params():
    return [pytest.param(base, d_out, T, mode, v, id=f"{base}-{SHAPES['d_in']}x{d_out}-T{T}-{mode}-{v}")
            for base in BASES for d_out in SHAPES["d_outs"] for T in SHAPES["Ts"] for mode in MODES
            for v in LAYER_VARIANTS]


@pytest.mark.parametrize("base_kind, d_out, T, mode, variant", _layer_params())
def test_layer(benchmark, base_kind, d_out, T, mode, variant):
    d_in, seq = SHAPES["d_in"], SHAPES["seq"]
    layer = _peft_layer(base_kind, d_in, d_out, [RANK], seed=d_out + T)
    x, dy = _inputs(T, d_in, d_out, seq, seed=d_out + T)
    ref = _runner(layer, _lora_params(layer), x, dy, mode)()
    if variant == "peft":
        fn, params = layer, _lora_params(layer)
    elif variant == "peft_patched":
        fn, params = fedlora.patch_peft(_Holder(layer, False)).proj, _lora_params(layer)
    elif variant == "multilora":
        fn = _multilora(layer)
        params = [fn.bank.A, fn.bank.B]
    else:
        fn, params = layer.base_layer, []
    run = _runner(fn, params, x, dy, mode)
    out = run()
    # One adapter: MultiLoRALinear's packed A / B are PEFT's lora_A / lora_B weights as they are.
    err = None if variant == "base" else _check(variant, out, ref)
    info = {"d_in": d_in, "d_out": d_out, "T": T, "seq": seq, "rank": RANK, "base": base_kind,
            "dtype": DTYPE_NAME, "mode": mode, "device": str(DEVICE), "device_name": device_name()}
    _timed(benchmark, run, f"layer {mode} {base_kind} {d_in}x{d_out} T={T} r={RANK} {DTYPE_NAME}",
           variant, LAYER_VARIANTS[variant], info, err)


# ----------------------------------------------------------------- mixed batch
MIXED_VARIANTS = {"peft_separate": "baseline", "peft_adapter_names": "candidate", "peft_patched": "candidate",
                  "multilora": "candidate"}


def _mixed_params():
    d_out = SHAPES["d_outs"][0]
    return [pytest.param(base, d_out, T, mode, v, id=f"{base}-{SHAPES['d_in']}x{d_out}-T{T}-{mode}-{v}")
            for base in BASES for T in SHAPES["Ts"] for mode in MODES for v in MIXED_VARIANTS
            if not (v == "peft_adapter_names" and mode == "fwd_bwd")]


@pytest.mark.parametrize("base_kind, d_out, T, mode, variant", _mixed_params())
def test_mixed_batch(benchmark, base_kind, d_out, T, mode, variant):
    n, d_in = len(MIXED_RANKS), SHAPES["d_in"]
    seq = T // n  # one sequence per adapter: 16 equal runs
    layer = _peft_layer(base_kind, d_in, d_out, MIXED_RANKS, seed=7 * T + d_out)
    x, dy = _inputs(T, d_in, d_out, seq, seed=7 * T)
    names = [f"a{i}" for i in range(n)]
    params = _lora_params(layer)
    pos = {id(p): i for i, p in enumerate(params)}  # list.index would compare tensors by value

    def separate(xx):  # sample i through adapter i alone, as 16 PEFT passes
        outs = []
        for i, name in enumerate(names):
            layer.set_adapter(name)
            outs.append(layer(xx[i:i + 1]))
        return torch.cat(outs)

    def separate_run():
        if mode == "fwd":
            with torch.no_grad():
                y = separate(x)
            sync()
            return y, ()
        xg = x.detach().clone().requires_grad_()
        y, grads = [], [None] * (len(params) + 1)
        dxs = []
        for i, name in enumerate(names):  # one forward+backward per client, as sequential FL training does
            layer.set_adapter(name)
            xi = xg[i:i + 1].detach().requires_grad_()
            yi = layer(xi)
            own = [layer.lora_A[name].weight, layer.lora_B[name].weight]
            dxi, dA, dB = torch.autograd.grad(yi, [xi, *own], dy[i:i + 1])
            y.append(yi)
            dxs.append(dxi)
            grads[1 + pos[id(own[0])]], grads[1 + pos[id(own[1])]] = dA, dB
        grads[0] = torch.cat(dxs)
        for p in params:  # set_adapter froze the other adapters; the other variants train all
            p.requires_grad_(True)
        sync()
        return torch.cat(y), tuple(grads)

    ref = separate_run()
    if variant == "peft_separate":
        run = separate_run
    elif variant == "peft_adapter_names":
        run = _runner(lambda xx: layer(xx, adapter_names=names), params, x, dy, mode)
    elif variant == "peft_patched":
        holder = fedlora.patch_peft(_Holder(layer, False))

        def patched(xx):
            with fedlora.adapter_batch(holder, names):
                return holder.proj(xx)
        run = _runner(patched, params, x, dy, mode)
    else:
        ml = _multilora(layer)
        run = _runner(lambda xx: ml(xx, seg_lens=[1] * n), [ml.bank.A, ml.bank.B], x, dy, mode)
    out = run()
    if variant == "multilora" and mode == "fwd_bwd":  # repack PEFT's per-adapter grads, outside timing
        As = [ref[1][1 + pos[id(layer.lora_A[nm].weight)]] for nm in names]
        Bs = [ref[1][1 + pos[id(layer.lora_B[nm].weight)]] for nm in names]
        ref = (ref[0], (ref[1][0], torch.cat(As), torch.cat(Bs, dim=1)))
    err = _check(variant, out, ref)
    info = {"d_in": d_in, "d_out": d_out, "T": T, "seq": seq, "n_adapters": n, "ranks": MIXED_RANKS,
            "base": base_kind, "dtype": DTYPE_NAME, "mode": mode, "device": str(DEVICE), "device_name": device_name()}
    _timed(benchmark, run, f"mixed16 {mode} {base_kind} {d_in}x{d_out} T={T} {DTYPE_NAME}",
           variant, MIXED_VARIANTS[variant], info, err)
