"""How many torch threads a command should use when other processes share the cores.

Streams one document through an (untrained) RMT over MiniLM, as `memformers stream` does, with each thread count in
turn (interleaved rounds, wall-clock tokens/s), alone and beside `--busy` processes that each keep one core busy
(a stand-in for a training run or a second user). The machine's load average is recorded before and after: other
work on the machine counts as well.

    python benchmarks/threads.py --threads 1,2 --busy 0,1 --rounds 3   # → results/threads_cpu.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch
from common import write_result

import memformers as mf
from memformers.segments import stream_segments


def spin(stop) -> None:
    """Keep one core busy until told to stop."""
    while not stop.is_set():
        sum(range(10_000))


def tokens_per_s(model, segments: int, threads: int) -> float:
    torch.set_num_threads(threads)
    vocab = model.backbone.get_input_embeddings().num_embeddings
    ids = torch.randint(1000, vocab, (segments * model.content_size,), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        for _ in model.stream(stream_segments(iter([ids]), model.content_size)):
            pass
    return len(ids) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--busy", default="0,1", help="numbers of busy processes beside the measurement")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--segment-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="threads_cpu", help="results/NAME.json")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    backbone, _ = mf.backbones.load("minilm")
    model = mf.RecurrentMemoryTransformer(backbone, num_memory_tokens=10, segment_size=args.segment_size).eval()
    tokens_per_s(model, 1, max(counts))  # warm-up
    load_before = os.getloadavg()
    rows = []
    for busy in (int(b) for b in args.busy.split(",")):
        stop = multiprocessing.Event()
        workers = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(busy)]
        for worker in workers:
            worker.start()
        try:
            rates: dict[int, list[float]] = {t: [] for t in counts}
            for _ in range(args.rounds):  # interleaved, so slow drifts in the machine's load hit every count alike
                for threads in counts:
                    rates[threads].append(tokens_per_s(model, args.segments, threads))
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        for threads in counts:
            median = statistics.median(rates[threads])
            rows.append({"busy_processes": busy, "threads": threads, "tokens_per_s": round(median, 1)})
            rows[-1]["rounds"] = [round(r, 1) for r in rates[threads]]
            print(f"busy {busy}, threads {threads}: {median:,.0f} tokens/s (median of {args.rounds})")
    payload = {
        "settings": vars(args),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "results": rows,
    }
    print(write_result(args.name, payload))


if __name__ == "__main__":
    main()
