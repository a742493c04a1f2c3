"""The driver asks each mechanism only for the logits somebody reads: the loss, its gradients, the returned logits
and generation are those of the full computation, while the LM head sees only labelled positions (none while
reading context)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, open_knn_gates, tiny_backbone, tiny_longmem

import memformers as mf
from memformers.segments import split_into_segments

SEGMENT = 16
MECHANISMS = ("rmt", "cache", "knn", "longmem")
FAMILIES = ("llama", "gpt2")


def make(mechanism: str, family: str, **kwargs) -> mf.MemoryModel:
    """A tiny mechanism whose memory visibly matters (open kNN/LongMem gates), in train mode without dropout."""
    if mechanism == "rmt":
        return mf.RecurrentMemoryTransformer(
            tiny_backbone(family), num_memory_tokens=4, segment_size=SEGMENT + 8, **kwargs
        )
    if mechanism == "cache":
        return mf.SegmentCacheTransformer(tiny_backbone(family), segment_size=SEGMENT, **kwargs)
    if mechanism == "knn":
        model = mf.MemorizingTransformer(
            tiny_backbone(family), memory_layers=(-1,), memory_size=64, top_k=4, segment_size=SEGMENT
        )
        return open_knn_gates(model, gate_bias=2.0)
    return tiny_longmem(family, SEGMENT, gate_bias=2.0)


def batch_with_answers() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of 40 and 30 tokens (3 and 2 segments) whose only labels are each row's last two tokens."""
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 38:] = ids[0, 38:]
    labels[1, 28:30] = ids[1, 28:30]
    return ids, mask, labels


class HeadCount:
    """A forward hook on the LM head: how many positions it projected, call by call."""

    def __init__(self, model: mf.MemoryModel) -> None:
        self.calls: list[int] = []
        self.handle = model.backbone.get_output_embeddings().register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.calls.append(args[0].shape[1])  # [batch, positions, hidden]

    def __enter__(self) -> HeadCount:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def loss_and_grads(model: mf.MemoryModel, logits: str, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, mask, labels=labels, logits=logits)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_loss_gradients_and_logits_equal_the_full_computation(mechanism: str, family: str) -> None:
    model = make(mechanism, family)
    ids, mask, labels = batch_with_answers()
    reference, reference_grads = loss_and_grads(model, "all", ids, mask, labels)
    assert reference_grads
    n = model.content_size
    for mode in ("last", "labelled"):
        with HeadCount(model) as head:
            out, grads = loss_and_grads(model, mode, ids, mask, labels)
        torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)
        # Segment 0 holds no label and no row's end: the head skips it. Segment 1 ends row 1, segment 2 row 0.
        assert head.calls[0] == 0
        if mode == "last":  # the whole segment where some row ends (RMT: its memory positions too)
            extra = 8 if mechanism == "rmt" else 0
            assert head.calls[1:] == [n + extra, 8 + extra], head.calls
        else:  # only the two labelled columns (next-token targets of each row's two answer tokens)
            assert head.calls[1:] == [2, 2], head.calls
        # Each row's last-segment logits: exactly the reference's where labelled (all of them for "last").
        for row, end in ((0, 40), (1, 30)):
            start = (end - 1) // n * n
            expected = reference.logits[row, start:end]  # [kept, vocab]
            got = out.logits[row, : end - start]
            if mode == "last":
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            else:
                answer = labels[row, start:end] != -100
                answer = torch.roll(answer, -1)  # decoders: the logits one before each labelled token
                torch.testing.assert_close(got[answer], expected[answer], rtol=1e-5, atol=1e-5)
                assert not got[~answer].any(), "labelled logits are zeros where nothing is labelled"


@pytest.mark.parametrize("family", FAMILIES)
def test_rmt_head_sees_only_the_answer_positions(family: str) -> None:
    """RMT's backbone runs on memory and content: the head projects the two labelled positions, nothing else."""
    model = make("rmt", family)
    ids, mask, labels = batch_with_answers()
    with HeadCount(model) as head:
        model(ids, mask, labels=labels, logits="labelled")
    assert head.calls == [0, 2, 2]
    with HeadCount(model) as head:
        model(ids, mask, labels=labels, logits="all")
    assert head.calls == [SEGMENT + 8, SEGMENT + 8, 16]  # every position, memory included


def test_rmt_with_gradient_checkpointing_skips_too() -> None:
    ids, mask, labels = batch_with_answers()
    reference_model = make("rmt", "llama")
    reference, reference_grads = loss_and_grads(reference_model, "all", ids, mask, labels)
    model = make("rmt", "llama", gradient_checkpointing=True)
    with HeadCount(model) as head:
        out, grads = loss_and_grads(model, "labelled", ids, mask, labels)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert max(head.calls) <= 2  # the recomputation during backward asks for the same positions


def test_encoder_rmt_without_native_logits_to_keep_slices_after_the_head() -> None:
    """BERT's masked-LM forward takes no `logits_to_keep`: the logits are sliced, the loss is the same."""
    model = mf.RecurrentMemoryTransformer(
        tiny_backbone("bert"), num_memory_tokens=4, segment_size=SEGMENT + 7, cls_token_id=1, sep_token_id=2
    )
    ids, mask, labels = batch_with_answers()
    reference, reference_grads = loss_and_grads(model, "all", ids, mask, labels)
    out, grads = loss_and_grads(model, "labelled", ids, mask, labels)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_switch_off_runs_the_head_everywhere_with_the_same_loss(mechanism: str) -> None:
    model = make(mechanism, "llama")
    ids, mask, labels = batch_with_answers()
    with torch.no_grad(), HeadCount(model) as head:
        skipped = model(ids, mask, labels=labels, logits="labelled")
    model.skip_unused_logits = False
    with torch.no_grad(), HeadCount(model) as full_head:
        full = model(ids, mask, labels=labels, logits="labelled")
    torch.testing.assert_close(skipped.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert sum(head.calls) == 4
    assert min(full_head.calls) > 0 and sum(full_head.calls) > 4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_reading_context_runs_no_head_and_generation_is_unchanged(mechanism: str, family: str) -> None:
    model = make(mechanism, family).eval()
    ids, mask, _ = batch_with_answers()
    with torch.no_grad(), HeadCount(model) as head:
        state, prompts = model.read_context(ids, mask)
    assert sum(head.calls) == 0
    segments = split_into_segments(ids, model.content_size, mask, None, model.alignment)
    skipped = model.generate_streamed(iter(segments), batch_size=2, max_new_tokens=5)
    model.skip_unused_logits = False
    with torch.no_grad(), HeadCount(model) as full_head:
        model.read_context(ids, mask)
    assert sum(full_head.calls) > 0  # the switch really turns the skipping off
    full = model.generate_streamed(iter(segments), batch_size=2, max_new_tokens=5)
    assert torch.equal(skipped, full)
    assert torch.equal(skipped, model.generate(ids, mask, max_new_tokens=5))


def test_stream_without_logits_keeps_states_and_hidden() -> None:
    model = make("rmt", "llama").eval()
    ids, mask, _ = batch_with_answers()
    segments = split_into_segments(ids, model.content_size, mask, None, "left")
    with torch.no_grad():
        full = list(model.stream(iter(segments), batch_size=2))
        bare = list(model.stream(iter(segments), batch_size=2, logits="none"))
    for (_, out_full, state_full), (_, out_bare, state_bare) in zip(full, bare, strict=True):
        assert out_bare.logits.shape == (2, 0, VOCAB)
        assert torch.equal(out_bare.hidden, out_full.hidden)
        assert torch.equal(state_bare.memory, state_full.memory)
    with pytest.raises(ValueError, match="logits"):
        next(model.stream(iter(segments), logits="last"))


def test_labelled_logits_need_token_labels() -> None:
    model = make("rmt", "llama")
    ids, mask, _ = batch_with_answers()
    with pytest.raises(ValueError, match="labelled"):
        model(ids, mask, logits="labelled")
    with pytest.raises(ValueError, match="logits must be one of"):
        model(ids, mask, logits="some")


def test_all_logits_and_lm_labels_still_cover_every_position() -> None:
    """Labels everywhere (language modelling): every position is projected, as before."""
    model = make("cache", "gpt2")
    ids, mask, _ = batch_with_answers()
    with torch.no_grad(), HeadCount(model) as head:
        out = model(ids, mask, labels=ids, logits="last")
    assert head.calls == [SEGMENT, SEGMENT, 8]
    assert out.logits.shape == (2, SEGMENT, VOCAB)
