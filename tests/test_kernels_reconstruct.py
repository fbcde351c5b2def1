"""reconstruct: B diag(c) A for several layers in one launch, every dot scheme against float64."""
import pytest
import torch

from fedlora.kernels import reconstruct as K

from .conftest import DEVICE, REL_TOL, rel_err

# fp32 output of 16-bit factors: the Triton kernel dots bf16 hi + lo parts of the fp32 tile
# B diag(c), 16 of its 24 bits (2^-17 relative each) with fp32 accumulation; the twin rounds
# B c to fp32 (2^-24). Both sit well under 1e-4 relative on these short sums.
SPLIT_TOL = 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", ["data", torch.float32])
def test_reconstruct_matches_float64_on_both_backends(backend, dtype, out_dtype):
    out_dtype = dtype if out_dtype == "data" else out_dtype
    gen = torch.Generator().manual_seed(17)
    layer_ranks, m, n = [5, 19, 1], 23, 30  # ranks straddle the 16-wide K tiles
    R = sum(layer_ranks)
    B = torch.randn(m, R, generator=gen).to(DEVICE, dtype)
    A = torch.randn(R, n, generator=gen).to(DEVICE, dtype)
    # weights x scalings: not 16-bit numbers, over two orders of magnitude
    c = (torch.rand(R, generator=gen) * 0.9 + 0.01).to(DEVICE)
    out = K.reconstruct(B, A, c, layer_ranks, out_dtype)
    assert out.shape == (3, m, n) and out.dtype == out_dtype
    start = 0
    for layer, r in enumerate(layer_ranks):
        ks = slice(start, start + r)
        ref = (B[:, ks].double() * c[ks].double()) @ A[ks].double()
        tol = REL_TOL[out_dtype] if out_dtype != torch.float32 or dtype == torch.float32 else SPLIT_TOL
        assert rel_err(out[layer], ref) < tol, (layer, K._dot_scheme(dtype, out_dtype))
        start += r


def test_dot_scheme_per_dtype():
    assert K._dot_scheme(torch.float32, torch.float32) == K.FP32_DOT
    assert K._dot_scheme(torch.bfloat16, torch.bfloat16) == K.NATIVE_DOT
    assert K._dot_scheme(torch.float16, torch.float16) == K.NATIVE_DOT
    assert K._dot_scheme(torch.bfloat16, torch.float32) == K.SPLIT_DOT
    assert K._dot_scheme(torch.float16, torch.float32) == K.SPLIT_DOT
