"""Run PEFT's LoRA layers through fedlora's segmented ops, and train mixed-adapter batches.

``patch_peft(model)`` gives every ``peft.tuners.lora.Linear`` and PEFT's
bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` LoRA layer an instance-level
``forward`` that computes the same thing through
:func:`fedlora.ops.segmented_lora_add_`. Nothing else on the module
changes: parameters, names and state_dict keys stay PEFT's, so
``save_pretrained`` / ``PeftModel.from_pretrained`` / ``get_peft_model_state_dict``
are unaffected, and ``unpatch_peft(model)`` deletes the instance attribute to
restore PEFT's own forward. The packed A / B are ``torch.cat`` of PEFT's own
per-adapter weights built inside forward, so autograd reaches PEFT's parameters.

Cases fedlora does not compute (DoRA and the other LoRA variants, ``lora_bias``,
PEFT's inference-time ``adapter_names=``, disabled or merged adapters) go to
PEFT's own forward; layer types fedlora does not handle at all (embedding,
conv, other quantization backends) are left unpatched. Each unaccelerated
layer type is warned about once.

``with adapter_batch(model, names_per_sample):`` trains several named adapters
of different ranks in one batch: sample i goes through adapter
``names_per_sample[i]`` only ("__base__": no adapter), so each adapter gets
exactly the gradient of training it alone on its own samples. PEFT itself
refuses ``adapter_names=`` in training mode. Make every adapter trainable first,
e.g. ``model.set_requires_grad(names)``.
"""
from __future__ import annotations

import contextlib
import types
import warnings

import torch
from torch import nn

from fedlora.layers import keep_4bit_layout_trainable
from fedlora.layers.layout import LAYOUT_ATTR, sample_segments_to_rows, segment_layout, writable
from fedlora.ops import segmented_lora_add_

_NAME_ATTR = "_fedlora_name"
_BASE = "__base__"
_warned: set = set()


def _lora_layer_class():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _supported_types() -> tuple[type, ...]:
    from peft.tuners.lora import bnb as lora_bnb
    from peft.tuners.lora.layer import Linear

    # Exact types only: a subclass may compute something else in its forward.
    extra = tuple(getattr(lora_bnb, n) for n in ("Linear8bitLt", "Linear4bit") if hasattr(lora_bnb, n))
    return (Linear,) + extra


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _unsupported_reason(layer, adapter: str) -> str | None:
    """Why fedlora cannot compute ``adapter`` on ``layer`` (None: it can)."""
    if adapter in layer.lora_variant:
        return f"the LoRA variant {type(layer.lora_variant[adapter]).__name__}"
    if getattr(layer.lora_B[adapter], "bias", None) is not None:
        return "lora_bias=True"
    return None


def _is_patched(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, types.MethodType) and fwd.__func__ is _patched_forward


def _name(layer) -> str:
    return getattr(layer, _NAME_ATTR, None) or type(layer).__name__


def _scalings(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _lora_weights(layer, adapter: str, x: torch.Tensor):
    """(A, B) of one adapter in the dtype the LoRA path runs in.

    Like PEFT: the input is cast to lora_A's dtype, except under autocast, where
    PEFT's lora_A / lora_B run in the autocast dtype; fedlora casts the factors
    to it (differentiably) since its op needs one dtype for x, A and B.
    """
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        A, B = A.to(dtype), B.to(dtype)
    return A, B


def _patched_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    layout = getattr(self, LAYOUT_ATTR, None)
    if layout is not None and kwargs.get("adapter_names") is not None:
        raise ValueError(f"{_name(self)}: adapter_names= cannot be combined with fedlora.adapter_batch")
    if layout is not None and self.merged and not self.disable_adapters:
        raise ValueError(f"{_name(self)}: a mixed-adapter batch needs unmerged adapters; call unmerge_adapter() first")
    if (kwargs.get("adapter_names") is not None or self.disable_adapters or self.merged
            or any(kwargs.get(k) is not None for k in VARIANT_KWARG_KEYS)):
        return type(self).forward(self, x, *args, **kwargs)
    for k in VARIANT_KWARG_KEYS:
        kwargs.pop(k, None)
    if layout is None:
        return _all_active_forward(self, x, args, kwargs)
    return _mixed_forward(self, x, args, kwargs, layout)


def _all_active_forward(self, x, args, kwargs):
    """PEFT's default: every active adapter's output is added on every row."""
    names = [a for a in self.active_adapters if a in self.lora_A]
    for a in names:
        reason = _unsupported_reason(self, a)
        if reason is not None:
            _warn_once((type(self), reason), f"fedlora: {_type_name(self)} layers with {reason} "
                       f"(e.g. {_name(self)!r}, adapter {a!r}) run PEFT's own forward")
            return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    if not names:
        return result
    x2d = x.reshape(-1, x.shape[-1])
    out2d = writable(result).reshape(-1, result.shape[-1])
    for a in names:  # PEFT's order; each adapter has its own dropout mask, as in PEFT
        A, B = _lora_weights(self, a, x)
        lx = self.lora_dropout[a](x2d.to(A.dtype))
        out2d = segmented_lora_add_(
            out2d, lx, A, B, [A.shape[0]], _scalings([self.scaling[a]], x.device), [x2d.shape[0]]
        )
    return out2d.view(result.shape)


def _mixed_forward(self, x, args, kwargs, layout):
    """Segment j (seg_counts[j] samples) goes through adapter seg_names[j] only."""
    seg_counts, seg_names = layout
    try:
        rows = sample_segments_to_rows(x.shape, seg_counts)
    except ValueError as exc:
        raise ValueError(f"{_name(self)}: fedlora.adapter_batch: {exc}") from exc
    used = []
    for n in seg_names:
        if n in self.lora_A and n not in used:
            used.append(n)
    for n in used:
        reason = _unsupported_reason(self, n)
        if reason is not None:
            raise ValueError(f"{_name(self)}: adapter {n!r} uses {reason}; mixed-adapter batches support plain LoRA only")
    result = self.base_layer(x, *args, **kwargs)
    if not used:
        return result
    weights = [_lora_weights(self, n, x) for n in used]
    dtype = weights[0][0].dtype
    As = [A.to(dtype) for A, _ in weights]
    Bs = [B.to(dtype) for _, B in weights]
    ranks = [A.shape[0] for A in As]
    scalings = [float(self.scaling[n]) for n in used]
    ids = [used.index(n) if n in used else len(used) for n in seg_names]
    if len(used) in ids:
        # Rows of "__base__" (or of adapters this layer lacks) get a rank-1 zero
        # adapter with scaling 0: every row needs a segment, and it adds exactly 0.
        As.append(As[0].new_zeros(1, As[0].shape[1]))
        Bs.append(Bs[0].new_zeros(Bs[0].shape[0], 1))
        ranks.append(1)
        scalings.append(0.0)
    x2d = x.reshape(-1, x.shape[-1]).to(dtype)
    if not all(isinstance(self.lora_dropout[n], nn.Identity) for n in used):
        pieces, start = [], 0
        for length, n in zip(rows, seg_names):
            seg = x2d[start:start + length]
            pieces.append(self.lora_dropout[n](seg) if n in used else seg)
            start += length
        x2d = torch.cat(pieces)
    out2d = writable(result).reshape(-1, result.shape[-1])
    out2d = segmented_lora_add_(
        out2d, x2d, torch.cat(As) if len(As) > 1 else As[0], torch.cat(Bs, dim=1) if len(Bs) > 1 else Bs[0],
        ranks, _scalings(scalings, x.device), rows, ids,
    )
    return out2d.view(result.shape)


def _lora_layers(model: nn.Module):
    LoraLayer = _lora_layer_class()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def patch_peft(model: nn.Module) -> nn.Module:
    """Route the model's PEFT LoRA linear layers through fedlora's ops (in place; returns model)."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"fedlora.patch_peft: {type(model).__name__} holds no PEFT LoRA layer")
    supported = _supported_types()
    for name, layer in layers:
        if _is_patched(layer):
            continue
        if type(layer) not in supported:
            _warn_once(type(layer), f"fedlora.patch_peft: {_type_name(layer)} layers (e.g. {name!r}) are not "
                       "accelerated by fedlora and keep PEFT's own forward")
            continue
        if "forward" in layer.__dict__:
            _warn_once(("hooked", type(layer)), f"fedlora.patch_peft: {name!r} ({_type_name(layer)}) already has a "
                       "replaced forward (an accelerate hook?) and keeps it")
            continue
        for adapter in layer.lora_A:
            reason = _unsupported_reason(layer, adapter)
            if reason is not None:
                _warn_once((type(layer), reason), f"fedlora.patch_peft: {_type_name(layer)} layers with {reason} "
                           f"(e.g. {name!r}, adapter {adapter!r}) run PEFT's own forward")
        setattr(layer, _NAME_ATTR, name)
        keep_4bit_layout_trainable(layer.get_base_layer())
        layer.forward = types.MethodType(_patched_forward, layer)
    return model


def unpatch_peft(model: nn.Module) -> nn.Module:
    """Restore PEFT's own forward on every layer :func:`patch_peft` changed."""
    for _, layer in _lora_layers(model):
        if _is_patched(layer):
            del layer.__dict__["forward"]
            layer.__dict__.pop(_NAME_ATTR, None)
    return model


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names_per_sample):
    """Within the context, sample i of every batch goes through adapter ``adapter_names_per_sample[i]``.

    Samples are dim 0 of the activations (sequences); runs of equal names form
    segments, so grouping each adapter's samples together is fastest but not
    required. Works in training and inference; the model must be patched by
    :func:`patch_peft`.
    """
    names = list(adapter_names_per_sample)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError("fedlora.adapter_batch: adapter_names_per_sample must be a non-empty list of adapter names")
    layers = _lora_layers(model)
    known = set()
    for _, layer in layers:
        known.update(layer.lora_A.keys())
        known.update(getattr(layer, "lora_embedding_A", {}).keys())
    unknown = sorted(set(names) - known - {_BASE})
    if unknown:
        raise ValueError(f"fedlora.adapter_batch: unknown adapter names {unknown}; the model holds {sorted(known)}")
    wanted = set(names) - {_BASE}
    for name, layer in layers:
        holds = wanted & (set(layer.lora_A.keys()) | set(getattr(layer, "lora_embedding_A", {}).keys()))
        if holds and not _is_patched(layer):
            raise ValueError(
                f"fedlora.adapter_batch: {name!r} ({_type_name(layer)}) holds adapters {sorted(holds)} but is not "
                "patched by fedlora, and PEFT's own forward cannot mix adapters in one batch; call "
                "fedlora.patch_peft(model) first (embedding/conv LoRA layers are not supported)"
            )
    seg_counts, seg_names = [], []
    for n in names:
        if seg_names and seg_names[-1] == n:
            seg_counts[-1] += 1
        else:
            seg_counts.append(1)
            seg_names.append(n)
    layout = (tuple(seg_counts), tuple(seg_names))
    patched = [layer for _, layer in layers if _is_patched(layer)]
    with segment_layout(patched, layout):
        yield
