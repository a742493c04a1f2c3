"""Why an ARMT that answers at 64 segments forgets at 256: what its noise writes do to the memory, block by block.

    python benchmarks/armt_noise_drift.py --checkpoint runs/read_loss_curriculum_step750 --length 15872 \\
        --facts-first --num-facts 2 3 --name armt_noise_drift_step750

Reads qa1 stories hidden in noise (test books) segment by segment, with the model's own `step`, and per block of
segments (the input cut in `--blocks` equal parts) and memory layer reports:
- `noise_gate`: the mean write strength β = σ(W_β h) of the noise's tokens (every position writes), as written
  (after any `write_threshold`), `story_gate`, that of the story's facts and question, and `layout_gate`, that of
  [CLS], [SEP] and the memory tokens, which write in every segment, noise or not;
- `read_norm`: the mean ‖y‖ of the read y = Aφ(q) / zᵀφ(q) that every content token adds to its hidden state,
  and `read_denominator`, its zᵀφ(q) (z takes every token's new part, whatever its gate);
- `noise_writing`: the share of the noise's tokens whose gate passes the model's `write_threshold` (they write);
  and, over the whole input, the words of the noise that write most often (`noise_writers`, each layer's count);
- `question_read`: per layer, the read of the question's entity tokens ("mary" in "where is mary ?"), its norm,
  numerator ‖Aφ(q)‖ and denominator zᵀφ(q), and the mass of z (Σ z) then: what the answer is read with.
A memory whose noise writes add nothing keeps its reads as they were after the facts, however long the input; one
whose noise writes add a little each segment drifts, and the reads, gates and answers drift with it. Beside it the
accuracy of the same stories. Writes results/NAME.json.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_story_placement, share, story_placement, write_result  # noqa: E402

import memformers as mf  # noqa: E402
from memformers.associative_memory import associative_read  # noqa: E402
from memformers.cli.checkpoints import checkpoint_tokenizer, tune_knobs  # noqa: E402
from memformers.evaluation import class_answers  # noqa: E402
from memformers.precision import autocast  # noqa: E402
from memformers.read_supervision import NOT_CONTENT, OTHER, QUERY, layout_codes, read_codes  # noqa: E402
from memformers.saving import read_config  # noqa: E402
from memformers.segments import split_into_segments  # noqa: E402
from memformers.tasks import get_tokenizer, make_sample  # noqa: E402
from memformers.tasks.babi import PLACES  # noqa: E402

MEASURES = ("noise_gate", "story_gate", "layout_gate", "read_norm", "read_denominator", "noise_writing")
TOP_WRITERS = 12  # the noise's writing words kept per layer


def drift(model, samples: list, blocks: int, tokenizer) -> tuple[list[dict], list[int], list[dict], list[dict]]:
    """Per block of segments, per memory layer: noise and story gates, read norms and denominators and the share of
    noise tokens that write (means over the block); the predicted classes; per layer, the noise's writing words by
    count; per layer, the read of the question's entity tokens ("mary" in "where is mary ?") at the last segment."""
    ids = torch.stack([torch.from_numpy(s.ids) for s in samples])  # [batch, length]: one length for all
    codes = torch.stack([torch.from_numpy(read_codes(s)) for s in samples])  # noise: OTHER
    mask = torch.ones_like(ids)
    segments = split_into_segments(ids, model.content_size, mask, codes, model.alignment)
    per_block = -(-len(segments) // blocks)
    layers = len(model.layers)
    sums = [[dict.fromkeys(MEASURES, 0.0) for _ in range(layers)] for _ in range(blocks)]
    counts = [[dict.fromkeys(MEASURES, 0) for _ in range(layers)] for _ in range(blocks)]
    writers = [Counter() for _ in range(layers)]  # per layer: noise token id → times it wrote
    question = []  # per layer: the question's entity tokens' read at the last segment
    state, logits = model.init_state(len(samples)), None
    with torch.no_grad(), model.recording_reads() as record:
        for index, segment in enumerate(segments):
            out, new_state = model.step(segment, state)
            block = index // per_block
            for layer, terms in enumerate(record.pop()):
                layout, written = layout_codes(segment, terms, model.prefix)  # [b, L], [b, k]
                gates = terms.gates.float()
                noise, story, layout_only = written == OTHER, written > OTHER, written == NOT_CONTENT
                content = layout >= OTHER  # [b, L] the segment's real tokens
                matrix, normalizer = state.matrix[layer].float(), state.normalizer[layer].float()
                reads = associative_read(terms.queries.float(), matrix, normalizer)  # [b, L, hidden]
                denominators = terms.queries.float() @ normalizer.unsqueeze(-1)  # [b, L, 1] zᵀφ(q)
                writing = noise & (gates > 0)  # [b, L]: with writers "all" every layout position writes
                rows, places = writing.nonzero(as_tuple=True)
                writers[layer].update(segment.input_ids[rows, places - model.prefix].tolist())  # [CLS] first
                for key, values in (
                    ("noise_gate", gates[noise]),
                    ("story_gate", gates[story]),
                    ("layout_gate", gates[layout_only]),
                    ("read_norm", reads.norm(dim=-1)[content]),
                    ("read_denominator", denominators.squeeze(-1)[content]),
                    ("noise_writing", writing[noise].float()),
                ):
                    sums[block][layer][key] += float(values.sum())
                    counts[block][layer][key] += values.numel()
                asking = layout == QUERY  # [b, L]: in the question, so in the last segment only
                if index == len(segments) - 1 and bool(asking.any()):
                    question.append(
                        {
                            "read_norm": float(reads.norm(dim=-1)[asking].mean()),
                            "read_numerator": float((reads * denominators).norm(dim=-1)[asking].mean()),
                            "read_denominator": float(denominators.squeeze(-1)[asking].mean()),
                            "normalizer_mass": float(normalizer.sum(-1).mean()),  # Σ z: DPFP keys are ≥ 0
                        }
                    )
            state = new_state
            logits = out.logits
    rows = []
    for block in range(min(blocks, -(-len(segments) // per_block))):
        first = block * per_block
        row = {"segments": [first, min(first + per_block, len(segments)) - 1], "layers": []}
        for layer in range(layers):
            row["layers"].append(
                {
                    key: (sums[block][layer][key] / counts[block][layer][key]) if counts[block][layer][key] else None
                    for key in sums[block][layer]
                }
            )
        rows.append(row)
    words = [
        {tokenizer.convert_ids_to_tokens(token): count for token, count in counter.most_common(TOP_WRITERS)}
        for counter in writers
    ]
    return rows, logits.argmax(-1).tolist(), words, question


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="A saved ARMT classifier whose every position writes.")
    parser.add_argument("--length", type=int, default=15872, help="Tokens a sample.")
    parser.add_argument("--samples", type=int, default=16, help="Stories, read side by side (one batch).")
    parser.add_argument("--blocks", type=int, default=8, help="Parts the segments are reported in.")
    add_story_placement(parser)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--set",
        dest="knobs",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Read with a knob no weight depends on, e.g. layout_writes=false (as memformers eval --set).",
    )
    parser.add_argument("--name", default="armt_noise_drift")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = mf.load(args.checkpoint).eval()
    knobs = tune_knobs(model, args.knobs)
    if model.config.writers != "all":
        parser.error("--checkpoint: an ARMT with writers = 'all' (the noise's own tokens write)")
    tokenizer = get_tokenizer(checkpoint_tokenizer(args.checkpoint, read_config(args.checkpoint)))
    classes = class_answers(model) or PLACES
    options = story_placement(args)
    samples = [make_sample("qa1", args.length, tokenizer, 0, i, "test", **options) for i in range(args.samples)]
    with autocast(args.precision):
        blocks, predicted, writers, question = drift(model, samples, args.blocks, tokenizer)
    right = sum(classes[p] == s.target for p, s in zip(predicted, samples, strict=True))
    result = {
        "checkpoint": args.checkpoint,
        "task": "qa1",
        "length": args.length,
        **options,
        "precision": args.precision,
        "knobs": knobs,
        "write_threshold": model.config.write_threshold,
        "accuracy": share(right, len(samples)),
        "blocks": blocks,
        "noise_writers": writers,
        "question_read": question,
    }
    path = write_result(args.name, result)
    print(f"qa1 at {args.length} tokens: {result['accuracy']}")
    for layer in range(len(model.layers)):
        print(f"  layer {layer}")
        for key in MEASURES:
            values = [row["layers"][layer][key] for row in blocks]
            print(f"    {key:10s} " + " ".join("   —  " if v is None else f"{v:.4f}" for v in values))
    for layer, read in enumerate(question):
        print(f"  layer {layer}, the question's read: " + ", ".join(f"{k} {v:.4g}" for k, v in read.items()))
    for layer, words in enumerate(writers):
        print(f"  layer {layer}, the noise's writing words: " + ", ".join(f"{w} {n}" for w, n in words.items()))
    print(path)


if __name__ == "__main__":
    main()
