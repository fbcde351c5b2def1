"""AdapterBank structure: packing, views, PEFT initialisation."""
import math

import torch

import fedlora


def test_from_factors_packs_rows_and_columns():
    gen = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 5, generator=gen), torch.randn(7, r, generator=gen)) for r in (3, 1, 4)]
    bank = fedlora.AdapterBank.from_factors(factors, [0.5, 1.0, 2.0])
    assert bank.ranks == [3, 1, 4]
    assert bank.offsets == [0, 3, 4]
    assert bank.num_adapters == 3 and bank.total_rank == 8
    assert bank.A.shape == (8, 5) and bank.B.shape == (7, 8)
    assert bank.scalings.tolist() == [0.5, 1.0, 2.0]
    for i, (a, b) in enumerate(factors):
        got_a, got_b = bank.factors(i)
        assert torch.equal(got_a, a) and torch.equal(got_b, b)
    # Factors are views of the leaf parameters (so training one trains the bank).
    assert bank.factors(2)[0]._base is bank.A or bank.factors(2)[0].data_ptr() == bank.A[4:].data_ptr()


def test_create_uses_peft_init_and_scalings():
    gen = torch.Generator().manual_seed(1)
    bank = fedlora.AdapterBank.create(64, 32, [4, 16], alphas=[8, 16], generator=gen)
    assert torch.count_nonzero(bank.B) == 0
    bound = 1 / math.sqrt(64)
    assert bank.A.abs().max() <= bound and bank.A.abs().max() > 0.8 * bound
    assert bank.scalings.tolist() == [2.0, 1.0]
    rs = fedlora.AdapterBank.create(64, 32, [4, 16], alphas=[8, 16], use_rslora=True, generator=gen)
    assert torch.allclose(rs.scalings, torch.tensor([8 / 2.0, 16 / 4.0]))


def test_bank_moves_with_to():
    bank = fedlora.AdapterBank.create(8, 8, [2, 3], init="gaussian").to(torch.float16)
    assert bank.A.dtype == bank.B.dtype == torch.float16
    assert bank.scalings.dtype == torch.float32  # scalings stay fp32 for the kernels
