"""Which segment's write an ARMT model's answer comes from, on qa1 stories spread over several segments.

    python benchmarks/armt_segment_writes.py --checkpoint runs/cpu_babilong_qa1_armt_apart_few_facts/final \\
        --length 248 --facts-apart --num-facts 2 3 --name armt_segment_writes_apart_few_facts_step1000

The question ends the last segment, so every fact reaches it through the associative memory. Each sample is read
three ways, segment by segment, with the model's own `step`:
- as trained: every segment writes;
- without segment s's write (its state passes through unchanged), for each segment s before the question's;
- with segment s's write alone (every other segment's skipped).
`--lead-in N` reads N segments of noise alone (segments of the same samples that hold no fact) before each story, so
that the story's first fact is not in the first segment that writes; segment numbers then count from the story's.
Accuracy is split by the segment that holds the fact answering the question (the actor's last move): a memory that
binds answers from that segment's write, and loses the answer when that write is skipped. Beside it, per segment
and layer: the mean write strength β = σ(W_β m_i); how alike the write's keys φ(W_K m_i) are between the writing
tokens of one story (`key_cosine_tokens`) and between stories at the same writing position (`key_cosine_rows`: near 1,
the keys do not depend on what the segment says, so a later write cannot find and replace the one it should); and
how much the write changed the memory, ‖ΔA‖ / ‖A‖ after it.
Which write the question reads (`query_matches`, per layer): for the question's actor token ("mary" in "where is mary
?") and for [CLS], the share of each writing position i of the story's segments in the token's read, taken as linear
attention does, β_i φ(q)ᵀk_i / Σ_j β_j φ(q)ᵀk_j (the delta rule's corrections left out), summed over the answering
fact's tokens, the other facts' tokens, other content and memory tokens; and how often the fact with the largest
share is the answering one, and how often it is the story's last fact (a fact drawn at random: `top_by_chance`). A
memory that binds actors to places matches the asked actor's fact, one that reads the latest write the last fact
(with `writers = "all"` only: the paper's memory tokens are no fact's).
Writes results/NAME.json.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from armt_memory_probe import pairwise_cosine, recording
from common import add_story_placement, share, story_placement, write_result

import memformers as mf
from memformers.cli.checkpoints import checkpoint_tokenizer
from memformers.evaluation import class_answers, sample_segments
from memformers.precision import autocast
from memformers.saving import read_config
from memformers.segments import Segment, segment_of, segment_starts
from memformers.tasks import make_sample
from memformers.tasks.babi import PLACES

WRITE_TERMS = ("beta", "key_cosine_tokens", "key_cosine_rows")
KINDS = ("fact", "other content", "memory")  # what a writing position is (memory: also [CLS] and [SEP])
MATCH_SHARES = ("answering fact", "other facts", "other content", "memory")
OTHER_CONTENT, MEMORY = -1, -2  # `fact_indices` of a writing position that is no fact's


def segment_start(index: int, length: int, content_size: int, alignment: str) -> int:
    """The first token of segment `index` of a `length`-token sample (`segment_of`'s inverse)."""
    return segment_starts(length, content_size, alignment)[index]


def read(
    model, segments: list, writes: set[int], record: dict | None = None, entering: dict | None = None
) -> list[int]:
    """The predicted classes when only the segments in `writes` write (the others pass the state on unchanged).
    `record`, if given, collects per segment each layer's WRITE_TERMS and relative change of A, and `entering`
    the hidden states entering each layer in the last segment."""
    state = model.init_state(segments[0].input_ids.shape[0])
    terms: list[dict] = []
    if record is not None:  # this instance only: each layer's write reports its WRITE_TERMS on the way
        for index, layer in enumerate(model.layers):
            layer.write = _recording_writes(layer, terms)
            if entering is not None:
                layer.read = recording(type(layer).read.__get__(layer), entering, index, first_call=False)
    try:
        for index, segment in enumerate(segments):
            terms.clear()
            output, new_state = model.step(segment, state)
            if record is not None:
                change = (new_state.matrix - state.matrix).flatten(2).norm(dim=-1)  # [layers, batch]
                size = new_state.matrix.flatten(2).norm(dim=-1).clamp_min(1e-12)
                for key in WRITE_TERMS:
                    record[index][key].append([layer_terms[key] for layer_terms in terms])
                record[index]["change"].append((change / size).mean(-1).tolist())
                for key in ("gates", "keys"):  # this batch's, per layer
                    record[index][key] = [layer_terms[key] for layer_terms in terms]
            if index in writes:
                state = new_state
    finally:
        for layer in model.layers:
            layer.__dict__.pop("write", None)
            layer.__dict__.pop("read", None)
    return output.logits.argmax(dim=-1).tolist()


def fact_indices(model, samples: list, first_token: int, tokens: int) -> torch.Tensor:  # [batch, k]
    """Which fact each writing position of one segment belongs to (its index in the story), for the samples'
    segment that holds their tokens first_token .. first_token + tokens − 1; OTHER_CONTENT for another content
    token, MEMORY for a memory token (or [CLS]/[SEP]); with the paper's writers every position is a memory token."""
    m = model.num_memory_tokens
    if model.config.writers == "memory":
        return torch.full((len(samples), m), MEMORY, dtype=torch.long)
    width = model.prefix + tokens + model.suffix + m
    owners = torch.full((len(samples), width), MEMORY, dtype=torch.long)
    owners[:, model.prefix : model.prefix + tokens] = OTHER_CONTENT
    for row, sample in enumerate(samples):
        facts = [piece for piece in sample.pieces if isinstance(piece, np.ndarray)][: len(sample.facts)]
        for index, (start, fact) in enumerate(zip(sample.fact_positions, facts, strict=True)):
            low, high = max(start, first_token), min(start + len(fact), first_token + tokens)
            if low < high:
                owners[row, model.prefix + low - first_token : model.prefix + high - first_token] = index
    return owners


def position_kinds(model, samples: list, first_token: int, tokens: int) -> torch.Tensor:  # [batch, k] kind index
    """What each writing position of one segment is, an index into KINDS (`fact_indices`, facts not told apart)."""
    return kinds_of(fact_indices(model, samples, first_token, tokens))


def kinds_of(owners: torch.Tensor) -> torch.Tensor:  # [batch, k] `fact_indices` → [batch, k] index into KINDS
    kinds = torch.full_like(owners, KINDS.index("fact"))
    kinds[owners == OTHER_CONTENT] = KINDS.index("other content")
    kinds[owners == MEMORY] = KINDS.index("memory")
    return kinds


def query_positions(model, samples: list, first_token: int) -> dict[str, list[int]]:
    """Where, in the question's segment (starting at token `first_token`), each sample's [CLS] and the actor's
    token of its question are, as positions of the segment the model reads."""
    actor_tokens = []
    for sample in samples:
        actor = sample.question.rstrip("?").split()[-1]
        (token,) = sample.tokenizer(actor, add_special_tokens=False)["input_ids"]  # one token a name
        position = sample.question_position + sample.ids[sample.question_position :].tolist().index(token)
        actor_tokens.append(model.prefix + position - first_token)
    return {"actor": actor_tokens, "[CLS]": [0] * len(samples)}


def match_shares(
    queries: torch.Tensor,  # [batch, d_key] φ(W_Q x) of one token a row, in one layer
    keys: list[torch.Tensor],  # per segment [batch, k, d_key] the writing positions' keys (0: padding)
    gates: list[torch.Tensor],  # per segment [batch, k] their β
    owners: list[torch.Tensor],  # per segment [batch, k] `fact_indices`
    answering: torch.Tensor,  # [batch] the answering fact's index
    last: torch.Tensor,  # [batch] the story's last fact's index
) -> dict[str, torch.Tensor]:  # MATCH_SHARES → [batch] share; "top is answering", "top is last" → [batch] bool
    """Each writing position's share β_i φ(q)ᵀk_i / Σ_j β_j φ(q)ᵀk_j of the query's read, summed by kind, and
    whether the fact with the largest summed share is the answering fact, or the last."""
    weights = torch.cat([(k @ queries.unsqueeze(-1)).squeeze(-1) * g for k, g in zip(keys, gates, strict=True)], 1)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)  # [batch, positions]
    owner = torch.cat(owners, 1)  # [batch, positions]
    is_answer = owner == answering.unsqueeze(1)
    facts = int(owner.max()) + 1
    per_fact = torch.stack([(weights * (owner == f)).sum(1) for f in range(facts)], 1)  # [batch, facts]
    top = per_fact.argmax(1)
    return {
        "answering fact": (weights * is_answer).sum(1),
        "other facts": (weights * ((owner >= 0) & ~is_answer)).sum(1),
        "other content": (weights * (owner == OTHER_CONTENT)).sum(1),
        "memory": (weights * (owner == MEMORY)).sum(1),
        "top is answering": top == answering,
        "top is last": top == last,
    }


def _recording_writes(layer, terms: list[dict]):
    """`layer.write`, appending to `terms` the mean β of the write and how alike its keys are: between the writing
    tokens of one row, and between the rows (other stories) at the same writing position (rows without padding)."""
    method = type(layer).write

    def write(memory: torch.Tensor, matrix: torch.Tensor, normalizer: torch.Tensor, mask=None, record=None, **kwargs):
        with torch.autocast(memory.device.type, enabled=False):
            keys, _, betas = layer.write_terms(memory.to(matrix.dtype))  # [batch, k, d_key], [batch, k]
            weights = torch.ones_like(betas) if mask is None else mask.to(betas.dtype)
            terms.append(
                {
                    "beta": float((betas * weights).sum() / weights.sum()),
                    "key_cosine_tokens": pairwise_cosine(keys),
                    "key_cosine_rows": pairwise_cosine(keys.transpose(0, 1)),
                    "gates": betas * weights,  # [batch, k] each writing position's β (0: padding)
                    "keys": keys * weights.unsqueeze(-1),  # [batch, k, d_key] (0: padding)
                }
            )
        return method(layer, memory, matrix, normalizer, mask, record, **kwargs)

    return write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="A saved ARMT classification model.")
    parser.add_argument("--length", type=int, default=248, help="Tokens a sample (several segments).")
    add_story_placement(parser)
    parser.add_argument("--lead-in", type=int, default=0, help="Noise-only segments read before each story.")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="armt_segment_writes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = mf.load(args.checkpoint).eval()
    if not isinstance(model, mf.AssociativeMemoryTransformer) or model.token_level:
        parser.error("--checkpoint: an ARMT classification model is needed")
    tokenizer = checkpoint_tokenizer(args.checkpoint, read_config(args.checkpoint))
    classes = class_answers(model) or PLACES
    options = story_placement(args)
    samples = [make_sample("qa1", args.length, tokenizer, 0, i, "test", **options) for i in range(args.samples)]
    length = samples[0].num_tokens
    where = lambda p: segment_of(p, length, model.content_size, model.alignment)  # noqa: E731
    count = where(length - 1) + 1
    if where(min(s.question_position for s in samples)) != count - 1 or any(
        where(p) == count - 1 for s in samples for p in s.fact_positions
    ):
        parser.error("--length: every fact must lie before the question's segment, and the question in the last")
    answer_segment = [where(s.fact_positions[s.supporting[-1]]) for s in samples]
    partial = 0 if model.alignment == "right" and length % model.content_size else None  # a shorter first segment
    noise_only = [  # (sample, segment) pairs of whole segments holding neither a fact nor the question
        (i, s)
        for i, sample in enumerate(samples)
        for s in range(count - 1)
        if s != partial and s not in {where(p) for p in sample.fact_positions}
    ]
    if args.lead_in and not noise_only:
        parser.error("--lead-in: no segment of these samples holds noise alone")
    lead = args.lead_in  # the story's segment s is read as segment lead + s
    ways = {"all": set(range(lead + count))}
    ways |= {f"without {s}": set(range(lead + count)) - {lead + s} for s in range(count - 1)}
    ways |= {f"only {s}": set(range(lead)) | {lead + s} for s in range(count - 1)}
    predicted: dict[str, list[str]] = defaultdict(list)
    record: dict[int, dict[str, list]] = {s: {key: [] for key in (*WRITE_TERMS, "change")} for s in range(lead + count)}
    layers = len(model.layers)
    gate_sums = [[[0.0] * len(KINDS) for _ in range(layers)] for _ in range(count)]  # [segment][layer][kind]
    gate_counts = [[[0] * len(KINDS) for _ in range(layers)] for _ in range(count)]
    matches = {q: [defaultdict(float) for _ in range(layers)] for q in ("actor", "[CLS]")}  # sums over samples
    entering: dict[int, torch.Tensor] = {}  # layer → [batch, width, hidden] in the question's segment
    split = lambda rows: list(sample_segments(rows, model.content_size, model.alignment))  # noqa: E731
    with torch.no_grad(), autocast(args.precision):
        for start in range(0, len(samples), args.batch):
            segments = split(samples[start : start + args.batch])
            rows = len(segments[0].input_ids)
            for n in range(lead):  # row r reads noise-only segment number (start + r + n · rows) of the list
                picks = [noise_only[(start + r + n * rows) % len(noise_only)] for r in range(rows)]
                ids = torch.stack([split([samples[i]])[s].input_ids[0] for i, s in picks])
                segments.insert(n, Segment(ids, torch.ones_like(ids), index=n))
            for way, writes in ways.items():
                labels = read(model, segments, writes, *((record, entering) if way == "all" else ()))
                predicted[way] += [classes[label] for label in labels]
            batch_samples = samples[start : start + args.batch]
            owners = []
            for s in range(count):  # the story's segments: each layer's β summed by kind of writing position
                tokens = int(segments[lead + s].attention_mask[0].sum())
                first_token = segment_start(s, length, model.content_size, model.alignment)
                owners.append(fact_indices(model, batch_samples, first_token, tokens))
                kinds = kinds_of(owners[-1])
                for layer, gates in enumerate(record[lead + s]["gates"]):
                    for kind in range(len(KINDS)):
                        chosen = kinds == kind
                        gate_sums[s][layer][kind] += float(gates[chosen].sum())
                        gate_counts[s][layer][kind] += int(chosen.sum())
            question_start = segment_start(count - 1, length, model.content_size, model.alignment)
            answering = torch.tensor([sample.supporting[-1] for sample in batch_samples])
            last = torch.tensor([len(sample.facts) - 1 for sample in batch_samples])
            rows = torch.arange(len(batch_samples))
            asking = query_positions(model, batch_samples, question_start) if model.config.writers == "all" else {}
            layers_asked = enumerate(model.layers) if asking else ()
            for layer_index, layer in layers_asked:  # against the story's writes, not the question segment's
                keys = [record[lead + s]["keys"][layer_index].float() for s in range(count - 1)]
                gates = [record[lead + s]["gates"][layer_index].float() for s in range(count - 1)]
                for who, positions in asking.items():
                    hidden = entering[layer_index][rows, positions].float()  # [batch, hidden]
                    found = match_shares(layer.queries(hidden), keys, gates, owners[: count - 1], answering, last)
                    for name, values in found.items():
                        matches[who][layer_index][name] += float(values.float().sum())
    result = {"checkpoint": args.checkpoint, "task": "qa1", "length": length, "segments": count} | options
    result["precision"], result["samples"], result["lead_in"] = args.precision, len(samples), lead
    result["answer_segment_counts"] = {str(s): answer_segment.count(s) for s in range(count)}
    reads = {}
    for way, answers in predicted.items():
        by_segment = {}
        for s in sorted(set(answer_segment)):
            rows = [i for i, a in enumerate(answer_segment) if a == s]
            by_segment[str(s)] = share(sum(answers[i] == samples[i].target for i in rows), len(rows))
        changed = sum(a != b for a, b in zip(answers, predicted["all"], strict=True))
        overall = share(sum(a == s.target for a, s in zip(answers, samples, strict=True)), len(samples))
        reads[way] = {"overall": overall, "by_answer_segment": by_segment, "changed_from_all": changed}
        cells = ", ".join(f"fact in {s}: {v['correct']}/{v['samples']}" for s, v in by_segment.items())
        print(f"{way:>10}: {overall['accuracy']:.1%} ({cells}); {changed} answers differ from all writes")
    result["reads"] = reads
    writes = {}
    for s, rows in record.items():
        name = f"lead-in {s}" if s < lead else str(s - lead)
        writes[name] = {  # per layer, averaged over batches
            key: [round(float(v), 4) for v in torch.tensor(values).mean(0)]
            for key, values in rows.items()
            if key not in ("gates", "keys")
        }
        if s >= lead:  # β by kind of writing position, per layer (None: no such position)
            sums, counts = gate_sums[s - lead], gate_counts[s - lead]
            writes[name]["beta_by_kind"] = {
                kind: [round(sums[i][k] / counts[i][k], 4) if counts[i][k] else None for i in range(layers)]
                for k, kind in enumerate(KINDS)
            }
        print(f"segment {name}: " + "  ".join(f"{key} {values}" for key, values in writes[name].items()))
    result["writes"] = writes
    result["query_matches"] = {  # per layer, means over the samples; none where only memory tokens write
        who: {name: [round(per_layer[i][name] / len(samples), 4) for i in range(layers)] for name in per_layer[0]}
        for who, per_layer in matches.items()
        if per_layer[0]
    }
    for who, shares in result["query_matches"].items():
        print(f"query {who}: " + "  ".join(f"{name} {values}" for name, values in shares.items()))
    result["top_by_chance"] = round(sum(1 / len(s.facts) for s in samples) / len(samples), 4)  # a fact at random
    print(f"a fact drawn at random is the answering (or the last) one in {result['top_by_chance']:.1%}")
    print(write_result(args.name, result))


if __name__ == "__main__":
    main()
