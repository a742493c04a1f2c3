"""FLOPs of one forward pass over a long input: full attention against segment recurrence.

Why: memory mechanisms exist because full attention is quadratic in the input length; this module puts numbers
on it with the standard per-token count that the RMT paper (arXiv 2304.11062) uses.

The count, per position a model computes (multiply and add = 2 FLOPs):

    flops_per_position = 2·N + 2·2·L·context·d

- `N` = the non-embedding parameters (attention and feed-forward weights) + the output projection d·vocab:
  every weight is used once per position. Embedding look-ups, norms, biases and the softmax are left out.
- `2·2·L·context·d`: attention scores (q·k) and the weighted sum of values, each 2·context·d per layer, where
  `context` is how many positions each one attends to.

Full attention over `length` tokens: `length` positions, `context = length`. This is the paper's count (its RMT is
a BERT encoder, where every token attends to the whole input; a causal model computed with a dense mask does the
same work). A causal count with `context = length / 2` on average halves the attention term and gives ratios about
half the paper's (×139 and ×14 instead of ×295 and ×29), so it is not what the paper used.

RMT with `segment_size`-position segments (memory included, the paper's 512) of which `content` hold input tokens
(encoder: segment − m − 3, decoder: segment − 2m): ceil(length / content) segments, each `segment_size` positions
with `context = segment_size`. Linear in the length.

With the paper's setting (segments of 512 positions, 10 memory tokens, 4096 segments = 2,043,904 tokens) this
gives full/RMT = ×277 for OPT-125M and ×27.7 for OPT-175B; the paper reports ×295 and ×29. The paper's figure
treats every 512 input tokens as one segment of 512 positions (the memory's positions not taken from the input):
`overhead=0` at 2,097,152 = 4096·512 tokens gives ×292 and ×29.1, within 1.2% of the paper.

kNN memory (Memorizing Transformers): local attention inside a segment (no memory tokens) plus, in each of the
`memory_layers`, an exact search of every query against the stored keys (2·d per key: all heads together) and
attention to the `top_k` retrieved (key, value) pairs (2·2·k·d). The store holds min(tokens before the segment,
memory_size) keys, so the search cost grows with the length until the store is full, then it is linear.

LongMem: a frozen backbone of L layers without its head, a SideNet of L/2 layers of the same width with the shared
output projection, both attending within a segment; one SideNet layer retrieves `top_k_chunks` chunks of
`chunk_size` tokens by an exact search over the stored chunk keys (memory_size / chunk_size of them) and attends
to their tokens.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Layout = Literal["encoder", "decoder"]


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a transformer, all the FLOPs count needs."""

    name: str
    layers: int
    d_model: int
    ffn: int
    heads: int
    vocab: int
    kv_heads: int | None = None  # grouped-query attention: fewer key/value heads (None = heads)
    gated: bool = False  # gated feed-forward (SwiGLU: three matrices instead of two)

    def __post_init__(self) -> None:
        for field in ("layers", "d_model", "ffn", "heads", "vocab"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an int ≥ 1, got {value!r}")

    @property
    def non_embedding_params(self) -> int:
        """Attention (q, k, v, o) and feed-forward weight matrices of all layers."""
        d = self.d_model
        kv = d * (self.kv_heads or self.heads) // self.heads
        attention = 2 * d * d + 2 * d * kv
        feed_forward = (3 if self.gated else 2) * d * self.ffn
        return self.layers * (attention + feed_forward)

    @property
    def weight_params(self) -> int:
        """N of the count: non-embedding parameters plus the output projection d·vocab."""
        return self.non_embedding_params + self.d_model * self.vocab


# OPT paper (arXiv 2205.01068) Table 1: layers, heads, d_model; feed-forward 4·d_model; GPT-2 BPE vocabulary as
# released (50,272 rows).
_OPT_TABLE = {
    "125m": (12, 12, 768),
    "350m": (24, 16, 1024),
    "1.3b": (24, 32, 2048),
    "2.7b": (32, 32, 2560),
    "6.7b": (32, 32, 4096),
    "13b": (40, 40, 5120),
    "30b": (48, 56, 7168),
    "66b": (64, 72, 9216),
    "175b": (96, 96, 12288),
}
OPT_VOCAB = 50272
OPT_CONFIGS: dict[str, ModelSpec] = {
    f"opt-{size}": ModelSpec(f"opt-{size}", layers, d, 4 * d, heads, OPT_VOCAB)
    for size, (layers, heads, d) in _OPT_TABLE.items()
}

_GATED_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo"})


def _first(config, *names: str):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def spec_from_config(config) -> ModelSpec:
    """A `ModelSpec` from a `transformers.PretrainedConfig` (any family that names its sizes the usual ways)."""
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    d = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    vocab = _first(config, "vocab_size")
    if None in (layers, d, heads, vocab):
        raise ValueError(
            f"config: a {type(config).__name__} without layers/hidden size/heads/vocab "
            f"({layers}, {d}, {heads}, {vocab}); give an HF decoder or encoder config"
        )
    ffn = _first(config, "intermediate_size", "ffn_dim", "n_inner") or 4 * d
    model_type = getattr(config, "model_type", "") or ""
    act = str(_first(config, "hidden_act", "activation_function") or "")
    gated = model_type in _GATED_MODEL_TYPES or act in ("silu", "swiglu")
    name = getattr(config, "_name_or_path", "") or model_type or type(config).__name__
    kv_heads = _first(config, "num_key_value_heads")
    return ModelSpec(str(name), int(layers), int(d), int(ffn), int(heads), int(vocab), kv_heads, gated)


def resolve_spec(model: str | os.PathLike | ModelSpec | object) -> ModelSpec:
    """'opt-125m' … 'opt-175b', a `ModelSpec`, an HF config object, or a folder holding a config.json."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, (str, os.PathLike)):
        key = str(model).lower()
        if key in OPT_CONFIGS:
            return OPT_CONFIGS[key]
        if Path(model).is_dir():
            import transformers

            return spec_from_config(transformers.AutoConfig.from_pretrained(model, local_files_only=True))
        raise ValueError(f"config must be one of {sorted(OPT_CONFIGS)}, a folder with config.json, got {str(model)!r}")
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):
        return spec_from_config(model)
    raise ValueError(f"config must be an OPT name, a ModelSpec, an HF config or a folder, got {type(model).__name__}")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int ≥ {low}, got {value!r}")
    return value


def forward_flops(spec: ModelSpec, positions: int, context: float) -> float:
    """FLOPs of `positions` positions each attending to `context` positions: positions·(2N + 4·L·context·d)."""
    return positions * (2 * spec.weight_params + 4 * spec.layers * context * spec.d_model)


def full_attention_flops(model, length: int) -> float:
    """One forward pass over the whole input: quadratic in `length`."""
    spec = resolve_spec(model)
    _check_int("length", length, 1)
    return forward_flops(spec, length, length)


def rmt_content(segment_size: int, memory_tokens: int, layout: Layout = "encoder", overhead: int | None = None) -> int:
    """Input tokens per RMT segment: segment_size minus memory (and special) positions."""
    _check_int("segment_size", segment_size, 1)
    _check_int("memory_tokens", memory_tokens, 0)
    if layout not in ("encoder", "decoder"):
        raise ValueError(f"layout must be 'encoder' or 'decoder', got {layout!r}")
    if overhead is None:
        overhead = (memory_tokens + 3 if memory_tokens else 2) if layout == "encoder" else 2 * memory_tokens
    _check_int("overhead", overhead, 0)
    content = segment_size - overhead
    if content < 1:
        raise ValueError(f"segment_size={segment_size} leaves no content after {overhead} memory/special positions")
    return content


def rmt_flops(
    model,
    length: int,
    segment_size: int = 512,
    memory_tokens: int = 10,
    layout: Layout = "encoder",
    overhead: int | None = None,
) -> float:
    """RMT: ceil(length / content) segments of `segment_size` positions, each attending within the segment."""
    spec = resolve_spec(model)
    _check_int("length", length, 1)
    content = rmt_content(segment_size, memory_tokens, layout, overhead)
    segments = math.ceil(length / content)
    return segments * forward_flops(spec, segment_size, segment_size)


def _stored_keys(length: int, segment: int, capacity: int) -> float:
    """Σ over segments of min(tokens before the segment, capacity): the keys each query of a segment searches."""
    segments = math.ceil(length / segment)
    full_from = math.ceil(capacity / segment)  # first segment index whose store is full
    growing = min(segments, full_from)
    total = segment * growing * (growing - 1) / 2  # Σ_{i<growing} i·segment
    total += capacity * max(0, segments - full_from)
    return total


def knn_flops(
    model,
    length: int,
    segment_size: int = 512,
    memory_layers: int = 1,
    top_k: int = 32,
    memory_size: int = 65_536,
) -> float:
    """Memorizing Transformer: local attention in segments plus exact kNN search and top-k attention."""
    spec = resolve_spec(model)
    _check_int("length", length, 1)
    _check_int("segment_size", segment_size, 1)
    _check_int("memory_layers", memory_layers, 0)
    _check_int("top_k", top_k, 1)
    _check_int("memory_size", memory_size, 1)
    if memory_layers > spec.layers:
        raise ValueError(f"memory_layers={memory_layers} exceeds the model's {spec.layers} layers")
    segments = math.ceil(length / segment_size)
    local = segments * forward_flops(spec, segment_size, segment_size)
    d = spec.d_model
    search = 2 * d * segment_size * _stored_keys(length, segment_size, memory_size)  # every query, every key
    attend = 4 * top_k * d * segments * segment_size
    return local + memory_layers * (search + attend)


def longmem_flops(
    model,
    length: int,
    segment_size: int = 1024,
    memory_size: int = 65_536,
    chunk_size: int = 4,
    top_k_chunks: int = 16,
    side_layers: int | None = None,
) -> float:
    """LongMem: frozen backbone (no head) + SideNet (L/2 layers, shared head) + chunk retrieval in one layer."""
    spec = resolve_spec(model)
    _check_int("length", length, 1)
    _check_int("segment_size", segment_size, 1)
    _check_int("memory_size", memory_size, 1)
    _check_int("chunk_size", chunk_size, 1)
    _check_int("top_k_chunks", top_k_chunks, 1)
    side = max(1, spec.layers // 2) if side_layers is None else _check_int("side_layers", side_layers, 1)
    d = spec.d_model
    per_layer = spec.non_embedding_params // spec.layers
    segments = math.ceil(length / segment_size)
    positions = segments * segment_size
    backbone = positions * (2 * spec.non_embedding_params + 4 * spec.layers * segment_size * d)
    sidenet = positions * (2 * (side * per_layer + d * spec.vocab) + 4 * side * segment_size * d)
    chunk_keys = _stored_keys(length, segment_size, memory_size) / chunk_size  # Σ chunks searched per segment
    search = 2 * d * segment_size * chunk_keys
    attend = 4 * top_k_chunks * chunk_size * d * positions
    return backbone + sidenet + search + attend


@dataclass
class FlopsReport:
    """FLOPs of every mechanism at one length, and the full/RMT ratio."""

    config: str
    length: int
    segment_size: int
    memory_tokens: int
    full_attention_flops: float
    rmt_flops: float
    ratio: float
    knn_flops: float | None = None
    longmem_flops: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def compare(
    model,
    length: int,
    segment_size: int = 512,
    memory_tokens: int = 10,
    layout: Layout = "encoder",
    overhead: int | None = None,
    knn: dict | None = None,
    longmem: dict | None = None,
) -> FlopsReport:
    """Full attention against RMT at `length` (and kNN / LongMem when their keyword arguments are given)."""
    spec = resolve_spec(model)
    full = full_attention_flops(spec, length)
    rmt = rmt_flops(spec, length, segment_size, memory_tokens, layout, overhead)
    return FlopsReport(
        config=spec.name,
        length=length,
        segment_size=segment_size,
        memory_tokens=memory_tokens,
        full_attention_flops=full,
        rmt_flops=rmt,
        ratio=full / rmt,
        knn_flops=None if knn is None else knn_flops(spec, length, **knn),
        longmem_flops=None if longmem is None else longmem_flops(spec, length, **longmem),
    )


def plot_flops(
    model,
    lengths: list[int],
    path: str | Path,
    segment_size: int = 512,
    memory_tokens: int = 10,
    knn: dict | None = None,
    longmem: dict | None = None,
) -> Path:
    """Log-log FLOPs against length for full attention, RMT, kNN memory and LongMem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = resolve_spec(model)
    curves = {
        "full attention": [full_attention_flops(spec, n) for n in lengths],
        f"RMT ({segment_size}, m={memory_tokens})": [rmt_flops(spec, n, segment_size, memory_tokens) for n in lengths],
        "kNN memory": [knn_flops(spec, n, **(knn or {})) for n in lengths],
        "LongMem": [longmem_flops(spec, n, **(longmem or {})) for n in lengths],
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, values in curves.items():
        ax.loglog(lengths, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("forward FLOPs")
    ax.set_title(f"{spec.name}: forward FLOPs against length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
