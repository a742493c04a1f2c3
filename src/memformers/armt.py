"""Associative Recurrent Memory Transformer (ARMT, arXiv 2407.04841) around any Hugging Face encoder or decoder.

Every layer l (or those of `memory_layers`, as the authors' `wrap_layers`) keeps an associative matrix A_l
[d_key, hidden] and a normaliser z_l [d_key], both 0 at the start.
Memory tokens (the same learned embeddings in every segment) sit right after each segment's content. After layer l
has processed a segment, the memory tokens' outputs m_i write (delta rule, with the paper's γ correction):

    k_i = φ(W_K m_i)   v_i = W_V m_i   β_i = σ(W_β m_i)
    v̄_i = A k_i / (zᵀ k_i + ε)               what the memory already returns for k_i
    γ_i = clip(1 − zᵀ k_i / (‖k_i‖² + ε), 0, 1)   no gradient
    A ← A + Σ_i β_i (v_i − v̄_i) ⊗ k_i         z ← z + Σ_i γ_i k_i

and in the next segment every token x_j entering layer l first reads y_j = A φ(W_Q x_j) / (zᵀ φ(W_Q x_j) + ε),
which is added to its hidden state. φ is DPFP with ν = 3 (d_key = 2·ν·d_mem), scaled to unit length, as the ARMT
authors' code does (`normalize_features`): DPFP is quadratic in its input, so without it a key's weight in every
read grows with the square of its token's norm, which in a decoder's residual stream spans orders of magnitude.
W_V starts at 0, so an untrained ARMT reads exactly nothing and equals the backbone on the segment with the memory
tokens appended. `normalize_gate` computes β from m scaled to unit RMS: in a decoder's residual stream ‖m‖ is large,
so σ(W_β m) starts at 0 or 1 for many tokens, and a gate at 0 gets no gradient (σ' = β(1 − β)) and never opens.

The state is kept, and written, in at least float32 whatever the backbone computes in: under bf16 autocast a
write rounded A to bf16 (8 bits of mantissa) at every segment, so over hundreds of segments the small corrections
the delta rule makes were lost. A write is m tokens' (or a segment's) worth of work, so it costs little to do
exactly; reads, a matrix product per token, follow the backbone's precision and round nothing that is carried.

The backbone is never edited: the read and the write are forward hooks on its blocks that exist only while a step
(or a generation) runs, and are removed before it returns. A step returns a new state and never changes its input.

Layouts (`segment_size` positions at most, padding only at the end of a row):
- encoder: `[CLS] content [SEP] memory×m`; content = segment_size − m − 2.
- decoder: `content memory×m` under the causal mask; content = segment_size − m. Content tokens never see this
  segment's memory tokens: they read the past only through the associative matrices.

`memory_attention` says who sees the memory tokens. "full" (an encoder's default): they and the segment all see one
another, so m tokens that start alike end alike in a pretrained encoder's upper layers (MiniLM: cosine 0.99 between
two of them), and a segment writes one association m times. "causal" (a decoder's only arrangement, which an encoder
may choose): memory token i sees the segment and memory tokens 1..i, the segment sees none of them, so token i can
write what tokens before it left out, and the segment's outputs do not depend on this segment's memory tokens.

`writers="all"` (not the paper's) has every real position of the segment write as well, with the same W_K, W_V, W_β:
a memory token's key is learnt from its position, and in a trained model it barely depends on what the segment says
(benchmarks/armt_segment_writes.py), so a later write cannot find the association it should replace; a content
token's key starts as what the token is (an actor's name), and its value can carry what the segment says about it.
`share_query_key=True` (not the paper's either; Reformer's shared-QK attention) reads with W_K too, so a token asks
with the very key its hidden state would write with.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from . import backbone_layers, backbones
from .associative_memory import AssociativeMemory, AssociativeState, ReadTerms, state_dtype
from .mechanism import (
    MechanismConfig,
    MemoryModel,
    check_choice,
    check_int,
    check_layers,
    check_number,
    resolve_layers,
)
from .recurrence import StepOutput
from .segments import Segment, as_segment

# --------------------------------------------------------------------------------------------------------------
# Config


@dataclass(kw_only=True)
class ARMTConfig(MechanismConfig):
    """ARMT's knobs (and the driver's), with the paper's defaults; checks itself on creation."""

    fixed = (
        "alignment",
        "num_memory_tokens",
        "d_mem",
        "nu",
        "memory_attention",
        "normalize_features",
        "memory_layers",
        "normalize_gate",
        "writers",
        "share_query_key",
    )
    tunable = ("write_threshold", "layout_writes")
    saved_before = {"normalize_features": False}  # models saved before the knob computed unnormalised features

    num_memory_tokens: int = 10  # memory tokens per segment; they write every layer's associative memory
    d_mem: int = 64  # the paper's; keys are φ(W_K m) of 2·nu·d_mem features
    nu: int = 3  # DPFP's order
    memory_attention: str | None = None  # "full" or "causal" (see the module's docstring); None: the layout's own
    normalize_features: bool | None = None  # φ of queries and keys at unit length; None: True (a saved model: as saved)
    memory_layers: tuple[int, ...] | None = None  # blocks with a memory (negative: from the top); None: all
    normalize_gate: bool = False  # β = σ(W_β m / rms(m) + b); the paper's (False) reads m as it is
    # Who writes: "memory", the paper's (the memory tokens' outputs), or "all" (every real position of the segment
    # as well: a content token's key can then be what it is, e.g. an actor's name, and its value what the segment
    # says about it, so a later segment's token of the same name finds and replaces it).
    writers: str = "memory"
    # One projection for reads and writes (W_Q = W_K, as Reformer's shared-QK attention; not the paper's): a token
    # then asks the memory with the key the same hidden state writes with, so the question's "mary" finds what a
    # fact's "mary" wrote from the start, where separate projections must first learn to agree.
    share_query_key: bool = False
    # Initialisation only (a saved model loads its weights): the authors' later code starts W_β's bias at 1 (β ≈ 0.73
    # for a zero input) and the memory embeddings at std 0.02; None: nn.Linear's own bias draw, and the memory at the
    # backbone embeddings' std, as the paper's code and RMT do.
    gate_bias: float | None = None
    memory_init_std: float | None = None
    # Gates β at or below it write nothing into A (β' = (β − τ)/(1 − τ), 0 below; z as before): a noise token's
    # tiny writes, each harmless, add up over thousands of segments and move every later read (README, "Why 256
    # segments forget"). 0: the paper's rule. No weight depends on it: a saved model goes on with the config's.
    write_threshold: float = 0.0
    # With writers "all": whether [CLS], [SEP] and the memory tokens write too. They write in every segment, noise or
    # not, so over tens of thousands of segments their small writes grow every read until the memory diverges
    # (README, "The hinge did not mend 1M"); False leaves the writing to the content's tokens. "first": they write
    # while a row's memory is empty (its first segment) and not after: the normalizer z takes its scale from a first
    # segment written as in training, which a first segment of a few tokens cannot give alone (README, "Layout
    # writes in the first segment"), and nothing of theirs accumulates. No weight depends on it.
    layout_writes: bool | str = True
    kind: str | None = None  # "encoder" or "decoder"; None: from the backbone
    cls_token_id: int | None = None  # encoder layout's [CLS] and [SEP]; None: from the backbone's config/tokenizer
    sep_token_id: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_memory_tokens", self.num_memory_tokens, 1)
        check_int("d_mem", self.d_mem, 1)
        check_int("nu", self.nu, 1)
        if self.kind is not None:
            check_choice("kind", self.kind, ("encoder", "decoder"))
        if self.memory_attention is not None:
            check_choice("memory_attention", self.memory_attention, ("full", "causal"))
        if self.memory_layers is not None:
            self.memory_layers = check_layers("memory_layers", self.memory_layers)
        check_choice("writers", self.writers, ("memory", "all"))
        if not isinstance(self.layout_writes, bool) and self.layout_writes != "first":
            raise ValueError(f"layout_writes must be True, False or 'first', got {self.layout_writes!r}")
        if self.layout_writes is not True and self.writers != "all":
            raise ValueError(
                f"layout_writes={self.layout_writes!r} needs writers='all' (else nothing writes), got {self.writers!r}"
            )
        for name in ("normalize_gate", "share_query_key"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.normalize_features not in (None, True, False):
            raise ValueError(f"normalize_features must be True, False or None, got {self.normalize_features!r}")
        if self.gate_bias is not None:
            check_number("gate_bias", self.gate_bias)
        if self.memory_init_std is not None:
            check_number("memory_init_std", self.memory_init_std, positive=True)
        check_number("write_threshold", self.write_threshold)
        if not 0 <= self.write_threshold < 1:
            raise ValueError(f"write_threshold must be in [0, 1), got {self.write_threshold!r}")

    @property
    def d_key(self) -> int:
        return 2 * self.nu * self.d_mem


@dataclass
class Writers:
    """The positions of a segment's layout whose outputs write the memory."""

    positions: torch.Tensor | None  # [batch, k] positions in the layout; None: every position (k = L)
    mask: torch.Tensor | None = None  # [batch, k] 1 = writes (0: padding); None: every one


# --------------------------------------------------------------------------------------------------------------
# The model


class AssociativeMemoryTransformer(MemoryModel):
    """ARMT: an associative memory in every layer, written by memory tokens, read by every token.

    `backbone` is a `transformers.PreTrainedModel` or a name for `memformers.backbones.load`. The head decides the
    outputs, as for RMT: a *ForSequenceClassification encoder classifies from the last segment's [CLS]; masked- and
    causal-LM heads give token logits; a base model gives hidden states.
    """

    config_class = ARMTConfig
    generates = True  # decoders with a causal-LM head
    decoder_only = False

    def __init__(self, backbone: transformers.PreTrainedModel | str, config: ARMTConfig | None = None, **knobs) -> None:
        config = self.make_config(config, knobs)
        super().__init__(backbone, config, config.kind)
        self.token_level = self.info.head == "token"
        self.causal = self.info.is_decoder
        hidden = self.info.hidden_size
        blocks = len(backbone_layers.layer_stack(self.backbone))
        chosen = (
            range(blocks)
            if config.memory_layers is None
            else resolve_layers("memory_layers", config.memory_layers, blocks)
        )
        self.memory_blocks = tuple(sorted(chosen))  # the blocks that read and write, in depth order
        if config.normalize_features is None:
            config = self.config = dataclasses.replace(config, normalize_features=True)
        normalize = config.normalize_features
        self.layers = nn.ModuleList(
            AssociativeMemory(
                hidden,
                config.d_mem,
                config.nu,
                normalize,
                config.normalize_gate,
                config.gate_bias,
                share_query_key=config.share_query_key,
            )
            for _ in self.memory_blocks
        )  # one per block of `memory_blocks`
        if self.info.is_decoder:
            self.prefix, self.suffix = 0, 0  # content memory
            if config.memory_attention == "full":
                raise ValueError(
                    'memory_attention="full" needs an encoder: a decoder\'s memory tokens are causal ("causal" or None)'
                )
        else:
            self.prefix, self.suffix = 1, 1  # [CLS] content [SEP] memory
        self.causal_memory = self.info.is_decoder or config.memory_attention == "causal"
        m = config.num_memory_tokens
        self._place_memory_tokens(decoder_overhead=m, encoder_overhead=2 + m, init_std=config.memory_init_std)
        self._reads_recorded: list[list[ReadTerms]] | None = None  # `recording_reads`: per step, per layer

    def no_weight_decay(self) -> set[str]:
        return {"memory"}  # the memory tokens are embeddings, not weights to shrink

    # --- the two methods the driver needs --------------------------------------------------------------------

    def init_state(self, batch_size: int) -> AssociativeState:
        """Every layer starts from an empty memory (A = 0, z = 0)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
        weight = self.layers[0].key.weight
        layers, d_key, options = len(self.layers), self.config.d_key, {"dtype": state_dtype(weight.dtype)}
        matrix = weight.new_zeros(layers, batch_size, d_key, self.info.hidden_size, **options)
        return AssociativeState(matrix, weight.new_zeros(layers, batch_size, d_key, **options))

    def step(
        self,
        segment: Segment | torch.Tensor,
        state: AssociativeState,
        logit_positions: torch.Tensor | None = None,  # [kept] content positions needing token logits; None: all
    ) -> tuple[StepOutput, AssociativeState]:
        """One segment through the backbone, every layer reading the state and its memory tokens writing a new one."""
        segment = as_segment(segment)
        ids, mask = segment.input_ids, segment.attention_mask  # [batch, n]
        batch, n = ids.shape
        if n > self.content_size:
            raise ValueError(f"segment has {n} tokens; this ARMT takes at most {self.content_size}")
        if state.matrix.shape[1] != batch:
            raise ValueError(f"state has {state.matrix.shape[1]} rows, the segment {batch}")
        if not self.token_level:
            logit_positions = None  # a sequence head's logits have no positions
        layout_writes = self.config.layout_writes
        if layout_writes == "first":  # [batch] the rows with nothing written yet: their first segment
            layout_writes = state.normalizer.abs().amax(dim=(0, 2)) == 0
        embeds, full_mask, write = self._layout(ids, mask, layout_writes)
        keep = None if logit_positions is None else logit_positions + self.prefix
        written: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        record = None
        if self._reads_recorded is not None:
            record = [ReadTerms() for _ in self.layers]
            self._reads_recorded.append(record)
        with self._hooked(state, write, written, record):
            logits, hidden = backbones.run_backbone(self.backbone, embeds, full_mask, logits_to_keep=keep)
        new_state = AssociativeState(
            torch.stack([w[0] for w in written]), torch.stack([w[1] for w in written])
        )  # [layers, batch, d_key, hidden], [layers, batch, d_key]
        content_hidden = hidden[:, self.prefix : self.prefix + n]
        if logits is not None and logits.dim() == 3 and logit_positions is None:
            logits = logits[:, self.prefix : self.prefix + n]
        return StepOutput(logits=logits, hidden=content_hidden, logit_positions=logit_positions), new_state

    @contextlib.contextmanager
    def recording_reads(self) -> Iterator[list[list[ReadTerms]]]:
        """Within the block, every `step` appends, per memory layer, what its tokens asked the memory and what its
        writing positions wrote (`ReadTerms`, with their gradients): what a loss on which write a token reads
        (`memformers.read_supervision`) needs. Costs one more projection of queries and keys a layer."""
        if self._reads_recorded is not None:
            raise RuntimeError("recording_reads is already active on this model")
        self._reads_recorded = recorded = []
        try:
            yield recorded
        finally:
            self._reads_recorded = None

    # --- layout and hooks -------------------------------------------------------------------------------------

    def _layout(
        self, ids: torch.Tensor, mask: torch.Tensor, layout_writes: bool | torch.Tensor = True
    ) -> tuple[torch.Tensor, torch.Tensor, Writers]:  # embeds [b, L, hidden], mask, writers
        """Input embeddings with the memory tokens right after each row's content (and [SEP]), padding last; the
        mask is [b, L], or [b, 1, L, L] (True: may attend) for an encoder with causal memory tokens; the positions
        that write (`writers`). `layout_writes`: whether [CLS], [SEP] and the memory tokens write, or per row [b]."""
        batch, n = ids.shape
        m = self.num_memory_tokens
        embed = self.backbone.get_input_embeddings()
        if not self.info.is_decoder:  # one lookup: each one's backward fills a gradient of the whole vocabulary
            column = lambda token: ids.new_full((batch, 1), token)  # noqa: E731
            ids = torch.cat([column(self.cls_token_id), ids, column(self.sep_token_id)], dim=1)
        content = embed(ids)  # [batch, prefix + n + suffix, hidden]
        pieces = [content, self.memory.to(content.dtype).unsqueeze(0).expand(batch, -1, -1)]
        source = torch.cat(pieces, dim=1)  # [batch, prefix + n + suffix + m, hidden]
        tail = self.suffix + m  # [SEP] and memory, moved right after each row's real content
        p = torch.arange(source.shape[1], device=ids.device).unsqueeze(0)  # [1, L]
        start = self.prefix + mask.sum(dim=1, keepdim=True)  # [batch, 1] first position after the content
        index = torch.where(p < start, p, torch.where(p < start + tail, p - start + self.prefix + n, p - tail))
        embeds = source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
        full_mask = (p < start + tail).long().expand(batch, -1)
        if self.config.writers == "all":  # every real position; padding writes nothing
            writing = full_mask  # [batch, L]
            if layout_writes is not True:
                writing = ((p >= self.prefix) & (p < start)).long()  # the content alone
                if layout_writes is not False:  # per row: the layout too where it says so
                    writing = torch.where(layout_writes[:, None], full_mask, writing)
            write = Writers(None, writing)  # the whole layout, [batch, L]; 0: writes nothing
        else:
            write = Writers(start + self.suffix + torch.arange(m, device=ids.device))  # [batch, m] memory positions
        if self.causal_memory and not self.info.is_decoder:
            full_mask = _causal_memory_mask(full_mask.bool(), start + self.suffix)
        return embeds, full_mask, write

    @contextlib.contextmanager
    def _hooked(
        self,
        state: AssociativeState,
        write: Writers | None,  # the writing positions; None: read only (generation)
        written: list | None,
        record: list[ReadTerms] | None = None,
    ) -> Iterator[None]:
        """Hooks on the backbone's blocks for one pass: each block's input reads its layer's memory, the outputs of
        its writing positions write the new one into `written[l]` (and `record[l]`, if given, gets the queries,
        keys and gates). Removed on exit, whatever happens."""
        handles = []
        try:
            blocks = backbone_layers.layer_stack(self.backbone)  # the backbone's own blocks, hooked only for this pass
            # one unbind, not a select per layer: each select's backward would fill a zero tensor of all layers
            matrices, normalizers = state.matrix.unbind(0), state.normalizer.unbind(0)
            for index, (block_index, memory) in enumerate(zip(self.memory_blocks, self.layers, strict=True)):
                block = blocks[block_index]
                matrix, normalizer = matrices[index], normalizers[index]
                terms = None if record is None else record[index]
                reader = _reader(memory, matrix, normalizer, terms)
                handles.append(block.register_forward_pre_hook(reader, with_kwargs=True))
                if write is not None:
                    threshold = self.config.write_threshold
                    writer = _writer(memory, matrix, normalizer, write, written, index, terms, threshold)
                    handles.append(block.register_forward_hook(writer))
            yield
        finally:
            for handle in handles:
                handle.remove()

    # --- generation -------------------------------------------------------------------------------------------

    def generate_from(
        self, state: AssociativeState, prompts: list[torch.Tensor], max_new_tokens: int = 32, **generate_kwargs
    ) -> torch.Tensor:  # [batch, new tokens]
        """Generate from each row's last segment, every layer reading the memory as in training (`generate` reads
        the context). Keyword arguments go to the backbone's `generate`."""
        batch, device = len(prompts), prompts[0].device
        width = max(len(p) for p in prompts)
        if self.info.max_positions is not None and width + max_new_tokens > self.info.max_positions:
            raise ValueError(
                f"max_new_tokens={max_new_tokens}: the prompt segment ({width} positions) and the new tokens exceed "
                f"the backbone's {self.info.max_positions} positions"
            )
        embed = self.backbone.get_input_embeddings()
        embeds = torch.zeros(batch, width, self.info.hidden_size, dtype=embed.weight.dtype, device=device)
        mask = torch.zeros(batch, width, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):  # left padding, as generate expects; reads do not depend on position
            embeds[row, width - len(prompt) :] = embed(prompt)
            mask[row, width - len(prompt) :] = 1
        pad = backbones.special_id(self.backbone.config, "pad_token_id", "eos_token_id")
        generate_kwargs.setdefault("pad_token_id", pad)
        with self._hooked(state, None, None):
            return self.backbone.generate(
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, **generate_kwargs
            )


def _causal_memory_mask(
    valid: torch.Tensor,  # [batch, L] True at real positions
    first: torch.Tensor,  # [batch, 1] each row's first memory position
) -> torch.Tensor:  # [batch, 1, L, L] True where a query (row) may attend a key (column)
    """An encoder's mask with a decoder's memory tokens: every position sees the real positions before the memory,
    memory token i also sees memory tokens 1..i, and nothing else sees a memory token."""
    p = torch.arange(valid.shape[1], device=valid.device)
    key_is_memory = (p >= first) & valid  # [batch, L]
    query_is_memory = key_is_memory.unsqueeze(2)  # [batch, L, 1]
    sees_memory = query_is_memory & key_is_memory.unsqueeze(1) & (p.view(1, 1, -1) <= p.view(1, -1, 1))
    allowed = (valid & ~key_is_memory).unsqueeze(1) | sees_memory  # [batch, L, L]
    return allowed.unsqueeze(1)


def _reader(memory: AssociativeMemory, matrix: torch.Tensor, normalizer: torch.Tensor, record: ReadTerms | None = None):
    """A forward pre-hook adding the read y to the hidden states entering a block (and recording the queries)."""

    def hook(module, args, kwargs):
        hidden, rest, rest_kwargs = backbone_layers.split_block_call(args, kwargs)
        hidden = hidden + memory.read(hidden, matrix, normalizer, record).to(hidden.dtype)
        if args:
            return (hidden, *rest), rest_kwargs
        return args, rest_kwargs | {"hidden_states": hidden}

    return hook


def _writer(
    memory: AssociativeMemory,
    matrix: torch.Tensor,
    normalizer: torch.Tensor,
    write: Writers,
    written: list,
    index: int,
    record: ReadTerms | None = None,
    threshold: float = 0.0,
):
    """A forward hook writing the outputs of a block's writing tokens into `written[index]` (and recording the
    writes' keys and gates)."""

    def hook(module, args, output):
        hidden = backbone_layers.block_output_hidden(output)  # [batch, L, hidden]
        tokens = hidden  # every position writes: no copy
        if write.positions is not None:
            positions = write.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            tokens = hidden.gather(1, positions)  # [batch, writers, hidden]
        written[index] = memory.write(tokens, matrix, normalizer, write.mask, record, threshold=threshold)
        if record is not None:
            record.positions = write.positions

    return hook
