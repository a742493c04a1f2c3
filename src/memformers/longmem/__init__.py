"""LongMem: a frozen backbone, a trainable SideNet and a chunked memory bank of past keys and values."""

from .attention import JointAttention
from .bank import MemoryBank
from .model import LongMem

__all__ = ["JointAttention", "LongMem", "MemoryBank"]
