"""Recurrent Memory Transformer (arXiv 2207.06881, 2304.11062) around any Hugging Face encoder or decoder.

Memory vectors go in through `inputs_embeds` beside each segment's tokens; the backbone's last-layer states at the
memory positions become the next segment's memory. The backbone itself is never edited.

Layouts (`segment_size` positions at most, padding only at the end of a row):
- encoder: `[CLS] memory×m [SEP] content [SEP]`, bidirectional; content = segment_size − m − 3
  (with m = 0 the memory block and its [SEP] vanish: the backbone's own `[CLS] content [SEP]`).
- decoder: `[read memory ; content ; write memory]` under the backbone's own causal mask: every content and write
  token sees all of the read memory, the write memory sees everything; content = segment_size − 2m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

from . import backbones
from .mechanism import MechanismConfig, MemoryModel, check_choice, check_int
from .recurrence import StepOutput
from .segments import Segment, as_segment


@dataclass
class MemoryState:
    """The memory carried between segments."""

    memory: torch.Tensor  # [batch, memory, hidden]
    initial: torch.Tensor  # [memory, hidden]: what a new document starts from

    def detach(self) -> MemoryState:
        return MemoryState(self.memory.detach(), self.initial)

    def reset(self, rows: torch.Tensor) -> MemoryState:
        fresh = self.initial.to(self.memory.dtype).expand_as(self.memory)
        return MemoryState(torch.where(rows.view(-1, 1, 1), fresh, self.memory), self.initial)

    def select(self, rows: torch.Tensor, other: MemoryState) -> MemoryState:
        return MemoryState(torch.where(rows.view(-1, 1, 1), self.memory, other.memory), self.initial)


@dataclass(kw_only=True)
class RMTConfig(MechanismConfig):
    """RMT's knobs (and the driver's)."""

    fixed = ("alignment", "num_memory_tokens")

    num_memory_tokens: int = 10  # m memory vectors (the papers use 10); 0: the backbone alone on the same segments
    kind: str | None = None  # "encoder" or "decoder"; None: from the backbone
    cls_token_id: int | None = None  # encoder layout's [CLS] and [SEP]; None: from the backbone's config/tokenizer
    sep_token_id: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_memory_tokens", self.num_memory_tokens, 0)
        if self.kind is not None:
            check_choice("kind", self.kind, ("encoder", "decoder"))


class RecurrentMemoryTransformer(MemoryModel):
    """RMT: `num_memory_tokens` memory vectors read and written through an unchanged backbone.

    `backbone` is a `transformers.PreTrainedModel` or a name for `memformers.backbones.load`. The head decides the
    outputs: a *ForSequenceClassification encoder classifies from the last segment's [CLS]; masked- and causal-LM
    heads give token logits; a base model gives hidden states. Knobs: `RMTConfig` (as keywords, or `config=`).
    """

    config_class = RMTConfig
    generates = True  # decoders with a causal-LM head
    decoder_only = False

    def __init__(self, backbone: transformers.PreTrainedModel | str, config: RMTConfig | None = None, **knobs) -> None:
        config = self.make_config(config, knobs)
        super().__init__(backbone, config, config.kind)
        self.token_level = self.info.head == "token"
        self.causal = self.info.is_decoder
        m = config.num_memory_tokens
        self._place_memory_tokens(decoder_overhead=2 * m, encoder_overhead=m + 3 if m else 2)

    def no_weight_decay(self) -> set[str]:
        return {"memory"}  # the initial memory is a starting point, not a weight to shrink

    # --- the two methods the driver needs --------------------------------------------------------------------

    def init_state(self, batch_size: int) -> MemoryState:
        """Every row starts from the learned initial memory."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        return MemoryState(self.memory.unsqueeze(0).expand(batch_size, -1, -1), self.memory)

    def step(
        self,
        segment: Segment | torch.Tensor,
        state: MemoryState,
        logit_positions: torch.Tensor | None = None,  # [kept] content positions needing token logits; None: all
    ) -> tuple[StepOutput, MemoryState]:
        """One segment through the backbone with the memory beside it; token logits only at `logit_positions`."""
        segment = as_segment(segment)
        if segment.input_ids.shape[1] > self.content_size:
            raise ValueError(
                f"segment has {segment.input_ids.shape[1]} tokens; this RMT takes at most {self.content_size}"
            )
        if not self.token_level:
            logit_positions = None  # a sequence head's logits have no positions
        if self.info.is_decoder:
            return self._decoder_step(segment, state, logit_positions)
        return self._encoder_step(segment, state, logit_positions)

    # --- layouts ----------------------------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(ids)

    def _encoder_step(
        self, segment: Segment, state: MemoryState, logit_positions: torch.Tensor | None
    ) -> tuple[StepOutput, MemoryState]:
        ids, mask = segment.input_ids, segment.attention_mask  # [batch, n]
        batch, n = ids.shape
        m = self.num_memory_tokens
        lengths = mask.sum(dim=1)  # [batch]
        prefix = 1 + m + 1 if m else 1  # [CLS] memory [SEP]
        # ids of [CLS] (memory placeholders) [SEP] content [SEP] pad…; the closing [SEP] right after each row's content
        column = lambda token: torch.full((batch, 1), token, dtype=ids.dtype, device=ids.device)  # noqa: E731
        parts = [column(self.cls_token_id)]
        if m:
            parts += [column(self.sep_token_id).expand(batch, m), column(self.sep_token_id)]
        parts += [ids * mask, column(0)]
        full_ids = torch.cat(parts, dim=1)  # [batch, prefix + n + 1]
        close = (prefix + lengths).unsqueeze(1)
        full_ids = full_ids.scatter(1, close, self.sep_token_id)
        positions = torch.arange(full_ids.shape[1], device=ids.device)
        full_mask = (positions.unsqueeze(0) <= close).long()
        embeds = self._embed(full_ids)
        if m:
            memory = state.memory.to(embeds.dtype)
            embeds = torch.cat([embeds[:, :1], memory, embeds[:, 1 + m :]], dim=1)
        keep = None if logit_positions is None else logit_positions + prefix
        logits, hidden = backbones.run_backbone(self.backbone, embeds, full_mask, logits_to_keep=keep)
        new_memory = hidden[:, 1 : 1 + m]  # [batch, memory, hidden]
        content_hidden = hidden[:, prefix : prefix + n]
        if logits is not None and logits.dim() == 3 and logit_positions is None:
            logits = logits[:, prefix : prefix + n]
        output = StepOutput(logits=logits, hidden=content_hidden, logit_positions=logit_positions)
        return output, MemoryState(new_memory, state.initial)

    def _decoder_step(
        self, segment: Segment, state: MemoryState, logit_positions: torch.Tensor | None
    ) -> tuple[StepOutput, MemoryState]:
        ids, mask = segment.input_ids, segment.attention_mask  # [batch, n]
        batch, n = ids.shape
        m = self.num_memory_tokens
        lengths = mask.sum(dim=1, keepdim=True)  # [batch, 1]
        content = self._embed(ids)  # [batch, n, hidden]
        memory = state.memory.to(content.dtype)
        source = torch.cat([memory, content, memory], dim=1)  # [batch, m + n + m, hidden]
        # Move each row's write memory right after its real content, padding after it: p → source index.
        p = torch.arange(2 * m + n, device=ids.device).unsqueeze(0)  # [1, 2m + n]
        write_start = m + lengths
        index = torch.where(p < write_start, p, torch.where(p < write_start + m, p - write_start + m + n, p - m))
        embeds = source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
        full_mask = (p < write_start + m).long().expand(batch, -1)
        keep = None if logit_positions is None else logit_positions + m  # content starts after the read memory
        logits, hidden = backbones.run_backbone(self.backbone, embeds, full_mask, logits_to_keep=keep)
        write = write_start + torch.arange(m, device=ids.device)  # [batch, m]
        new_memory = hidden.gather(1, write.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        content_hidden = hidden[:, m : m + n]
        if logits is not None and logit_positions is None:
            logits = logits[:, m : m + n]
        output = StepOutput(logits=logits, hidden=content_hidden, logit_positions=logit_positions)
        return output, MemoryState(new_memory, state.initial)

    # --- generation -------------------------------------------------------------------------------------------

    def generate_from(
        self, state: MemoryState, prompts: list[torch.Tensor], max_new_tokens: int = 32, **generate_kwargs
    ) -> torch.Tensor:  # [batch, new tokens]
        """Generate from each row's last segment behind its read memory only, as in training (`generate` reads
        the context). Keyword arguments go to the backbone's `generate` (`do_sample`, `temperature`, `top_p`,
        `eos_token_id`…)."""
        batch, device = len(prompts), prompts[0].device
        m = self.num_memory_tokens
        width = m + max(len(p) for p in prompts)
        if self.info.max_positions is not None and width + max_new_tokens > self.info.max_positions:
            raise ValueError(
                f"max_new_tokens={max_new_tokens}: the prompt segment ({width} positions) and the new tokens exceed "
                f"the backbone's {self.info.max_positions} positions"
            )
        hidden = self.info.hidden_size
        embeds = torch.zeros(batch, width, hidden, dtype=self.backbone.dtype, device=device)
        mask = torch.zeros(batch, width, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):  # left padding, as generate expects
            row_embeds = torch.cat([state.memory[row].to(embeds.dtype), self._embed(prompt)])
            embeds[row, width - len(row_embeds) :] = row_embeds
            mask[row, width - len(row_embeds) :] = 1
        pad = backbones.special_id(self.backbone.config, "pad_token_id", "eos_token_id")
        generate_kwargs.setdefault("pad_token_id", pad)
        return self.backbone.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, **generate_kwargs
        )
