"""Training-step time on the CPU: fp32 against bf16 autocast, one thread against two, the next batch built in
a thread (prefetch), the backbone through torch.compile, torch's fused AdamW, dropout off and eager attention, on
the BABILong tasks config at one segment.

    python benchmarks/training_speed.py                  # configs/cpu_babilong_tasks.toml, 3 rounds of 20 steps
    python benchmarks/training_speed.py --rounds 2 --steps 10
    python benchmarks/training_speed.py --variant "bf16, 1 thread, prefetch" \
        --variant "bf16, 1 thread, prefetch, compiled" --name training_speed_compile
    python benchmarks/training_speed.py --config configs/cpu_babilong_qa1_armt.toml --segments 4 \
        --variant "lengths drawn per sample" --variant "lengths drawn per batch" --name training_speed_vary_per

Each round runs every variant back to back from the same initial weights and samples (the ratio of medians
within one run is what to read; the machine is noisy). "Today's fp32" is the trainer before these options:
fp32, torch's default threads (all cores), batches built inline. The loss after the steps says whether a
variant learns the same: bf16 changes rounding, not the samples. With `--segments N` the run trains at a stage of
N segments with lengths drawn from 1 to N, and a step's time varies with the length drawn: the mean step is then
what compares (the median otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from common import machine, write_result

from memformers import precision
from memformers.training import Trainer
from memformers.training_config_parsing import load_config


@dataclass(frozen=True)
class Variant:
    precision: str = "no"  # optim.mixed_precision
    threads: int = 1
    prefetch: bool = False  # build the next batch in a thread
    compiled: bool = False  # the backbone through torch.compile(dynamic=True): batches differ in width
    fused: bool = False  # torch's fused AdamW instead of its per-weight loop
    dropout: float | None = None  # model.dropout; None: the backbone's own (MiniLM: 0.1)
    attention: str | None = None  # model.attention; None: the backbone's own (sdpa)
    vary_per: str | None = None  # curriculum.vary_per with --segments; None: the config's


VARIANTS = {
    "fp32, 2 threads (today)": Variant(threads=2),
    "fp32, 1 thread": Variant(),
    "bf16, 2 threads": Variant("bf16", 2),
    "bf16, 1 thread": Variant("bf16"),
    "bf16, 2 threads, prefetch": Variant("bf16", 2, prefetch=True),
    "bf16, 1 thread, prefetch": Variant("bf16", prefetch=True),
    "bf16, 1 thread, prefetch, compiled": Variant("bf16", prefetch=True, compiled=True),
    "bf16, 1 thread, prefetch, fused AdamW": Variant("bf16", prefetch=True, fused=True),
    "bf16, 1 thread, prefetch, fused AdamW, no dropout": Variant("bf16", prefetch=True, fused=True, dropout=0.0),
    "bf16, 2 threads, prefetch, fused AdamW, no dropout": Variant("bf16", 2, prefetch=True, fused=True, dropout=0.0),
    "bf16, 1 thread, prefetch, fused AdamW, no dropout, eager attention": Variant(
        "bf16", prefetch=True, fused=True, dropout=0.0, attention="eager"
    ),
    "bf16, 2 threads, prefetch, fused AdamW, no dropout, eager attention": Variant(
        "bf16", 2, prefetch=True, fused=True, dropout=0.0, attention="eager"
    ),
    "fp32, 1 thread, fused AdamW, no dropout, eager attention": Variant(fused=True, dropout=0.0, attention="eager"),
    "lengths drawn per sample": Variant(
        "bf16", prefetch=True, fused=True, dropout=0.0, attention="eager", vary_per="sample"
    ),
    "lengths drawn per batch": Variant(
        "bf16", prefetch=True, fused=True, dropout=0.0, attention="eager", vary_per="batch"
    ),
}


def run_variant(config_path: str, steps: int, variant: Variant, segments: int | None = None) -> dict:
    """`steps` optimizer steps of a fresh run (at a stage of `segments`, lengths varied, if given); the median and
    mean step time after the first (a compiled backbone compiles there), and the last losses."""
    torch.set_num_threads(variant.threads)
    precision.cpu_has_native_bf16 = lambda: True  # measure bf16 even where the trainer would fall back to fp32
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"optim.mixed_precision={variant.precision}",
            f"optim.prefetch={str(variant.prefetch).lower()}",
            f"optim.fused_adamw={str(variant.fused).lower()}",
            f"output.dir={out}",
            "curriculum.eval_every=0",
            "output.checkpoint_every=0",
        ]
        if variant.dropout is not None:
            overrides.append(f"model.dropout={variant.dropout}")
        if variant.attention is not None:
            overrides.append(f'model.attention="{variant.attention}"')
        if segments is not None:
            overrides += [f"curriculum.segments=[{segments}]", "curriculum.vary_segments=true"]
        if variant.vary_per is not None:
            overrides.append(f'curriculum.vary_per="{variant.vary_per}"')
        trainer = Trainer(load_config(config_path, overrides), progress=False, resume=False)
        if variant.compiled:
            trainer.unwrapped.backbone.compile(dynamic=True)
        times, losses = [], []
        for _ in range(steps):
            start = time.perf_counter()
            record = trainer.train_step()
            times.append(time.perf_counter() - start)
            losses.append(record["loss"])
        trainer.close()
    return {
        "step_s": statistics.median(times[1:]),
        "mean_step_s": statistics.mean(times[1:]),
        "loss_last5": statistics.mean(losses[-5:]),
    }


def run_in_process(config_path: str, steps: int, variant: str, segments: int | None) -> dict:
    """One variant in a fresh Python process: Accelerate's precision and torch's thread count are per process."""
    command = [sys.executable, __file__, "--config", config_path, "--steps", str(steps), "--one", variant]
    command += [] if segments is None else ["--segments", str(segments)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cpu_babilong_tasks.toml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--segments", type=int, help="Train at a stage of this many segments, lengths varied.")
    parser.add_argument("--name", default="training_speed_cpu")
    parser.add_argument(
        "--variant", action="append", choices=list(VARIANTS), help="Measure only these (repeat the flag); default all."
    )
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)  # run one variant, print its JSON
    args = parser.parse_args()
    variants = args.variant or list(VARIANTS)
    if args.one:
        print(json.dumps(run_variant(args.config, args.steps, VARIANTS[args.one], args.segments)))
        return
    key = "step_s" if args.segments is None else "mean_step_s"  # lengths varied: the mean step compares
    load_before = os.getloadavg()  # other processes skew every variant; the ratios within a round are what to read
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name in variants:
            result = run_in_process(args.config, args.steps, name, args.segments)
            rows[name].append(result)
            print(f"round {round_ + 1}: {name:<28} {result[key]:.2f} s a step, loss {result['loss_last5']:.4f}")
    base = statistics.median(r[key] for r in rows[variants[0]])  # speed-ups against the first measured
    table = []
    for name, results in rows.items():
        step = statistics.median(r[key] for r in results)
        table.append(
            {
                "variant": name,
                "step_s": round(step, 3),
                "speed_up": round(base / step, 2),
                "loss_after_steps": round(statistics.mean(r["loss_last5"] for r in results), 4),
                "rounds": results,
            }
        )
    lines = ["| variant | s a step | speed-up | loss after the steps |", "|---|---:|---:|---:|"]
    lines += [
        f"| {r['variant']} | {r['step_s']:.2f} | ×{r['speed_up']:.2f} | {r['loss_after_steps']:.4f} |" for r in table
    ]
    cpu = machine()
    bf16 = "yes" if cpu["cpu_bf16"] else "no"
    lines.insert(0, f"{cpu['cpu']} ({cpu['cpu_capability']}, bf16 instructions: {bf16})\n")
    print("\n".join(lines))
    path = write_result(
        args.name,
        {
            "config": args.config,
            "steps": args.steps,
            "segments": args.segments,
            "step_statistic": "median" if key == "step_s" else "mean",
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "variants": table,
        },
    )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
