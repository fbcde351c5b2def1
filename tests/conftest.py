"""Shared test set-up.

Without a GPU, Triton kernels run in Triton's CPU interpreter; the variable must
be set before triton is imported, hence here. On a GPU machine the kernels are
compiled for real (set TRITON_INTERPRET=1 yourself to force the interpreter).
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile's on-disk cache is keyed by the traced graph, not by a custom op's Python source, so an
# entry left by an older checkout (/tmp/torchinductor_<user> is shared by every checkout on a machine)
# can replay a stale op. Each test session compiles into a fresh cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fedlora-inductor-"))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative Frobenius-norm error bounds ||out - ref|| / ||ref|| against float64
# references (device tool's METHOD.md: fp32 far under 1e-3, tf32 near 3e-4,
# bf16 operands 1e-3..1e-2). fp16 sits between: 10 mantissa bits.
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float64: 1e-12}
if torch.cuda.is_available():
    REL_TOL[torch.float32] = 1e-3  # Triton's fp32 dot may use tf32 when torch allows it


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere counts as failure (inf)."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test once on the torch twins and once on the Triton kernels."""
    monkeypatch.setenv("FEDLORA_BACKEND", request.param)
    return request.param
