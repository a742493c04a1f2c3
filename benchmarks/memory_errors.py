"""What a qa1 model gets wrong: which place it answers when it is wrong, and how accuracy falls with later facts.

    python benchmarks/memory_errors.py --checkpoint checkpoints/babilong-armt --length 1024 --facts-first \\
        --samples 300 --name memory_errors_shipped_1k_facts_first

qa1 asks where an actor is; the answer is the place of their last move. A wrong answer is one of three kinds:
- an earlier place of the same actor: the memory kept the actor's moves but not which came last;
- a place where only other actors went: the fact was bound to the wrong actor;
- a place nobody in the story went to: the fact was not kept at all;
- (decoders, which generate their answer) no single place: the answer names none of the places, or several.
Beside the counts stands what a uniform guess among the five wrong places would give for the same stories, so a
kind that is over-represented stands out. Accuracy is also split by how many facts of the story come after the
one that answers (later writes the memory had to keep it through) and by the story's number of facts. Two more
rates show whether the model binds at all: how often the story's last place is the answer (what answering the
latest place, whoever went there, scores on these stories: a memory above it binds some facts to their actors),
and how often the model answers the story's last place.
With `--facts-first` every fact sits before the noise, so past one window only the memory answers; with
`--facts-apart` the facts are spaced evenly through it. Writes results/NAME.json.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from common import add_story_placement, share, story_placement, write_result

import memformers as mf
from memformers.babilong_metric import answer_part
from memformers.cli.checkpoints import checkpoint_tokenizer
from memformers.evaluation import (
    class_answers,
    equal_length_batches,
    generate_answers,
    generates,
    predict_classes,
)
from memformers.precision import autocast
from memformers.saving import read_config
from memformers.tasks import make_sample
from memformers.tasks.babi import ACTORS, PLACES

KINDS = ("earlier place of the actor", "another actor's place", "a place not in the story", "no single place")


def moves(facts: tuple[str, ...]) -> list[tuple[str, str]]:
    """(actor, place) of every qa1 fact, in story order."""
    found = []
    for fact in facts:
        actor = next(a for a in ACTORS if a in fact)
        place = next(p for p in PLACES if p in fact)
        found.append((actor, place))
    return found


def error_kind(story: list[tuple[str, str]], actor: str, answer: str, wrong: str) -> str:
    """Which of KINDS a wrong answer is."""
    if wrong not in PLACES:
        return KINDS[3]
    own = {place for who, place in story if who == actor} - {answer}
    if wrong in own:
        return KINDS[0]
    if wrong in {place for who, place in story if who != actor}:
        return KINDS[1]
    return KINDS[2]


def named_place(output: str) -> str:
    """The one place a generated answer names (as the BABILong metric reads it), or "" for none or several."""
    named = [place for place in PLACES if place in answer_part(output)]
    return named[0] if len(named) == 1 else ""


def bucket(value: int, edges: tuple[int, ...]) -> str:
    """The label of the range in `edges` (lower bounds) holding `value`."""
    low = max(edge for edge in edges if edge <= value)
    higher = [edge for edge in edges if edge > low]
    return f"{low}" if higher and higher[0] == low + 1 else f"{low}–{higher[0] - 1}" if higher else f"{low}+"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/babilong-armt")
    parser.add_argument("--length", type=int, default=1024, help="Tokens a sample (0: the story alone).")
    parser.add_argument("--samples", type=int, default=300)
    add_story_placement(parser)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="memory_errors")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = mf.load(args.checkpoint).eval()
    tokenizer = checkpoint_tokenizer(args.checkpoint, read_config(args.checkpoint))
    classes = class_answers(model) or PLACES
    options = story_placement(args)
    samples = [make_sample("qa1", args.length, tokenizer, 0, i, "test", **options) for i in range(args.samples)]
    predicted: dict[int, str] = {}
    with autocast(args.precision):
        for batch in equal_length_batches(samples, args.batch):  # length 0: stories of several lengths
            rows = [samples[i] for i in batch]
            if generates(model):
                for i, text in zip(batch, generate_answers(model, rows, tokenizer), strict=True):
                    predicted[i] = named_place(text)
                continue
            for i, label in zip(batch, predict_classes(model, rows), strict=True):
                predicted[i] = classes[label]
    errors: Counter = Counter()
    expected: Counter = Counter()  # a uniform guess among the five wrong places, for the same stories
    after: dict[str, list[int]] = {}
    size: dict[str, list[int]] = {}
    last_is_answer, answers_last = [], []
    for i, sample in enumerate(samples):
        story = moves(sample.facts)
        actor = next(a for a in ACTORS if a in sample.question)
        right = predicted[i] == sample.target
        last_is_answer.append(story[-1][1] == sample.target)
        answers_last.append(predicted[i] == story[-1][1])
        later = len(story) - 1 - sample.supporting[-1]
        after.setdefault(bucket(later, (0, 1, 3, 6)), []).append(right)
        size.setdefault(bucket(len(story), (2, 5, 8)), []).append(right)
        if not right:
            errors[error_kind(story, actor, sample.target, predicted[i])] += 1
            for wrong in set(PLACES) - {sample.target}:
                expected[error_kind(story, actor, sample.target, wrong)] += 1 / 5
    wrong_total = sum(errors.values())
    by_kind = {
        kind: {"errors": errors[kind], "share": errors[kind] / wrong_total if wrong_total else None}
        | {"uniform_guess_share": expected[kind] / wrong_total if wrong_total else None}
        for kind in KINDS
    }
    result = {
        "checkpoint": args.checkpoint,
        "task": "qa1",
        "length": args.length,
        **options,
        "precision": args.precision,
        "overall": share(sum(predicted[i] == s.target for i, s in enumerate(samples)), len(samples)),
        "errors_by_kind": by_kind,
        "by_facts_after_the_answer": {key: share(sum(v), len(v)) for key, v in sorted(after.items())},
        "by_story_facts": {key: share(sum(v), len(v)) for key, v in sorted(size.items())},
        "last_place_is_the_answer": share(sum(last_is_answer), len(samples)),
        "answers_the_last_place": share(sum(answers_last), len(samples)),
    }
    path = write_result(args.name, result)
    placed = " (facts first)" if args.facts_first else " (facts apart)" if args.facts_apart else ""
    print(f"qa1 at {args.length} tokens{placed}: {result['overall']}")
    for kind, row in by_kind.items():
        guess = row["uniform_guess_share"] or 0
        print(f"  {kind}: {row['errors']} ({row['share'] or 0:.0%}; a uniform guess {guess:.0%})")
    for title, rows in (("facts after the answer", after), ("facts in the story", size)):
        print(f"  by {title}: " + ", ".join(f"{k}: {sum(v)}/{len(v)}" for k, v in sorted(rows.items())))
    print(
        f"  answering the story's last place would score {result['last_place_is_the_answer']['accuracy']:.1%}; "
        f"the model answers it in {result['answers_the_last_place']['accuracy']:.1%} of the stories"
    )
    print(path)


if __name__ == "__main__":
    main()
