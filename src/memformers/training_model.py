"""The model and tokenizer a training config describes: a pretrained, scratch or saved backbone wrapped in the
config's mechanism, and the classes a classifier answers with."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .training_checkpoints import _seed_everything
from .training_config import ModelConfig, TrainConfig


def class_vocabulary(config: TrainConfig) -> tuple[str, ...]:
    """The classes a classifier answers with: the tasks' answers, or a saved classifier's own classes (in its order)
    where they cover them, so that a model trained on qa1-qa5 can go on with qa1 alone without a new head."""
    from .tasks import answer_vocabulary

    answers = answer_vocabulary(config.task_names)
    m = config.model
    if m.head != "classification" or m.backbone == "scratch":
        return answers
    folder = Path(m.backbone)
    saved = folder / "backbone" / "config.json" if (folder / "memformers.json").exists() else folder / "config.json"
    if not saved.is_file():
        return answers
    id2label = json.loads(saved.read_text()).get("id2label") or {}
    classes = tuple(id2label[key] for key in sorted(id2label, key=int))
    return classes if set(answers) <= set(classes) else answers


def build_model(config: TrainConfig):
    """The mechanism and tokenizer a config describes (weights drawn from `optim.seed` where they are new)."""
    from . import backbones
    from .tasks import get_tokenizer

    m = config.model
    tokenizer = get_tokenizer(config.tokenizer_name)
    answers = class_vocabulary(config)  # class i = answers[i], kept in the backbone's id2label
    labels = {"id2label": dict(enumerate(answers)), "label2id": {a: i for i, a in enumerate(answers)}}
    _seed_everything(config.optim.seed)
    if (Path(m.backbone) / "memformers.json").exists():  # a saved memformers model: train it further
        model = _continue_from(m, Path(m.backbone))
        _set_kernels(model.backbone, m)
        return _frozen_as_asked(model, m), tokenizer
    if m.backbone == "scratch":
        backbone = _scratch_backbone(m, tokenizer, labels)
    else:
        kwargs = {"num_labels": len(answers)} | labels if m.head == "classification" else {}
        backbone, _ = backbones.load(m.backbone, head=m.head, **kwargs)
        if m.keep_layers is not None:
            try:
                backbones.keep_layers(backbone, m.keep_layers)
            except ValueError as error:
                raise ValueError(f"model.keep_layers: {error}") from None
    _set_kernels(backbone, m)
    from . import registry

    mechanism = registry.get(m.mechanism)
    config = m.mechanism_config()
    if m.head != "causal-lm":  # the task tokenizer's [CLS] and [SEP], for mechanisms whose layout has them
        special = {"cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
        config = dataclasses.replace(config, **{k: v for k, v in special.items() if k in config.knobs()})
    try:
        model = mechanism.model(backbone, config)
    except ValueError as error:
        raise ValueError(f"[model.{m.mechanism}] {error}") from None
    return _frozen_as_asked(model, m), tokenizer


def _set_kernels(backbone, m: ModelConfig) -> None:
    """`model.dropout` (pretrained or saved backbones: a scratch one is built with its own) and `model.attention`."""
    from . import backbones

    if m.dropout is not None:
        backbones.set_dropout(backbone, m.dropout)
    if m.attention is not None:
        backbones.set_attention(backbone, m.attention)


def _frozen_as_asked(model, m: ModelConfig):
    """`model.freeze_backbone`: only the mechanism's own weights train (the backbone is left as loaded)."""
    model.freeze_backbone = model.freeze_backbone or m.freeze_backbone
    return model


def _continue_from(m: ModelConfig, path: Path):
    """A model saved by `save_pretrained`, with the config's training knobs; its shape must match the config.

    The knobs that shape weights or layouts (the config class's `fixed`) must equal the saved ones; those that only
    size a state (`resizable`: kNN/LongMem `memory_size`), those no weight depends on (`tunable`: ARMT's
    `write_threshold`) and the driver's follow the config, `segment_size` too (no
    weight depends on it: a model trained on short segments goes on with longer ones, rebuilt around the same
    weights and checked against the backbone's window); the others stay as saved. To put a saved backbone into
    another mechanism, give its `backbone/` folder instead.
    """
    from . import registry
    from .saving import load

    model = load(path)
    mechanism = registry.get(m.mechanism)
    if not isinstance(model, mechanism.model):
        raise ValueError(
            f"model.mechanism = {m.mechanism!r}, but {path} holds a {type(model).__name__}; to wrap its backbone in "
            f"another mechanism set model.backbone = {str(path / 'backbone')!r}"
        )
    wanted, saved = m.mechanism_config().to_dict(), model.config_dict()
    top = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in model.config.fixed:
        if wanted[key] is not None and wanted[key] != saved[key]:  # None: the backbone's default, as saved
            name = f"model.{key}" if key in top else f"model.{m.mechanism}.{key}"
            raise ValueError(f"{name} = {wanted[key]!r}, but the model saved in {path} has {saved[key]!r}")
    follow = (*model.config.resizable, *model.config.tunable, "bptt_depth", "gradient_checkpointing")
    model.config = dataclasses.replace(model.config, **{key: getattr(m.mechanism_config(), key) for key in follow})
    if wanted["segment_size"] not in (None, saved["segment_size"]):
        model = _resegmented(model, wanted["segment_size"])
    return model


def _resegmented(model, segment_size: int):
    """The same mechanism and weights in segments of `segment_size` positions (its layout, content and window
    checks redone by the constructor)."""
    config = dataclasses.replace(model.config, segment_size=segment_size)
    try:
        rebuilt = type(model).from_config(model.backbone, config)
    except ValueError as error:
        raise ValueError(f"model.segment_size: {error}") from None
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt


def _scratch_backbone(m: ModelConfig, tokenizer, labels: dict):
    import transformers

    s = m.scratch
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=m.segment_size * (1 if s.family == "bert" else 2),  # a decoder's cache: 2 segments
        pad_token_id=tokenizer.pad_token_id,
    )
    if s.family == "bert":
        config = transformers.BertConfig(
            **common, hidden_dropout_prob=s.dropout, attention_probs_dropout_prob=s.dropout, **labels
        )
        cls = transformers.BertForSequenceClassification if m.head == "classification" else transformers.BertForMaskedLM
        return cls(config)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    config = transformers.LlamaConfig(
        **common, num_key_value_heads=s.heads, attention_dropout=s.dropout, bos_token_id=bos, eos_token_id=eos
    )
    return transformers.LlamaForCausalLM(config)
