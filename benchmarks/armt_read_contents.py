"""What an ARMT model's memory hands the question: does the read at the question's actor token carry the answer?

    python benchmarks/armt_read_contents.py --checkpoint runs/first_two_segments_read_loss/final \\
        --length 124 --facts-first --distinct-actors --num-facts 2 3 --name armt_read_contents_read_loss

qa1 stories whose facts all lie before the question's segment (the question ends the last). Each sample is read
segment by segment with the model's own `step`; in the question's segment, for every memory layer, the read
y = A φ(q) / (zᵀφ(q)) at the question's actor token ("mary" in "where is mary ?") and, beside it, the token's hidden
state entering the layer before the read. A linear probe (softmax regression on standardised features) is fitted on
the first `--fit` samples to name the answer's place and scored on the rest: the read names it if the memory wrote
the place where the question finds it. `read_share` is the answering fact's share of the actor token's read, as
benchmarks/armt_segment_writes.py measures it, so a read that finds the right fact but carries no place shows as a
high share and a probe near chance. The model's own accuracy on the held-out samples is beside them.
Writes results/NAME.json.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from armt_segment_writes import (
    fact_indices,
    match_shares,
    query_positions,
    segment_of,
    segment_start,
)
from common import add_story_placement, share, story_placement, write_result

import memformers as mf
from memformers import backbone_layers
from memformers.cli.checkpoints import checkpoint_tokenizer
from memformers.evaluation import class_answers, sample_segments
from memformers.precision import autocast
from memformers.saving import read_config
from memformers.tasks import make_sample
from memformers.tasks.babi import PLACES


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, fit: int, classes: int) -> tuple[float, float]:
    """A softmax regression fitted on the first `fit` rows of `features` [n, d] to `labels` [n]: its accuracy on
    the rest and on the rows it was fitted on (standardised with the fitted rows' statistics; L2 1e-3)."""
    torch.manual_seed(0)
    mean, std = features[:fit].mean(0), features[:fit].std(0) + 1e-6
    x = (features - mean) / std  # [n, d]
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(x[:fit] @ weight + bias, labels[:fit]) + 1e-3 * weight.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = (x @ weight + bias).argmax(1)
    return float((predicted[fit:] == labels[fit:]).float().mean()), float(
        (predicted[:fit] == labels[:fit]).float().mean()
    )


def _keeping_input(store: dict, layer: int):
    """A forward pre-hook keeping the hidden states that enter a block in `store[layer]`."""

    def hook(_module, args, kwargs):
        store[layer] = args[0] if args else kwargs["hidden_states"]

    return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, help="A saved ARMT classification model, every position writing."
    )
    parser.add_argument("--length", type=int, default=124, help="Tokens a sample (several segments).")
    add_story_placement(parser)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--fit", type=int, default=400, help="Samples the probes are fitted on; the rest score them.")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="armt_read_contents")
    args = parser.parse_args()
    if not 0 < args.fit < args.samples:
        parser.error(f"--fit must lie between 0 and --samples ({args.samples}), got {args.fit}")
    torch.set_num_threads(args.threads)
    model = mf.load(args.checkpoint).eval()
    if not isinstance(model, mf.AssociativeMemoryTransformer) or model.token_level or model.config.writers != "all":
        parser.error("--checkpoint: an ARMT classification model whose every position writes is needed")
    tokenizer = checkpoint_tokenizer(args.checkpoint, read_config(args.checkpoint))
    classes = list(class_answers(model) or PLACES)
    options = story_placement(args)
    samples = [make_sample("qa1", args.length, tokenizer, 0, i, "test", **options) for i in range(args.samples)]
    length = samples[0].num_tokens
    where = lambda p: segment_of(p, length, model.content_size, model.alignment)  # noqa: E731
    count = where(length - 1) + 1
    if any(where(p) == count - 1 for s in samples for p in s.fact_positions) or any(
        where(s.question_position) != count - 1 for s in samples
    ):
        parser.error("--length: every fact must lie before the question's segment, and the question in the last")
    layers = len(model.layers)
    blocks = backbone_layers.layer_stack(model.backbone)
    reads: list[list[torch.Tensor]] = [[] for _ in range(layers)]  # per layer, per batch [rows, hidden]
    entering: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    shares: list[float] = [0.0] * layers
    predicted: list[str] = []
    with torch.no_grad(), autocast(args.precision):
        for start in range(0, len(samples), args.batch):
            batch = samples[start : start + args.batch]
            segments = list(sample_segments(batch, model.content_size, model.alignment))
            state = model.init_state(len(batch))
            with model.recording_reads() as record:
                for segment in segments[:-1]:
                    _, state = model.step(segment, state)
            question_start = segment_start(count - 1, length, model.content_size, model.alignment)
            positions = torch.tensor(query_positions(model, batch, question_start)["actor"])
            rows = torch.arange(len(batch))
            seen: dict[int, torch.Tensor] = {}
            handles = [  # registered before the step's own hooks: the hidden states before the read
                blocks[block].register_forward_pre_hook(_keeping_input(seen, layer), with_kwargs=True)
                for layer, block in enumerate(model.memory_blocks)
            ]
            try:
                output, _ = model.step(segments[-1], state)
            finally:
                for handle in handles:
                    handle.remove()
            predicted += [classes[label] for label in output.logits.argmax(-1).tolist()]
            owners = []
            for s in range(count - 1):
                tokens = int(segments[s].attention_mask[0].sum())
                owners.append(
                    fact_indices(model, batch, segment_start(s, length, model.content_size, model.alignment), tokens)
                )
            answering = torch.tensor([sample.supporting[-1] for sample in batch])
            last = torch.tensor([len(sample.facts) - 1 for sample in batch])
            for layer, memory in enumerate(model.layers):
                hidden = seen[layer][rows, positions].float()  # [rows, hidden]
                read = memory.read(hidden.unsqueeze(1), state.matrix[layer], state.normalizer[layer]).squeeze(1)
                reads[layer].append(read.float())
                entering[layer].append(hidden)
                keys = [step[layer].keys.float() for step in record]
                gates = [step[layer].gates.float() for step in record]
                found = match_shares(memory.queries(hidden), keys, gates, owners, answering, last)
                shares[layer] += float(found["answering fact"].sum())
    labels = torch.tensor([classes.index(sample.target) for sample in samples])
    held_out = samples[args.fit :]
    result = {"checkpoint": args.checkpoint, "task": "qa1", "length": length, "segments": count} | options
    result |= {"precision": args.precision, "samples": len(samples), "fit": args.fit}
    result["model_accuracy_held_out"] = share(
        sum(p == s.target for p, s in zip(predicted[args.fit :], held_out, strict=True)), len(held_out)
    )
    most_common = max(set(labels[: args.fit].tolist()), key=labels[: args.fit].tolist().count)
    result["probe_chance"] = float((labels[args.fit :] == most_common).float().mean())  # the fitted rows' commonest
    result["read_share_answering_fact"] = [round(value / len(samples), 4) for value in shares]
    for name, features in (("read", reads), ("entering", entering)):
        scores = [probe_accuracy(torch.cat(f), labels, args.fit, len(classes)) for f in features]
        result[f"probe_{name}_held_out"] = [round(held, 4) for held, _ in scores]
        result[f"probe_{name}_fitted"] = [round(fitted, 4) for _, fitted in scores]
    print(f"model, held out: {result['model_accuracy_held_out']['accuracy']:.3f}")
    print(f"answering fact's share of the actor token's read, by layer: {result['read_share_answering_fact']}")
    for name in ("read", "entering"):
        print(
            f"probe on the {name} (held out): {result[f'probe_{name}_held_out']}  chance {result['probe_chance']:.3f}"
        )
    print(write_result(args.name, result))


if __name__ == "__main__":
    main()
