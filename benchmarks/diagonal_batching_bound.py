"""What diagonal batching could gain on this CPU, at most (the ARMT issue's stretch; arXiv 2506.05229).

With a memory in every layer, segment s at layer l needs only segment s − 1 at layer l and segment s at layer l − 1,
so the cells of one diagonal (up to one per layer) can run as one batch. At best that turns L calls of a block on one
segment into one call on L segments. This script times exactly that for a real block, one segment alone against
L segments batched, interleaved in one process:

    python benchmarks/diagonal_batching_bound.py --backbones minilm,smollm2 --segment-sizes 128,512 --threads 1,2

bound = (L × time of a block on [1, segment]) / (time of a block on [L, segment]). Diagonal batching runs every
block this way and adds the bookkeeping of the diagonals, so the bound is an upper limit of its speed-up for a batch
of one: where it is near 1, diagonal batching cannot pay. Writes results/diagonal_batching_bound.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_result

from memformers import backbone_layers, backbones


def block_call(model, block, hidden: torch.Tensor):
    """A function that runs `block` once on `hidden` [batch, length, d], with what the family's blocks expect."""
    base = getattr(model, "base_model", model)
    batch, length, _ = hidden.shape
    if hasattr(base, "rotary_emb"):  # Llama-style: rotary position embeddings and a causal mask passed in
        positions = torch.arange(length).unsqueeze(0).expand(batch, -1)
        rotary = base.rotary_emb(hidden, positions)
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None].expand(batch, 1, -1, -1)
        return lambda: block(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
    return lambda: block(hidden)


def timed(call, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="minilm,smollm2")
    parser.add_argument("--segment-sizes", default="128,512")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name in args.backbones.split(","):
        model, _ = backbones.load(name)
        model.eval()
        block = backbone_layers.layer_stack(model)[0]
        layers = len(backbone_layers.layer_stack(model))
        hidden_size = model.config.hidden_size
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for size in (int(s) for s in args.segment_sizes.split(",")):
                alone = block_call(model, block, torch.randn(1, size, hidden_size))
                batched = block_call(model, block, torch.randn(layers, size, hidden_size))
                ratios, one, many = [], [], []
                with torch.no_grad():
                    alone(), batched()  # warm up
                    for _ in range(args.rounds):
                        t1, tl = timed(alone, args.repeats * layers), timed(batched, args.repeats)
                        one.append(t1)
                        many.append(tl)
                        ratios.append(layers * t1 / tl)
                row = {
                    "backbone": name,
                    "layers": layers,
                    "threads": threads,
                    "segment_size": size,
                    "block_one_segment_ms": round(1e3 * statistics.median(one), 2),
                    "block_all_layers_batched_ms": round(1e3 * statistics.median(many), 2),
                    "bound": round(statistics.median(ratios), 3),
                }
                rows.append(row)
                print(row, flush=True)
    write_result("diagonal_batching_bound", {"settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
