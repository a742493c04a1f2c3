"""Greedy generation of every mechanism on a padded batch, token for token against the backbone's own `generate`.

Guards the generation cache's keyword: transformers 5.24 renamed it (`past_key_values` → `cache`), in model forwards,
`generate` and what decoder layers pass their attention. An attention layer that a mechanism replaces and that does
not find the cache attends, at each new token, to that token alone: a padded batch then fails in the attention
function, and a single row silently generates other tokens. Each mechanism here is in the setting where it must
generate exactly what the backbone does: kNN memory with its gate closed, RMT with no memory tokens, the segment
cache on a context shorter than one segment. LongMem's SideNet changes the outputs from the start, so each row must
instead give what it gives alone, and cached decoding what recomputing the window gives.

The reference is the backbone's greedy `generate` on each row alone, without padding, rather than its `generate` on
the padded batch: batching and padding change the shapes of its matrix products, so its logits move in the last
bits (about 1e-6 on these models) and a near-tie could pick another token in the batch than alone. A row alone is
what the row means. End-of-sequence is off (`eos_token_id=None`), so every row has all its new tokens.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import VOCAB, tiny_backbone, tiny_longmem
from transformers import DynamicCache

import memformers as mf
from memformers import backbone_layers, backbones

FAMILIES = ("llama", "gpt2")
SEGMENT = 16
NEW_TOKENS = 8


def padded_batch(lengths: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Rows of the given lengths, right-padded with zeros: (ids [rows, longest], mask, each row's own tokens)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=generator) for n in lengths]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
    return ids, mask, rows


def backbone_alone(backbone, tokens: torch.Tensor) -> torch.Tensor:  # [NEW_TOKENS]
    """The backbone's own greedy generation on one unpadded row."""
    out = backbone.generate(
        tokens[None],
        attention_mask=torch.ones_like(tokens[None]),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(tokens) :]


def last_segment(tokens: torch.Tensor) -> torch.Tensor:
    """The row's last segment as the driver cuts it (left alignment): the prompt generation starts from (the whole
    row when it is shorter than a segment)."""
    return tokens[(len(tokens) - 1) // SEGMENT * SEGMENT :]


def generate_without_deprecations(model: mf.MemoryModel, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
    """`model.generate`, failing on any deprecation warning (a keyword name transformers is about to drop)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = model.generate(ids, mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, **kwargs)
    deprecations = [str(w.message) for w in caught if "deprecated" in str(w.message)]
    assert not deprecations, deprecations
    return new


# Mechanisms that, as built here, add nothing to the backbone yet: (how to build one, the rows' lengths).
EXACT = {
    "knn-gate-closed": (  # memory written and read in both layers, its share zero as constructed
        lambda backbone: mf.MemorizingTransformer(
            backbone, memory_layers=(0, 1), memory_size=64, top_k=8, segment_size=SEGMENT
        ),
        (2 * SEGMENT + 5, SEGMENT + 9),  # prompts of 5 and 9 tokens behind 2 and 1 segments read
    ),
    "rmt-no-memory": (
        lambda backbone: mf.RecurrentMemoryTransformer(backbone, num_memory_tokens=0, segment_size=SEGMENT),
        (2 * SEGMENT + 5, SEGMENT + 9),
    ),
    "segment-cache-one-segment": (  # nothing read before the prompt: no earlier segment's cache
        lambda backbone: mf.SegmentCacheTransformer(backbone, segment_size=SEGMENT),
        (SEGMENT - 5, 6),
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mechanism", sorted(EXACT))
def test_generation_equals_the_backbones_own_row_by_row(mechanism: str, family: str) -> None:
    build, lengths = EXACT[mechanism]
    backbone = tiny_backbone(family)
    ids, mask, rows = padded_batch(lengths)
    new = generate_without_deprecations(build(backbone), ids, mask)
    for row, tokens in enumerate(rows):
        assert new[row].tolist() == backbone_alone(backbone, last_segment(tokens)).tolist(), f"row {row}"


@pytest.mark.parametrize("family", FAMILIES)
def test_longmem_rows_generate_what_they_do_alone_and_cached_equals_recomputed(family: str) -> None:
    model = tiny_longmem(family, segment_size=SEGMENT)  # fusion gate open: the bank changes what is generated
    ids, mask, rows = padded_batch((2 * SEGMENT + 5, SEGMENT + 9))
    cached = generate_without_deprecations(model, ids, mask)
    recomputed = generate_without_deprecations(model, ids, mask, use_cache=False)
    assert cached.tolist() == recomputed.tolist()
    for row, tokens in enumerate(rows):
        alone = generate_without_deprecations(model, tokens[None], torch.ones_like(tokens[None]), use_cache=False)
        assert cached[row].tolist() == alone[0].tolist(), f"row {row}"


@pytest.mark.parametrize("family", FAMILIES)
def test_replaced_attention_layers_append_to_the_generation_cache(family: str) -> None:
    """Within a kNN memory step, every layer (each one replaced here) appends its keys to the cache the backbone
    was given, under whatever name the backbone passes it on."""
    backbone = tiny_backbone(family)
    model = mf.MemorizingTransformer(backbone, memory_layers=(0, 1), memory_size=64, top_k=8, segment_size=SEGMENT)
    ids, mask, _ = padded_batch((7, 4))
    cache = DynamicCache()
    with torch.no_grad(), model.memory(model.init_state(2)):
        backbones.run_backbone(backbone, backbone.get_input_embeddings()(ids), mask, cache=cache)
    assert [cache.get_seq_length(layer) for layer in range(len(backbone_layers.decoder_layers(backbone)))] == [7, 7]
