"""What a saved model says about itself: its config, the tokenizer and tasks it was trained with; and the model
shipped with the repository."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import InputError, InputWarning

# src/memformers/cli/checkpoints.py → the repository's root
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[3] / "checkpoints" / "babilong-armt"


def read_checkpoint(checkpoint: Path, option: str) -> dict:
    """The `memformers.json` of a saved model, or an error naming the option that gave the folder."""
    from ..saving import CONFIG_NAME, read_config

    if not (Path(checkpoint) / CONFIG_NAME).is_file():
        raise InputError(f"{option}: {str(checkpoint)!r} holds no model saved by memformers (no {CONFIG_NAME} inside)")
    return read_config(checkpoint)


def checkpoint_tokenizer(checkpoint: Path, config: dict) -> str:
    """The tokenizer a checkpoint was trained with (recorded by the trainer), else the one saved beside it."""
    return config.get("extra", {}).get("tokenizer") or str(Path(checkpoint) / "backbone")


def trained_tasks(config: dict) -> list[str]:
    """The tasks a checkpoint was trained on, as the trainer recorded them, each once ([] when not recorded): a
    config may list a task twice to train on it more often."""
    names = [name.strip() for name in str(config.get("extra", {}).get("task") or "").split(",") if name.strip()]
    return list(dict.fromkeys(names))


def warn_untrained_tasks(checkpoint: Path, config: dict, tasks: list[str]) -> None:
    trained = trained_tasks(config)
    untrained = [name for name in tasks if trained and name not in trained]
    if untrained:
        warnings.warn(
            f"{checkpoint} was trained on {', '.join(trained)}, not on {', '.join(untrained)}: expect chance-level "
            "answers there",
            InputWarning,
            stacklevel=2,
        )


def check_vocabulary(model, tokenizer, where: str) -> None:
    """Refuse a tokenizer whose ids run past the model's embeddings: ids from another tokenizer."""
    rows = model.backbone.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(
            f"tokenizer: {where} gives ids up to {len(tokenizer) - 1:,}, but the model embeds only {rows:,}: the ids "
            "come from another tokenizer; use the tokenizer the model was trained with"
        )


def tune_knobs(model, settings: list[str], option: str = "--set") -> dict:
    """Set a saved model's tunable knobs (its config class's `tunable`: ARMT's `write_threshold`), given as
    KEY=VALUE, in place (`MemoryModel`'s attribute for a knob, which its config checks again); returns them as set.
    No weight depends on such a knob, so it may differ from training's; the knobs that shape weights are refused."""
    from ..training_config_parsing import parse_override

    tunable = model.config.tunable
    knobs = {}
    for text in settings:
        if "=" not in text:
            raise InputError(f"{option} {text!r}: give KEY=VALUE, e.g. write_threshold=0.01")
        path, value = parse_override(text)
        key = ".".join(path)
        if key not in tunable:
            allowed = ", ".join(tunable) or "none"
            raise InputError(
                f"{option} {key}: a saved {type(model).__name__} can change only knobs no weight depends on "
                f"({allowed}); the others shape its weights"
            )
        try:
            setattr(model, key, value)
        except ValueError as error:
            raise InputError(f"{option}: {error}") from None
        knobs[key] = value
    return knobs


def tunable_knobs(model) -> dict:
    """The values of a model's tunable knobs (none for a mechanism without them), as it reads now."""
    return {key: getattr(model.config, key) for key in model.config.tunable}


def resolve_tokenizer(tokenizer: str) -> str:
    """A tokenizer name or folder as given, or, for a saved memformers model, the tokenizer it records."""
    from ..saving import CONFIG_NAME

    if (Path(tokenizer) / CONFIG_NAME).is_file():
        return checkpoint_tokenizer(Path(tokenizer), read_checkpoint(Path(tokenizer), "--tokenizer"))
    return tokenizer
