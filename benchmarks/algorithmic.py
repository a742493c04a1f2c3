"""Copy, reverse and associative retrieval (the RMT paper, arXiv 2207.06881): accuracy against the number of segments.

Each model trained by `configs/cpu_algorithmic_<task>_<mechanism>.toml` (RMT, and the segment cache as the
Transformer-XL-style baseline) is measured on fresh problems whose source fills 1, 2, 3, 4, 6, 8, 12 and 16 segments,
beyond the training curriculum too. The samples come from the trainer's own `TaskBatches` under an evaluation seed
that neither training nor its validation used. Scores are teacher-forced, over the *whole* target (the trainer's
validation looks only at the last segment): exact match (every target symbol right) and per-symbol accuracy, with
95% Wilson intervals; per-symbol chance is 1 / vocab_size.

    memformers train configs/cpu_algorithmic_copy_rmt.toml          # … and the five other configs
    python benchmarks/algorithmic.py --threads 1                     # → results/algorithmic_cpu.json and .png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS, ROOT, write_result
from rich.progress import Progress

import memformers as mf
from memformers.evaluation import wilson_interval
from memformers.saving import read_config
from memformers.segments import IGNORE_INDEX, shift_labels
from memformers.tasks import get_tokenizer
from memformers.training import TaskBatches, config_from_dict

TASKS = ("copy", "reverse", "associative")
MECHANISMS = ("rmt", "cache")
SEGMENTS = (1, 2, 3, 4, 6, 8, 12, 16)
EVAL_SEED = 7_000_003  # neither the training seed (0) nor its validation seed (1_000_003)


def target_scores(
    logits: torch.Tensor,  # [batch, length, vocab] at every input position (logits="all")
    labels: torch.Tensor,  # [batch, length] aligned with the input; IGNORE_INDEX outside the target
    attention_mask: torch.Tensor,  # [batch, length]
) -> tuple[torch.Tensor, torch.Tensor]:  # ([batch] right target symbols, [batch] target symbols)
    """Teacher-forced hits over each row's whole target: position t's argmax against the next real token's label."""
    targets = shift_labels(labels, attention_mask)  # [batch, length]
    scored = targets != IGNORE_INDEX
    hits = (logits.argmax(-1) == targets) & scored
    return hits.sum(1), scored.sum(1)


def state_floats(model: torch.nn.Module) -> int:
    """Floats carried from one segment to the next, per row: RMT's memory, or the cache's keys and values."""
    if isinstance(model, mf.RecurrentMemoryTransformer):
        return model.memory.numel()  # memory tokens × hidden
    config = model.backbone.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * model.content_size * head_dim


@torch.no_grad()
def measure(model: torch.nn.Module, batches: TaskBatches, segments: int, samples: int, batch_size: int, seed: int):
    """Exact-match count, right-symbol count and symbol count over `samples` problems of `segments` source segments."""
    exact = right = total = 0
    for start in range(0, samples, batch_size):
        batch = batches.batch(list(range(start, min(start + batch_size, samples))), segments, seed, vary=False)
        out = model(**batch, logits="all")
        hits, counts = target_scores(out.logits, batch["labels"], batch["attention_mask"])
        exact += int((hits == counts).sum())
        right += int(hits.sum())
        total += int(counts.sum())
    return exact, right, total


def load_run(run: Path) -> tuple[torch.nn.Module, TaskBatches, dict]:
    """The trained model, the trainer's sample builder for its task, and its training config."""
    model = mf.load(run / "final")
    train_config = read_config(run / "final")["extra"]["train_config"]
    config = config_from_dict(train_config)
    batches = TaskBatches(config, get_tokenizer(config.tokenizer_name), model.content_size)
    return model, batches, train_config


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    colors = {"rmt": "tab:blue", "cache": "tab:orange"}
    for ax, task in zip(axes[0], tasks, strict=True):
        for mechanism in MECHANISMS:
            mine = [r for r in rows if r["task"] == task and r["mechanism"] == mechanism]
            if not mine:
                continue
            x = [r["segments"] for r in mine]
            exact = [r["exact"] for r in mine]
            low = [r["exact"] - r["interval"][0] for r in mine]
            high = [r["interval"][1] - r["exact"] for r in mine]
            name = f"{mechanism.upper() if mechanism == 'rmt' else 'segment cache'}"
            ax.errorbar(
                x, exact, yerr=[low, high], marker="o", color=colors[mechanism], label=f"{name}: exact", capsize=2
            )
            ax.plot(
                x,
                [r["per_symbol"] for r in mine],
                "--",
                marker=".",
                color=colors[mechanism],
                label=f"{name}: per symbol",
            )
            ax.axvspan(0.8, max(mine[0]["trained_segments"]) + 0.2, color="0.93", zorder=0)
        ax.axhline(mine[0]["chance_per_symbol"], color="0.5", lw=0.8, ls=":", label="chance per symbol")
        ax.set_xscale("log", base=2)
        ax.set_xticks(SEGMENTS, [str(s) for s in SEGMENTS])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.set_xlabel("source segments (grey: trained)")
    axes[0][0].set_ylabel("accuracy (teacher-forced)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="folder of the cpu_algorithmic_* runs")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=MECHANISMS)
    parser.add_argument("--segments", nargs="+", type=int, default=list(SEGMENTS))
    parser.add_argument("--samples", type=int, default=128, help="problems per cell")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="algorithmic_cpu", help="results/NAME.json and NAME.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    cells = [(t, m, n) for t in args.tasks for m in args.mechanisms for n in args.segments]
    with Progress() as progress:
        bar = progress.add_task("measuring", total=len(cells))
        loaded: dict[tuple[str, str], tuple] = {}
        for task, mechanism, segments in cells:
            name = f"cpu_algorithmic_{task}_{mechanism}"
            if (task, mechanism) not in loaded:
                loaded[task, mechanism] = load_run(args.runs / name)
            model, batches, train_config = loaded[task, mechanism]
            seed = train_config["task"]["seed"]
            if args.seed in (seed, train_config["task"].get("eval_seed") or seed + 1_000_003):
                raise ValueError(f"--seed {args.seed} is one the training of {name} used; pick another")
            progress.update(bar, description=f"{task} · {mechanism} · {segments} seg")
            exact, right, total = measure(model, batches, segments, args.samples, args.batch_size, args.seed)
            rows.append(
                {
                    "task": task,
                    "mechanism": mechanism,
                    "segments": segments,
                    "samples": args.samples,
                    "exact": exact / args.samples,
                    "interval": wilson_interval(exact, args.samples),
                    "per_symbol": right / total,
                    "per_symbol_interval": wilson_interval(right, total),
                    "target_symbols": total // args.samples,
                    "chance_per_symbol": 1 / train_config["task"]["vocab_size"],
                    "state_floats": state_floats(model),
                    "content_size": model.content_size,
                    "trained_segments": train_config["curriculum"]["segments"],
                    "training_config": f"configs/{name}.toml",
                }
            )
            progress.advance(bar)
    print(f"{'task':<12}{'mechanism':<10}{'seg':>4}{'exact':>8}{'95% interval':>16}{'per symbol':>12}")
    for r in rows:
        low, high = r["interval"]
        print(
            f"{r['task']:<12}{r['mechanism']:<10}{r['segments']:>4}{r['exact']:>8.2f}"
            f"{f'[{low:.2f}, {high:.2f}]':>16}{r['per_symbol']:>12.3f}"
        )
    for task in args.tasks:  # RMT against the cache within this run, per segment count
        pairs = {(r["mechanism"], r["segments"]): r for r in rows if r["task"] == task}
        ratios = [
            f"{n}: {pairs['rmt', n]['per_symbol'] / max(pairs['cache', n]['per_symbol'], 1e-9):.2f}"
            for n in args.segments
            if ("rmt", n) in pairs and ("cache", n) in pairs
        ]
        if ratios:
            print(f"{task}: per-symbol accuracy RMT / cache by segments — " + ", ".join(ratios))
    payload = {
        "description": "teacher-forced accuracy over the whole target vs source segments; RMT vs segment cache",
        "eval_seed": args.seed,
        "rows": rows,
    }
    print(write_result(args.name, payload))
    plot(rows, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
