"""nn.Modules over the ops: MultiLoRALinear, DeltaLinear and the model-wide segment layout."""
from .delta import DeltaLinear, fold_deltas
from .layout import segments
from .multilora import MultiLoRALinear, keep_4bit_layout_trainable

__all__ = ["DeltaLinear", "MultiLoRALinear", "fold_deltas", "keep_4bit_layout_trainable", "segments"]
