"""memformers: any Hugging Face transformer reads millions of tokens through memory."""

from . import backbones
from .cache import SegmentCacheTransformer
from .knn import MemorizingTransformer
from .longmem import LongMem
from .recurrence import MemoryModel, RecurrentOutput, StepOutput
from .rmt import MemoryState, RecurrentMemoryTransformer
from .saving import load, save_pretrained
from .segments import Segment, split_into_segments, stream_segments

MECHANISMS = {
    cls.__name__: cls for cls in (RecurrentMemoryTransformer, MemorizingTransformer, LongMem, SegmentCacheTransformer)
}

__all__ = [
    "MECHANISMS",
    "LongMem",
    "MemorizingTransformer",
    "MemoryModel",
    "MemoryState",
    "RecurrentMemoryTransformer",
    "RecurrentOutput",
    "Segment",
    "SegmentCacheTransformer",
    "StepOutput",
    "backbones",
    "load",
    "save_pretrained",
    "split_into_segments",
    "stream_segments",
]
__version__ = "0.1.0"
