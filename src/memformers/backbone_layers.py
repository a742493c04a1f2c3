"""Inside a backbone: its blocks, how a block and an attention module are called, and one layer's attention.

For mechanisms that act within a backbone rather than on its inputs and outputs: ARMT hooks every block
(`layer_stack`, `split_block_call`, `block_output_hidden`); kNN memory and LongMem rebuild one decoder layer's
attention from that layer's own weights (`attention_adapter`, `AttentionAdapter`, `AttentionCall`) and find the
decoder stack and its final norm. Hugging Face's keyword names are spelt here, once, for every call
(`cache_arguments` and `takes_position_ids` serve whole-model calls too, `backbones.run_backbone`'s among them):
a rename bites hardest where an attention module's forward is replaced, which is this module's business.

With `backbones.py` (a backbone as a whole: describing, running, setting up and loading it), the only place that
knows model families. It imports nothing else of memformers, so `backbones.py` can import it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

# ----------------------------------------------------------------------------------------------------------------
# Hugging Face's keyword names: the only code that spells them
#
# transformers 5.24 renamed the generation cache from `past_key_values` to `cache` in model forwards, `generate`,
# decoder layers and attention modules (the old name still works until 5.40, with a warning, except where an
# attention module's forward is replaced: there it is silently not seen). Each name is read off the signature of
# the function that takes it, so one code path serves old and new releases, and the next rename is a change here.

CACHE_KEYWORDS = ("cache", "past_key_values")  # the generation cache, newest name first


@functools.cache
def _signature(function: Callable) -> inspect.Signature:
    return inspect.signature(function)  # follows transformers' deprecation wrappers to the real parameters


def cache_keyword(model_class: type) -> str:
    """The name under which `model_class.forward` (and `generate`, which passes it on) takes the generation cache."""
    parameters = _signature(model_class.forward).parameters
    # A forward that names neither (taking `**kwargs` only) predates the rename.
    return next((name for name in CACHE_KEYWORDS if name in parameters), CACHE_KEYWORDS[-1])


def cache_arguments(model: nn.Module, cache: transformers.Cache | None) -> dict:
    """Keyword arguments for `model`'s forward or `generate`: read `cache` and append to it in place; with None,
    build no cache at all (a forward has no use for one)."""
    if cache is not None:
        return {cache_keyword(type(model)): cache, "use_cache": True}
    if getattr(model.config, "use_cache", False) or "use_cache" in getattr(model.config, "__dict__", {}):
        return {"use_cache": False}
    return {}


def takes_position_ids(model: nn.Module) -> bool:
    """Whether the model's forward takes `position_ids` (GPT-2, Llama and most decoders do)."""
    return "position_ids" in _signature(type(model).forward).parameters


def split_block_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """A decoder block's call: (hidden states [b, n, hidden], the other positional and keyword arguments)."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


@dataclass
class AttentionCall:
    """One call to a decoder layer's attention module, in our names, whatever the module's forward calls them."""

    hidden: torch.Tensor  # [batch, length, hidden]
    attention_mask: torch.Tensor | None  # the backbone's: 4-D (eager, sdpa), 2-D or None (flash)
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # rotary (cos, sin); None without rotary
    cache: transformers.Cache | None  # the generation cache, when decoding with one
    extra: dict  # the rest of the keyword arguments, which the layer passes on to its attention function


def attention_call(module: nn.Module, args: tuple, kwargs: dict) -> AttentionCall:
    """Bind a call to `module` (an attention module) by its class's own forward signature, positional or not."""
    signature = _signature(type(module).forward)
    try:
        arguments = dict(signature.bind(module, *args, **kwargs).arguments)
    except TypeError as error:
        raise ValueError(f"{type(module).__name__} called with arguments its forward does not take: {error}") from error
    extra: dict = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            extra = dict(arguments.pop(name, {}))
    caches = [where.pop(name, None) for where in (arguments, extra) for name in CACHE_KEYWORDS]  # old names too
    return AttentionCall(
        hidden=arguments["hidden_states"],
        attention_mask=arguments.get("attention_mask"),
        position_embeddings=arguments.get("position_embeddings"),
        cache=next((cache for cache in caches if cache is not None), None),
        extra=extra,
    )


# ----------------------------------------------------------------------------------------------------------------
# Attention adapters: one decoder layer's attention, computed with the layer's own weights
#
# Mechanisms that change how a layer attends (kNN memory) replace that attention module's `forward` at runtime and
# rebuild it from these pieces: queries, keys and values from the layer's own projections, positions applied with
# the family's own rotary function, and the layer's own output projection.

LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2"})
ATTENTION_FAMILIES = LLAMA_FAMILY | {"gpt2"}


@dataclass
class AttentionAdapter:
    """How to reach and recompute the self-attention of decoder layer `layer` of a Llama-family or GPT-2 model."""

    module: nn.Module  # the attention module itself (LlamaAttention, GPT2Attention, ...)
    family: str  # "llama" (Llama, Mistral, Qwen2, SmolLM2) or "gpt2"
    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float

    def split_call(self, args: tuple, kwargs: dict) -> AttentionCall:
        """A call to the module, whatever its signature, in our names."""
        return attention_call(self.module, args, kwargs)

    def project(
        self, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q [b, heads, n, d]; k, v [b, kv_heads, n, d]
        """Queries, keys and values from the layer's own projections, before any position encoding."""
        batch, length, _ = hidden.shape
        if self.family == "gpt2":
            query, key, value = self.module.c_attn(hidden).split(self.module.split_size, dim=2)
        else:
            query, key, value = self.module.q_proj(hidden), self.module.k_proj(hidden), self.module.v_proj(hidden)
        query = query.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = key.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = value.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return query, key, value

    def rotate(
        self, query: torch.Tensor, key: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor]:  # same shapes
        """Queries and keys with positions applied as the layer would (rotary for Llama; GPT-2 has none here)."""
        if self.family == "gpt2":
            return query, key
        cos, sin = call.position_embeddings
        apply_rotary = importlib.import_module(type(self.module).__module__).apply_rotary_pos_emb
        return apply_rotary(query, key, cos, sin)

    def update_cache(
        self, key: torch.Tensor, value: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [b, kv_heads, past + n, d]
        """Append to the generation cache, when there is one, and return every key and value to attend to."""
        if call.cache is None:
            return key, value
        return call.cache.update(key, value, self.layer)

    def dropout(self) -> float:
        """The attention-probability dropout the layer uses (0 in eval mode)."""
        if not self.module.training:
            return 0.0
        if self.family == "gpt2":
            return self.module.attn_dropout.p
        return float(getattr(self.module, "attention_dropout", 0.0))

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall
    ) -> torch.Tensor:  # [b, heads, n, d]
        """The layer's own attention function (eager, sdpa, flash… as the backbone is configured), so that its
        output is bit-identical to the layer's; query and key with positions applied, key and value from the cache."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager = importlib.import_module(type(self.module).__module__).eager_attention_forward
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.module.config._attn_implementation, eager)
        extra = dict(call.extra)
        if hasattr(self.module, "sliding_window"):
            extra["sliding_window"] = self.module.sliding_window
        elif self.family in LLAMA_FAMILY and getattr(self.module.config, "sliding_window", None) is not None:
            extra["sliding_window"] = self.module.config.sliding_window  # Mistral keeps it on the config
        out, _ = interface(
            self.module,
            query,
            key,
            value,
            call.attention_mask,
            dropout=self.dropout(),
            scaling=self.scaling,
            **extra,
        )
        return out.transpose(1, 2)  # [b, n, heads, d] → [b, heads, n, d]

    def output(self, attention: torch.Tensor) -> torch.Tensor:  # [b, n, heads * d] → [b, n, hidden]
        """The layer's own output projection (and GPT-2's residual dropout)."""
        if self.family == "gpt2":
            return self.module.resid_dropout(self.module.c_proj(attention))
        return self.module.o_proj(attention)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of a Llama-family or GPT-2 model (with or without its head)."""
    family = attention_family(model)
    base = getattr(model, "base_model", model)
    return base.h if family == "gpt2" else base.layers


def attention_family(model: nn.Module) -> str:
    """ "llama" or "gpt2": which attention adapter a model needs; a clear error for any other family."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ATTENTION_FAMILIES:
        raise ValueError(
            f"backbone: attention adapters exist for model types {sorted(ATTENTION_FAMILIES)}, got {model_type!r}"
        )
    return "gpt2" if model_type == "gpt2" else "llama"


def attention_adapter(model: nn.Module, layer: int, block: nn.Module | None = None) -> AttentionAdapter:
    """The adapter of decoder layer `layer` (negative counts from the top), or of `block`, a copy of that layer."""
    family = attention_family(model)
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer must be in [{-len(layers)}, {len(layers) - 1}] for this backbone, got {layer}")
    layer = layer % len(layers)
    block = layers[layer] if block is None else block
    config = model.config
    if family == "gpt2":
        module = block.attn
        num_heads = num_kv_heads = module.num_heads
    else:
        module = block.self_attn
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    return AttentionAdapter(
        module=module,
        family=family,
        layer=layer,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=module.head_dim,
        scaling=float(module.scaling),
    )


def final_norm(model: nn.Module) -> nn.Module:
    """The norm a Llama-family or GPT-2 model applies after its last decoder block."""
    base = getattr(model, "base_model", model)
    return base.ln_f if attention_family(model) == "gpt2" else base.norm


# ----------------------------------------------------------------------------------------------------------------
# The stack of transformer blocks, for mechanisms that act at every layer's input and output (ARMT)

# Where each family keeps its blocks, relative to its base model: BERT-likes, Llama-likes and GPT-NeoX, GPT-2, OPT,
# DistilBERT.
LAYER_STACK_PATHS = ("encoder.layer", "layers", "h", "decoder.layers", "transformer.layer")


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The ordered transformer blocks of an encoder or decoder, whose calls take the hidden states first."""
    base = getattr(model, "base_model", model)
    for path in LAYER_STACK_PATHS:
        found: object = base
        for name in path.split("."):
            found = getattr(found, name, None)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    raise ValueError(
        f"backbone: cannot find the transformer blocks of {type(model).__name__} (looked for base-model attributes "
        f"{', '.join(LAYER_STACK_PATHS)})"
    )


def block_output_hidden(output) -> torch.Tensor:
    """A block's output hidden states [batch, length, hidden], whether it returns a tensor or a tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]
