"""A loss on which write a token reads: tell an associative memory where the answer was written.

The answer's loss reaches the memory's keys only through the read it scored; on bAbI stories spread over segments
an ARMT then learns to read the latest write, not the one about the asked actor (README, "Which write the question
reads"). `optim.read_loss_weight` adds, for the question's entity tokens (the actor, object or place it names), the
negative log of the share the supporting facts' writes take of the token's read, per memory layer:

    share = Σ_{i ∈ supporting} β_i φ(q)ᵀk_i / Σ_i β_i φ(q)ᵀk_i      over every position written in earlier segments

the weights linear attention gives them (the delta rule's corrections left out, as in
benchmarks/armt_segment_writes.py). Its gradient reaches W_Q, W_K and W_β of every memory layer and, through the
hidden states that made the queries and keys, the backbone; never the classifier. A row counts only where a
supporting fact lies in a segment before the question's (elsewhere the segment's attention reads it).

`optim.noise_write_weight` adds a second loss on the same record: a hinge keeping the noise's write gates (tokens
neither of the story's facts nor of its question) under a quarter of the model's `write_threshold`, under which a
write changes nothing in A, so that thousands of noise segments leave the memory as the facts left it.
"""

from __future__ import annotations

import numpy as np
import torch

from .segments import split_into_segments
from .tasks.babi import ACTORS, OBJECTS, PLACES
from .tasks.haystack import Sample, encode_sentence

OTHER, SUPPORTING, QUERY, STORY = 0, 1, 2, 3  # what `read_codes` says a token is
NOT_CONTENT = -1  # `layout_codes` of [CLS], [SEP] and the memory tokens
ENTITIES = frozenset(name.lower() for name in (*ACTORS, *OBJECTS, *PLACES))  # what a question asks about
READ_TARGETS = ("fact", "answer", "named", "last")  # what of the supporting facts the loss names (`read_codes`)
NOISE_WRITE_MEANS = ("all", "breaking")  # what the noise-write loss averages over (`noise_write_loss`)


def read_codes(sample: Sample, target: str = "fact") -> np.ndarray:  # [num_tokens] int64
    """Per token of `sample`: SUPPORTING where the memory should find what the question asks (`target` "fact":
    every token of the supporting facts; "answer": the answer's word in them, "garden" in "mary went to the
    garden ."; "named": every token of the supporting facts that name an actor, object or place the question
    names, the first hop of qa2's and qa3's chains: "where is the apple ?" finds "john took the apple .", and what
    that read brings in, not the question, must find "john went to the hallway ."; "last": every token of the
    supporting fact that comes last, alone: qa3's "john went to the kitchen ." must itself write where the apple was
    before, read from what earlier segments wrote, for a later question to find it), QUERY where the question names
    an actor, object or place ("mary" in "where is mary ?"), STORY elsewhere in the story's facts and question,
    OTHER elsewhere (the noise)."""
    if target not in READ_TARGETS:
        raise ValueError(f"target must be one of {READ_TARGETS}, got {target!r}")
    codes = np.zeros(sample.num_tokens, dtype=np.int64)
    facts = [piece for piece in sample.pieces if isinstance(piece, np.ndarray)][: len(sample.facts)]
    answer = {sample.target.lower()}
    for start, fact in zip(sample.fact_positions, facts, strict=True):
        codes[start : start + len(fact)] = STORY
    codes[sample.question_position :] = STORY  # the question ends the sample
    asked = _words(sample.question) & ENTITIES
    last = max(sample.supporting, key=lambda index: sample.fact_positions[index])
    for index in sample.supporting:
        start = sample.fact_positions[index]
        if target == "named" and not _words(sample.facts[index]) & asked or target == "last" and index != last:
            continue
        if target in ("fact", "named", "last"):
            codes[start : start + len(facts[index])] = SUPPORTING
        else:
            codes[start + _word_tokens(sample, sample.facts[index], answer)] = SUPPORTING
    codes[sample.question_position + _word_tokens(sample, sample.question, ENTITIES)] = QUERY
    return codes


def _words(sentence: str) -> set[str]:
    """The words of `sentence` in lower case, without trailing punctuation ("Mary?" is "mary")."""
    return {word.rstrip("?.,").lower() for word in sentence.split()}


def _word_tokens(sample: Sample, sentence: str, words: frozenset[str] | set[str]) -> np.ndarray:  # [k] int64
    """The offsets, within `sentence`'s tokens as the sample holds them, of the tokens spelling any of `words`
    (compared in lower case, without trailing punctuation: "Mary?" is "mary")."""
    text = " " + sentence  # as `encode_sentence` tokenizes it inside the sample
    encoded = sample.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if not np.array_equal(np.asarray(encoded["input_ids"]), encode_sentence(sample.tokenizer, sentence)):
        raise ValueError(f"read_codes: {sentence!r} is tokenized otherwise inside the sample")
    spans = []
    position = 0
    for word in text.split():
        start = text.index(word, position)
        position = start + len(word)
        name = word.rstrip("?.,")
        if name.lower() in words:
            spans.append((start, start + len(name)))
    offsets = [
        i for i, (low, high) in enumerate(encoded["offset_mapping"]) if any(low < e and s < high for s, e in spans)
    ]
    return np.asarray(offsets, dtype=np.int64)


def layout_codes(segment, terms, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:  # [b, L], [b, k]
    """The codes of one recorded step's layout positions (the segment's own `read_codes` on its content, padding
    −100, NOT_CONTENT on [CLS], [SEP] and the memory tokens) and of its writing positions (`terms.positions`)."""
    layout = torch.full(terms.queries.shape[:2], NOT_CONTENT, dtype=torch.long, device=segment.labels.device)
    layout[:, prefix : prefix + segment.labels.shape[1]] = segment.labels
    return layout, layout if terms.positions is None else layout.gather(1, terms.positions)


def read_share_loss(
    record: list[list],  # per step, per memory layer: `associative_memory.ReadTerms` (`recording_reads`)
    codes: torch.Tensor,  # [batch, length] `read_codes` of each row, aligned with input_ids (padding: any)
    input_ids: torch.Tensor,  # [batch, length]
    attention_mask: torch.Tensor,  # [batch, length]
    content_size: int,
    alignment: str,
    prefix: int,  # layout positions before the content ([CLS]: 1)
) -> tuple[torch.Tensor, int]:  # the mean −log share over counted (row, query token, layer), and how many
    """The read-share loss of one pass of the driver, recorded step by step (see the module's docstring)."""
    segments = _recorded_segments("read_share_loss", record, codes, input_ids, attention_mask, content_size, alignment)
    losses = []
    for layer in range(len(record[0])):
        earlier_keys, earlier_weights, earlier_supporting = [], [], []
        for segment, steps in zip(segments, record, strict=True):
            terms = steps[layer]
            layout, written = layout_codes(segment, terms, prefix)  # [b, L], [b, k]
            if earlier_keys:
                keys = torch.cat(earlier_keys, 1).float()  # [b, P, d_key]
                gates = torch.cat(earlier_weights, 1).float()  # [b, P]
                supporting = torch.cat(earlier_supporting, 1)  # [b, P]
                asking = (layout == QUERY) & supporting.any(1, keepdim=True)  # [b, L]
                if bool(asking.any()):
                    weights = (terms.queries.float() @ keys.transpose(1, 2)) * gates.unsqueeze(1)  # [b, L, P]
                    found = (weights * supporting.unsqueeze(1)).sum(-1)  # [b, L]
                    share = found / weights.sum(-1).clamp_min(1e-12)
                    losses.append(-torch.log(share[asking].clamp_min(1e-6)))
            earlier_keys.append(terms.keys)
            earlier_weights.append(terms.gates * segment.active.unsqueeze(1))  # a row not begun kept no write
            earlier_supporting.append(written == SUPPORTING)
    return _mean_and_count(losses, input_ids)


def noise_write_loss(
    record: list[list],  # per step, per memory layer: `associative_memory.ReadTerms` (`recording_reads`)
    codes: torch.Tensor,  # [batch, length] `read_codes` of each row, aligned with input_ids
    input_ids: torch.Tensor,  # [batch, length]
    attention_mask: torch.Tensor,  # [batch, length]
    content_size: int,
    alignment: str,
    prefix: int,  # layout positions before the content ([CLS]: 1)
    threshold: float,  # the model's write_threshold τ > 0
    over: str = "all",  # the mean over every noise write ("all") or over those above τ/4 alone ("breaking")
) -> tuple[torch.Tensor, int]:  # the mean hinge over the noise's writes (every layer), and how many
    """Keep the noise's writes under the write threshold, with room to spare: per noise token (OTHER) and memory
    layer, how far W_β's logit lies above that of τ/4, 0 below. A noise token whose β stays under τ adds nothing
    to A however many segments follow; one just above adds a little every segment, and over thousands of them
    those writes move every read (README, "Why 256 segments forget"). Averaged over every noise write, a rare
    one that writes hard ("kitchen" in a novel's sentence) weighs next to nothing among a batch's thousands of
    quiet ones; `over="breaking"` averages over the writes above τ/4 alone, so each weighs as much however rare."""
    if not 0 < threshold < 1:
        raise ValueError(f"noise_write_loss: threshold must be in (0, 1), got {threshold!r}")
    if over not in NOISE_WRITE_MEANS:
        raise ValueError(f"noise_write_loss: over must be one of {NOISE_WRITE_MEANS}, got {over!r}")
    segments = _recorded_segments("noise_write_loss", record, codes, input_ids, attention_mask, content_size, alignment)
    margin = float(np.log(threshold / 4) - np.log1p(-threshold / 4))  # logit(τ/4)
    hinges = []
    for segment, steps in zip(segments, record, strict=True):
        for terms in steps:
            _, written = layout_codes(segment, terms, prefix)  # [b, k]
            noise = (written == OTHER) & segment.active.unsqueeze(1)
            hinge = (terms.gate_logits.float() - margin).clamp_min(0)[noise]
            hinges.append(hinge if over == "all" else hinge[hinge > 0])
    return _mean_and_count(hinges, input_ids)


def _recorded_segments(name: str, record: list[list], codes, input_ids, attention_mask, content_size, alignment):
    """The driver's segments of the pass `record` holds, each with its rows' codes as labels."""
    segments = split_into_segments(input_ids, content_size, attention_mask, codes, alignment)
    if len(segments) != len(record):
        raise ValueError(f"{name}: {len(record)} recorded steps for {len(segments)} segments")
    return segments


def _mean_and_count(parts: list[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The mean of every term in `parts` and how many there are (0 and 0 where there are none)."""
    every = torch.cat(parts) if parts else like.new_zeros(0, dtype=torch.float32)
    if not every.numel():
        return like.new_zeros((), dtype=torch.float32), 0
    return every.mean(), every.numel()
