"""LongMem generation and retrieval costs on a small random-weight Llama (so that a CPU run takes a minute).

1. Generation of 64 new tokens after a long context: recomputing the prompt window for every token against the
   key-value caches of the backbone and the SideNet (`generate(use_cache=...)`); the tokens must be equal.
2. Peak memory of one segment read under `no_grad` with a full bank, retrieval all at once (`query_block=None`)
   against query blocks: the retrieved keys and values, [batch, kv_heads, queries, top_k_chunks · chunk_size, d],
   exist for one block at a time. Outputs must be equal.

    python benchmarks/longmem_efficiency.py --threads 1   # → results/longmem_efficiency.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from common import write_result

import memformers as mf
from memformers.profiling import PeakMemory


def build(args) -> mf.LongMem:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    backbone = transformers.LlamaForCausalLM(config).eval()
    model = mf.LongMem(backbone, memory_size=8192, chunk_size=4, top_k_chunks=16, segment_size=args.segment_size).eval()
    with torch.no_grad():
        model.fusion.gate_bias.fill_(2.0)  # memory is read
    return model


def generation(model: mf.LongMem, args) -> dict:
    ids = torch.randint(0, 1000, (args.batch, 4 * args.segment_size))
    runs = {True: [], False: []}
    tokens = {}
    for _ in range(args.repeats):
        for use_cache in (False, True):
            start = time.perf_counter()
            tokens[use_cache] = model.generate(ids, max_new_tokens=args.new_tokens, use_cache=use_cache)
            runs[use_cache].append(time.perf_counter() - start)
    if not torch.equal(tokens[True], tokens[False]):
        raise AssertionError("cached generation gave other tokens than recomputing")
    reading = []  # the context read (three segments into the bank), the same in both: timed apart and subtracted
    for _ in range(args.repeats):
        start = time.perf_counter()
        with torch.no_grad():
            model.read_context(ids)
        reading.append(time.perf_counter() - start)
    read = statistics.median(reading)
    rate = {c: args.batch * args.new_tokens / (statistics.median(runs[c]) - read) for c in runs}
    return {
        "seconds_reading_context": [round(s, 3) for s in reading],
        "context_tokens": ids.shape[1],
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "seconds_recompute": [round(s, 3) for s in runs[False]],
        "seconds_cached": [round(s, 3) for s in runs[True]],
        # New tokens per second of generation proper (total minus the median context read).
        "tokens_per_second_recompute": round(rate[False], 1),
        "tokens_per_second_cached": round(rate[True], 1),
        "speedup": round(rate[True] / rate[False], 2),
        "tokens_equal": True,
    }


def retrieval_memory(model: mf.LongMem, args) -> dict:
    ids = torch.randint(0, 1000, (args.batch, args.segment_size))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        bank = model.init_state(args.batch)
        for _ in range(8):  # a full-ish bank: 8 segments
            model.step(torch.randint(0, 1000, ids.shape), bank)
    rows, reference = [], None
    for block in (None, 2048, 512, 128):
        model.fusion.query_block = block
        with torch.no_grad(), PeakMemory() as meter:
            logits, _, _ = model.side_forward(ids, mask, bank)
        if reference is None:
            reference = logits
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
        rows.append({"query_block": block, "peak_bytes": meter.peak_bytes})
    base = rows[0]["peak_bytes"]
    for row in rows:
        row["peak_mib"] = round(row["peak_bytes"] / 2**20, 1)
        row["ratio_to_unblocked"] = round(row["peak_bytes"] / base, 3)
    adapter = model.fusion.adapter
    queries = adapter.num_heads // adapter.num_kv_heads * args.segment_size
    return {
        "segment_size": args.segment_size,
        "batch": args.batch,
        "grouped_queries_per_kv_head": queries,
        "retrieved_tokens_per_query": model.top_k_chunks * model.chunk_size,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--segment-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args)
    gen = generation(model, args)
    print(gen, flush=True)
    memory = retrieval_memory(model, args)
    for row in memory["rows"]:
        print(row, flush=True)
    write_result(
        "longmem_efficiency",
        {
            "model": f"random Llama, 4 blocks, hidden {args.hidden}, 8 heads / 4 kv heads; SideNet 2 layers; "
            "chunks of 4, top 16 chunks",
            "generation": gen,
            "retrieval_peak_memory": memory,
        },
    )


if __name__ == "__main__":
    main()
