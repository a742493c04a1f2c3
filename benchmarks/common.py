"""What every benchmark writes beside its numbers: the machine, the command and the date."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

from memformers.evaluation import wilson_interval
from memformers.precision import cpu_has_native_bf16

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent  # commands are recorded as run from the repository root


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512, ...
        "cpu_bf16": cpu_has_native_bf16(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_model() -> str:
    """The CPU's model name: the same command runs several times faster or slower on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_result(name: str, payload: dict) -> Path:
    """Write `results/NAME.json` with the machine, the command line and the date."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def share(correct: int, total: int) -> dict:
    """A count of right answers as its accuracy with a 95% interval (None where nothing was counted)."""
    low, high = wilson_interval(correct, total) if total else (0.0, 1.0)
    return {"samples": total, "correct": correct, "accuracy": correct / total if total else None, "ci95": [low, high]}


def add_story_placement(parser: argparse.ArgumentParser) -> None:
    """--facts-first / --facts-apart, --num-facts and --distinct-actors, as `make_sample` takes them
    (`story_placement` reads them)."""
    placement = parser.add_mutually_exclusive_group()
    placement.add_argument("--facts-first", action="store_true", help="Every fact before the noise.")
    placement.add_argument("--facts-apart", action="store_true", help="The facts evenly spaced through the noise.")
    parser.add_argument(
        "--num-facts", type=int, nargs=2, metavar=("LOW", "HIGH"), help="Stories of LOW..HIGH facts (qa1's own: 2 10)."
    )
    parser.add_argument(
        "--distinct-actors",
        action="store_true",
        help="Every sentence moves another actor to another place (at most 4 facts): the last place answers 1/n.",
    )


def story_placement(args: argparse.Namespace) -> dict:
    """`make_sample`'s facts_first, facts_apart, num_facts and distinct_actors from `add_story_placement`'s
    arguments."""
    keys = ("facts_first", "facts_apart", "num_facts", "distinct_actors")
    return {key: getattr(args, key) for key in keys}
