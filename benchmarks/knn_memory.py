"""kNN memory overhead: training-step time with 0, 8K, 65K and 262K stored tokens, and torch vs faiss search.

The paper (arXiv 2203.08913, ~200M model) reports a step ×1.25 slower with 8K memory and ×3 with 65K. The cost
of memory is the search (queries × stored keys per memory layer), independent of the rest of the model, so the
ratio depends on the model's size: the small random-weight Llama used here (so a CPU run takes minutes) makes it
look worse than for a real model. Stores are filled with random keys to their size before timing.

    python benchmarks/knn_memory.py --threads 1      # CPU → results/knn_memory_cpu.json
    python benchmarks/knn_memory.py --device cuda    # GPU → results/knn_memory_cuda.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import transformers
from common import write_result

import memformers as mf
from memformers.knn import KNNMemoryState, KNNStore


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def build_backbone(args) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.segment,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(args.device)


def fill(store: KNNStore, size: int, chunk: int = 65_536) -> KNNStore:
    """The store with random keys and values up to `size` entries per row."""
    batch, heads, _, head_dim = store.keys.shape
    for start in range(0, size, chunk):
        n = min(chunk, size - start)
        kv = torch.randn(batch, heads, n, head_dim, device=store.keys.device, dtype=store.keys.dtype)
        store = store.write(kv, kv)
    return store


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def bare_step(backbone, ids: torch.Tensor) -> None:
    logits = backbone(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    lm_loss(logits, ids).backward()


def memory_step(model: mf.MemorizingTransformer, state: KNNMemoryState, ids: torch.Tensor, size: int) -> None:
    if size == 0:  # keep the store empty: the mechanism's own cost, without any search
        state.reset(torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device))
    out, _ = model.step(ids, state)
    lm_loss(out.logits, ids).backward()


def step_times(args) -> dict:
    """Training-step seconds of the backbone alone and with each store size, in interleaved rounds (shared noise)."""
    device = torch.device(args.device)
    backbone = build_backbone(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.segment), device=device)
    model = mf.MemorizingTransformer(
        backbone,
        memory_layers=(args.memory_layer,),
        memory_size=max(args.memory_sizes),
        top_k=args.top_k,
        segment_size=args.segment,
        search=args.search,
    )
    adapter = model.layers[0].adapter
    states = {}
    for size in args.memory_sizes:  # a store of exactly `size` entries: full, so FIFO keeps it at `size`
        store = KNNStore(args.batch, adapter.num_kv_heads, adapter.head_dim, max(size, 1), device=device)
        store = fill(store, size)
        states[size] = KNNMemoryState([store])
    runs = {"backbone": lambda: bare_step(backbone, ids)}
    for size, state in states.items():
        runs[str(size)] = functools.partial(memory_step, model, state, ids, size)
    times = {name: [] for name in runs}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, run in runs.items():
            elapsed = seconds(run, device)
            if round_:
                times[name].append(elapsed)
    base = statistics.median(times["backbone"])
    result = {"backbone": {"seconds": base, "all": times["backbone"]}}
    print(f"backbone alone: {base:.3f} s per training step")
    for size, state in states.items():
        median = statistics.median(times[str(size)])
        result[str(size)] = {
            "seconds": median,
            "ratio": median / base,
            "stored": int(state.stores[0].size.max()) if size else 0,
            "store_mib": state.nbytes() / 2**20,
            "all": times[str(size)],
        }
        print(f"memory {size:>7}: {median:.3f} s per step, x{median / base:.2f}")
    return result


def search_once(store: KNNStore, queries: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    return store.search(queries, k, backend)[1]


def search_times(args) -> dict:
    """Seconds of one search, torch vs faiss (CPU), at the benchmark's shapes and at REFERENCES.md's."""
    device = torch.device(args.device)
    backends = ["torch", "faiss"] if device.type == "cpu" else ["torch"]
    shapes = [(args.heads, args.batch * args.segment, size) for size in args.memory_sizes if size]
    shapes.append((1, 4096, 262_144))  # the shape measured in REFERENCES.md §4
    result = {}
    for heads, num_queries, size in shapes:
        store = KNNStore(1, heads, args.head_dim, size, device=device)
        store = fill(store, size)
        queries = torch.randn(1, heads, num_queries, args.head_dim, device=device)
        entry = {"heads": heads, "queries": num_queries, "keys": size, "head_dim": args.head_dim, "k": args.top_k}
        found = {backend: search_once(store, queries, args.top_k, backend) for backend in backends}  # warm-up
        for backend in backends:
            runs = [seconds(functools.partial(search_once, store, queries, args.top_k, backend), device)]
            runs += [seconds(functools.partial(search_once, store, queries, args.top_k, backend), device)]
            entry[f"{backend}_s"] = min(runs)
        if len(found) == 2:
            entry["same_neighbours"] = bool(torch.equal(found["torch"], found["faiss"]))
        result[f"{heads}x{num_queries}x{size}"] = entry
        timings = ", ".join(f"{backend} {entry[f'{backend}_s']:.3f} s" for backend in backends)
        print(f"search {heads} heads x {num_queries} queries x {size} keys: {timings}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[0, 8192, 65_536, 262_144])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--segment", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--memory-layer", type=int, default=-2)
    parser.add_argument("--search", default="torch", choices=["torch", "faiss"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of torch and faiss")
    args = parser.parse_args()
    if args.threads is not None:  # on a shared CPU, fewer threads than cores avoids spinning on busy cores
        torch.set_num_threads(args.threads)
        import faiss

        faiss.omp_set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    args.head_dim = args.hidden // args.heads
    config = dict(vars(args))
    steps = step_times(args)
    searches = search_times(args)
    path = write_result(
        f"knn_memory_{torch.device(args.device).type}",
        {
            "config": config,  # random weights: only the shapes matter for time
            "model": f"Llama: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}",
            "step": "forward + backward of one segment (batch × segment tokens), memory in one layer",
            "step_times": steps,
            "search_times": searches,
            "paper": {"8192": 1.25, "65536": 3.0},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
