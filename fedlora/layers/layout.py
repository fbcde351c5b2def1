"""The segment layout of a batch, told once to a whole model, and the in-place add plumbing.

A LoRA layer needs to know which rows of its input go through which adapter.
:func:`segments` sets that layout on every :class:`~fedlora.layers.MultiLoRALinear`
of a model for the duration of a ``with`` block, so a transformers model can be
called unchanged::

    with fedlora.segments(model, seg_lens=[2, 1, 3], adapter_ids=[0, 4, 1]):
        loss = model(input_ids=batch).loss      # batch: 6 sequences

``seg_lens`` counts SAMPLES along dim 0 of each layer's input (sequences for a
[batch, seq, hidden] activation; rows for a [T, hidden] one): a segment is a
run of whole sequences, converted to rows at forward time
(:func:`sample_segments_to_rows`). The PEFT drop-in reads the same attribute.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


def writable(result: torch.Tensor) -> torch.Tensor:
    """``result``, or a copy of it when autograd would refuse an in-place add.

    A view may have been made inside another autograd.Function (bitsandbytes'
    4-bit and 8-bit matmuls return one); with grad mode on, autograd forbids
    modifying such views in place, so that case pays one copy (PEFT clones
    every 4-bit output). Inference (no grad) always adds in place, and so does
    a compiled graph, which AOTAutograd functionalizes as a whole.
    """
    if not torch.compiler.is_compiling() and torch.is_grad_enabled() and result._is_view():
        return result.clone()
    return result


def sample_segments_to_rows(x_shape, seg_lens) -> list[int]:
    """Per-sample segment lengths -> per-row lengths for an input of ``x_shape``.

    Dim 0 of the input counts samples and every dim between it and the last
    (features) is part of a sample: a [batch, seq, d_in] input has seq rows per
    sample, a [T, d_in] input one. Raises ValueError when the layout does not
    cover exactly x_shape[0] samples.
    """
    seg_lens = [int(n) for n in seg_lens]
    samples = x_shape[0] if len(x_shape) >= 2 else 1
    if any(n < 0 for n in seg_lens):
        raise ValueError(f"segment lengths must be non-negative, got {seg_lens}")
    if sum(seg_lens) != samples:
        raise ValueError(
            f"the segment layout covers {sum(seg_lens)} samples but the input has {samples} "
            f"(input shape {tuple(x_shape)}; lengths count samples along dim 0)"
        )
    rows_per_sample = math.prod(x_shape[1:-1])
    return [n * rows_per_sample for n in seg_lens]


LAYOUT_ATTR = "_fedlora_layout"


@contextlib.contextmanager
def segment_layout(modules, layout):
    """Set ``module._fedlora_layout = layout`` on every module; restore the previous ones on exit.

    The layers read their per-sample segment layout from this attribute, so a
    whole model is told once per batch and nested contexts unwind correctly.
    """
    modules = list(modules)
    previous = [getattr(m, LAYOUT_ATTR, None) for m in modules]
    for m in modules:
        setattr(m, LAYOUT_ATTR, layout)
    try:
        yield
    finally:
        for m, prev in zip(modules, previous):
            setattr(m, LAYOUT_ATTR, prev)


class SegmentedLayer(nn.Module):
    """A layer that routes segments of its input through adapters (MultiLoRALinear is one).

    It has a ``name`` (used in errors) and ``num_adapters``, and reads the layout
    :func:`segments` sets on it from the ``LAYOUT_ATTR`` attribute.
    """

    name: str
    num_adapters: int


def _multilora_layers(model: nn.Module) -> list[SegmentedLayer]:
    layers = []
    for qualname, module in model.named_modules():
        if isinstance(module, SegmentedLayer):
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
    with segment_layout(layers, layout):
        yield
