"""Bad input to segmented_lora and AdapterBank: a ValueError that names the problem."""
import pytest
import torch

import fedlora
from fedlora.ops import segmented_lora


@pytest.fixture
def bank():
    gen = torch.Generator().manual_seed(0)
    return fedlora.AdapterBank.from_factors(
        [(torch.randn(r, 8, generator=gen), torch.randn(6, r, generator=gen)) for r in (2, 3)], [1.0, 0.5]
    )


@pytest.fixture
def x():
    return torch.randn(10, 8)


def test_seg_lens_must_sum_to_rows(bank, x):
    with pytest.raises(ValueError, match="seg_lens sum to 9 but x has 10 rows"):
        segmented_lora(x, bank, [4, 5])


def test_negative_segment_length(bank, x):
    with pytest.raises(ValueError, match="seg_lens must be non-negative"):
        segmented_lora(x, bank, [12, -2])


def test_non_integer_segment_lengths(bank, x):
    with pytest.raises(ValueError, match="seg_lens must hold integers"):
        segmented_lora(x, bank, torch.tensor([5.0, 5.0]))


def test_adapter_id_out_of_range(bank, x):
    with pytest.raises(ValueError, match=r"adapter_ids \[2\] out of range for a bank of 2"):
        segmented_lora(x, bank, [5, 5], [0, 2])


def test_negative_adapter_id(bank, x):
    with pytest.raises(ValueError, match="adapter_ids .* out of range"):
        segmented_lora(x, bank, [5, 5], [-1, 0])


def test_adapter_ids_wrong_length(bank, x):
    with pytest.raises(ValueError, match="adapter_ids has 3 entries but seg_lens has 2"):
        segmented_lora(x, bank, [5, 5], [0, 1, 1])


def test_default_adapter_ids_need_enough_adapters(bank, x):
    with pytest.raises(ValueError, match="3 segments and only 2 adapters"):
        segmented_lora(x, bank, [3, 3, 4])


def test_feature_mismatch(bank):
    with pytest.raises(ValueError, match="x has 7 features but the bank's d_in is 8"):
        segmented_lora(torch.randn(10, 7), bank, [10])


def test_dtype_mismatch(bank, x):
    with pytest.raises(ValueError, match="x is torch.float16 but the bank is torch.float32"):
        segmented_lora(x.half(), bank, [10])


def test_device_mismatch(bank):
    x_meta = torch.empty(10, 8, device="meta")
    with pytest.raises(ValueError, match="x is on meta but the bank is on cpu"):
        segmented_lora(x_meta, bank, [10])


def test_x_must_be_2d(bank):
    with pytest.raises(ValueError, match=r"x must be a 2-D tensor \[T, d_in\], got \(2, 5, 8\)"):
        segmented_lora(torch.randn(2, 5, 8), bank, [10])


def test_bank_must_be_an_adapter_bank(x):
    with pytest.raises(ValueError, match="bank must be a fedlora.AdapterBank"):
        segmented_lora(x, torch.nn.Linear(8, 6), [10])


def test_empty_bank_from_factors():
    with pytest.raises(ValueError, match="factors is empty"):
        fedlora.AdapterBank.from_factors([])


def test_empty_bank_from_ranks():
    with pytest.raises(ValueError, match="ranks is empty"):
        fedlora.AdapterBank(torch.empty(0, 8), torch.empty(6, 0), [])


def test_rank_zero_rejected():
    with pytest.raises(ValueError, match="ranks must all be >= 1"):
        fedlora.AdapterBank(torch.randn(2, 8), torch.randn(6, 2), [2, 0])


def test_factor_rank_mismatch():
    with pytest.raises(ValueError, match=r"factors\[0\]: A has rank 3 but B has rank 2"):
        fedlora.AdapterBank.from_factors([(torch.randn(3, 8), torch.randn(6, 2))])


def test_factor_layer_shape_mismatch():
    with pytest.raises(ValueError, match=r"factors\[1\] is for a 6x9 layer"):
        fedlora.AdapterBank.from_factors([(torch.randn(2, 8), torch.randn(6, 2)), (torch.randn(2, 9), torch.randn(6, 2))])


def test_scalings_wrong_length():
    with pytest.raises(ValueError, match="scalings has 3 entries but the bank has 1 adapters"):
        fedlora.AdapterBank.from_factors([(torch.randn(2, 8), torch.randn(6, 2))], [1.0, 2.0, 3.0])


def test_backend_variable_checked(monkeypatch, bank, x):
    monkeypatch.setenv("FEDLORA_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FEDLORA_BACKEND='cuda-please' is not one of"):
        segmented_lora(x, bank, [10])
