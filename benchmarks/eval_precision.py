"""Reading a long input in bf16 against fp32: speed, and whether the answers stay the same.

    python benchmarks/eval_precision.py --checkpoint checkpoints/babilong-stage0 --tasks qa1,qa2,qa3,qa4,qa5 \\
        --length 16384 --samples 20 --rounds 2

Every round reads the same samples in fp32, then in bf16 (autocast, `memformers.precision`), back to back in one
process, so the ratio of the two times is what to read on a noisy machine. The answers of the two precisions are
compared sample by sample: how many agree, and each precision's accuracy. Writes results/eval_precision.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_result

import memformers as mf
from memformers.cli.checkpoints import checkpoint_tokenizer
from memformers.evaluation import class_answers, predict_classes
from memformers.precision import autocast
from memformers.saving import read_config
from memformers.tasks import make_sample


def read(model, samples: list, precision: str, batch: int) -> tuple[float, list[int]]:
    """Seconds to read every sample (`batch` side by side), and the predicted classes."""
    start = time.perf_counter()
    predicted: list[int] = []
    with autocast(precision):
        for first in range(0, len(samples), batch):
            predicted += predict_classes(model, samples[first : first + batch])
    return time.perf_counter() - start, predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/babilong-stage0")
    parser.add_argument("--tasks", default="qa1,qa2,qa3,qa4,qa5")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=20, help="Samples a task.")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="eval_precision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = mf.load(args.checkpoint).eval()
    tokenizer = checkpoint_tokenizer(args.checkpoint, read_config(args.checkpoint))
    classes = class_answers(model)
    rows = []
    for task in args.tasks.split(","):
        samples = [make_sample(task, args.length, tokenizer, 0, index, "test") for index in range(args.samples)]
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        answers: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            for precision in ("fp32", "bf16"):
                seconds, answers[precision] = read(model, samples, precision, args.batch)
                times[precision].append(seconds)
        right = {p: sum(classes[a] == s.target for a, s in zip(answers[p], samples, strict=True)) for p in answers}
        row = {
            "task": task,
            "samples": len(samples),
            "fp32_s": round(statistics.median(times["fp32"]), 2),
            "bf16_s": round(statistics.median(times["bf16"]), 2),
            "speedup": round(statistics.median(a / b for a, b in zip(times["fp32"], times["bf16"], strict=True)), 2),
            "same_answers": sum(a == b for a, b in zip(answers["fp32"], answers["bf16"], strict=True)),
            "fp32_correct": right["fp32"],
            "bf16_correct": right["bf16"],
        }
        rows.append(row)
        print(row, flush=True)
    total = sum(r["samples"] for r in rows)
    summary = {
        "speedup_median": statistics.median(r["speedup"] for r in rows),
        "same_answers": f"{sum(r['same_answers'] for r in rows)}/{total}",
        "fp32_correct": f"{sum(r['fp32_correct'] for r in rows)}/{total}",
        "bf16_correct": f"{sum(r['bf16_correct'] for r in rows)}/{total}",
    }
    print(summary)
    write_result(args.name, {"settings": vars(args), "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
