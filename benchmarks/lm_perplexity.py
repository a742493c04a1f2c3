"""Language modelling with memory: perplexity of held-out Austen books per segment index, every mechanism.

Two tiers, each with one table of every mechanism and one kNN table (store size against perplexity):

- `--tier scratch` (CPU): one small Llama trained from scratch as the backbone alone (configs/lm_base.toml), then
  the same 12 further steps on the same windows for each row (configs/lm_<row>.toml): the backbone alone continued,
  the segment cache, RMT with 4 and 16 memory tokens, kNN memory, LongMem. 128 content tokens per segment.
- `--tier smollm2` (CPU): the pretrained SmolLM2-135M as is, and fine-tuned 40 steps per row as the backbone alone,
  the segment cache and RMT m=16 on 2- and on 4-segment windows, the same tokens (configs/smollm2_lm_<row>.toml);
  kNN memory on the frozen backbone with only its gates trained (configs/smollm2_knn_gates.toml). 256 content
  tokens per segment.

Every row is evaluated with `memformers perplexity` on the same held-out documents (the test books, never
trained on). A kNN model is trained once and read with several store sizes. Rows already evaluated are not run
again (their JSON is kept under results/<tier folder>/).

    memformers train configs/lm_base.toml
    for row in continued cache rmt4 rmt16 knn longmem; do memformers train configs/lm_$row.toml; done
    python benchmarks/lm_perplexity.py --tier scratch  # → lm_perplexity_cpu.{json,md,png}, knn_perplexity_scratch.json

    for row in alone rmt16 rmt16_4seg cache; do memformers train configs/smollm2_lm_$row.toml; done
    memformers train configs/smollm2_knn_gates.toml
    python benchmarks/lm_perplexity.py --tier smollm2  # → lm_perplexity_smollm2.{json,md,png}, knn_perplexity.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS, ROOT, write_result

from memformers.perplexity import markdown_table

Rows = dict[str, tuple[str, list[str]]]  # name → (checkpoint, extra `memformers eval` arguments)


@dataclass
class Tier:
    rows: Rows
    knn_rows: Rows  # long documents, so that the larger stores fill
    baseline: str  # the row every other is compared with
    segment_tokens: int
    setup: dict
    knn_setup: str
    folder: str  # per-row JSON of the main table under results/; the kNN table's in folder + "_knn"
    name: str  # results/<name>.{json,md,png}
    knn_name: str
    tokens: int  # per document, main table
    documents: int
    knn_tokens: int
    knn_documents: int


SPLIT = "test (Persuasion, Northanger Abbey)"
SMOLLM2_ALONE = ("smollm2", ["--segment-size", "256"])
TIERS = {
    "scratch": Tier(
        rows={
            "backbone alone (base)": ("runs/lm_base/final", []),
            "backbone alone (continued)": ("runs/lm_continued/final", []),
            "segment cache": ("runs/lm_cache/final", []),
            "RMT m=4": ("runs/lm_rmt4/final", []),
            "RMT m=16": ("runs/lm_rmt16/final", []),
            "kNN memory 2K": ("runs/lm_knn/final", ["--memory-size", "2048"]),
            "kNN memory 8K": ("runs/lm_knn/final", ["--memory-size", "8192"]),
            "LongMem 8K": ("runs/lm_longmem/final", []),
        },
        knn_rows={  # memory 0 = the kNN model's own backbone alone
            "backbone alone (continued)": ("runs/lm_continued/final", []),
            "kNN model, memory 0": ("runs/lm_knn/final/backbone", ["--segment-size", "128"]),
            "kNN memory 2K": ("runs/lm_knn/final", ["--memory-size", "2048"]),
            "kNN memory 8K": ("runs/lm_knn/final", ["--memory-size", "8192"]),
            "kNN memory 32K": ("runs/lm_knn/final", ["--memory-size", "32768"]),
        },
        baseline="backbone alone (continued)",
        segment_tokens=128,
        setup={
            "model": "Llama from scratch: 4 layers, hidden 192, 4 heads, SmolLM2 tokenizer (49,152)",
            "base_training": "configs/lm_base.toml (60 steps × 8 windows of 256 tokens)",
            "row_training": "configs/lm_<row>.toml (12 steps × 4 windows of 512 tokens, from the base backbone)",
        },
        knn_setup="the scratch tier's kNN row (trained with a 2K-token store, layer 3 of 4)",
        folder="lm_rows",
        name="lm_perplexity_cpu",
        knn_name="knn_perplexity_scratch",
        tokens=4096,
        documents=4,
        knn_tokens=10240,
        knn_documents=2,
    ),
    "smollm2": Tier(
        rows={
            "SmolLM2 alone (pretrained)": SMOLLM2_ALONE,
            "SmolLM2 alone (fine-tuned)": ("runs/smollm2_lm_alone/final", []),
            "segment cache": ("runs/smollm2_lm_cache/final", []),
            "RMT m=16": ("runs/smollm2_lm_rmt16/final", []),
            "RMT m=16, 4-segment windows": ("runs/smollm2_lm_rmt16_4seg/final", []),
            "kNN memory 2K (frozen backbone)": ("runs/smollm2_knn_gates/final", ["--memory-size", "2048"]),
        },
        knn_rows={  # the kNN model's backbone is the pretrained one, frozen: memory 0 is SmolLM2 alone
            "memory 0 (SmolLM2 alone)": SMOLLM2_ALONE,
            "kNN memory 2K": ("runs/smollm2_knn_gates/final", ["--memory-size", "2048"]),
            "kNN memory 8K": ("runs/smollm2_knn_gates/final", ["--memory-size", "8192"]),
            "kNN memory 32K": ("runs/smollm2_knn_gates/final", ["--memory-size", "32768"]),
        },
        baseline="SmolLM2 alone (fine-tuned)",
        segment_tokens=256,
        setup={
            "model": "SmolLM2-135M (30 layers, hidden 576), pretrained",
            "row_training": (
                "configs/smollm2_lm_<row>.toml (40 steps × 2 windows of 512 tokens, whole model; the 4-segment RMT "
                "row 40 steps × 1 window of 1,024 tokens)"
            ),
            "knn_training": "configs/smollm2_knn_gates.toml (150 steps × 1 window of 2,048 tokens, backbone frozen)",
        },
        knn_setup=(
            "SmolLM2-135M frozen, kNN memory in layer 27 of 30 (normalised keys, top 32), gates trained with a "
            "2K-token store (configs/smollm2_knn_gates.toml)"
        ),
        folder="lm_rows_smollm2",
        name="lm_perplexity_smollm2",
        knn_name="knn_perplexity",
        tokens=4096,
        documents=4,
        knn_tokens=40960,
        knn_documents=2,
    ),
}
COLUMNS = ("1", "2", "4", "8", "16+")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def evaluate(rows: dict, folder: Path, tokens: int, documents: int, batch_size: int) -> dict[str, dict]:
    """Each row's `memformers perplexity` JSON (run once; kept under `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (checkpoint, extra) in rows.items():
        out = folder / f"{slug(name)}.json"
        if not out.exists():
            command = [sys.executable, "-m", "memformers.cli", "perplexity", checkpoint]
            command += ["--tokens", str(tokens), "--documents", str(documents), "--batch-size", str(batch_size)]
            command += [*extra, "--device", "cpu", "--json", str(out)]
            print(" ".join(command[2:]), flush=True)
            subprocess.run(command, check=True, cwd=ROOT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        results[name] = json.loads(out.read_text())
    return results


def plot(results: dict[str, dict], path: Path, title: str, segment_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, result in results.items():
        values = result["by_segment"]
        ax.plot(range(1, len(values) + 1), values, marker=".", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"segment index ({segment_tokens} tokens each)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compact(result: dict) -> dict:
    keys = ("checkpoint", "command", "mechanism", "perplexity", "overall", "by_segment", "state_floats_per_row")
    return {k: result[k] for k in keys} | {"tokens_scored": result["tokens"], "tokens_per_s": result["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="scratch")
    parser.add_argument("--tokens", type=int, help="tokens per held-out document (main table; default: the tier's)")
    parser.add_argument("--documents", type=int)
    parser.add_argument("--knn-tokens", type=int, help="tokens per document of the kNN table")
    parser.add_argument("--knn-documents", type=int)
    parser.add_argument("--skip-knn", action="store_true", help="only the main table")
    args = parser.parse_args()
    tier = TIERS[args.tier]
    tokens, documents = args.tokens or tier.tokens, args.documents or tier.documents
    knn_tokens, knn_documents = args.knn_tokens or tier.knn_tokens, args.knn_documents or tier.knn_documents

    results = evaluate(tier.rows, RESULTS / tier.folder, tokens, documents, documents)
    base = results[tier.baseline]
    table = markdown_table(results, COLUMNS)
    print(table)
    common = {"segment_tokens": tier.segment_tokens, "split": SPLIT}
    write_result(
        tier.name,
        {
            "setup": tier.setup | common | {"documents": documents, "tokens_per_document": tokens},
            "rows": {name: compact(r) for name, r in results.items()},
            f"overall_vs_{slug(tier.baseline)}": {name: r["overall"] / base["overall"] for name, r in results.items()},
        },
    )
    (RESULTS / f"{tier.name}.md").write_text(table + "\n")
    title = f"held-out Austen: perplexity by segment ({args.tier} tier)"
    plot(results, RESULTS / f"{tier.name}.png", title, tier.segment_tokens)
    if args.skip_knn:
        return
    knn = evaluate(tier.knn_rows, RESULTS / f"{tier.folder}_knn", knn_tokens, knn_documents, knn_documents)
    print(markdown_table(knn, COLUMNS))
    alone = next(iter(knn.values()))["overall"]
    shape = {"documents": knn_documents, "tokens_per_document": knn_tokens}
    write_result(
        tier.knn_name,
        {
            "setup": {"model": tier.knn_setup} | common | shape,
            "memory_size": {name: compact(r) for name, r in knn.items()},
            "overall": {name: r["overall"] for name, r in knn.items()},
            "overall_vs_backbone_alone": {name: r["overall"] / alone for name, r in knn.items()},
            "late_segments_16plus": {name: r["perplexity"]["16+"] for name, r in knn.items()},
        },
    )
    assert all(math.isfinite(r["overall"]) for r in knn.values())


if __name__ == "__main__":
    main()
