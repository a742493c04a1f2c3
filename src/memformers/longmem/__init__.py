"""LongMem: a frozen backbone, a trainable SideNet and a chunked memory bank of past keys and values."""

from .attention import JointAttention
from .bank import MemoryBank
from .model import LongMem, LongMemConfig

__all__ = ["JointAttention", "LongMem", "LongMemConfig", "MemoryBank"]
