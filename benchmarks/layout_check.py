"""Does a decoder's memory answer only in the layout it trained on? Teacher-forced and generated accuracy at several
lengths, on the same test stories.

    python benchmarks/layout_check.py --checkpoint runs/smol_mem_gate/checkpoint-0000425/model --lengths 221,224,216 \\
        --facts-first --name layout_check_smollm2_gate_step425

A trainer's validation scores an answer teacher-forced: the sample, its answer and end-of-text in one pass, laid out
exactly as in training. `memformers eval` generates the answer after the sample alone, so the segments' boundaries
fall a few tokens earlier. Where the two disagree at the training length but agree elsewhere, the model is fine
and only the layout differs; where both fall off a few tokens away from it, the memory learnt the layout.
Writes results/NAME.json.
"""

from __future__ import annotations

import argparse

import torch
from common import share, write_result

import memformers as mf
from memformers.babilong_metric import babilong_correct, babilong_labels
from memformers.cli.checkpoints import checkpoint_tokenizer
from memformers.evaluation import generate_answers, generates
from memformers.precision import autocast
from memformers.saving import read_config
from memformers.tasks import collate, get_tokenizer, make_sample, sample_item
from memformers.training_data import answer_correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="A saved decoder with a causal-LM head.")
    parser.add_argument("--task", default="qa1")
    parser.add_argument("--lengths", default="221,224", help="Sample lengths in tokens, comma-separated.")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--facts-first", action="store_true", help="Every fact before the noise.")
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="layout_check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = mf.load(args.checkpoint).eval()
    if not generates(model):
        parser.error("--checkpoint: a decoder with a causal-LM head (it generates its answers)")
    tokenizer = get_tokenizer(checkpoint_tokenizer(args.checkpoint, read_config(args.checkpoint)))
    labels = babilong_labels(args.task)  # generated answers are scored as `memformers eval` scores them
    rows = {}
    for length in (int(n) for n in args.lengths.split(",")):
        made = [
            make_sample(args.task, length, tokenizer, 0, i, "test", facts_first=args.facts_first)
            for i in range(args.samples)
        ]
        forced, generated = 0, 0
        for start in range(0, len(made), args.batch):
            part = made[start : start + args.batch]
            batch = collate([sample_item(s, "text", tokenizer.eos_token_id) for s in part], tokenizer.pad_token_id or 0)
            with torch.no_grad(), autocast(args.precision):
                logits = model(**batch, logits="labelled").logits
                answers = generate_answers(model, part, tokenizer, max_new_tokens=4)
            right = answer_correct(logits, batch["labels"], batch["attention_mask"], True, model.content_size,
                                   model.alignment)  # fmt: skip
            forced += int(right.sum())
            generated += sum(
                babilong_correct(a, s.target, s.question, labels) for s, a in zip(part, answers, strict=True)
            )
        rows[str(length)] = {"teacher_forced": share(forced, len(made)), "generated": share(generated, len(made))}
        print(f"{length} tokens: teacher-forced {forced}/{len(made)}, generated {generated}/{len(made)}", flush=True)
    config = {"checkpoint": args.checkpoint, "task": args.task, "facts_first": args.facts_first}
    write_result(args.name, config | {"precision": args.precision, "by_length": rows})


if __name__ == "__main__":
    main()
