"""The one list of mechanisms: name → (model class, config class).

Saving and loading, the trainer's TOML, `bench` and the CLI read it; nothing else lists mechanisms. A new mechanism
is one module (its config, model and state) and one line here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .armt import ARMTConfig, AssociativeMemoryTransformer
from .cache import CacheConfig, SegmentCacheTransformer
from .knn import KNNConfig, MemorizingTransformer
from .longmem import LongMem, LongMemConfig
from .mechanism import MechanismConfig, MemoryModel
from .rmt import RecurrentMemoryTransformer, RMTConfig


@dataclass(frozen=True)
class Mechanism:
    """A mechanism as the rest of the library sees it."""

    name: str  # what configs and commands call it ("rmt")
    model: type[MemoryModel]
    config: type[MechanismConfig]
    label: str  # for tables and plots


MECHANISMS: dict[str, Mechanism] = {
    m.name: m
    for m in (
        Mechanism("rmt", RecurrentMemoryTransformer, RMTConfig, "RMT"),
        Mechanism("armt", AssociativeMemoryTransformer, ARMTConfig, "ARMT"),
        Mechanism("knn", MemorizingTransformer, KNNConfig, "kNN memory"),
        Mechanism("longmem", LongMem, LongMemConfig, "LongMem"),
        Mechanism("cache", SegmentCacheTransformer, CacheConfig, "segment cache"),
    )
}


def get(name: str) -> Mechanism:
    """The mechanism called `name`, or whose model class is called so (saved files name the class)."""
    for mechanism in MECHANISMS.values():
        if name in (mechanism.name, mechanism.model.__name__):
            return mechanism
    raise ValueError(f"mechanism must be one of {tuple(MECHANISMS)}, got {name!r}")


def of(model: MemoryModel) -> Mechanism:
    """The registry entry of a built model."""
    for mechanism in MECHANISMS.values():
        if type(model) is mechanism.model:
            return mechanism
    raise ValueError(f"model: {type(model).__name__} is not a registered mechanism ({tuple(MECHANISMS)})")
