"""`save_pretrained` / `load`: a mechanism, its backbone and its own weights in one folder.

Layout: `memformers.json` (mechanism and constructor arguments), `backbone/` (the backbone's own
`save_pretrained`, safetensors), `memformers.safetensors` (every parameter outside the backbone). The mechanism is
found by name in the registry and rebuilt from its config class. Written atomically (`files.atomic_folder`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_folder

CONFIG_NAME = "memformers.json"
WEIGHTS_NAME = "memformers.safetensors"
BACKBONE_DIR = "backbone"
FORMAT_VERSION = 1


def own_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers that belong to the mechanism, not to its backbone."""
    return {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if not name.startswith(f"{BACKBONE_DIR}.")
    }


STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _stored_as(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `dtype`; tensors sharing storage (tied embeddings) stay shared, so they are written
    once."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = tensor.data_ptr()
        if key not in cast:
            cast[key] = tensor.detach().to(dtype)
        out[name] = cast[key]
    return out


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    extra: dict | None = None,
    dtype: str | None = None,
) -> Path:
    """Write `model` (a memformers mechanism) to the folder `path`, atomically. `dtype="float16"` (or "bfloat16")
    stores the weights at half the size, for shipping; `load` computes in the model's own precision again."""
    from .errors import InputError

    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise InputError(f"dtype {dtype!r}: one of {sorted(STORAGE_DTYPES)}, or None to store as computed")
    path = Path(path)
    own, backbone_weights = own_state_dict(model), None  # None: the backbone writes its own, as computed
    if dtype is not None:
        backbone_weights = model.backbone.state_dict()
        computed = next((t.dtype for t in backbone_weights.values() if t.is_floating_point()), torch.float32)
        backbone_weights, own = (
            _stored_as(backbone_weights, STORAGE_DTYPES[dtype]),
            _stored_as(own, STORAGE_DTYPES[dtype]),
        )
    with atomic_folder(path) as tmp:
        model.backbone.save_pretrained(tmp / BACKBONE_DIR, state_dict=backbone_weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / BACKBONE_DIR)
        save_file(own, tmp / WEIGHTS_NAME)
        config = {
            "format_version": FORMAT_VERSION,
            "mechanism": type(model).__name__,
            "backbone_class": type(model.backbone).__name__,
            "config": model.config_dict(),
            "extra": extra or {},
        }
        if dtype is not None:  # what `load` casts back to
            config["stored_as"], config["dtype"] = dtype, str(computed).removeprefix("torch.")
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return path


def read_config(path: str | os.PathLike) -> dict:
    """The `memformers.json` of a saved model, with a clear error when `path` is not one."""
    from .errors import InputError

    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise InputError(f"path {str(path)!r} is not a saved memformers model (no {CONFIG_NAME} inside)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{file} is not valid JSON ({error}); save the model again with save_pretrained") from None
    if not isinstance(config, dict) or not {"mechanism", "backbone_class", "config"} <= set(config):
        raise InputError(f"{file} lacks mechanism, backbone_class or config; save the model again with save_pretrained")
    check_weight_files(path)
    return config


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Load a model written by `save_pretrained`: the same mechanism, backbone and weights, bit for bit."""
    from . import registry

    config = read_config(path)
    try:
        mechanism = registry.get(config["mechanism"])
        knobs = mechanism.config.from_saved(config["config"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    backbone_class = getattr(transformers, config["backbone_class"])
    computed = {"dtype": getattr(torch, config["dtype"])} if "stored_as" in config else {}
    backbone = backbone_class.from_pretrained(Path(path) / BACKBONE_DIR, **computed)
    model = mechanism.model.from_config(backbone, knobs)
    missing, unexpected = model.load_state_dict(load_file(Path(path) / WEIGHTS_NAME), strict=False)
    missing = [name for name in missing if not name.startswith(f"{BACKBONE_DIR}.")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match {config['mechanism']}: missing {missing}, unexpected {unexpected}"
        )
    if device is not None:
        model.to(device)
    return model.eval()


def check_weight_files(path: str | os.PathLike) -> None:
    """Refuse a saved model whose safetensors files cannot be read (truncated, overwritten), naming the file: its
    header is read, not its tensors, so this costs next to nothing."""
    from safetensors import SafetensorError, safe_open

    from .errors import InputError

    files = [Path(path) / WEIGHTS_NAME, *sorted((Path(path) / BACKBONE_DIR).glob("*.safetensors"))]
    for file in files:
        if not file.is_file():
            raise InputError(f"{file} is missing; save the model again with save_pretrained")
        try:
            with safe_open(file, framework="pt"):
                pass
        except (OSError, SafetensorError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"{file} is not a readable safetensors file ({reason})") from None
