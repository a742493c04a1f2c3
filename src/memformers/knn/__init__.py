"""kNN memory (Memorizing Transformers): a store of past keys and values read by chosen attention layers."""

from .attention import KNNAttention, local_attention
from .model import KNNMemoryState, MemorizingTransformer
from .store import KNNStore, faiss_search, torch_search

__all__ = [
    "KNNAttention",
    "KNNMemoryState",
    "KNNStore",
    "MemorizingTransformer",
    "faiss_search",
    "local_attention",
    "torch_search",
]
