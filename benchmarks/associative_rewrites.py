"""Associative retrieval with rewrites (the ARMT paper, arXiv 2407.04841, App. E), from scratch on the CPU.

A stream of key→value updates, one per segment; a key may be written again and again (16 keys for up to 500
updates), and the last segment asks for one key that appeared: the answer is its *latest* value. ARMT, RMT and the
segment cache (Transformer-XL-style baseline) are trained the same way on the same samples (same seed, steps,
batches, optimiser) around the same 4-layer, 128-wide scratch Llama, on 1 to 50 updates, then measured on fresh
samples with 10, 50, 100, 200 and 500 updates (up to 10× the training length). Chance is 1/16.

Curriculum: stages of a fixed number of steps, each drawing 1 to its ceiling of updates a batch (default ceilings
3, 6, 12, 25, 50). From scratch a memory first has to learn to carry one value at all: started at 1–5 updates and
lr 1e-3, ARMT's loss stayed at ln 16 and then went to NaN (its read divides by zᵀφ(q) + ε, which a feature the
keys barely wrote keeps small); at lr 3e-4 on 1–3 updates it reaches 81% in 400 steps of batch 32. The stages are
steps, not thresholds, so that every mechanism sees the same samples.

Layout: every segment's content is 4 tokens, `[PAIR k1 k2 v]` for an update and `[QUERY k1 k2 answer]` last; the
loss and the accuracy are on the answer only. ARMT: 8 memory tokens (segment_size 12), d_mem 32. RMT: 8 memory
vectors (segment_size 20: read 8 + content 4 + write 8). Segment cache: the previous segment's keys and values.

    for m in armt rmt cache; do python benchmarks/associative_rewrites.py --mechanisms $m & done
    # → results/associative_rewrites.json and .png

Training resumes from runs/associative_rewrites/<mechanism>/ (a checkpoint every 50 steps, refused if it was made
with other settings); each mechanism can run as its own process (`--mechanisms armt`), and its entry is merged into
the JSON when it finishes. `--evaluate-only` measures the last checkpoint of a run stopped early, and `--stop-after N`
stops after N of the steps the learning rate schedule plans; the JSON records the steps taken ("steps") beside the
planned ones ("planned_steps").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import transformers
from common import RESULTS, ROOT, write_result

import memformers as mf
from memformers.evaluation import wilson_interval
from memformers.segments import IGNORE_INDEX

PAD, PAIR, QUERY, FIRST_SYMBOL = 0, 1, 2, 3
KEY_SYMBOLS = 4  # keys are 2 of 4 symbols: 16 distinct keys, so 50 updates rewrite most of them
VALUE_SYMBOLS = 16
VOCAB = FIRST_SYMBOL + VALUE_SYMBOLS
CONTENT = 4  # tokens per segment
UPDATES = (10, 50, 100, 200, 500)
MECHANISMS = ("armt", "rmt", "cache")
LABELS = {"armt": "ARMT", "rmt": "RMT", "cache": "segment cache"}
RUNS = ROOT / "runs" / "associative_rewrites"
EVAL_SEED = 7_000_003
VALIDATION_SEED = 1_000_003


def make_batch(updates: int, batch: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` problems of `updates` key→value writes and one query: ids and labels [batch, 4·(updates + 1)]."""
    ids = torch.empty(batch, CONTENT * (updates + 1), dtype=torch.long)
    for row in range(batch):
        latest: dict[tuple[int, int], int] = {}
        tokens = []
        for _ in range(updates):
            key = (rng.randrange(KEY_SYMBOLS), rng.randrange(KEY_SYMBOLS))
            value = rng.randrange(VALUE_SYMBOLS)
            latest[key] = value
            tokens += [PAIR, FIRST_SYMBOL + key[0], FIRST_SYMBOL + key[1], FIRST_SYMBOL + value]
        asked = rng.choice(sorted(latest))
        tokens += [QUERY, FIRST_SYMBOL + asked[0], FIRST_SYMBOL + asked[1], FIRST_SYMBOL + latest[asked]]
        ids[row] = torch.tensor(tokens)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = ids[:, -1]  # only the answer is scored (the model predicts it from the query key)
    return ids, labels


def backbone(seed: int) -> transformers.PreTrainedModel:
    """The scratch decoder every mechanism wraps: 4 layers, width 128 (the paper's App. E size)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=512,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=PAIR,
        eos_token_id=QUERY,
    )
    return transformers.LlamaForCausalLM(config)


def build(name: str, seed: int, memory_tokens: int, d_mem: int) -> mf.MemoryModel:
    net = backbone(seed)
    if name == "armt":
        options = {"num_memory_tokens": memory_tokens, "segment_size": CONTENT + memory_tokens, "d_mem": d_mem}
        # the results committed were measured with unnormalised features, before ARMT's default became the authors'
        model = mf.AssociativeMemoryTransformer(net, **options, normalize_features=False)
    elif name == "rmt":
        model = mf.RecurrentMemoryTransformer(
            net, num_memory_tokens=memory_tokens, segment_size=CONTENT + 2 * memory_tokens
        )
    elif name == "cache":
        model = mf.SegmentCacheTransformer(net, segment_size=CONTENT)
    else:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {name!r}")
    assert model.content_size == CONTENT
    return model


@torch.no_grad()
def accuracy(model: mf.MemoryModel, updates: int, samples: int, batch: int, seed: int) -> tuple[int, int]:
    """(right answers, samples) on fresh problems drawn from `seed`."""
    model.eval()
    rng = random.Random(seed * 1_000 + updates)
    right = 0
    for start in range(0, samples, batch):
        ids, labels = make_batch(updates, min(batch, samples - start), rng)
        out = model(ids, labels=labels, logits="labelled")
        predicted = out.logits[:, -2].argmax(-1)  # the query key's last position predicts the answer
        right += int((predicted == ids[:, -1]).sum())
    model.train()
    return right, samples


def max_updates_at(step: int, stages: list[int], steps_per_stage: int) -> int:
    """Curriculum: the ceiling of updates of the stage that `step` (0-based) is in."""
    return stages[min(step // steps_per_stage, len(stages) - 1)]


def parse_stages(text: str) -> list[int]:
    try:
        stages = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
    if stages != sorted(stages) or stages[0] < 1:
        raise argparse.ArgumentTypeError(f"increasing ceilings ≥ 1, e.g. 3,6,12,25,50; got {text!r}")
    return stages


def save_atomically(payload: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def train(name: str, args: argparse.Namespace) -> tuple[mf.MemoryModel, int, list[dict], float]:
    """Train (or resume) one mechanism; returns it, the steps it took, its validation curve and its training seconds.
    With `--evaluate-only` the last checkpoint as it is (a run stopped early)."""
    folder = RUNS / name
    folder.mkdir(parents=True, exist_ok=True)
    model = build(name, args.seed, args.memory_tokens, args.d_mem)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup, planned = 100, planned_steps(args)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / planned))),
    )
    rng = random.Random(args.seed)
    step, curve, seconds = 0, [], 0.0
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        if saved.get("settings") != run_settings(args):
            raise SystemExit(
                f"{checkpoint} was trained with other settings ({saved.get('settings')}); move it away to start "
                f"afresh with {run_settings(args)}"
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        step, curve, seconds = saved["step"], saved["curve"], saved["seconds"]
        print(f"{name}: resumed at step {step}", flush=True)
    model.train()
    stop = planned if args.stop_after is None else min(args.stop_after, planned)
    while step < stop and not args.evaluate_only:
        started = time.perf_counter()
        ceiling = max_updates_at(step, args.stages, args.steps_per_stage)
        updates = rng.randint(1, ceiling)
        ids, labels = make_batch(updates, args.batch, rng)
        loss = model(ids, labels=labels, logits="none").loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        seconds += time.perf_counter() - started
        if step % args.eval_every == 0 or step == planned:
            right, total = accuracy(model, ceiling, args.val_samples, args.batch, VALIDATION_SEED)
            curve.append(
                {"step": step, "loss": round(loss.item(), 4), "updates": ceiling, "val_accuracy": right / total}
            )
            print(f"{name} step {step}: loss {loss.item():.3f}, validation accuracy at {ceiling} updates "
                  f"{right / total:.3f} ({seconds:.0f} s)", flush=True)  # fmt: skip
        if step % 50 == 0 or step == planned:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "settings": run_settings(args)}
            state |= {"schedule": schedule.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}
            save_atomically(state | {"step": step, "curve": curve, "seconds": seconds}, checkpoint)
    return model, step, curve, seconds


def planned_steps(args: argparse.Namespace) -> int:
    return len(args.stages) * args.steps_per_stage


def run_settings(args: argparse.Namespace) -> dict:
    """What a checkpoint must have been trained with to be resumed."""
    keys = ("stages", "steps_per_stage", "batch", "lr", "memory_tokens", "d_mem", "seed")
    return {key: getattr(args, key) for key in keys}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in results.items():
        xs = [int(u) for u in entry["accuracy"]]
        ys = [entry["accuracy"][str(u)]["accuracy"] for u in xs]
        low = [entry["accuracy"][str(u)]["interval"][0] for u in xs]
        high = [entry["accuracy"][str(u)]["interval"][1] for u in xs]
        ax.plot(xs, ys, marker="o", label=LABELS[name])
        ax.fill_between(xs, low, high, alpha=0.15)
    ax.axhline(1 / VALUE_SYMBOLS, color="gray", linestyle=":", label="chance")
    ax.axvline(results[next(iter(results))]["train_updates"], color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("key-value updates (segments) before the query")
    ax.set_ylabel("accuracy of the latest value")
    ax.set_ylim(0, 1.02)
    taken = {entry["steps"] for entry in results.values()}
    steps = ", ".join(f"{LABELS[name]} {entry['steps']}" for name, entry in results.items())
    steps = f"{taken.pop()} each" if len(taken) == 1 else steps
    ax.set_title(f"Associative retrieval with rewrites (steps: {steps})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def table(results: dict) -> str:
    head = "| mechanism | steps | " + " | ".join(f"{u} updates" for u in UPDATES) + " |"
    lines = [head, "|" + " --- |" * (len(UPDATES) + 2)]
    for name, entry in results.items():
        cells = [f"{100 * entry['accuracy'][str(u)]['accuracy']:.1f}" for u in UPDATES if str(u) in entry["accuracy"]]
        lines.append(f"| {LABELS[name]} | {entry['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=MECHANISMS)
    parser.add_argument("--stages", type=parse_stages, default=[3, 6, 12, 25, 50], help="Ceilings of updates.")
    parser.add_argument("--steps-per-stage", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--memory-tokens", type=int, default=8)
    parser.add_argument("--d-mem", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--val-samples", type=int, default=64)
    parser.add_argument("--test-samples", type=int, default=128)
    parser.add_argument("--test-batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="associative_rewrites")
    parser.add_argument("--evaluate-only", action="store_true", help="Measure the last checkpoint as it is.")
    parser.add_argument(
        "--stop-after", type=int, default=None, help="Stop training after this many of the --steps the schedule plans."
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = RESULTS / f"{args.name}.json"
    results: dict = {}
    for name in args.mechanisms:
        model, steps, curve, seconds = train(name, args)
        scores = {}
        for updates in UPDATES:
            right, total = accuracy(model, updates, args.test_samples, args.test_batch, EVAL_SEED)
            scores[str(updates)] = {"accuracy": right / total, "right": right, "samples": total}
            scores[str(updates)]["interval"] = list(wilson_interval(right, total))
            print(f"{name}: {updates} updates → {right / total:.3f}", flush=True)
        # Mechanisms may run as parallel processes: merge with what the others wrote meanwhile.
        results = json.loads(out.read_text())["results"] if out.exists() else {}
        results[name] = {
            "steps": steps,
            "planned_steps": planned_steps(args),
            "train_updates": max_updates_at(max(steps - 1, 0), args.stages, args.steps_per_stage),
            "train_seconds": round(seconds, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "accuracy": scores,
            "validation_curve": curve,
        }
        skip = ("mechanisms", "evaluate_only", "stop_after")
        settings = {k: v for k, v in vars(args).items() if k not in skip}
        payload = {"settings": settings, "chance": 1 / VALUE_SYMBOLS, "results": results}
        write_result(args.name, payload)
        plot(results, RESULTS / f"{args.name}.png")
    print(table(dict(sorted(results.items(), key=lambda item: MECHANISMS.index(item[0])))))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
