"""Reading speed of a thresholded ARMT with its writes computed only where a gate passes the threshold, or for all.

    python benchmarks/armt_sparse_writes.py                     # the stored qa1 model, 25 test stories, 16 segments
    python benchmarks/armt_sparse_writes.py --checkpoint checkpoints/babilong-armt-read-loss --task qa2 --rounds 5

With `write_threshold` > 0, a gate at or below it writes nothing into A; a trained reader keeps about 98 tokens in
100 of the noise there. Without gradients, `AssociativeMemory.write` then computes W_V and the delta rule's reads
for the few tokens above it only (z still takes every key); with gradients it computes them for all, as training
must. Each round streams the same batch both ways back to back, the full write with grad mode on and no parameter
requiring a gradient (so no graph is built), and records seconds a segment, the ratio of the medians (what to
read: the machine is noisy), whether the predicted classes agree and the largest difference of the logits and A.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_result

import memformers as mf
from memformers.cli.checkpoints import checkpoint_tokenizer
from memformers.evaluation import sample_segments
from memformers.saving import read_config
from memformers.tasks import make_sample


def stream(model, segments: list, sparse: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(seconds, last logits, last A) of reading `segments`, with the writes above the threshold only or all."""
    with torch.set_grad_enabled(not sparse):
        start = time.perf_counter()
        for _segment, output, state in model.stream(iter(segments), None, batch_size=segments[0].input_ids.shape[0]):
            pass
        return time.perf_counter() - start, output.logits, state.matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/babilong-qa1-armt")
    parser.add_argument("--task", default="qa1")
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="armt_sparse_writes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = mf.load(args.checkpoint).eval().requires_grad_(False)
    if not getattr(model.config, "write_threshold", 0):
        parser.error(f"--checkpoint: an ARMT with a write_threshold > 0 is needed, {args.checkpoint} has none")
    tokenizer = checkpoint_tokenizer(args.checkpoint, read_config(args.checkpoint))
    length = args.segments * model.content_size
    samples = [make_sample(args.task, length, tokenizer, 0, i, "test") for i in range(args.batch_size)]
    segments = list(sample_segments(samples, model.content_size, model.alignment))
    stream(model, segments[:2], sparse=True)  # warm-up
    seconds = {"all": [], "above_threshold": []}
    for _ in range(args.rounds):
        full_time, full_logits, full_matrix = stream(model, segments, sparse=False)
        sparse_time, sparse_logits, sparse_matrix = stream(model, segments, sparse=True)
        seconds["all"].append(full_time / len(segments))
        seconds["above_threshold"].append(sparse_time / len(segments))
    ratio = statistics.median(seconds["all"]) / statistics.median(seconds["above_threshold"])
    payload = {
        "checkpoint": args.checkpoint,
        "task": args.task,
        "segments": len(segments),
        "batch_size": args.batch_size,
        "write_threshold": model.config.write_threshold,
        "seconds_per_segment": {name: [round(s, 4) for s in values] for name, values in seconds.items()},
        "speedup": round(ratio, 3),
        "classes_agree": bool(torch.equal(full_logits.argmax(-1), sparse_logits.argmax(-1))),
        "max_logit_difference": float((full_logits - sparse_logits).abs().max()),
        "max_relative_matrix_difference": float((full_matrix - sparse_matrix).abs().max() / full_matrix.abs().max()),
    }
    path = write_result(args.name, payload)
    print(
        f"{len(segments)} segments × {args.batch_size} rows: all writes {statistics.median(seconds['all']):.3f} s a "
        f"segment, above the threshold only {statistics.median(seconds['above_threshold']):.3f} s: ×{ratio:.2f}; "
        f"classes agree: {payload['classes_agree']}, "
        f"largest logit difference {payload['max_logit_difference']:.2g} → {path}"
    )


if __name__ == "__main__":
    main()
