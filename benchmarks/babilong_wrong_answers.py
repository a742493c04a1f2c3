"""What a qa2 model answers when it is wrong: where the object was when it was taken, a place its holder left
after, a place in the question's segment, or another.

    python benchmarks/babilong_wrong_answers.py --checkpoint checkpoints/babilong-armt-read-loss --length 560

"Where is the apple?" needs two facts: who took the apple, and where that actor went after. A model that stored
"apple → the place where it was taken" answers that place when the holder moved on in a later segment, one that
missed the holder's last move a place they left, one that reads nothing from its memory a place its last
window names, and one that found the wrong actor that actor's place. Each wrong answer is put in the first kind
it fits, in that order; the rest are "another place".
"""

from __future__ import annotations

import argparse

import torch
from common import share, write_result
from rich.progress import track

import memformers as mf
from memformers.cli.checkpoints import checkpoint_tokenizer, tune_knobs
from memformers.evaluation import class_answers, equal_length_batches, predict_classes
from memformers.precision import autocast
from memformers.saving import read_config
from memformers.segments import count_segments
from memformers.tasks import make_sample
from memformers.tasks.babi import DROP_VERBS, MOVE_VERBS, PLACES, TAKE_VERBS

KINDS = ("taken_at", "holder_earlier", "question_segment", "other_actor", "another_place")


def holder_trail(facts: tuple[str, ...], obj: str) -> tuple[list[str | None], dict[str, str]]:
    """Where the actor who last took `obj` was when taking it (None: not known yet), then each place they moved to
    after, in order, until they dropped it (empty: nobody took it); and every other actor's last place."""
    place, trail, holder, taker = {}, [], None, None
    for fact in facts:
        actor, rest = fact.rstrip(".").split(" ", 1)
        if any(rest.startswith(verb + " the ") for verb in MOVE_VERBS):
            place[actor] = rest.rsplit(" ", 1)[-1]
            if actor == holder:
                trail.append(place[actor])
        elif any(rest == f"{verb} the {obj}" for verb in TAKE_VERBS):
            holder = taker = actor
            trail = [place.get(actor)]
        elif actor == holder and any(rest == f"{verb} the {obj}" for verb in DROP_VERBS):
            holder = None  # it stays where it was dropped: the trail ends there
    return trail, {actor: at for actor, at in place.items() if actor != taker}


def wrong_kind(sample, answer: str, content_size: int) -> str:
    """The kind of a wrong `answer` to a qa2 `sample` read in segments of `content_size` (right-aligned): where
    the object was taken, a place its holder left after, a place the question's segment names, another actor's
    last place, or another."""
    obj = sample.question.rstrip("?").rsplit(" ", 1)[-1]
    trail, others = holder_trail(sample.facts, obj)
    if trail and answer == trail[0]:
        return "taken_at"
    if answer in trail[1:-1]:
        return "holder_earlier"
    last = sample.num_tokens - content_size  # the question's segment: the last content_size tokens
    facts = zip(sample.facts, sample.fact_positions, strict=True)
    named = {fact.rstrip(".").rsplit(" ", 1)[-1] for fact, at in facts if at >= last}
    if answer in named & set(PLACES):
        return "question_segment"
    return "other_actor" if answer in others.values() else "another_place"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/babilong-armt-read-loss")
    parser.add_argument("--length", type=int, default=560, help="tokens (0: the stories alone)")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--set", dest="knobs", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="babilong_qa2_wrong_answers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = mf.load(args.checkpoint).eval()
    knobs = tune_knobs(model, args.knobs)
    tokenizer = checkpoint_tokenizer(args.checkpoint, read_config(args.checkpoint))
    answers = class_answers(model)
    stories = [make_sample("qa2", args.length, tokenizer, 0, i, "test") for i in range(args.samples)]
    counts = dict.fromkeys(KINDS, 0)
    right = 0
    for indices in track(equal_length_batches(stories, args.batch_size), description="qa2"):
        group = [stories[i] for i in indices]  # one length a batch: at length 0 the stories differ
        with torch.no_grad(), autocast(args.precision, "cpu"):
            said = [answers[c] for c in predict_classes(model, group)]
        for story, answer in zip(group, said, strict=True):
            if answer == story.target:
                right += 1
            else:
                counts[wrong_kind(story, answer, model.content_size)] += 1
    segments = sorted({count_segments(s.num_tokens, model.content_size) for s in stories})
    result = {"checkpoint": args.checkpoint, "length": args.length, "segments": segments, "knobs": knobs}
    result |= {"precision": args.precision, "right": share(right, len(stories)), "wrong_by_kind": counts}
    print(result)
    write_result(args.name, result)


if __name__ == "__main__":
    main()
