"""kNN memory (Memorizing Transformers): a store of past keys and values read by chosen attention layers."""

from .attention import KNNAttention, attention_lse
from .model import KNNConfig, KNNMemoryState, MemorizingTransformer
from .store import KNNStore, faiss_search, torch_search

__all__ = [
    "KNNAttention",
    "KNNConfig",
    "KNNMemoryState",
    "KNNStore",
    "MemorizingTransformer",
    "attention_lse",
    "faiss_search",
    "torch_search",
]
