"""Every mechanism side by side on one decoder backbone and one input: tokens/s and peak memory of inference from
1K to 1M tokens, training-step time over 1, 2, 4, 8 segments, and the length where recurrence beats full attention.

    python benchmarks/mechanisms.py                              # CPU, small random Llama → results/mechanisms_cpu.json
    python benchmarks/mechanisms.py --device cuda --dtype bf16 --mfu   # GPU → results/mechanisms_gpu.json

The measuring code is `memformers.bench` (also `memformers bench`); the crossover, tables and plots are read from
its records by `memformers.bench_results`. A cell predicted (from the shorter lengths) to take longer than
--time-budget seconds is skipped and says so; its extrapolated time is recorded, labelled as such. The run is
resumable: measurements already in the JSON with the same settings (lengths, segment counts and budget aside) are
kept, and it is rewritten after every measurement.
Plots: results/mechanisms_<device>_time.png and _memory.png.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import RESULTS, write_result

from memformers import bench, bench_results


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = bench.BenchSettings()
    parser.add_argument("--backbone", default=defaults.backbone, help="'tiny' (random Llama built in code), 'smollm2'")
    parser.add_argument("--lengths", type=ints, default=defaults.lengths)
    parser.add_argument("--segment-size", type=int, default=defaults.segment_size)
    parser.add_argument("--device", default=defaults.device, choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=defaults.dtype, choices=list(bench.DTYPES))
    parser.add_argument("--mechanisms", default=",".join(defaults.mechanisms))
    parser.add_argument("--train-segments", type=ints, default=defaults.train_segments)
    parser.add_argument("--time-budget", type=float, default=defaults.time_budget_s, help="seconds per cell")
    parser.add_argument("--mfu", action="store_true", help="also RMT's model FLOPs utilisation at batch 16")
    parser.add_argument("--out", default=None, help="result name (default mechanisms_cpu / mechanisms_gpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = bench.BenchSettings(
        backbone=args.backbone,
        lengths=args.lengths,
        segment_size=args.segment_size,
        device=args.device,
        dtype=args.dtype,
        mechanisms=tuple(m.strip() for m in args.mechanisms.split(",") if m.strip()),
        train_segments=args.train_segments,
        time_budget_s=args.time_budget,
    ).check()
    name = args.out or ("mechanisms_gpu" if args.device == "cuda" else "mechanisms_cpu")
    path = RESULTS / f"{name}.json"
    done = []
    if path.exists():  # resume: keep what a run with the same settings already measured
        previous = json.loads(path.read_text())
        cells = ("time_budget_s", "lengths", "train_segments")  # which cells to run, not how they are measured
        same = lambda a: {k: v for k, v in a.items() if k not in cells}  # noqa: E731
        if same(previous.get("settings", {})) == same(settings.to_dict()):
            done = [r for r in previous.get("records", []) if r["status"] == "ok"]  # skipped cells: decided anew
            print(f"resuming: {len(done)} records kept from {path.name}")

    def payload(records: list[dict], complete: bool) -> dict:
        result = {
            "settings": settings.to_dict(),
            "backbone": bench.describe_backbone(settings),
            "inference": "one document streamed (recurrent) or one SDPA forward (full attention), batch 1, no grad",
            "training": "forward + backward through all segments (full back-propagation), median of the timed steps",
            "peak_memory": "CPU: live tensors (PeakMemory), metered in a second pass; CUDA: the allocator's peak",
            "clock": "CPU: the process's CPU time (a shared machine); CUDA: wall time, synchronised",
            "complete": complete,
            "records": records,
        }
        if complete:
            result["crossover_rmt_vs_full"] = bench_results.crossover(records, "rmt")
            result["crossover_cache_vs_full"] = bench_results.crossover(records, "cache")
        return result

    collected = list(done)

    def save(record: dict) -> None:  # after every measurement, so an interrupted run resumes where it stopped
        collected.append(record)
        write_result(name, payload(collected, False))

    records = bench.run(settings, done, on_record=save)
    result = payload(records, True)
    if args.mfu:
        result["mfu"] = bench.rmt_mfu(settings)
        print("MFU:", result["mfu"])
    print("wrote", write_result(name, result))
    config = settings.tiny if settings.backbone == "tiny" else {}
    shape = f"random Llama {config['layers']}×{config['hidden']}" if config else settings.backbone
    title = f"{shape}, segments of {settings.segment_size}, {settings.device} {settings.dtype}"
    bench_results.plot(records, RESULTS / f"{name}_time.png", RESULTS / f"{name}_memory.png", title)
    print(bench_results.markdown_tables(records, sorted(settings.lengths)))
    print("crossover (RMT vs full attention):", result["crossover_rmt_vs_full"])


if __name__ == "__main__":
    main()
