"""LongMem (arXiv 2306.07174): a frozen backbone, a trainable SideNet and a chunked memory bank.

One segment, in four moves:
1. The frozen backbone reads the segment without a graph. Hooks record the input of its first block, H[0], the
   output of every block j − 1 as H[j] (j = 1..L; hooks rather than `output_hidden_states`, whose last entry has the
   final norm applied), and the pre-rotary keys and the values of `memory_layer` (memories carry no positions).
2. The SideNet reads H[0]. It has S layers; with r = L / S (the paper: r = 2), SideNet layer i (0-based) starts as a
   copy of backbone block r·i + r − 1, and its output gets the cross-network residual
       x[i + 1] = layer_i(x[i]) + (H[r·(i + 1)] − H[r·i]),
   the change the backbone's blocks r·i … r·i + r − 1 made. For r = 2 and l = i + 1 (1-based) this is the paper's
   H[2l] − H[2l − 2]. SideNet layers that returned their input would give x[S] = H[L] exactly.
   The backbone's frozen final norm and LM head turn x[S] into logits; the embeddings are the backbone's too.
3. SideNet layer `fusion_layer` attends jointly: its local attention and, for every query, attention over the tokens
   of the `top_k_chunks` chunks of the bank whose mean key has the largest inner product with the pre-rotary query,
   mixed per head by `out = local·(1 − g) + memory·g`, g = sigmoid(gate_bias). Queries with no memory keep local.
4. Only then is the segment written to the bank (write after read: a segment never retrieves its own tokens).

The bank is the state the driver carries: a `KNNStore` per batch row and key-value head whose keys are chunk-mean
keys and whose values are the chunk's token keys, values and a validity flag, FIFO over `memory_size // chunk_size`
chunks. Rows never share slots, so a row can only retrieve its own past.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from .. import backbone_layers, backbones
from ..knn.store import BACKENDS, Backend, KNNStore
from ..mechanism import MechanismConfig, MemoryModel, check_choice, check_int
from ..recurrence import StepOutput
from ..segments import Segment, as_segment
from .attention import JointAttention
from .bank import MemoryBank

MAX_MEMORY_SIZE = 1 << 22


@dataclass(kw_only=True)
class LongMemConfig(MechanismConfig):
    """LongMem's knobs (and the driver's); None: the backbone's default, resolved when the model is built."""

    fixed = ("alignment", "sidenet_layers", "memory_layer", "fusion_layer", "chunk_size")
    resizable = ("memory_size",)

    sidenet_layers: int | None = None  # S, dividing the backbone's L blocks (default L/2)
    memory_layer: int | None = None  # the backbone block whose keys and values the bank holds (default 3L/4 − 1)
    fusion_layer: int | None = None  # the SideNet layer that reads the bank (default S/2)
    memory_size: int = 65_536  # tokens per row in the bank, FIFO
    chunk_size: int = 4  # tokens per retrieved chunk
    top_k_chunks: int = 16  # chunks each query reads
    search: Backend = "torch"
    query_block: int | None = 512  # queries per key-value head retrieved at once (bounds memory); None: all

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sidenet_layers", "memory_layer", "fusion_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be None (the backbone's default) or an int, got {value!r}")
        if self.sidenet_layers is not None:
            check_int("sidenet_layers", self.sidenet_layers, 1)
        check_int("chunk_size", self.chunk_size, 1)
        if (
            isinstance(self.memory_size, bool)
            or not isinstance(self.memory_size, int)
            or not self.chunk_size <= self.memory_size <= MAX_MEMORY_SIZE
            or self.memory_size % self.chunk_size
        ):
            raise ValueError(
                f"memory_size must be an int multiple of chunk_size={self.chunk_size} in [{self.chunk_size}, "
                f"{MAX_MEMORY_SIZE}], got {self.memory_size!r}"
            )
        check_int("top_k_chunks", self.top_k_chunks, 1)
        check_choice("search", self.search, BACKENDS)
        if self.query_block is not None:
            check_int("query_block", self.query_block, 1)


@dataclass
class _Capture:
    """What the backbone's hooks record during one forward pass."""

    hidden: list[torch.Tensor] = dataclasses.field(default_factory=list)  # H[0..L], each [b, n, hidden]
    block_args: tuple = ()  # the positional arguments after the hidden states that block 0 received
    block_kwargs: dict = dataclasses.field(default_factory=dict)
    keys: torch.Tensor | None = None  # [b, kv_heads, n, d] pre-rotary, of the memory layer
    values: torch.Tensor | None = None


class LongMem(MemoryModel):
    """LongMem around a frozen Llama-family (Llama, Mistral, Qwen2, SmolLM2) or GPT-2 causal LM.

    `sidenet_layers` (default L/2) must divide the backbone's L blocks. `memory_layer` is the backbone block whose
    keys and values the bank holds (default: block 3L/4 − 1, the paper's 18th of 24); `fusion_layer` the SideNet
    layer that reads the bank (default S/2, the middle). The bank keeps the most recent `memory_size` tokens per row
    in chunks of `chunk_size`; each query reads the tokens of its `top_k_chunks` best chunks, `query_block` queries
    per key-value head at a time (bounding retrieval memory; None: all at once). Only the SideNet (and its gate) is
    trainable; the backbone and its embeddings, final norm and LM head stay frozen (gradients pass through the
    final norm and head, never into them) and read in eval mode, without any change to the backbone itself.
    """

    freeze_backbone = True  # always: only the SideNet (and its gate) trains

    config_class = LongMemConfig
    generates = True

    def __init__(
        self, backbone: transformers.PreTrainedModel | str, config: LongMemConfig | None = None, **knobs
    ) -> None:
        config = self.make_config(config, knobs)
        super().__init__(backbone, config)
        if not self.info.is_decoder or self.info.head != "token":
            raise ValueError(f"backbone: LongMem needs a causal LM (Llama family or GPT-2), got {self.info.class_name}")
        blocks = backbone_layers.decoder_layers(self.backbone)  # also rejects families without an attention adapter
        num_blocks = len(blocks)
        sidenet_layers = max(1, num_blocks // 2) if config.sidenet_layers is None else config.sidenet_layers
        check_int("sidenet_layers", sidenet_layers, 1, num_blocks)
        if num_blocks % sidenet_layers:
            raise ValueError(
                f"sidenet_layers must divide the backbone's {num_blocks} blocks (each SideNet layer stands for an "
                f"equal run of blocks), got {sidenet_layers}"
            )
        memory_layer = max(0, 3 * num_blocks // 4 - 1) if config.memory_layer is None else config.memory_layer
        check_int("memory_layer", memory_layer, -num_blocks, num_blocks - 1)
        fusion_layer = sidenet_layers // 2 if config.fusion_layer is None else config.fusion_layer
        check_int("fusion_layer", fusion_layer, -sidenet_layers, sidenet_layers - 1)
        # The config records the layers as resolved for this backbone.
        self.config = config = dataclasses.replace(
            config,
            sidenet_layers=sidenet_layers,
            memory_layer=memory_layer % num_blocks,
            fusion_layer=fusion_layer % sidenet_layers,
        )
        self.stride = num_blocks // sidenet_layers  # r: backbone blocks per SideNet layer
        self.content_size = config.segment_size
        self.token_level = True
        self.causal = True

        # The SideNet: the mechanism's own copies of backbone blocks (any patch or hook on those blocks is not ours).
        self.sidenet = nn.ModuleList(
            copy.deepcopy(blocks[self.stride * i + self.stride - 1]) for i in range(config.sidenet_layers)
        )
        for module in self.sidenet.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
            module.__dict__.pop("forward", None)
        self.sidenet.requires_grad_(True)
        fused_block = self.stride * self.fusion_layer + self.stride - 1
        fused = self.sidenet[self.fusion_layer]
        adapter = backbone_layers.attention_adapter(self.backbone, fused_block, block=fused)
        self.fusion = JointAttention(adapter, config.top_k_chunks, config.search, config.query_block)
        self.memory_adapter = backbone_layers.attention_adapter(self.backbone, self.memory_layer)

    # --- reading the frozen backbone --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _recording(self, capture: _Capture) -> Iterator[None]:
        """Hooks on the backbone that record into `capture`, for the duration of the block only."""
        blocks = backbone_layers.decoder_layers(self.backbone)

        def before_first(module, args, kwargs):
            hidden, capture.block_args, capture.block_kwargs = backbone_layers.split_block_call(args, kwargs)
            capture.hidden.append(hidden)

        def after_block(module, args, output):
            capture.hidden.append(output[0] if isinstance(output, tuple) else output)

        def before_memory_attention(module, args, kwargs):
            hidden = self.memory_adapter.split_call(args, kwargs).hidden
            _, capture.keys, capture.values = self.memory_adapter.project(hidden)

        handles = [blocks[0].register_forward_pre_hook(before_first, with_kwargs=True)]
        handles += [block.register_forward_hook(after_block) for block in blocks]
        handles.append(self.memory_adapter.module.register_forward_pre_hook(before_memory_attention, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def read_backbone(
        self,
        input_ids: torch.Tensor,  # [batch, length]
        attention_mask: torch.Tensor,  # [batch, past + length] with a cache, else [batch, length]
        position_ids: torch.Tensor | None = None,  # [batch, length]
        cache: transformers.Cache | None = None,
    ) -> _Capture:
        """The frozen backbone over one segment: H[0..L], block 0's call arguments, the memory layer's keys/values.

        With a `cache` (generation) the backbone reads only the new tokens and appends their keys and values to it.
        """
        capture = _Capture()
        base = self.backbone.base_model
        with self._recording(capture), backbones.eval_mode(base):
            base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **backbone_layers.cache_arguments(base, cache),
            )
        return capture

    # --- the SideNet ------------------------------------------------------------------------------------------

    def side_forward(
        self,
        input_ids: torch.Tensor,  # [batch, length]
        attention_mask: torch.Tensor,  # [batch, length], or [batch, past + length] with caches
        bank: MemoryBank | None,
        position_ids: torch.Tensor | None = None,  # [batch, length]
        caches: tuple[transformers.Cache, transformers.Cache] | None = None,  # (backbone's, SideNet's)
        logit_positions: torch.Tensor | None = None,  # [kept] positions whose logits are needed; None: all
    ) -> tuple[torch.Tensor, torch.Tensor, _Capture]:  # logits [b, n or kept, vocab], hidden [b, n, hidden], capture
        """Backbone, then SideNet with cross-network residuals and the fusion layer reading `bank` (never writing).

        With `caches` only the new tokens are read: the backbone appends to the first cache, the SideNet (whose
        layers keep their blocks' indices, all distinct) to the second. The LM head runs on `logit_positions` only.
        """
        backbone_cache, side_cache = caches if caches is not None else (None, None)
        capture = self.read_backbone(input_ids, attention_mask, position_ids, backbone_cache)
        hidden_states = capture.hidden  # H[0..L]
        args, kwargs = capture.block_args, capture.block_kwargs
        if backbone_cache is not None:  # the SideNet's blocks get their own cache wherever the backbone's was passed
            args = tuple(side_cache if a is backbone_cache else a for a in args)
            kwargs = {k: side_cache if v is backbone_cache else v for k, v in kwargs.items()}
        r = self.stride
        x = hidden_states[0]
        self.fusion.bank = bank
        try:
            with self.fusion.patched() if bank is not None else contextlib.nullcontext():  # None: no memory
                for i, layer in enumerate(self.sidenet):
                    out = layer(x, *args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    x = out + (hidden_states[r * (i + 1)] - hidden_states[r * i])  # cross-network residual
        finally:
            self.fusion.bank = None
        # The backbone's own final norm and LM head, frozen: gradients pass through them, never into them.
        hidden = backbones.frozen_call(backbone_layers.final_norm(self.backbone), x)
        head_input = hidden if logit_positions is None else hidden[:, logit_positions]
        return backbones.frozen_call(self.backbone.get_output_embeddings(), head_input), hidden, capture

    # --- the two methods the driver needs --------------------------------------------------------------------

    def init_state(self, batch_size: int) -> MemoryBank:
        """An empty bank on the backbone's device, in its dtype."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
        reference = self.backbone.get_input_embeddings().weight
        adapter = self.memory_adapter
        store = KNNStore(
            batch_size,
            adapter.num_kv_heads,
            adapter.head_dim,
            self.memory_size // self.chunk_size,
            device=reference.device,
            dtype=reference.dtype,
            value_dim=self.chunk_size * (2 * adapter.head_dim + 1),
        )
        return MemoryBank(store, self.chunk_size)

    def step(
        self,
        segment: Segment | torch.Tensor,
        state: MemoryBank,
        logit_positions: torch.Tensor | None = None,  # [kept] positions needing logits; None: all
    ) -> tuple[StepOutput, MemoryBank]:
        """One segment: read the bank (earlier segments only), then write this segment's chunks to it. Logits only
        at `logit_positions`."""
        segment = as_segment(segment)
        if segment.input_ids.shape[1] > self.content_size:
            raise ValueError(f"segment has {segment.input_ids.shape[1]} tokens; this model takes {self.content_size}")
        if state.store.batch_size != segment.batch_size or state.chunk_size != self.chunk_size:
            raise ValueError(
                f"state: a bank of batch {state.store.batch_size} and chunk size {state.chunk_size} does not fit a "
                f"segment of batch {segment.batch_size} and chunk_size={self.chunk_size}"
            )
        logits, hidden, capture = self.side_forward(
            segment.input_ids, segment.attention_mask, state, logit_positions=logit_positions
        )
        written = state.write(capture.keys, capture.values, segment.attention_mask)  # after the read
        return StepOutput(logits=logits, hidden=hidden, logit_positions=logit_positions), written

    # --- generation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_from(
        self,
        state: MemoryBank,
        prompts: list[torch.Tensor],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        eos_token_id: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:  # [batch, max_new_tokens]
        """Generate from each row's last segment, which reads the bank written so far (`generate` writes the
        context). The SideNet makes the logits, so generation is our own loop (greedy, or sampling at `temperature`).
        With `use_cache` the prompt is read once and each new token alone, through a key-value cache of the
        backbone and one of the SideNet; without, the whole window is recomputed per token (same tokens, slower).
        New tokens never enter the bank. After `eos_token_id` a row repeats it.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        batch, device, dtype = len(prompts), prompts[0].device, prompts[0].dtype
        lengths = torch.tensor([len(p) for p in prompts], device=device)  # [batch]
        prompt_width = int(lengths.max())
        width = prompt_width + max_new_tokens
        if self.info.max_positions is not None and width > self.info.max_positions:
            raise ValueError(
                f"max_new_tokens={max_new_tokens}: the prompt segment ({prompt_width} tokens) and the new "
                f"tokens exceed the backbone's {self.info.max_positions} positions"
            )
        # Right padding: positions stay those of training, and causal attention never sees the padding. With a
        # cache, each row's new tokens follow the padded prompt in the cache, at the row's own positions.
        ids = torch.zeros(batch, width, dtype=dtype, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        rows = torch.arange(batch, device=device)
        mask = (torch.arange(prompt_width, device=device).view(1, -1) < lengths.view(-1, 1)).long()  # [b, prompt]
        caches = (transformers.DynamicCache(), transformers.DynamicCache()) if use_cache else None
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        new_tokens = []
        for step in range(max_new_tokens):
            if use_cache and step > 0:  # the newest token alone, at its row's position
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)  # [b, prompt + step]
                logits, _, _ = self.side_forward(
                    ids[rows, lengths - 1].view(-1, 1), mask, state, (lengths - 1).view(-1, 1), caches
                )
                scores = logits[:, -1].float()  # [batch, vocab]
            else:
                end = int(lengths.max())
                if not use_cache:
                    mask = (torch.arange(end, device=device).view(1, -1) < lengths.view(-1, 1)).long()
                positions = torch.arange(end, device=device).expand(batch, -1)
                last, which = torch.unique(lengths - 1, return_inverse=True)  # the head reads each row's last token
                logits, _, _ = self.side_forward(ids[:, :end], mask, state, positions, caches, last)
                scores = logits[rows, which].float()  # [batch, vocab]
            if do_sample:
                token = torch.multinomial(torch.softmax(scores / temperature, dim=-1), 1).squeeze(1)
            else:
                token = scores.argmax(dim=-1)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            ids[rows, lengths] = token.to(ids.dtype)
            lengths = lengths + 1
            new_tokens.append(token)
        return torch.stack(new_tokens, dim=1).to(dtype)
