"""Reading the records of a `bench` run: where a recurrent mechanism overtakes full attention, tables, plots.

Why apart from `bench`: these are pure functions of the records a run wrote (its JSON), with no model, device or
clock in them. They are read again long after a run (the CLI and `benchmarks/mechanisms.py` report from them) and
change when a report changes, not when a measurement does. They import `bench`'s labels and the small functions
that read a record (`record_is`, `mib_text`); `bench` never imports them.
"""

from __future__ import annotations

import math
from pathlib import Path

from .bench import LABELS, Record, mib_text, record_is


def crossover(records: list[Record], recurrent: str = "rmt") -> dict:
    """The shortest input length at which `recurrent` reads more tokens/s than full attention.

    Measured where both were measured at some length; otherwise extrapolated (and labelled so) from the
    measured log-log slopes of both, or None when they never meet.
    """
    rate = {
        (r["mechanism"], r["length"]): r["tokens_per_s"]
        for r in records
        if r["kind"] == "inference" and r["status"] == "ok"
    }
    both = sorted(n for (m, n) in rate if m == "full" and (recurrent, n) in rate)
    if not both:
        return {"length": None, "how": f"full attention and {recurrent} share no measured length"}
    for i, n in enumerate(both):
        if rate[(recurrent, n)] > rate[("full", n)]:
            ratio = round(rate[(recurrent, n)] / rate[("full", n)], 2)
            if i == 0:
                return {"length": n, "how": "measured: already at the shortest length measured", "ratio": ratio}
            prev = both[i - 1]
            # where log(rate ratio), linear in log(length) between the two measurements, crosses 0
            r0 = math.log(rate[(recurrent, prev)] / rate[("full", prev)])
            r1 = math.log(rate[(recurrent, n)] / rate[("full", n)])
            between = math.exp(math.log(prev) + r0 / (r0 - r1) * math.log(n / prev))
            return {
                "length": n,
                "how": f"measured: between {prev:,} and {n:,} tokens",
                "ratio": ratio,
                "interpolated_length": round(between),
            }

    def fit(name: str) -> tuple[float, float]:  # seconds = a · length^b over the two longest measured lengths
        points = sorted((n, n / rate[(m, n)]) for (m, n) in rate if m == name)[-2:]
        (n0, t0), (n1, t1) = points[0], points[-1]
        b = math.log(t1 / t0) / math.log(n1 / n0) if n1 != n0 else 1.0
        return t1 / n1**b, b

    (a_full, b_full), (a_rec, b_rec) = fit("full"), fit(recurrent)
    if b_full <= b_rec:
        return {"length": None, "how": "extrapolated: full attention's time does not grow faster; they never meet"}
    length = (a_rec / a_full) ** (1 / (b_full - b_rec))
    return {
        "length": round(length),
        "how": f"extrapolated from the measured slopes (full attention ~ n^{b_full:.2f}, {recurrent} ~ n^{b_rec:.2f})",
    }


def markdown_tables(records: list[Record], lengths: list[int]) -> str:
    """Inference (tokens/s · peak MiB per length) and training (seconds a step per segment count), for a README."""
    from .evaluation import format_length

    names = list(dict.fromkeys(r["mechanism"] for r in records))
    lines = ["| mechanism | " + " | ".join(format_length(n) for n in lengths) + " |"]
    lines.append("| --- |" + " ---: |" * len(lengths))
    for name in names:
        cells = []
        for n in lengths:
            r = next((r for r in records if record_is(r, "inference", name) and r["length"] == n), None)
            if r is None:
                cells.append("–")
            elif r["status"] == "ok":
                cells.append(f"{r['tokens_per_s']:,.0f} tok/s · {mib_text(r['peak_bytes'])}")
            else:
                cells.append(f"skipped ({r['reason']})")
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    counts = sorted({r["segments"] for r in records if r["kind"] == "training"})
    if counts:
        lines += ["", "| training step (s) | " + " | ".join(f"{c} seg." for c in counts) + " |"]
        lines.append("| --- |" + " ---: |" * len(counts))
        for name in names:
            cells = []
            for c in counts:
                r = next((r for r in records if record_is(r, "training", name) and r["segments"] == c), None)
                cells.append("–" if r is None else f"{r['step_seconds']:.3f}" if r["status"] == "ok" else "skipped")
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[Record], time_path: str | Path, memory_path: str | Path, title: str = "") -> None:
    """Log-log seconds to read the input, and peak memory, against its length: one line per mechanism."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["mechanism"] for r in records))
    for path, key, scale, label in (
        (time_path, "seconds", 1.0, "seconds to read the input (CPU: process time)"),
        (memory_path, "peak_bytes", 2**-20, "peak memory (MiB)"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name in names:
            points = sorted(
                (r["length"], r[key] * scale)
                for r in records
                if record_is(r, "inference", name) and r["status"] == "ok" and r.get(key) is not None
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=LABELS[name])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
