"""Memorizing Transformer (arXiv 2203.08913) around a pretrained Hugging Face decoder.

Chosen attention layers also attend to a non-differentiable store of the keys and values of past segments.
The state carried from segment to segment is one `KNNStore` per memory layer; each segment is otherwise read on its
own (positions restart at 0), so the backbone never sees more than `segment_size` positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from .. import backbone_layers, backbones
from ..mechanism import MechanismConfig, MemoryModel, check_choice, check_int, check_layers, resolve_layers
from ..recurrence import StepOutput
from ..segments import Segment, as_segment
from .attention import COMBINES, Combine, KNNAttention
from .store import BACKENDS, Backend, KNNStore

MAX_MEMORY_SIZE = 1 << 20


@dataclass
class KNNMemoryState:
    """The stores of every memory layer: values (a step returns new ones), holding no graph."""

    stores: list[KNNStore]

    def detach(self) -> KNNMemoryState:
        return self  # nothing in a store carries gradients

    def reset(self, rows: torch.Tensor) -> KNNMemoryState:
        return KNNMemoryState([store.reset(rows) for store in self.stores])

    def select(self, rows: torch.Tensor, other: KNNMemoryState) -> KNNMemoryState:
        # The driver's rows without tokens wrote nothing, so a state selected against itself is itself.
        return KNNMemoryState(
            [mine.select(rows, theirs) for mine, theirs in zip(self.stores, other.stores, strict=True)]
        )

    def nbytes(self) -> int:
        return sum(store.nbytes() for store in self.stores)


@dataclass(kw_only=True)
class KNNConfig(MechanismConfig):
    """kNN memory's knobs (and the driver's); defaults from the paper where it gives them."""

    fixed = ("alignment", "memory_layers", "combine", "normalize_keys")
    resizable = ("memory_size",)

    memory_layers: tuple[int, ...] = (-4,)  # decoder layers with memory; negative counts from the top
    memory_size: int = 65_536  # (key, value) pairs per batch row, head and memory layer, FIFO
    top_k: int = 32  # neighbours each query attends to
    combine: Combine = "gate"  # "gate" (the paper's per-head sigmoid gate) or "joint" (one softmax)
    normalize_keys: bool = False  # L2-normalised memory queries and keys, with a learned per-head temperature
    search: Backend = "torch"  # "torch" (exact, blockwise) or "faiss" (exact, CPU stores)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.memory_layers = check_layers("memory_layers", self.memory_layers)
        check_int("memory_size", self.memory_size, 1, MAX_MEMORY_SIZE)
        check_int("top_k", self.top_k, 1)
        check_choice("combine", self.combine, COMBINES)
        if not isinstance(self.normalize_keys, bool):
            raise ValueError(f"normalize_keys must be True or False, got {self.normalize_keys!r}")
        check_choice("search", self.search, BACKENDS)


class MemorizingTransformer(MemoryModel):
    """kNN memory in `memory_layers` of a Llama-family (Llama, Mistral, Qwen2, SmolLM2) or GPT-2 decoder.

    `memory_size` (key, value) pairs per batch row, head and memory layer, FIFO; each query attends to its `top_k`
    nearest by inner product. `combine` is "gate" (the paper's per-head sigmoid gate) or "joint" (one softmax over
    memory and local keys); either way a zero-initialised per-head mix keeps the pretrained outputs unchanged at
    first. `normalize_keys` L2-normalises memory queries and keys with a learned per-head temperature. `search` is
    "torch" (exact blockwise top-k, CPU or GPU) or "faiss" (exact, CPU stores). Knobs: `KNNConfig` (as keywords,
    or `config=`).
    """

    config_class = KNNConfig
    generates = True

    def __init__(self, backbone: transformers.PreTrainedModel | str, config: KNNConfig | None = None, **knobs) -> None:
        config = self.make_config(config, knobs)
        super().__init__(backbone, config)
        if not self.info.is_decoder:
            raise ValueError(
                f"backbone: kNN memory needs a decoder (Llama family or GPT-2), got {self.info.class_name}"
            )
        num_layers = len(backbone_layers.decoder_layers(self.backbone))
        resolved = resolve_layers("memory_layers", config.memory_layers, num_layers)
        self.content_size = config.segment_size
        self.token_level = self.info.head == "token"
        self.causal = True
        self.layers = nn.ModuleList(
            KNNAttention(
                backbone_layers.attention_adapter(self.backbone, layer),
                config.top_k,
                config.combine,
                config.normalize_keys,
                config.search,
            )
            for layer in resolved
        )

    # --- the two methods the driver needs --------------------------------------------------------------------

    def init_state(self, batch_size: int) -> KNNMemoryState:
        """Empty stores on the backbone's device, in its dtype."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
        reference = self.backbone.get_input_embeddings().weight
        stores = [
            KNNStore(
                batch_size,
                layer.adapter.num_kv_heads,
                layer.adapter.head_dim,
                self.memory_size,
                device=reference.device,
                dtype=reference.dtype,
            )
            for layer in self.layers
        ]
        return KNNMemoryState(stores)

    def step(
        self,
        segment: Segment | torch.Tensor,
        state: KNNMemoryState,
        logit_positions: torch.Tensor | None = None,  # [kept] positions needing token logits; None: all
    ) -> tuple[StepOutput, KNNMemoryState]:
        """One segment through the backbone: memory layers read their stores, then write the segment's tokens.
        Token logits only at `logit_positions` (the stores are written all the same)."""
        segment = as_segment(segment)
        if segment.input_ids.shape[1] > self.content_size:
            raise ValueError(f"segment has {segment.input_ids.shape[1]} tokens; this model takes {self.content_size}")
        if len(state.stores) != len(self.layers) or state.stores[0].batch_size != segment.batch_size:
            raise ValueError(
                f"state: {len(state.stores)} stores of batch {state.stores[0].batch_size} do not fit "
                f"{len(self.layers)} memory layers and a segment of batch {segment.batch_size}"
            )
        with self.memory(state, write_mask=segment.attention_mask) as written:
            embeds = self.backbone.get_input_embeddings()(segment.input_ids)
            keep = logit_positions if self.token_level else None
            logits, hidden = backbones.run_backbone(self.backbone, embeds, segment.attention_mask, logits_to_keep=keep)
        return StepOutput(logits=logits, hidden=hidden, logit_positions=keep), written.state

    @contextlib.contextmanager
    def memory(self, state: KNNMemoryState, write_mask: torch.Tensor | None = None) -> Iterator[_Written]:
        """`with model.memory(state) as written: backbone(...)`: for the duration of the block the memory layers
        take the place of the backbone's attention and read `state`; given a `write_mask` [batch, length] they also
        remember those tokens, and `written.state` is the new state after the block (`state` itself is unchanged)."""
        written = _Written(state)
        with contextlib.ExitStack() as patches:
            for layer, store in zip(self.layers, state.stores, strict=True):
                patches.enter_context(layer.patched())
                layer.store, layer.write_mask = store, write_mask
            try:
                yield written
                written.state = KNNMemoryState([layer.store for layer in self.layers])
            finally:
                for layer in self.layers:
                    layer.store = layer.write_mask = None

    def reset(self, state: KNNMemoryState, rows: torch.Tensor | None = None) -> KNNMemoryState:
        """`state` with the rows marked (every row when None) cleared: a new document starts there."""
        if rows is None:
            rows = torch.ones(state.stores[0].batch_size, dtype=torch.bool)
        return state.reset(rows)

    # --- generation -------------------------------------------------------------------------------------------

    def generate_from(
        self, state: KNNMemoryState, prompts: list[torch.Tensor], max_new_tokens: int = 32, **generate_kwargs
    ) -> torch.Tensor:  # [batch, new tokens]
        """Generate from each row's last segment, read locally while every generated token also retrieves from the
        memory written so far (`generate` writes the context). Keyword arguments go to the backbone's `generate`."""
        batch, device, dtype = len(prompts), prompts[0].device, prompts[0].dtype
        width = max(len(p) for p in prompts)
        if self.info.max_positions is not None and width + max_new_tokens > self.info.max_positions:
            raise ValueError(
                f"max_new_tokens={max_new_tokens}: the prompt segment ({width} tokens) and the new tokens exceed "
                f"the backbone's {self.info.max_positions} positions"
            )
        pad = backbones.special_id(self.backbone.config, "pad_token_id", "eos_token_id", "bos_token_id", fallback=0)
        ids = torch.full((batch, width), pad, dtype=dtype, device=device)
        mask = torch.zeros(batch, width, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):  # left padding, as generate expects
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        generate_kwargs.setdefault("pad_token_id", pad)
        with self.memory(state):
            out = self.backbone.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **generate_kwargs
            )
        return out[:, width:]


@dataclass
class _Written:
    """The state a `memory` block leaves behind (set when the block ends)."""

    state: KNNMemoryState
