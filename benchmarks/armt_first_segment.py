"""Where a right-aligned input's partial segment goes, and what it does to an ARMT whose every position writes.

    python benchmarks/armt_first_segment.py                     # the stored qa1 model, 4,096 tokens, 50 test stories
    python benchmarks/armt_first_segment.py --length 4031 --samples 25

In the first segment the memory is empty, so every writing position adds its whole key to the normalizer z
(γ = 1); later keys add little (γ ≈ 0 once z covers them). The first segment's number of positions thus sets z, and
with it the scale of every read, A φ / (zᵀφ + ε), for the whole input. Reads the same stories with the remainder
(length mod the content size) in the first segment, as right alignment did, and in the second, as it does now
(`right_aligned_sizes`), and records, per layout: the accuracy, and per memory layer the sum of z after the first
segment (mean over rows) and the mean norm of the last segment's reads.
"""

from __future__ import annotations

import argparse

import torch
from common import write_result
from rich.progress import track

import memformers as mf
from memformers.associative_memory import associative_read
from memformers.cli.checkpoints import checkpoint_tokenizer
from memformers.evaluation import class_answers
from memformers.saving import read_config
from memformers.segments import right_aligned_sizes, stack_segments, stream_segments
from memformers.tasks import make_sample


def leading_sizes(length: int, content_size: int, remainder_first: bool) -> list[int]:
    """The first segments' content sizes: the remainder first, as right alignment had it, or as it has it now."""
    return [length % content_size] if remainder_first else right_aligned_sizes(length, content_size)


def read(model, stories: list, leading: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(classes, z sums after the first segment [layers, rows], mean read norms in the last segment [layers, rows])."""
    rows = [stream_segments(iter([torch.from_numpy(story.ids)]), model.content_size, leading) for story in stories]
    segments = [stack_segments(list(column)) for column in zip(*rows, strict=True)]
    first_z, state = None, None
    with torch.no_grad():
        for _segment, _output, state in model.stream(iter(segments[:-1]), None, batch_size=len(stories)):
            if first_z is None:
                first_z = state.normalizer.sum(-1)  # [layers, rows]
        with model.recording_reads() as record:
            *_, (_segment, output, _state) = model.stream(iter(segments[-1:]), state, batch_size=len(stories))
        norms = torch.stack(
            [  # what each layer's memory added to the last segment's hidden states, per position
                associative_read(terms.queries, state.matrix[i], state.normalizer[i]).norm(dim=-1).mean(-1)
                for i, terms in enumerate(record[0])
            ]
        )  # [layers, rows]
    return output.logits.argmax(-1).tolist(), first_z, norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/babilong-qa1-armt")
    parser.add_argument("--task", default="qa1")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="armt_first_segment")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = mf.load(args.checkpoint).eval()
    tokenizer = checkpoint_tokenizer(args.checkpoint, read_config(args.checkpoint))
    if not args.length % model.content_size or args.length < 3 * model.content_size:
        parser.error(f"--length: a partial segment and three segments or more are needed, got {args.length}")
    answers = class_answers(model)
    stories = [make_sample(args.task, args.length, tokenizer, 0, i, "test") for i in range(args.samples)]
    results = {}
    for name, first in (("remainder_first", True), ("remainder_second", False)):
        leading = leading_sizes(args.length, model.content_size, first)
        correct, z_sums, norms = 0, [], []
        for start in track(range(0, len(stories), args.batch_size), description=name):
            batch = stories[start : start + args.batch_size]
            classes, z, norm = read(model, batch, leading)
            correct += sum(answers[c] == story.target for c, story in zip(classes, batch, strict=True))
            z_sums.append(z)
            norms.append(norm)
        results[name] = {
            "first_segments": leading,
            "accuracy": correct / len(stories),
            "z_sum_after_first_segment": [round(float(v), 1) for v in torch.cat(z_sums, 1).mean(1)],
            "last_segment_read_norm": [round(float(v), 3) for v in torch.cat(norms, 1).mean(1)],
        }
        print(name, results[name])
    write_result(args.name, {"checkpoint": args.checkpoint, "task": args.task, "length": args.length,
                             "samples": args.samples, **results})  # fmt: skip


if __name__ == "__main__":
    main()
