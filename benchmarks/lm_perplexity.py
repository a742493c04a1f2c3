"""Language modelling with memory, CPU tier: perplexity of held-out Austen books per segment index, every mechanism.

One small Llama trained from scratch as the backbone alone (configs/lm_base.toml), then the same 12 further steps
on the same windows for each row (configs/lm_<row>.toml): the backbone alone continued, the segment cache, RMT with
4 and 16 memory tokens, kNN memory, LongMem. Every row is evaluated with `memformers eval --perplexity` on the same
held-out documents (the test books, never trained on), 128 content tokens per segment for every row. The kNN model
is trained once (2K-token store) and read with several store sizes. Rows already evaluated are not run again.

    memformers train configs/lm_base.toml
    for row in continued cache rmt4 rmt16 knn longmem; do memformers train configs/lm_$row.toml; done
    python benchmarks/lm_perplexity.py        # → results/lm_perplexity_cpu.{json,md,png}, results/knn_perplexity.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from common import RESULTS, ROOT, write_result

from memformers.perplexity import markdown_table

# name → (checkpoint, extra `memformers eval` arguments)
ROWS: dict[str, tuple[str, list[str]]] = {
    "backbone alone (base)": ("runs/lm_base/final", []),
    "backbone alone (continued)": ("runs/lm_continued/final", []),
    "segment cache": ("runs/lm_cache/final", []),
    "RMT m=4": ("runs/lm_rmt4/final", []),
    "RMT m=16": ("runs/lm_rmt16/final", []),
    "kNN memory 2K": ("runs/lm_knn/final", ["--memory-size", "2048"]),
    "kNN memory 8K": ("runs/lm_knn/final", ["--memory-size", "8192"]),
    "LongMem 8K": ("runs/lm_longmem/final", []),
}
# The kNN table: long documents, so that the larger stores fill; memory 0 = the kNN model's own backbone alone.
KNN_ROWS: dict[str, tuple[str, list[str]]] = {
    "backbone alone (continued)": ("runs/lm_continued/final", []),
    "kNN model, memory 0": ("runs/lm_knn/final/backbone", ["--segment-size", "128"]),
    "kNN memory 2K": ("runs/lm_knn/final", ["--memory-size", "2048"]),
    "kNN memory 8K": ("runs/lm_knn/final", ["--memory-size", "8192"]),
    "kNN memory 32K": ("runs/lm_knn/final", ["--memory-size", "32768"]),
}
COLUMNS = ("1", "2", "4", "8", "16+")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def evaluate(rows: dict, folder: Path, tokens: int, documents: int, batch_size: int) -> dict[str, dict]:
    """Each row's `memformers eval --perplexity` JSON (run once; kept under `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (checkpoint, extra) in rows.items():
        out = folder / f"{slug(name)}.json"
        if not out.exists():
            command = [sys.executable, "-m", "memformers.cli", "eval", checkpoint, "--perplexity"]
            command += ["--tokens", str(tokens), "--documents", str(documents), "--batch-size", str(batch_size)]
            command += [*extra, "--device", "cpu", "--json", str(out)]
            print(" ".join(command[2:]), flush=True)
            subprocess.run(command, check=True, cwd=ROOT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        results[name] = json.loads(out.read_text())
    return results


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, result in results.items():
        values = result["by_segment"]
        ax.plot(range(1, len(values) + 1), values, marker=".", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("segment index (128 tokens each)")
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
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per held-out document (main table)")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--knn-tokens", type=int, default=10240, help="tokens per document of the kNN table")
    parser.add_argument("--knn-documents", type=int, default=2)
    parser.add_argument("--skip-knn", action="store_true", help="only the main table")
    args = parser.parse_args()

    results = evaluate(ROWS, RESULTS / "lm_rows", args.tokens, args.documents, args.documents)
    base = results["backbone alone (continued)"]
    table = markdown_table(results, COLUMNS)
    print(table)
    ratios = {name: r["overall"] / base["overall"] for name, r in results.items()}
    write_result(
        "lm_perplexity_cpu",
        {
            "setup": {
                "model": "Llama from scratch: 4 layers, hidden 192, 4 heads, SmolLM2 tokenizer (49,152)",
                "segment_tokens": 128,
                "base_training": "configs/lm_base.toml (60 steps × 8 windows of 256 tokens)",
                "row_training": "configs/lm_<row>.toml (12 steps × 4 windows of 512 tokens, from the base backbone)",
                "documents": args.documents,
                "tokens_per_document": args.tokens,
                "split": "test (Persuasion, Northanger Abbey)",
            },
            "rows": {name: compact(r) for name, r in results.items()},
            "overall_vs_backbone_alone_continued": ratios,
        },
    )
    (RESULTS / "lm_perplexity_cpu.md").write_text(table + "\n")
    plot(results, RESULTS / "lm_perplexity_cpu.png", "held-out Austen: perplexity by segment (CPU tier)")
    if args.skip_knn:
        return
    knn = evaluate(KNN_ROWS, RESULTS / "lm_rows_knn", args.knn_tokens, args.knn_documents, args.knn_documents)
    print(markdown_table(knn, COLUMNS))
    alone = knn["backbone alone (continued)"]["overall"]
    write_result(
        "knn_perplexity",
        {
            "setup": {
                "model": "the CPU-tier kNN row of lm_perplexity_cpu (trained with a 2K-token store, layer 3 of 4)",
                "segment_tokens": 128,
                "documents": args.knn_documents,
                "tokens_per_document": args.knn_tokens,
                "split": "test (Persuasion, Northanger Abbey)",
            },
            "memory_size": {name: compact(r) for name, r in knn.items()},
            "overall": {name: r["overall"] for name, r in knn.items()},
            "overall_vs_backbone_alone": {name: r["overall"] / alone for name, r in knn.items()},
            "late_segments_16plus": {name: r["perplexity"]["16+"] for name, r in knn.items()},
        },
    )
    assert all(math.isfinite(r["overall"]) for r in knn.values())


if __name__ == "__main__":
    main()
