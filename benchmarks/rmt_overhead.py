"""RMT against its bare backbone: tokens/s on the same segments, and peak memory against the number of segments.

    python benchmarks/rmt_overhead.py            # CPU: MiniLM encoder and SmolLM2 decoder, fp32
    python benchmarks/rmt_overhead.py --device cuda --dtype bf16   # GPU

Throughput: both read the same number of content tokens in segments of `segment_size` positions; RMT spends
m + 3 (encoder) or 2m (decoder) of those positions on memory, so its content tokens/s is compared with the
backbone's tokens/s on full segments. Rounds alternate between the two to share the machine's noise.
Times are the fastest of interleaved rounds (the least disturbed run); the ratio of medians is recorded too.
Memory: one document streamed through the RMT at 4 … 4096 segments; peak activation bytes (CPU: live tensors;
GPU: the allocator's peak) and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_result

import memformers as mf
from memformers.profiling import PeakMemory, peak_rss_bytes, reset_peak_rss


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(name: str, args, device, dtype) -> dict:
    backbone, _ = mf.backbones.load(name)
    is_decoder = mf.backbones.describe(backbone).is_decoder
    m = args.decoder_memory_tokens if is_decoder else args.memory_tokens
    model = mf.RecurrentMemoryTransformer(backbone, num_memory_tokens=m, segment_size=args.segment_size)
    model = model.to(device=device, dtype=dtype).eval()
    vocab = backbone.get_input_embeddings().num_embeddings
    content = model.content_size
    rmt_ids = torch.randint(1000, vocab, (args.batch, args.segments * content), device=device)
    bare_ids = torch.randint(1000, vocab, (args.batch, args.segment_size), device=device)

    def run_rmt():
        model(rmt_ids, logits="none")

    def run_bare():
        for _ in range(args.segments):
            backbone(bare_ids)

    rmt_times, bare_times = [], []
    with torch.no_grad():
        run_rmt(), run_bare()  # warm-up
        for _ in range(args.rounds):
            rmt_times.append(timed(run_rmt, device))
            bare_times.append(timed(run_bare, device))
    # The fastest of interleaved rounds: the run least disturbed by whatever else the machine is doing.
    rmt_rate = args.batch * args.segments * content / min(rmt_times)
    bare_rate = args.batch * args.segments * args.segment_size / min(bare_times)
    median_ratio = (content * statistics.median(bare_times)) / (args.segment_size * statistics.median(rmt_times))
    result = {
        "backbone": name,
        "kind": model.info.kind,
        "memory_tokens": m,
        "segment_size": args.segment_size,
        "content_per_segment": content,
        "batch": args.batch,
        "segments": args.segments,
        "rounds": args.rounds,
        "rmt_content_tokens_per_s": round(rmt_rate, 1),
        "backbone_tokens_per_s": round(bare_rate, 1),
        "ratio": round(rmt_rate / bare_rate, 3),
        "ratio_of_medians": round(median_ratio, 3),
        "layout_bound": round(content / args.segment_size, 3),
    }
    print(result)
    return result


def memory_scan(args, device, dtype) -> list[dict]:
    backbone, _ = mf.backbones.load("minilm")
    model = mf.RecurrentMemoryTransformer(
        backbone, num_memory_tokens=args.memory_tokens, segment_size=args.scan_segment_size
    )
    model = model.to(device=device, dtype=dtype).eval()
    rows = []
    for count in args.scan:
        generator = torch.Generator().manual_seed(0)
        length = count * model.content_size
        chunks = (
            torch.randint(1000, 30000, (min(1024, length - i),), generator=generator) for i in range(0, length, 1024)
        )
        segments = (segment.to(device) for segment in mf.stream_segments(chunks, model.content_size))
        reset_peak_rss()
        start = time.perf_counter()
        with torch.no_grad(), PeakMemory(device) as meter:
            steps = sum(1 for _ in model.stream(segments))
        seconds = time.perf_counter() - start
        row = {
            "segments": steps,
            "tokens": length,
            "peak_activation_bytes": meter.peak_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
            "seconds": round(seconds, 2),
        }
        print(row)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--backbones", default="minilm,smollm2")
    parser.add_argument("--segment-size", type=int, default=512)
    parser.add_argument("--memory-tokens", type=int, default=10, help="encoder memory tokens (the 2M-token paper)")
    parser.add_argument("--decoder-memory-tokens", type=int, default=16, help="decoder memory tokens (BABILong)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scan", default="4,16,64,256,1024,4096")
    parser.add_argument("--scan-segment-size", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.scan = [int(v) for v in args.scan.split(",")]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    results = {"throughput": [throughput(name, args, device, dtype) for name in args.backbones.split(",")]}
    results["memory_scan"] = {
        "backbone": "minilm",
        "segment_size": args.scan_segment_size,
        "memory_tokens": args.memory_tokens,
        "rows": memory_scan(args, device, dtype),
    }
    peaks = [row["peak_activation_bytes"] for row in results["memory_scan"]["rows"]]
    results["memory_scan"]["max_over_min_peak"] = round(max(peaks) / min(peaks), 3)
    name = args.out or ("rmt_overhead_gpu" if device.type == "cuda" else "rmt_overhead_cpu")
    print("wrote", write_result(name, results))


if __name__ == "__main__":
    main()
