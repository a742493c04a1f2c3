"""LongMem in-context learning: many labelled demonstrations in memory, then classification of new inputs.

Each episode maps words of the Austen text to "negative"/"positive" at random (`memformers.tasks.icl`), so only
the demonstrations reveal the labels. The frozen SmolLM2-135M backbone reads the last `segment_size` tokens (a few
demonstrations and the queries); LongMem reads the same window plus every earlier demonstration from its bank.
The window-truncated backbone is the baseline. Accuracy is the share of queries whose label scores higher than
the other label, per number of demonstrations.

The paper trains the SideNet on general text and then does ICL without further training; here, with a CPU budget,
the SideNet (the backbone frozen) is trained on episodes of this task whose words come from the "train" words, and
evaluated on fresh episodes over the disjoint "test" words. Training is resumable: a checkpoint is written under
`runs/longmem_icl/` every few steps and reloaded when the script is run again.

    python benchmarks/longmem_icl.py --steps 80 --episodes 6   # → results/longmem_icl.json and .png
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, write_result
from rich.progress import track

import memformers as mf
from memformers.evaluation import wilson_interval
from memformers.segments import Segment
from memformers.tasks.icl import TOKENS_PER_ITEM, ICLEpisode, make_icl_episode


def build(args) -> tuple[mf.LongMem, object]:
    backbone, tokenizer = mf.backbones.load("smollm2")
    blocks = backbone.config.num_hidden_layers
    stride = blocks // args.sidenet_layers
    fusion = args.sidenet_layers // 2
    model = mf.LongMem(
        backbone,
        sidenet_layers=args.sidenet_layers,
        fusion_layer=fusion,
        # The block the fusion layer copies (block 17 of 30 for 5 SideNet layers): its own keys for its queries.
        # Measured on the untrained backbone, two of its heads put the chunk of a query word's demonstration among
        # the top 8 of 256 by mean pre-rotary key (queried at the word); 3 SideNet layers (blocks 9, 19, 29) did not.
        memory_layer=stride * fusion + stride - 1,
        memory_size=args.memory_size,
        chunk_size=TOKENS_PER_ITEM,  # one demonstration per chunk
        top_k_chunks=args.top_k_chunks,
        segment_size=args.segment_size,
        alignment="right",  # the last segment is full: the same window as the truncated backbone's
    )
    return model, tokenizer


def label_scores(logits: torch.Tensor, episode: ICLEpisode, offset: int) -> torch.Tensor:
    """[queries, labels] the label logits at each query's ":" (`offset`: the episode position of logits[0])."""
    positions = episode.answer_positions - offset
    return logits[positions][:, episode.label_ids].float()


def longmem_scores(model: mf.LongMem, episode: ICLEpisode) -> torch.Tensor:
    """Read everything before the last segment into the bank (no graph: the bank holds frozen keys), then the
    last segment with a graph when one is being recorded."""
    ids = episode.input_ids.unsqueeze(0)
    with torch.no_grad():
        state, prompts = model.read_context(ids)
    window = prompts[0].unsqueeze(0)
    out, _ = model.step(Segment(window, torch.ones_like(window), None, 0), state)
    return label_scores(out.logits[0], episode, episode.num_tokens - window.shape[1])


@torch.no_grad()
def backbone_scores(model: mf.LongMem, episode: ICLEpisode, window: int) -> torch.Tensor:
    """The frozen backbone alone on the last `window` tokens: the demonstrations that fit, then the queries."""
    ids = episode.input_ids[-window:].unsqueeze(0)
    logits = model.backbone(input_ids=ids).logits[0]
    return label_scores(logits, episode, episode.num_tokens - ids.shape[1])


def train(model: mf.LongMem, tokenizer, args, run_dir: Path) -> dict:
    """Train the SideNet (and gate) on "train"-word episodes; resumes from `run_dir/checkpoint.pt`."""
    params = [p for p in model.parameters() if p.requires_grad]
    gate = [model.fusion.gate_bias]
    layers = [p for p in params if p is not model.fusion.gate_bias]
    # The gate is 9 numbers that must move by units in a hundred steps: its own, larger learning rate.
    groups = [{"params": layers, "lr": args.lr}, {"params": gate, "lr": args.gate_lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    checkpoint = run_dir / "checkpoint.pt"
    step, losses, seconds = 0, [], 0.0
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        step, losses, seconds = saved["step"], saved["losses"], saved["seconds"]
        print(f"resumed at step {step}")
    model.train()
    rng = random.Random(f"train-sizes-{args.seed}")
    sizes = [rng.choice(args.train_demonstrations) for _ in range(args.steps)]
    for index in track(range(step, args.steps), description="training the SideNet", total=args.steps - step):
        start = time.perf_counter()
        episode = make_icl_episode(tokenizer, sizes[index], args.queries, seed=args.seed * 100_000 + index)
        scores = longmem_scores(model, episode)
        loss = torch.nn.functional.cross_entropy(scores, episode.answers)  # over the two labels
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        seconds += time.perf_counter() - start
        step = index + 1
        if step % args.save_every == 0 or step == args.steps:
            trainable = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
            tmp = checkpoint.with_suffix(".tmp")
            torch.save(
                {
                    "model": trainable,
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "losses": losses,
                    "seconds": seconds,
                },
                tmp,
            )
            tmp.replace(checkpoint)
            recent = losses[-args.save_every :]
            print(f"step {step}: loss {sum(recent) / len(recent):.3f} ({seconds:.0f} s)", flush=True)
    model.eval()
    return {"steps": step, "seconds": round(seconds, 1), "losses": [round(x, 4) for x in losses]}


def evaluate(model: mf.LongMem, tokenizer, args, run_dir: Path) -> list[dict]:
    """Accuracy per number of demonstrations on "test"-word episodes; finished sizes are kept in `run_dir`."""
    done_path = run_dir / "evaluation.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    rows = []
    for count in args.demonstrations:
        if str(count) not in done:
            correct = {"longmem": 0, "backbone": 0}
            in_window = total = 0
            start = time.perf_counter()
            for episode_index in track(range(args.episodes), description=f"{count} demonstrations"):
                episode = make_icl_episode(tokenizer, count, args.queries, seed=episode_index, split="test")
                with torch.no_grad():
                    mine = longmem_scores(model, episode)
                theirs = backbone_scores(model, episode, args.segment_size)
                answers = episode.answers
                correct["longmem"] += int((mine.argmax(-1) == answers).sum())
                correct["backbone"] += int((theirs.argmax(-1) == answers).sum())
                # A query's demonstration is in the backbone's window when it lies in the last segment_size tokens.
                first_visible = episode.num_tokens - args.segment_size
                where = {word: i * TOKENS_PER_ITEM for i, (word, _) in enumerate(episode.demonstrations)}
                in_window += sum(where[word] >= first_visible for word, _ in episode.queries)
                total += len(answers)
            done[str(count)] = {
                "correct": correct,
                "total": total,
                "queries_with_demonstration_in_window": in_window,
                "seconds": round(time.perf_counter() - start, 1),
            }
            done_path.write_text(json.dumps(done, indent=2))
        record = done[str(count)]
        row = {
            "demonstrations": count,
            "queries": record["total"],
            "demonstration_in_window": record["queries_with_demonstration_in_window"],
        }
        for name, correct in record["correct"].items():
            low, high = wilson_interval(correct, record["total"])
            row[name] = {
                "accuracy": round(correct / record["total"], 4),
                "correct": correct,
                "interval_95": [round(low, 4), round(high, 4)],
            }
        rows.append(row)
        print(row, flush=True)
    return rows


@torch.no_grad()
def retrieval_diagnostic(model: mf.LongMem, tokenizer, args, count: int = 256, episodes: int = 2) -> dict:
    """Per fusion-layer query head: the share of queries whose demonstration's chunk is among the `top_k_chunks`
    retrieved (the bank's own search), for the query taken at the word and at the ":" that predicts the label."""
    captured = {}
    original = model.fusion.memory_attention

    def spy(query, bank):
        captured["query"] = query  # [1, heads, n, d]
        return original(query, bank)

    model.fusion.memory_attention = spy
    hits = {"word": 0, "colon": 0}
    per_head = {"word": None, "colon": None}
    total = 0
    try:
        for index in range(episodes):
            episode = make_icl_episode(tokenizer, count, args.queries, seed=1000 + index, split="test")
            ids = episode.input_ids.unsqueeze(0)
            state, prompts = model.read_context(ids)
            window = prompts[0].unsqueeze(0)
            model.step(Segment(window, torch.ones_like(window), None, 0), state)
            query = captured["query"][0]  # [heads, n, d]
            heads = query.shape[0]
            kv = state.store.keys.shape[1]
            first = episode.num_tokens - window.shape[1]
            where = {word: i for i, (word, _) in enumerate(episode.demonstrations)}
            for j, (word, _) in enumerate(episode.queries):
                chunk = where[word]
                if chunk >= int(state.store.size[0]):  # its demonstration is in the window, not the bank
                    continue
                total += 1
                for name, shift in (("word", 1), ("colon", 0)):
                    q = query[:, int(episode.answer_positions[j]) - first - shift]  # [heads, d]
                    grouped = q.view(1, kv, heads // kv, -1)  # the heads of a group share a bank
                    _, slots = state.store.search(grouped, model.top_k_chunks)  # [1, kv, group, k]
                    found = (slots[0] == chunk).any(-1).reshape(heads).long()  # head h = kv · group + g
                    per_head[name] = found if per_head[name] is None else per_head[name] + found
                    hits[name] += int(found.any())
    finally:
        model.fusion.memory_attention = original
    return {
        "demonstrations": count,
        "queries_in_bank": total,
        "share_found_by_any_head": {name: round(hits[name] / max(1, total), 3) for name in hits},
        "share_found_per_head": {
            name: [round(int(x) / max(1, total), 3) for x in per_head[name]] for name in per_head if total
        },
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [row["demonstrations"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("longmem", "LongMem (window + memory)"), ("backbone", "backbone, window only")):
        acc = [row[name]["accuracy"] for row in rows]
        low = [row[name]["accuracy"] - row[name]["interval_95"][0] for row in rows]
        high = [row[name]["interval_95"][1] - row[name]["accuracy"] for row in rows]
        ax.errorbar(counts, acc, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("demonstrations in the context")
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_ylim(0, 1.02)
    ax.set_title("ICL, random word → label per episode (SmolLM2-135M)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--episodes", type=int, default=6, help="evaluation episodes per number of demonstrations")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--demonstrations", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--train-demonstrations", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--sidenet-layers", type=int, default=5)
    parser.add_argument("--segment-size", type=int, default=128)
    parser.add_argument("--memory-size", type=int, default=8192)
    parser.add_argument("--top-k-chunks", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--gate-lr", type=float, default=3e-2)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run-dir", default="runs/longmem_icl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir = ROOT / args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build(args)
    training = train(model, tokenizer, args, run_dir)
    rows = evaluate(model, tokenizer, args, run_dir)
    diagnostic = {"trained": retrieval_diagnostic(model, tokenizer, args)}
    print(diagnostic, flush=True)
    untrained, _ = build(args)
    diagnostic["untrained"] = retrieval_diagnostic(untrained.eval(), tokenizer, args)
    print(diagnostic, flush=True)
    plot(rows, RESULTS / "longmem_icl.png")
    config = {k: v for k, v in vars(args).items() if k not in ("run_dir", "threads")}
    write_result(
        "longmem_icl",
        {
            "task": "episode-specific random word → negative/positive mapping over Austen words; 4 tokens per "
            "demonstration; queries teacher-forced after the demonstrations",
            "backbone": "smollm2 (SmolLM2-135M, frozen)",
            "sidenet_training": "SideNet trained on this task's 'train'-word episodes; evaluated on fresh episodes of "
            "the disjoint 'test' words",
            "config": config,
            "training": {k: v for k, v in training.items() if k != "losses"},
            "training_loss_by_tenth": _tenths(training["losses"]),
            "results": rows,
            "retrieval": diagnostic,
        },
    )


def _tenths(losses: list[float]) -> list[float]:
    """The mean training loss over each tenth of training."""
    if not losses:
        return []
    n = max(1, len(losses) // 10)
    return [round(sum(losses[i : i + n]) / len(losses[i : i + n]), 4) for i in range(0, len(losses), n)]


if __name__ == "__main__":
    main()
