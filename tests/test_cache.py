"""Segment cache: each segment equals the bare backbone on [previous ; current], the cache is detached and reaches
exactly one segment back, rows never mix, streaming memory stays flat, save/load round-trips."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODERS, tiny_backbone

import memformers as mf
from memformers.profiling import PeakMemory

S = 16  # tokens per segment


def tiny_cache(family: str, segment_size: int = S, head: str = "token", **kwargs) -> mf.SegmentCacheTransformer:
    return mf.SegmentCacheTransformer(tiny_backbone(family, head), segment_size=segment_size, **kwargs)


def random_ids(batch: int, length: int, seed: int = 1, low: int = 5, high: int = 90) -> torch.Tensor:
    return torch.randint(low, high, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", DECODERS)
def test_one_segment_equals_backbone(family):
    model = tiny_cache(family)
    ids = random_ids(2, S)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model.backbone(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_each_segment_equals_backbone_on_previous_and_current(family):
    """The defining property: segment k's logits are the backbone's on [segment k−1 ; segment k], for every k."""
    model = tiny_cache(family)
    ids = random_ids(2, 3 * S)
    with torch.no_grad():
        ours = model(ids).logits
        for k in (1, 2):
            window = ids[:, (k - 1) * S : (k + 1) * S]
            theirs = model.backbone(window).logits[:, S:]
            torch.testing.assert_close(ours[:, k * S : (k + 1) * S], theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_partial_previous_segment(family):
    """Right alignment: a 5-token first segment, padded in the cache; the second reads it at positions 0..4."""
    model = tiny_cache(family, alignment="right")
    ids = random_ids(1, S + 5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model.backbone(ids).logits, rtol=0, atol=1e-5)


def test_cache_reaches_exactly_one_segment_back():
    model = tiny_cache("llama")
    ids = random_ids(1, 3 * S)
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] + 1) % 90
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert (before[0, S : 2 * S] - after[0, S : 2 * S]).abs().max() > 1e-4  # segment 2 reads segment 1
    torch.testing.assert_close(before[0, 2 * S :], after[0, 2 * S :], rtol=0, atol=0)  # segment 3 does not


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cache_is_detached(family):
    """A loss on segment 2 alone sends no gradient into segment 1's pass."""
    model = tiny_cache(family).train()
    ids = random_ids(1, 2 * S)
    labels = torch.full_like(ids, -100)
    labels[0, S + 1 :] = ids[0, S + 1 :]
    embedded = []  # the token embeddings of each pass that builds a graph: segment 1, then segment 2

    def keep(_module, _inputs, output):
        if output.requires_grad:
            output.retain_grad()
            embedded.append(output)

    handle = model.backbone.get_input_embeddings().register_forward_hook(keep)
    try:
        out = model(ids, labels=labels)
        out.loss.backward()
    finally:
        handle.remove()
    assert not any(t.requires_grad for t in out.state.keys + out.state.values)
    assert len(embedded) == 2
    assert embedded[0].grad is None or embedded[0].grad.abs().sum() == 0
    assert embedded[1].grad[0, :-1].abs().sum(dim=-1).min() > 0  # the last token predicts nothing here


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("alignment", ["left", "right"])
def test_rows_equal_running_alone(family, alignment):
    model = tiny_cache(family, alignment=alignment)
    long, short = random_ids(1, 3 * S - 5), random_ids(1, S + 7, seed=3)
    ids = torch.zeros(2, 3 * S - 5, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = long[0], 1
    ids[1, : short.shape[1]], mask[1, : short.shape[1]] = short[0], 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(batched[0:1], model(long).logits, rtol=0, atol=1e-5)
        alone = model(short).logits
        torch.testing.assert_close(batched[1:2, : short.shape[1]], alone, rtol=0, atol=1e-5)


def test_reset_and_select():
    model = tiny_cache("llama")
    ids = random_ids(2, S)
    with torch.no_grad():
        _, state = model.step(ids, model.init_state(2))
        fresh, _ = model.step(ids, model.init_state(2))
        reset = state.reset(torch.tensor([True, False]))
        out, _ = model.step(ids, reset)
        cached, _ = model.step(ids, state)
    torch.testing.assert_close(out.logits[0], fresh.logits[0], rtol=0, atol=1e-5)  # a new document: no cache
    torch.testing.assert_close(out.logits[1], cached.logits[1], rtol=0, atol=0)
    for mixed in (
        state.select(torch.tensor([False, True]), model.init_state(2)),
        model.init_state(2).select(torch.tensor([True, False]), state),
    ):
        assert mixed.mask[0].sum() == 0 and mixed.mask[1].sum() == S
        assert mixed.keys[0][0].abs().sum() == 0 and torch.equal(mixed.keys[0][1], state.keys[0][1])


def _streaming_peak(model, num_segments: int) -> int:
    chunks = list(random_ids(1, num_segments * model.content_size)[0].split(37))
    with torch.no_grad(), PeakMemory() as meter:
        count = sum(1 for _ in model.stream(mf.stream_segments(iter(chunks), model.content_size)))
    assert count == num_segments
    return meter.peak_bytes


def test_streaming_memory_is_flat():
    model = tiny_cache("gpt2")
    short, long = _streaming_peak(model, 4), _streaming_peak(model, 64)
    assert long <= 1.10 * short, (short, long)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_cache("llama", alignment="right")
    model.save_pretrained(tmp_path / "cache")
    loaded = mf.load(tmp_path / "cache")
    assert isinstance(loaded, mf.SegmentCacheTransformer) and mf.MECHANISMS["cache"].model is mf.SegmentCacheTransformer
    assert (loaded.segment_size, loaded.alignment) == (S, "right")
    ids = random_ids(1, 2 * S + 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_base_model_gives_hidden_states():
    model = tiny_cache("gpt2", head="none")
    ids = random_ids(1, 2 * S)
    with torch.no_grad():
        out = model(ids, logits="none")
        step, _ = model.step(ids[:, :S], model.init_state(1))
    assert out.logits is None and step.hidden.shape == (1, S, 32) and not model.token_level


def test_bad_input_raises():
    with pytest.raises(ValueError, match="decoder"):
        mf.SegmentCacheTransformer(tiny_backbone("bert"), segment_size=S)
    with pytest.raises(ValueError, match="segment_size=200"):
        tiny_cache("gpt2", segment_size=200)  # 400 positions > 256
    with pytest.raises(ValueError, match="segment_size"):
        tiny_cache("gpt2", segment_size=0)
    model = tiny_cache("gpt2")
    with pytest.raises(ValueError, match="at most 16"):
        model.step(random_ids(1, S + 1), model.init_state(1))


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = tiny_cache("llama").train()
    checkpointed = tiny_cache("llama", gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    ids = random_ids(2, 3 * S - 4)
    for model in (plain, checkpointed):
        model(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_continues_behind_the_previous_segment(family):
    """Greedy generation equals the bare backbone's on [previous segment ; last segment], row by row in a batch
    whose rows have 3, 2 and 1 segments (the last with no cache at all)."""
    model = tiny_cache(family).eval()
    lengths = (2 * S + 3, S + 5, 6)
    ids = torch.zeros(3, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = [random_ids(1, n, seed=n)[0] for n in lengths]
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
    new = model.generate(ids, mask, max_new_tokens=4, do_sample=False)
    pad = model.backbone.config.pad_token_id or 0
    for row, tokens in enumerate(rows):
        window = tokens[(len(tokens) - 1) // S * S - S :] if len(tokens) > S else tokens
        alone = model.backbone.generate(window[None], max_new_tokens=4, do_sample=False, pad_token_id=pad)
        assert new[row].tolist() == alone[0, len(window) :].tolist()
