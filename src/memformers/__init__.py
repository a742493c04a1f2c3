"""memformers: any Hugging Face transformer reads millions of tokens through memory."""

from . import backbones
from .armt import ARMTConfig, AssociativeMemoryTransformer
from .associative_memory import AssociativeState
from .cache import CacheConfig, SegmentCacheTransformer
from .knn import KNNConfig, MemorizingTransformer
from .longmem import LongMem, LongMemConfig
from .mechanism import MechanismConfig, MemoryModel
from .recurrence import RecurrentOutput, StepOutput
from .registry import MECHANISMS
from .rmt import MemoryState, RecurrentMemoryTransformer, RMTConfig
from .saving import load, save_pretrained
from .segments import Segment, split_into_segments, stream_segments

__all__ = [
    "MECHANISMS",
    "ARMTConfig",
    "AssociativeMemoryTransformer",
    "AssociativeState",
    "CacheConfig",
    "KNNConfig",
    "LongMem",
    "LongMemConfig",
    "MechanismConfig",
    "MemorizingTransformer",
    "MemoryModel",
    "MemoryState",
    "RMTConfig",
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
