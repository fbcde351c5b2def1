"""MultiLoRALinear: a frozen linear base plus n LoRA adapters of their own ranks.

    y = base(x) + s_a * dropout(x) A_a^T B_a^T     for the rows of a segment using adapter a

The base is an ``nn.Linear`` or a bitsandbytes ``Linear4bit`` (NF4 / FP4, with
or without double quantization) / ``Linear8bitLt``; its forward stays its own
(bitsandbytes dequantizes and multiplies) and the LoRA part is accumulated into
its output in place (:func:`fedlora.ops_fused.segmented_lora_add_`).

Segment layout. A layer needs to know which rows go through which adapter.
It takes it from ``layer(x, seg_lens=..., adapter_ids=...)`` or, so that a
transformers model can be called unchanged, from a context set once for the
whole model::

    with fedlora.segments(model, seg_lens=[2, 1, 3], adapter_ids=[0, 4, 1]):
        loss = model(input_ids=batch).loss      # batch: 6 sequences

``seg_lens`` counts SAMPLES along dim 0 of each layer's input (sequences for a
[batch, seq, hidden] activation; rows for a [T, hidden] one): a segment is a
run of whole sequences, converted to rows at forward time.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from . import ops_fused
from .bank import AdapterBank, lora_scaling

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


class MultiLoRALinear(nn.Module):
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
        ranks = [int(r) for r in ranks]
        if not ranks or any(r < 1 for r in ranks):
            raise ValueError(f"{self.name}: every adapter needs rank >= 1, got ranks {ranks}")
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
            layout = getattr(self, ops_fused.LAYOUT_ATTR, None)
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
            rows = ops_fused.sample_segments_to_rows(x.shape, seg_lens)
            result = self.base_layer(x)
            out2d = ops_fused.writable(result).reshape(-1, self.out_features)
            lx = self.lora_dropout(x.reshape(-1, self.in_features).to(self.bank.dtype))
            out2d = ops_fused.segmented_lora_add_(
                out2d, lx, self.bank.A, self.bank.B, self.bank.ranks, self.bank.scalings, rows, adapter_ids
            )
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from exc
        return out2d.view(result.shape)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, base={self.base_kind}, ranks={self.bank.ranks}"


def _multilora_layers(model: nn.Module) -> list[MultiLoRALinear]:
    layers = []
    for qualname, module in model.named_modules():
        if isinstance(module, MultiLoRALinear):
            if module.name.startswith("MultiLoRALinear(") and qualname:
                module.name = qualname  # errors then name the layer as the model does
            layers.append(module)
    return layers


@contextlib.contextmanager
def segments(model: nn.Module, seg_lens, adapter_ids=None):
    """Set the segment layout of every :class:`MultiLoRALinear` in ``model``.

    ``seg_lens[j]`` consecutive samples (dim 0 of the model's activations, i.e.
    sequences) use adapter ``adapter_ids[j]`` (default j). The previous layout
    (an enclosing context) is restored on exit.
    """
    layers = _multilora_layers(model)
    if not layers:
        raise ValueError(f"fedlora.segments: {type(model).__name__} holds no MultiLoRALinear layer")
    if isinstance(seg_lens, torch.Tensor):
        seg_lens = seg_lens.tolist()
    if isinstance(adapter_ids, torch.Tensor):
        adapter_ids = adapter_ids.tolist()
    layout = (tuple(int(n) for n in seg_lens), None if adapter_ids is None else tuple(int(a) for a in adapter_ids))
    if layout[1] is not None and len(layout[1]) != len(layout[0]):
        raise ValueError(f"fedlora.segments: {len(layout[1])} adapter_ids for {len(layout[0])} segments")
    for layer in layers:
        bad = [a for a in (layout[1] or range(len(layout[0]))) if not 0 <= a < layer.num_adapters]
        if bad:
            raise ValueError(f"fedlora.segments: {layer.name!r} has {layer.num_adapters} adapters; adapter ids {bad} do not exist")
    with ops_fused.segment_layout(layers, layout):
        yield
