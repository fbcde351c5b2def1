"""MultiLoRALinear: a frozen linear base plus n LoRA adapters of their own ranks.

    y = base(x) + s_a * dropout(x) A_a^T B_a^T     for the rows of a segment using adapter a

The base is an ``nn.Linear`` or a bitsandbytes ``Linear4bit`` (NF4 / FP4, with
or without double quantization) / ``Linear8bitLt``; its forward stays its own
(bitsandbytes dequantizes and multiplies) and the LoRA part is accumulated into
its output in place (:func:`fedlora.ops.segmented_lora_add_`).

Segment layout: a layer takes it from ``layer(x, seg_lens=..., adapter_ids=...)``
or from the model-wide :func:`fedlora.segments` context (see :mod:`fedlora.layers.layout`).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from fedlora.bank import AdapterBank, check_ranks, lora_scaling
from fedlora.ops import segmented_lora_add_

from .layout import LAYOUT_ATTR, SegmentedLayer, sample_segments_to_rows, writable

def keep_4bit_layout_trainable(base: nn.Module) -> None:
    """Stop bitsandbytes repacking a 4-bit weight into its CPU inference layout.

    On CPUs with AVX512-BF16, Linear4bit converts its weight on the first no-grad
    eval() forward to a layout served by gemv_4bit, which has no autograd, and
    never converts back: training after an evaluation would then backpropagate
    through a kernel without a backward. Adapter training needs the trainable layout.
    """
    if hasattr(base, "support_avx512bf16_for_cpu"):
        base.support_avx512bf16_for_cpu = False


def _base_kind(base: nn.Module, name: str) -> str:
    bnb = sys.modules.get("bitsandbytes")  # a bitsandbytes layer implies the package is imported
    if bnb is not None:
        if isinstance(base, bnb.nn.Linear4bit):
            return "bnb-4bit"
        if isinstance(base, bnb.nn.Linear8bitLt):
            return "bnb-8bit"
    if isinstance(base, nn.Linear) and base.weight.dtype.is_floating_point:
        return "linear"
    raise TypeError(
        f"{name}: base layer of type {type(base).__module__}.{type(base).__qualname__} is not supported; "
        "use torch.nn.Linear, bitsandbytes.nn.Linear4bit or bitsandbytes.nn.Linear8bitLt"
    )


class MultiLoRALinear(SegmentedLayer):
    """A frozen base linear layer with an :class:`AdapterBank` of n LoRA adapters.

    Either ``ranks`` (with ``alphas``, default alpha = rank; ``use_rslora``) for
    a new bank with PEFT's initialisation (A Kaiming-uniform, B zero), or
    ``factors`` = [(A_i [r_i, d_in], B_i [d_out, r_i]), ...] with ``alphas`` or
    ``scalings``. ``lora_dropout`` is applied to the LoRA input only, in
    training mode, like PEFT's ``lora_dropout``. ``dtype`` of the adapters
    defaults to the base weight's dtype for fp32/fp64 bases and fp32 otherwise
    (PEFT's ``autocast_adapter_dtype``); the input is cast to it for the LoRA
    path and the LoRA result is added to the base output in the base's dtype.
    """

    def __init__(self, base: nn.Module, ranks=None, alphas=None, *, factors=None, scalings=None,
                 use_rslora: bool = False, lora_dropout: float = 0.0, dtype: torch.dtype | None = None,
                 name: str | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.name = name or f"MultiLoRALinear({type(base).__name__})"
        self.base_kind = _base_kind(base, self.name)
        base.requires_grad_(False)
        keep_4bit_layout_trainable(base)
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        if dtype is None:
            wdt = base.weight.dtype
            dtype = wdt if self.base_kind == "linear" and wdt in (torch.float32, torch.float64) else torch.float32
        device = base.weight.device
        if (ranks is None) == (factors is None):
            raise ValueError(f"{self.name}: give exactly one of ranks= (new adapters) or factors= (given adapters)")
        if factors is not None:
            factors = [(a.detach().to(device=device, dtype=dtype), b.detach().to(device=device, dtype=dtype))
                       for a, b in factors]
            ranks = [a.shape[0] for a, _ in factors]
        try:
            ranks = check_ranks(ranks)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        if scalings is not None and alphas is not None:
            raise ValueError(f"{self.name}: give alphas= or scalings=, not both")
        if scalings is None:
            alphas = ranks if alphas is None else alphas
            if isinstance(alphas, (int, float)):
                alphas = [alphas] * len(ranks)
            if len(alphas) != len(ranks):
                raise ValueError(f"{self.name}: {len(alphas)} alphas for {len(ranks)} adapters")
            scalings = [lora_scaling(float(a), r, use_rslora) for a, r in zip(alphas, ranks)]
        try:
            if factors is None:
                self.bank = AdapterBank.create(self.in_features, self.out_features, ranks, dtype=dtype,
                                               device=device, generator=generator)
                self.bank.scalings.copy_(torch.as_tensor(scalings, dtype=torch.float32))
            else:
                self.bank = AdapterBank.from_factors(factors, scalings)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from exc
        if (self.bank.d_in, self.bank.d_out) != (self.in_features, self.out_features):
            raise ValueError(
                f"{self.name}: adapters are for a {self.bank.d_in} -> {self.bank.d_out} layer "
                f"but the base is {self.in_features} -> {self.out_features}"
            )
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    @property
    def num_adapters(self) -> int:
        return self.bank.num_adapters

    def forward(self, x: torch.Tensor, seg_lens=None, adapter_ids=None) -> torch.Tensor:
        """``seg_lens`` (samples along dim 0) / ``adapter_ids``: this call's layout.

        Without them the layout of an enclosing :func:`segments` context is used;
        with neither, a single-adapter layer applies its adapter to every row.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input has {x.shape[-1]} features, expected {self.in_features}")
        if seg_lens is None:
            if adapter_ids is not None:
                raise ValueError(f"{self.name}: adapter_ids= given without seg_lens=")
            layout = getattr(self, LAYOUT_ATTR, None)
            if layout is not None:
                seg_lens, adapter_ids = layout
            elif self.bank.num_adapters == 1:
                seg_lens = [x.shape[0] if x.dim() >= 2 else 1]
            else:
                raise ValueError(
                    f"{self.name}: {self.bank.num_adapters} adapters but no segment layout; pass "
                    "seg_lens=/adapter_ids= or call the model inside fedlora.segments(model, ...)"
                )
        try:
            rows = sample_segments_to_rows(x.shape, seg_lens)
            result = self.base_layer(x)
            out2d = writable(result).reshape(-1, self.out_features)
            lx = self.lora_dropout(x.reshape(-1, self.in_features).to(self.bank.dtype))
            out2d = segmented_lora_add_(
                out2d, lx, self.bank.A, self.bank.B, self.bank.ranks, self.bank.scalings, rows, adapter_ids
            )
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from exc
        return out2d.view(result.shape)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, base={self.base_kind}, ranks={self.bank.ranks}"
