"""The segment-cache baseline (Transformer-XL style) around any Hugging Face decoder.

Each segment attends to itself and to the previous segment's keys and values, kept detached, through the
backbone's own generation cache (a `transformers.DynamicCache`): no backbone code is touched. It is the baseline a
memory mechanism has to beat: a window of two segments, with no memory beyond it.

Positions. The cached keys are the ones the backbone computes for the previous segment *on its own*, at positions
[0, len_prev); the current segment reads them at positions [len_prev, len_prev + n). So every step is exactly the
bare backbone run on [previous ; current] (seen from the current tokens), for rotary (Llama family: the relative
offsets are right because cached keys were rotated at the very positions they are read at) and absolute (GPT-2,
OPT: positions stay below 2·segment_size) families alike, and positions never grow with the input's length.
The price is a second, cache-free pass over each segment (under `no_grad`, without the head) to produce those keys:
the keys computed while attending to the cache would carry older segments into the window and sit at positions
the next segment cannot read them at without re-rotation. So information flows exactly one segment back; a
Transformer-XL whose cache holds states computed with their own cache reaches further, but needs relative
position encodings that pretrained Hugging Face decoders do not have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from transformers import DynamicCache

from . import backbone_layers, backbones
from .mechanism import MechanismConfig, MemoryModel
from .recurrence import StepOutput
from .segments import Segment, as_segment


@dataclass
class CacheState:
    """The previous segment's keys and values per layer, and which of its positions hold real tokens."""

    keys: tuple[torch.Tensor, ...]  # per layer [batch, kv_heads, width, head_dim]; () before the first segment
    values: tuple[torch.Tensor, ...]  # per layer [batch, kv_heads, width, head_dim]
    mask: torch.Tensor  # [batch, width] long, 1 = a real cached token (right-padded)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def detach(self) -> CacheState:
        return CacheState(tuple(k.detach() for k in self.keys), tuple(v.detach() for v in self.values), self.mask)

    def reset(self, rows: torch.Tensor) -> CacheState:
        """A new document sees no cache: its cached positions are masked out."""
        return CacheState(self.keys, self.values, self.mask.masked_fill(rows.view(-1, 1), 0))

    def select(self, rows: torch.Tensor, other: CacheState) -> CacheState:
        width = max(self.width, other.width)
        a, b = self._padded(width), other._padded(width)
        if not a.keys and not b.keys:  # neither side has a cache yet
            return CacheState((), (), torch.where(rows.view(-1, 1), a.mask, b.mask))
        a, b = a._shaped_like(b), b._shaped_like(a)
        pick = rows.view(-1, 1, 1, 1)
        return CacheState(
            tuple(torch.where(pick, x, y) for x, y in zip(a.keys, b.keys, strict=True)),
            tuple(torch.where(pick, x, y) for x, y in zip(a.values, b.values, strict=True)),
            torch.where(rows.view(-1, 1), a.mask, b.mask),
        )

    def _shaped_like(self, other: CacheState) -> CacheState:
        """An empty cache as zeros (all masked) in the shape of `other`'s; a filled one unchanged."""
        if self.keys or not other.keys:
            return self
        zeros = lambda tensors: tuple(torch.zeros_like(t) for t in tensors)  # noqa: E731
        return CacheState(zeros(other.keys), zeros(other.values), self.mask)

    def _padded(self, width: int) -> CacheState:
        """Zero keys and masked positions on the right up to `width` (an empty cache takes its shape from none)."""
        extra = width - self.width
        if extra == 0:
            return self
        mask = F.pad(self.mask, (0, extra))
        if not self.keys:
            return CacheState((), (), mask)
        pad = lambda t: F.pad(t, (0, 0, 0, extra))  # noqa: E731
        return CacheState(tuple(map(pad, self.keys)), tuple(map(pad, self.values)), mask)


@dataclass(kw_only=True)
class CacheConfig(MechanismConfig):
    """The segment cache has no knobs of its own: a segment and the one before it."""


class SegmentCacheTransformer(MemoryModel):
    """A decoder reading segment by segment, each segment attending also to the previous one (detached cache).

    `backbone` is a decoder `transformers.PreTrainedModel` (causal-LM head or base model) or a name for
    `memformers.backbones.load`. `segment_size` tokens of input per segment; attention spans up to twice that,
    so `2·segment_size` must fit the backbone's positions. Knobs: `CacheConfig` (as keywords, or `config=`).
    """

    config_class = CacheConfig
    generates = True

    def __init__(
        self, backbone: transformers.PreTrainedModel | str, config: CacheConfig | None = None, **knobs
    ) -> None:
        config = self.make_config(config, knobs)
        super().__init__(backbone, config, span=2)  # a segment and its cache
        backbone = self.backbone
        if not self.info.is_decoder or self.info.head not in ("token", "none"):
            raise ValueError(
                f"backbone: the segment cache needs a decoder with a causal-LM head or none, got "
                f"{self.info.class_name} ({self.info.kind}, head {self.info.head!r})"
            )
        self.content_size = config.segment_size
        self.token_level = self.info.head == "token"
        self.causal = True
        self._takes_positions = backbone_layers.takes_position_ids(backbone)

    def init_state(self, batch_size: int) -> CacheState:
        """No cache before the first segment."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        device = self.backbone.get_input_embeddings().weight.device
        return CacheState((), (), torch.zeros(batch_size, 0, dtype=torch.long, device=device))

    def step(
        self,
        segment: Segment | torch.Tensor,
        state: CacheState,
        logit_positions: torch.Tensor | None = None,  # [kept] positions needing token logits; None: all
    ) -> tuple[StepOutput, CacheState]:
        """The segment behind the previous one's cache; its own cache-free keys and values become the next cache.
        Token logits only at `logit_positions`."""
        segment = as_segment(segment)
        ids, mask = segment.input_ids, segment.attention_mask  # [batch, n], right-padded
        batch, n = ids.shape
        if n > self.content_size:
            raise ValueError(f"segment has {n} tokens; this model takes at most {self.content_size}")
        if state.mask.shape[0] != batch:
            raise ValueError(f"state has {state.mask.shape[0]} rows, the segment {batch}")
        # Padding sits at the end of each row, so under the causal mask no real token can see it: every query
        # gets a visible key (no all-masked softmax rows) and real tokens are unaffected.
        ones = torch.ones_like(mask)
        arange = torch.arange(n, device=ids.device).unsqueeze(0).expand(batch, -1)  # [batch, n]
        past = None
        if state.keys:
            past = DynamicCache(ddp_cache_data=list(zip(state.keys, state.values, strict=True)))
            attention = torch.cat([state.mask, ones], dim=1)  # [batch, width + n]
            positions = state.mask.sum(dim=1, keepdim=True) + arange  # after the row's cached tokens
        else:
            attention, positions = ones, arange
        embeds = self.backbone.get_input_embeddings()(ids)  # [batch, n, hidden]
        logits, hidden = backbones.run_backbone(
            self.backbone,
            embeds,
            attention,
            positions if self._takes_positions else None,
            logits_to_keep=logit_positions if self.token_level else None,
            cache=past,
        )
        logits = logits if self.token_level else None

        with torch.no_grad():  # the next cache: this segment alone at positions [0, n), detached by construction
            base = self.backbone.base_model
            cache = DynamicCache(config=base.config)
            alone: dict = {"attention_mask": ones, **backbone_layers.cache_arguments(base, cache)}
            if self._takes_positions:
                alone["position_ids"] = arange
            base(input_ids=ids, **alone)
        keys = tuple(layer.keys for layer in cache.layers)
        values = tuple(layer.values for layer in cache.layers)
        output = StepOutput(logits=logits, hidden=hidden, logit_positions=logit_positions if self.token_level else None)
        return output, CacheState(keys, values, mask)

    def generate_from(
        self, state: CacheState, prompts: list[torch.Tensor], max_new_tokens: int = 32, **generate_kwargs
    ) -> torch.Tensor:  # [batch, new tokens]
        """Generate from each row's last segment behind the previous segment's cache (`generate` reads the context).

        The prompt sees exactly what a training step would: the previous segment's cache-free keys and values at
        positions [0, len_prev), then itself. The backbone's own `generate` continues from that cache (its input
        starts with placeholder ids where the cached tokens stand, which it never reads again); keyword arguments
        go to it.
        """
        device, dtype = prompts[0].device, prompts[0].dtype
        batch, cached = state.mask.shape
        width = max(len(p) for p in prompts)
        pad = backbones.special_id(self.backbone.config, "pad_token_id", "eos_token_id", "bos_token_id", fallback=0)
        ids = torch.full((batch, cached + width), pad, dtype=dtype, device=device)
        mask = torch.cat([state.mask, torch.zeros(batch, width, dtype=torch.long, device=device)], 1)
        for row, prompt in enumerate(prompts):  # [cache, right-padded][prompt, left-padded]
            ids[row, cached + width - len(prompt) :] = prompt
            mask[row, cached + width - len(prompt) :] = 1
        if state.keys:
            past = DynamicCache(ddp_cache_data=list(zip(state.keys, state.values, strict=True)))
            generate_kwargs.update(backbone_layers.cache_arguments(self.backbone, past))
        generate_kwargs.setdefault("pad_token_id", pad)
        out = self.backbone.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **generate_kwargs
        )
        return out[:, cached + width :]
