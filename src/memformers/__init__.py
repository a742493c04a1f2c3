"""memformers: any Hugging Face transformer reads millions of tokens through memory."""

from . import backbones
from .recurrence import MemoryModel, RecurrentOutput, StepOutput
from .rmt import MemoryState, RecurrentMemoryTransformer
from .saving import load, save_pretrained
from .segments import Segment, split_into_segments, stream_segments

MECHANISMS = {cls.__name__: cls for cls in (RecurrentMemoryTransformer,)}

__all__ = [
    "MECHANISMS",
    "MemoryModel",
    "MemoryState",
    "RecurrentMemoryTransformer",
    "RecurrentOutput",
    "Segment",
    "StepOutput",
    "backbones",
    "load",
    "save_pretrained",
    "split_into_segments",
    "stream_segments",
]
__version__ = "0.1.0"
