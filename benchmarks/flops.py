"""Forward FLOPs of full attention, RMT, kNN memory and LongMem against length, for the OPT family.

    python benchmarks/flops.py

Writes results/flops.json (every OPT size at the paper's 2,043,904 tokens, plus the curves of OPT-125M and
OPT-175B over 1K … 2M tokens) and results/flops.png (log-log curves of OPT-125M). The count is
`memformers.flops`'s (see its docstring); the RMT paper (arXiv 2304.11062) reports ×295 (OPT-125M) and ×29
(OPT-175B) for full attention over RMT at about 2M tokens.
"""

from __future__ import annotations

from common import RESULTS, write_result

from memformers import flops

PAPER_LENGTH = 4096 * 499  # 4096 segments of 512 positions, 10 memory tokens + 3 special tokens each
LENGTHS = [1 << p for p in range(10, 22)]


def main() -> None:
    at_paper = {
        name: flops.compare(name, PAPER_LENGTH, 512, 10, knn={}, longmem={}).to_dict() for name in flops.OPT_CONFIGS
    }
    paper_convention = {  # every 512 input tokens one 512-position segment (memory positions not taken from input)
        name: flops.compare(name, 4096 * 512, 512, 10, overhead=0).ratio for name in ("opt-125m", "opt-175b")
    }
    curves = {
        name: [flops.compare(name, n, 512, 10, knn={}, longmem={}).to_dict() for n in LENGTHS]
        for name in ("opt-125m", "opt-175b")
    }
    flops.plot_flops("opt-125m", LENGTHS, RESULTS / "flops.png")
    path = write_result(
        "flops",
        {
            "paper": {"opt-125m": 295, "opt-175b": 29, "length": PAPER_LENGTH},
            "at_paper_length": at_paper,
            "ratio_paper_convention_4096x512": paper_convention,
            "curves": curves,
        },
    )
    for name, report in at_paper.items():
        print(f"{name:>9}: full / RMT = ×{report['ratio']:.1f}")
    print(f"paper convention (4096·512 tokens, no memory overhead): {paper_convention}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
