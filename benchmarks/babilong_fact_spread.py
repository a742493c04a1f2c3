"""Which stories a model answers across segments: accuracy by how many segments a story's supporting facts lie in,
and whether the question shares the last one's segment or comes in a later one.

    python benchmarks/babilong_fact_spread.py --checkpoint runs/qa3_alone_two_segments/best --task qa3 \
        --lengths 420,560 --samples 200

A model trained at two segments has seen a chain split over two segments only with the question beside its last
link, and a whole chain in one segment read later; a chain split over two segments and asked about in a third needs
the memory to hold what both wrote, together. The cells tell apart "cannot carry a chain" from "cannot carry one
this long". The stories are the test split's, each task's own placement (or --facts-apart / --facts-first).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from common import add_story_placement, share, story_placement, write_result
from rich.progress import track

import memformers as mf
from memformers.cli.checkpoints import checkpoint_tokenizer, tune_knobs
from memformers.evaluation import class_answers, equal_length_batches, predict_classes
from memformers.precision import autocast
from memformers.saving import read_config
from memformers.segments import segment_of
from memformers.tasks import make_sample


def spread(sample, content_size: int, alignment: str) -> str:
    """Where `sample`'s supporting facts and its question fall when read in segments of `content_size`: "N
    segments, question beside the last" (the question in the last fact's segment) or "N segments, question later"."""

    def index(position: int) -> int:
        return segment_of(position, sample.num_tokens, content_size, alignment)

    where = [index(sample.fact_positions[i]) for i in sample.supporting]
    question = index(sample.question_position)
    beside = "question beside the last" if question == max(where) else "question later"
    return f"{len(set(where))} segment{'s' * (len(set(where)) > 1)}, {beside}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--task", default="qa3", choices=("qa1", "qa2", "qa3", "qa4", "qa5"))
    parser.add_argument("--lengths", default="420,560", help="tokens, comma-separated")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--set", dest="knobs", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default=None, help="results/NAME.json (default babilong_TASK_fact_spread)")
    add_story_placement(parser)
    args = parser.parse_args()
    lengths = [int(text) for text in args.lengths.split(",")]
    if any(length < 1 for length in lengths):
        parser.error(f"--lengths must be positive token counts, got {args.lengths!r}")
    torch.set_num_threads(args.threads)
    model = mf.load(args.checkpoint).eval()
    knobs = tune_knobs(model, args.knobs)
    tokenizer = checkpoint_tokenizer(args.checkpoint, read_config(args.checkpoint))
    answers = class_answers(model)
    placement = story_placement(args)
    cells = {}
    for length in lengths:
        stories = [make_sample(args.task, length, tokenizer, 0, i, "test", **placement) for i in range(args.samples)]
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # kind → [right, total]
        for indices in track(equal_length_batches(stories, args.batch_size), description=f"{args.task} {length}"):
            group = [stories[i] for i in indices]
            with torch.no_grad(), autocast(args.precision, "cpu"):
                said = [answers[c] for c in predict_classes(model, group)]
            for story, answer in zip(group, said, strict=True):
                count = counts[spread(story, model.content_size, model.alignment)]
                count[0] += answer == story.target
                count[1] += 1
        cells[str(length)] = {kind: share(*counts[kind]) for kind in sorted(counts)}
        for kind, cell in cells[str(length)].items():
            print(f"{args.task} {length:>6}  {kind:<40} {cell['correct']:>4}/{cell['samples']:<4}")
    result = {"checkpoint": args.checkpoint, "task": args.task, "knobs": knobs, "precision": args.precision}
    write_result(args.name or f"babilong_{args.task}_fact_spread", result | {"placement": placement, "cells": cells})


if __name__ == "__main__":
    main()
