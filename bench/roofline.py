"""Roofline model of fedlora's public ops at the benchmark shapes: predicted, never measured.

For each case the launch sequence is taken from the code, not written down here:

fedlora      the public op runs on CPU tensors inside ``kernels.dispatch.capture_launches()``
             (no kernel executes): every Triton launch is recorded with its arguments, and its
             grid comes from the launcher's own grid function for each GPU autotune config.
             The torch ops around the kernels (casts, autograd's accumulation of dx) are
             recorded by a TorchDispatchMode.
baselines    the benchmark suites' own variants (bench/test_bench_segmented.py's PeftLoop and
             PaddedBmm, FlexLoRA's per-client dense sum as in bench/test_bench_server.py) run on
             fake tensors (no memory, no arithmetic) under the same TorchDispatchMode, so every
             aten op they and autograd issue is counted.

Cost of one launch: FLOPs it issues (tensor-core tiles including their padding for the
Triton kernels, 2 M N K for a GEMM) and HBM bytes (compulsory traffic: every byte of every
tensor region it reads or writes, once; re-reads are assumed to hit L2). Predicted time:

    t = max(bytes / BW, flops / peak) / fill + LAUNCH_S
    fill = min(1, programs that do work / SMs)      (one program per SM at least; a launch
                                                     with fewer programs than SMs runs slower)

with peak the tensor-core rate of the dot's operand type (16-bit, tf32) or the fp32 FMA rate
(IEEE fp32 dots and cuBLAS SGEMM without tf32, torch's default). torch GEMMs are assumed to
split K (cuBLAS split-K) into ceil(K / 1024) slices when they have few output tiles of
128 x 128. For each Triton launch the config with the smallest predicted time is taken (what
the autotuner would pick if the model were right); the table names it.

Peaks (dense, no sparsity), from NVIDIA's datasheets (H100 Tensor Core GPU datasheet, SXM5
column; H200 Tensor Core GPU datasheet, SXM column; the datasheets print the 16-bit and tf32
figures with 2:4 sparsity, halved here):

    H100 SXM  HBM3 3.35 TB/s, BF16/FP16 989.4 TFLOP/s, TF32 494.7, FP32 66.9, 132 SMs
    H200 SXM  HBM3e 4.8 TB/s, BF16/FP16 989.4 TFLOP/s, TF32 494.7, FP32 66.9, 132 SMs

LAUNCH_S = 4 us per launch is an assumption (launch latency plus the gap between dependent
kernels in eager mode); it is the floor of every launch, ours and the baselines'. Eager
PyTorch's CPU cost per op (autograd bookkeeping) is not modelled, which favours the
many-launch baselines.

    python -m bench.roofline     writes bench/results/roofline.md and roofline.json
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fedlora import AdapterBank
from fedlora.kernels.dispatch import capture_launches, shipped_configs
from fedlora.ops import lora_delta, segmented_lora, segmented_lora_add_

RESULTS = Path(__file__).resolve().parent / "results"
LAUNCH_S = 4e-6
SPLIT_K_SLICE = 1024
CUBLAS_TILE = 128


@dataclass(frozen=True)
class Hardware:
    name: str
    bw: float  # bytes/s
    tc16: float  # 16-bit tensor-core FLOP/s
    tf32: float
    fp32: float  # FMA
    sms: int


HARDWARE = (
    Hardware("H100 SXM", 3.35e12, 989.4e12, 494.7e12, 66.9e12, 132),
    Hardware("H200 SXM", 4.8e12, 989.4e12, 494.7e12, 66.9e12, 132),
)


@dataclass
class Cost:
    """One launch: what it is, its work, and its predicted time per hardware."""

    name: str
    flops: float
    bytes: float
    math: str  # "tc16" | "tf32" | "fp32" | "none"
    programs: int  # programs (CTAs) that do work
    config: str = ""
    times: dict = field(default_factory=dict)

    def time(self, hw: Hardware) -> float:
        peak = {"tc16": hw.tc16, "tf32": hw.tf32, "fp32": hw.fp32, "none": math.inf}[self.math]
        fill = min(1.0, self.programs / hw.sms) if self.programs else 1.0
        return max(self.bytes / hw.bw, self.flops / peak) / fill + LAUNCH_S


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _esize(t) -> int:
    return t.element_size()


# ------------------------------------------------------ Triton kernel models
def _meta_math(native: bool, precision: str) -> str:
    return "tc16" if native else ("tf32" if precision == "tf32" else "fp32")


def _segments(a) -> list[tuple[int, int]]:
    """[(rows, rank)] per segment, read from the (CPU) plan tensors of a captured launch."""
    starts = a["seg_starts_ptr"].tolist()
    adapters = a["seg_adapters_ptr"].tolist()
    offsets = a["rank_offsets_ptr"].tolist()
    return [(starts[j + 1] - starts[j], offsets[adapters[j] + 1] - offsets[adapters[j]]) for j in range(len(adapters))]


def _used_rank(a) -> int:
    """Total rank of the adapters that own a non-empty segment (the factors a launch reads)."""
    offsets = a["rank_offsets_ptr"].tolist()
    starts = a["seg_starts_ptr"].tolist()
    used = {ad for j, ad in enumerate(a["seg_adapters_ptr"].tolist()) if starts[j + 1] > starts[j]}
    return sum(offsets[u + 1] - offsets[u] for u in used)


def _ceil(x, b):
    return -(-x // b) * b


def model_shrink(a, m) -> Cost:
    K, x, w = a["K"], a["x_ptr"], a["w_ptr"]
    BM, BR, BK = m["BLOCK_M"], m["BLOCK_R"], m["BLOCK_K"]
    segs = [(L, r) for L, r in _segments(a) if L]
    programs = sum(-(-L // BM) * -(-r // BR) for L, r in segs)
    flops = sum(-(-L // BM) * -(-r // BR) * 2 * BM * BR * _ceil(K, BK) for L, r in segs)
    rows = sum(L for L, _ in segs)
    nbytes = rows * K * _esize(x) + _used_rank(a) * K * _esize(w) + sum(L * r for L, r in segs) * 4
    return Cost("shrink", flops, nbytes, _meta_math(a["NATIVE_DOT"], a["PRECISION"]), programs)


def model_expand(a, m) -> Cost:
    N, h, w, out = a["N"], a["h_ptr"], a["w_ptr"], a["out_ptr"]
    BM, BN, BK = m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"]
    segs = [(L, r) for L, r in _segments(a) if L]
    n_tiles = -(-N // BN)
    programs = sum(-(-L // BM) * n_tiles for L, _ in segs)
    flops = sum(-(-L // BM) * n_tiles * 2 * BM * BN * _ceil(r, BK) for L, r in segs)
    rows = sum(L for L, _ in segs)
    out_bytes = rows * N * _esize(out) * (2 if a["ACCUMULATE"] else 1)
    nbytes = sum(L * r for L, r in segs) * 4 + _used_rank(a) * N * _esize(w) + out_bytes
    return Cost("expand+add" if a["ACCUMULATE"] else "expand", flops, nbytes,
                _meta_math(a["NATIVE_DOT"], a["PRECISION"]), programs)


def _chunks(a):
    """[(rank, rows, slot)] per outer chunk."""
    adapters = a["chunk_adapters_ptr"].tolist()
    ptr = a["chunk_piece_ptr"].tolist()
    bounds = a["piece_bounds_ptr"].tolist()
    slots = a["chunk_slots_ptr"].tolist()
    offsets = a["rank_offsets_ptr"].tolist()
    out = []
    for c, ad in enumerate(adapters):
        pieces = [(bounds[2 * p], bounds[2 * p + 1]) for p in range(ptr[c], ptr[c + 1])]
        out.append((offsets[ad + 1] - offsets[ad], pieces, slots[c]))
    return out


def model_outer(a, m) -> Cost:
    C, x, out = a["C"], a["x_ptr"], a["out_ptr"]
    BR, BC, BT = m["BLOCK_R"], m["BLOCK_C"], m["BLOCK_T"]
    c_tiles = -(-C // BC)
    programs = flops = nbytes = 0
    for r, pieces, slot in _chunks(a):
        rows = sum(hi - lo for lo, hi in pieces)
        steps = sum(-(-(hi - lo) // BT) for lo, hi in pieces)
        programs += -(-r // BR) * c_tiles
        flops += -(-r // BR) * c_tiles * 2 * BR * BC * BT * steps
        nbytes += rows * r * 4 + rows * C * _esize(x) + r * C * (4 if slot >= 0 else _esize(out))
    return Cost("outer", flops, nbytes, _meta_math(a["NATIVE_DOT"], a["PRECISION"]), programs)


def model_outer_reduce(a, m) -> Cost:
    C, out = a["C"], a["out_ptr"]
    info = a["split_info_ptr"].tolist()
    offsets = a["rank_offsets_ptr"].tolist()
    programs = nbytes = 0
    for i in range(0, len(info), 3):
        ad, _, chunks = info[i:i + 3]
        r = offsets[ad + 1] - offsets[ad]
        programs += -(-r // m["BLOCK_R"]) * -(-C // m["BLOCK_C"])
        nbytes += chunks * r * C * 4 + r * C * _esize(out)
    return Cost("outer reduce", 0, nbytes, "none", programs)


def model_reconstruct(a, m) -> Cost:
    M, N, b, A, out = a["M"], a["N"], a["b_ptr"], a["a_ptr"], a["out_ptr"]
    BM, BN, BK = m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"]
    offsets = a["layer_offsets_ptr"].tolist()
    tiles = -(-M // BM) * -(-N // BN)
    dots = {0: 1, 1: 1, 2: 2 if a["A_IS_BF16"] else 3}[a["DOT"]]
    flops = sum(tiles * 2 * BM * BN * _ceil(offsets[i + 1] - offsets[i], BK) * dots for i in range(len(offsets) - 1))
    nbytes = _bytes(b) + _bytes(A) + offsets[-1] * 4 + _bytes(out)
    math_kind = "tc16" if a["DOT"] else ("tf32" if a["PRECISION"] == "tf32" else "fp32")
    return Cost("reconstruct", flops, nbytes, math_kind, tiles * (len(offsets) - 1))


MODELS = {
    "_shrink_kernel": model_shrink,
    "_expand_kernel": model_expand,
    "_outer_kernel": model_outer,
    "_outer_reduce_kernel": model_outer_reduce,
    "_reconstruct_kernel": model_reconstruct,
}


def _python_function(obj):
    """The Python function under an autotuner / @triton.jit object (or the interpreter's stand-in)."""
    while not inspect.isfunction(obj):
        obj = obj.fn
    return obj


def triton_costs(launches, hw: Hardware) -> list[Cost]:
    costs = []
    for launch in launches:
        fn = _python_function(launch.kernel)
        name = fn.__name__
        args = inspect.signature(fn).bind_partial(*launch.args, **launch.kwargs).arguments
        best = None
        for config in shipped_configs(launch.kernel, args):
            cost = MODELS[name]({**args, **config.kwargs}, config.kwargs)
            grid = launch.grid(config.kwargs) if callable(launch.grid) else launch.grid
            cost.programs = min(cost.programs, math.prod(grid))
            cost.config = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in config.kwargs.items()) + \
                f" w{config.num_warps}"
            if best is None or cost.time(hw) < best.time(hw):
                best = cost
        costs.append(best)
    return costs


# ----------------------------------------------------------- torch op models
_FREE = {
    "view", "_unsafe_view", "t", "transpose", "permute", "slice", "select", "expand", "as_strided", "empty",
    "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "unsqueeze", "squeeze",
    "split", "split_with_sizes", "unbind", "_reshape_alias", "lift_fresh", "lift_fresh_copy", "_local_scalar_dense",
    "unfold", "diagonal", "narrow", "values", "indices", "set_", "resize_", "is_same_size", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "stride", "size", "numel", "dim", "is_contiguous",
}
_WRITE_ONLY = {"zero_", "fill_", "zeros", "zeros_like", "new_zeros", "full", "full_like", "ones", "ones_like"}
_GEMM = {"mm", "addmm", "bmm", "baddbmm"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _math_for(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "tc16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


class TorchOps(TorchDispatchMode):
    """Record every aten op that would be a kernel launch, with its FLOPs and bytes."""

    def __init__(self):
        super().__init__()
        self.costs: list[Cost] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace != "aten":
            return out
        name = func.overloadpacket.__name__
        if name in _FREE:
            return out
        ins = [t for t in _tensors((args, kwargs)) if t.dtype.is_floating_point or t.numel() > 1 << 16]
        outs = list(_tensors(out))
        if not ins and not any(t.dtype.is_floating_point for t in outs):
            return out  # host-side integer bookkeeping
        if name in _GEMM:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
            tiles = batch * -(-M // CUBLAS_TILE) * -(-N // CUBLAS_TILE)
            split = -(-K // SPLIT_K_SLICE) if tiles < 132 else 1
            cost = Cost(name, 2.0 * batch * M * N * K, sum(map(_bytes, ins)) + sum(map(_bytes, outs)),
                        _math_for(a.dtype), tiles * split)
        else:
            read = 0 if name in _WRITE_ONLY else sum(map(_bytes, ins))
            if name == "slice_backward":  # a full-size zero tensor with the gradient copied into a slice
                read = _bytes(args[0])
            cost = Cost(name, 0.0, read + sum(map(_bytes, outs)), "none", 0)
        self.costs.append(cost)
        return out


# --------------------------------------------------------------------- cases
@dataclass
class Sequence:
    """One variant of one case: its launches and totals per hardware."""

    variant: str
    launches: list[Cost]
    minimal_flops: float = 0.0
    minimal_bytes: float = 0.0
    minimal_math: str = "tc16"

    def total(self, hw: Hardware) -> float:
        return sum(c.time(hw) for c in self.launches)

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.launches)

    @property
    def bytes(self) -> float:
        return sum(c.bytes for c in self.launches)


def _fedlora_sequence(variant, hw, setup) -> Sequence:
    """``setup()`` makes the inputs (not recorded) and returns the call to model, which runs on
    real CPU tensors with Triton launches captured and torch ops recorded."""
    run = setup()
    torch_ops = TorchOps()
    with capture_launches() as launches, torch_ops:
        run()
    launches_costs = triton_costs(launches, hw)
    return Sequence(variant, launches_costs + torch_ops.costs)


def _fake_sequence(variant, run) -> Sequence:
    torch_ops = TorchOps()
    with FakeTensorMode(allow_non_fake_inputs=True), torch_ops:
        run()
    return Sequence(variant, torch_ops.costs)


def _bank(d_in, d_out, ranks, dtype, grad=False) -> AdapterBank:
    R = sum(ranks)
    A = torch.zeros(R, d_in, dtype=dtype, requires_grad=grad)
    B = torch.zeros(d_out, R, dtype=dtype, requires_grad=grad)
    return AdapterBank(A, B, list(ranks), [16.0 / r for r in ranks])


def _lora_sequence(hw, setup, T, ranks, seg_lens, d_in, d_out, dtype, backward) -> Sequence:
    """fedlora's recorded sequence for one LoRA case, with the minimal math beside it."""
    seq = _fedlora_sequence("fedlora", hw, setup)
    esize = torch.empty(0, dtype=dtype).element_size()
    seq.minimal_flops, seq.minimal_bytes = _lora_math(T, ranks, seg_lens, d_in, d_out, esize, backward)
    seq.minimal_math = _math_for(dtype)
    return seq


def _lora_math(T_rows, ranks, seg_lens, d_in, d_out, esize, backward: bool):
    """Minimal FLOPs / bytes of the math (every tensor read or written once per phase)."""
    used = {a for a, L in enumerate(seg_lens) if L}
    flops_fwd = sum(2.0 * L * ranks[a] * (d_in + d_out) for a, L in enumerate(seg_lens))
    factors = sum(ranks[a] for a in used) * (d_in + d_out) * esize
    fwd_bytes = T_rows * (d_in + d_out) * esize + factors
    if not backward:
        return flops_fwd, fwd_bytes
    # backward: read dY, x, A, B; write dx, dA, dB (H, G are O(T r), counted once each way)
    bwd_bytes = T_rows * (d_out + d_in) * esize * 2 + factors * 2
    return 3 * flops_fwd, fwd_bytes + bwd_bytes


def segmented_case(T, n, d, dtype, hw, ranks, seg_lens):
    """fedlora.ops.segmented_lora against the bench's peft_loop and padded_bmm, fwd and fwd+bwd."""
    from bench import test_bench_segmented as S

    out = {}
    for mode in ("fwd", "fwd_bwd"):
        backward = mode == "fwd_bwd"
        seqs = []

        def fed():
            bank = _bank(d, d, ranks, dtype, grad=backward)
            x = torch.empty(T, d, dtype=dtype, requires_grad=backward)
            dy = torch.empty(T, d, dtype=dtype)

            def run():
                y = segmented_lora(x, bank, seg_lens)
                if backward:
                    torch.autograd.grad(y, [x, bank.A, bank.B], dy)
            return run

        seqs.append(_lora_sequence(hw, fed, T, ranks, seg_lens, d, d, dtype, backward))
        case = _stub_case(T, n, d, dtype, ranks, seg_lens)
        for name, cls in (("peft_loop", S.PeftLoop), ("padded_bmm", S.PaddedBmm)):
            with _suite_dtype(S, dtype):  # the suite's variants build their tensors in its DTYPE
                variant = cls(case)

            def base_run(variant=variant):
                x = torch.empty(T, d, dtype=dtype, requires_grad=backward)
                y = variant(x)
                if backward:
                    torch.autograd.grad(y, [x, *variant.params], torch.empty_like(y))

            seqs.append(_fake_sequence(name, base_run))
        seqs.append(_base_gemm(T, d, d, dtype, backward))
        out[mode] = seqs
    return out


@contextlib.contextmanager
def _suite_dtype(module, dtype):
    previous = module.DTYPE
    module.DTYPE = dtype
    try:
        yield
    finally:
        module.DTYPE = previous


def _stub_case(T, n, d, dtype, ranks, seg_lens):
    """A bench Case whose tensors are zeros (the baselines' set-up only copies them)."""
    from bench import test_bench_segmented as S

    bank = _bank(d, d, ranks, dtype)
    z = torch.zeros(0, dtype=dtype)
    return S.Case(T, d, n, list(ranks), list(seg_lens), x=z, dy=z, W=z, bank=bank)


def _base_gemm(T, d_in, d_out, dtype, backward) -> Sequence:
    """The frozen base layer: y = x W^T, plus dx = dY W for a backward (no dW: frozen)."""
    def run():
        x = torch.empty(T, d_in, dtype=dtype, requires_grad=backward)
        W = torch.empty(d_out, d_in, dtype=dtype)
        y = torch.nn.functional.linear(x, W)
        if backward:
            torch.autograd.grad(y, [x], torch.empty_like(y))

    return _fake_sequence("base_gemm", run)


class _BaseStandIn(torch.autograd.Function):
    """The frozen base layer inside a layer case: an output and a dx, no work (the base GEMM
    is modelled on its own). It makes autograd meet the base's dx and the LoRA's dx, as in the
    real layer."""

    @staticmethod
    def forward(ctx, x, d_out):
        ctx.shape = x.shape
        return x.new_empty((x.shape[0], d_out))

    @staticmethod
    def backward(ctx, grad):
        return grad.new_empty(ctx.shape), None


def layer_case(T, d_in, d_out, ranks, seg_lens, adapter_dtype, base_dtype, hw):
    """MultiLoRALinear's LoRA path (cast to the adapters' dtype, segmented_lora_add_ into the
    base output, autograd adding the LoRA dx to the base's dx) against the base GEMM."""
    out = {}
    for mode in ("fwd", "fwd_bwd"):
        backward = mode == "fwd_bwd"

        def fed():
            bank = _bank(d_in, d_out, ranks, adapter_dtype, grad=backward)
            x = torch.empty(T, d_in, dtype=base_dtype, requires_grad=backward)
            dy = torch.empty(T, d_out, dtype=base_dtype)

            def run():
                base_out = _BaseStandIn.apply(x, d_out)
                y = segmented_lora_add_(base_out, x.to(adapter_dtype), bank.A, bank.B, bank.ranks, bank.scalings,
                                        seg_lens)
                if backward:
                    torch.autograd.grad(y, [x, bank.A, bank.B], dy)
            return run

        out[mode] = [_lora_sequence(hw, fed, T, ranks, seg_lens, d_in, d_out, adapter_dtype, backward),
                     _base_gemm(T, d_in, d_out, base_dtype, backward)]
    return out


def server_case(d_out, d_in, layers, clients, dtype, hw, seed=0):
    """lora_delta over `layers` banks against FlexLoRA's per-client dense sum (reconstruction only)."""
    import random

    rng = random.Random(seed)
    ranks = [rng.choice((4, 8, 16, 32, 64)) for _ in range(clients)]
    weights = [1.0 / clients] * clients

    def fed():
        bank = _bank(d_in, d_out, ranks, dtype)  # one bank object for every layer: same launches, less memory

        def run():
            try:
                lora_delta([bank] * layers, weights)
            except ValueError:  # its check of the result reads an output the captured launch never wrote
                pass
        return run

    fed_seq = _fedlora_sequence("fedlora lora_delta", hw, fed)
    R = sum(ranks)
    esize = torch.empty(0, dtype=dtype).element_size()
    fed_seq.minimal_flops = 2.0 * layers * d_out * d_in * R
    fed_seq.minimal_bytes = layers * (R * (d_in + d_out) * esize + d_out * d_in * esize)
    fed_seq.minimal_math = _math_for(dtype)

    def flexlora():
        for _ in range(layers):
            dW = torch.zeros(d_out, d_in, dtype=torch.float32)
            for i, r in enumerate(ranks):
                A_i, B_i = torch.empty(r, d_in, dtype=dtype), torch.empty(d_out, r, dtype=dtype)
                dW += (weights[i] * 16.0 / r) * (B_i.float() @ A_i.float())

    return {"reconstruct": [fed_seq, _fake_sequence("flexlora_dense_sum", flexlora)]}, ranks


# -------------------------------------------------------------------- report
def _fmt_t(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _fmt_b(b: float) -> str:
    return f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"


def _fmt_f(f: float) -> str:
    return f"{f / 1e12:.3f} TF" if f >= 1e11 else f"{f / 1e9:.2f} GF"


def build(quick: bool = False) -> dict:
    from bench.test_bench_segmented import layout

    report = {"hardware": [asdict(h) for h in HARDWARE], "launch_s": LAUNCH_S, "cases": []}
    seg_shapes = [(2048, 8), (8192, 32)] if quick else [(T, n) for T in (2048, 8192) for n in (8, 32, 64)]
    for hw in HARDWARE:
        for T, n in seg_shapes:
            ranks, seg_lens = layout(T, n)
            report["cases"].append(_case_entry("segmented_lora", f"T={T} d=4096 n={n} ranks 4..64 bf16", hw,
                                               segmented_case(T, n, 4096, torch.bfloat16, hw, ranks, seg_lens)))
        report["cases"].append(_case_entry("segmented_lora", "T=8192 d=4096 one adapter r=16 bf16", hw,
                                           segmented_case(8192, 1, 4096, torch.bfloat16, hw, [16], [8192])))
        layer_shapes = [(4096, 4096, 4096)] if quick else [(T, 4096, d_out) for d_out in (4096, 11008)
                                                            for T in (4096, 16384)]
        for T, d_in, d_out in layer_shapes:
            for adt in (torch.float32, torch.bfloat16):
                name = "fp32 adapters (PEFT default)" if adt == torch.float32 else "bf16 adapters"
                report["cases"].append(_case_entry(
                    "MultiLoRALinear", f"T={T} {d_in}->{d_out} bf16 base, one adapter r=16, {name}", hw,
                    layer_case(T, d_in, d_out, [16], [T], adt, torch.bfloat16, hw)))
                mixed = [4, 8, 16, 32] * 4
                report["cases"].append(_case_entry(
                    "MultiLoRALinear", f"T={T} {d_in}->{d_out} bf16 base, 16 adapters r 4..32, {name}", hw,
                    layer_case(T, d_in, d_out, mixed, [T // 16] * 16, adt, torch.bfloat16, hw)))
        for dtype in (torch.float32, torch.bfloat16):
            layers = 4 if quick else 32
            seqs, ranks = server_case(4096, 4096, layers, 100, dtype, hw)
            report["cases"].append(_case_entry(
                "lora_delta", f"FlexLoRA server step: {layers} layers 4096x4096, 100 clients ranks 4..64 "
                f"(R={sum(ranks)}), {str(dtype).removeprefix('torch.')}", hw, seqs))
    return report


def _case_entry(op, shape, hw, modes) -> dict:
    entry = {"op": op, "shape": shape, "hardware": hw.name, "modes": {}}
    for mode, seqs in modes.items():
        rows = []
        for s in seqs:
            rows.append({
                "variant": s.variant, "launches": len(s.launches), "flops": s.flops, "bytes": s.bytes,
                "time_s": s.total(hw), "minimal_flops": s.minimal_flops, "minimal_bytes": s.minimal_bytes,
                "minimal_time_s": Cost("math", s.minimal_flops, s.minimal_bytes, s.minimal_math, 0).time(hw) - LAUNCH_S
                if s.minimal_flops else None,
                # per-launch detail for fedlora only (the baselines' hundreds of aten ops stay summed)
                "kernels": [{"name": c.name, "config": c.config, "flops": c.flops, "bytes": c.bytes,
                             "math": c.math, "programs": c.programs, "time_s": c.time(hw)}
                            for c in s.launches] if s.variant.startswith("fedlora") else [],
            })
        entry["modes"][mode] = rows
    return entry


def _summary_rows(report: dict) -> list[str]:
    rows = ["| case | mode | fedlora launches | H100 fedlora | H200 fedlora | LoRA / base GEMM (H100, H200) "
            "| vs peft_loop (H100, H200) | vs padded_bmm (H100, H200) | vs FlexLoRA dense sum (H100, H200) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_key: dict = {}
    for case in report["cases"]:
        by_key.setdefault((case["op"], case["shape"]), {})[case["hardware"]] = case
    for (op, shape), per_hw in by_key.items():
        h100, h200 = per_hw["H100 SXM"], per_hw["H200 SXM"]
        for mode in h100["modes"]:
            cells = {}
            for hw_name, case in (("h100", h100), ("h200", h200)):
                rows_ = {r["variant"]: r for r in case["modes"][mode]}
                fed = next(r for v, r in rows_.items() if v.startswith("fedlora"))
                cells[hw_name] = (fed, rows_)

            def ratio(name, inverse=False):
                vals = []
                for hw_name in ("h100", "h200"):
                    fed, rows_ = cells[hw_name]
                    if name not in rows_:
                        return ""
                    other = rows_[name]["time_s"]
                    vals.append(f"{fed['time_s'] / other:.2f}" if inverse else f"{other / fed['time_s']:.1f}x")
                return ", ".join(vals)

            fed100 = cells["h100"][0]
            rows.append(f"| {op} {shape} | {mode} | {fed100['launches']} | {_fmt_t(fed100['time_s'])} | "
                        f"{_fmt_t(cells['h200'][0]['time_s'])} | {ratio('base_gemm', inverse=True)} | "
                        f"{ratio('peft_loop')} | {ratio('padded_bmm')} | {ratio('flexlora_dense_sum')} |")
    return rows


def markdown(report: dict) -> str:
    hw_lines = [f"- {h['name']}: HBM {h['bw'] / 1e12:.2f} TB/s, BF16/FP16 tensor {h['tc16'] / 1e12:.1f} TFLOP/s, "
                f"TF32 {h['tf32'] / 1e12:.1f}, FP32 {h['fp32'] / 1e12:.1f}, {h['sms']} SMs" for h in report["hardware"]]
    lines = [
        "# Roofline model of fedlora's ops: PREDICTED times, no measurement",
        "",
        "Generated by `python -m bench.roofline` (model and assumptions in its docstring and in "
        "bench/NOTES.md). No GPU has run these kernels; every time below is a prediction from",
        "t = max(bytes / BW, FLOPs / peak) / fill + 4 us per launch, over the launch sequence the code "
        "issues (Triton grids and tiles from the launchers, torch ops recorded from the real calls).",
        "Peaks (dense; NVIDIA H100 and H200 Tensor Core GPU datasheets, SXM):",
        "",
        *hw_lines,
        "",
        "## Summary",
        "",
        "`LoRA / base GEMM`: fedlora's predicted time over the frozen base layer's GEMM(s) in the same "
        "mode (fwd: y = x W^T; fwd_bwd: plus dx = dY W). `vs X`: X's predicted time over fedlora's.",
        "",
        *_summary_rows(report),
        "",
        "## Per case",
        "",
        "Columns: launches of the sequence; FLOPs and HBM bytes it issues; its predicted time; "
        "`x base`: time / the base GEMM's time; `minimal`: the math alone (each tensor read or "
        "written once per phase, at the dtype's peak, no launch cost).",
    ]
    for case in report["cases"]:
        lines += ["", f"### {case['op']} {case['shape']} — {case['hardware']}"]
        for mode, rows in case["modes"].items():
            base = next((r for r in rows if r["variant"] == "base_gemm"), None)
            lines += ["", f"**{mode}**", "", "| variant | launches | FLOPs | bytes | predicted | x base | minimal |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                xbase = f"{r['time_s'] / base['time_s']:.3f}" if base else ""
                minimal = _fmt_t(r["minimal_time_s"]) if r["minimal_time_s"] else ""
                lines.append(f"| {r['variant']} | {r['launches']} | {_fmt_f(r['flops'])} | {_fmt_b(r['bytes'])} | "
                             f"{_fmt_t(r['time_s'])} | {xbase} | {minimal} |")
            fed = next(r for r in rows if r["variant"].startswith("fedlora"))
            kern = "; ".join(f"{k['name']}" + (f" [{k['config']}, {k['programs']} programs]" if k["config"] else "")
                             + f" {_fmt_t(k['time_s'])}" for k in fed["kernels"])
            lines.append(f"\nfedlora launches: {kern}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    quick = "--quick" in (argv or sys.argv[1:])
    torch.set_num_threads(1)
    report = build(quick)
    suffix = "-quick" if quick else ""
    (RESULTS / f"roofline{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"roofline{suffix}.md").write_text(markdown(report))
    print(f"wrote bench/results/roofline{suffix}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
