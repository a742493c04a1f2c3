"""RMT behaviour that matters: equality with the backbone, memory that carries information, gradients that reach
exactly as far as `bptt_depth` allows, flat streaming memory, rows that never mix, clear errors."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import (
    DECODERS,
    ENCODERS,
    assert_batch_generates_as_rows_alone,
    random_ids,
    tiny_backbone,
    tiny_config,
)

import memformers as mf
from memformers.profiling import PeakMemory
from memformers.recurrence import detach_before

ALL = ENCODERS + DECODERS


def tiny_rmt(family: str, m: int = 4, segment_size: int = 32, head: str = "token", **kwargs):
    if family in ENCODERS:
        kwargs = {"cls_token_id": 3, "sep_token_id": 4, **kwargs}
    backbone = tiny_backbone(family, head)
    return mf.RecurrentMemoryTransformer(backbone, num_memory_tokens=m, segment_size=segment_size, **kwargs)


# --- equality with the backbone --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL)
def test_zero_memory_one_segment_equals_backbone(family):
    model = tiny_rmt(family, m=0, segment_size=40)
    ids = random_ids(2, model.content_size)
    with torch.no_grad():
        ours = model(ids).logits
        if model.info.is_decoder:
            theirs = model.backbone(ids).logits
        else:  # the encoder layout with no memory is the backbone's own [CLS] content [SEP]
            cls, sep = model.cls_token_id, model.sep_token_id
            framed = torch.cat([torch.full((2, 1), cls), ids, torch.full((2, 1), sep)], dim=1)
            theirs = model.backbone(framed).logits[:, 1:-1]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_zero_memory_equals_real_minilm():
    backbone, tokenizer = mf.backbones.load("minilm")
    model = mf.RecurrentMemoryTransformer(backbone.eval(), num_memory_tokens=0, segment_size=512)
    assert model.content_size == 510
    text = "Mary travelled to the office. " * 20
    framed = tokenizer(text, return_tensors="pt")  # [CLS] … [SEP]
    content = framed.input_ids[:, 1:-1]
    with torch.no_grad():
        expected = backbone(**framed).last_hidden_state[:, 1:-1]
        _, state = None, model.init_state(1)
        output, _ = model.step(content, state)
    torch.testing.assert_close(output.hidden, expected, rtol=0, atol=1e-5)


def test_zero_memory_equals_real_smollm2():
    backbone, tokenizer = mf.backbones.load("smollm2")
    model = mf.RecurrentMemoryTransformer(backbone.eval(), num_memory_tokens=0, segment_size=128)
    ids = tokenizer("Mary travelled to the office. John went to the garden.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = backbone(ids).logits
        ours = model(ids).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "name", ["./missing-model", "../missing/model", "/missing/model", "~/missing-model", "runs/missing/model"]
)
def test_a_backbone_named_as_a_missing_path_fails_at_once_without_trying_the_hub(monkeypatch, name):
    def hub(*args, **kwargs):
        raise AssertionError("a path was tried on the hub")

    for auto in (transformers.AutoConfig, transformers.AutoModel, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", hub)
    with pytest.raises(mf.backbones.BackboneNotFoundError, match=f"backbone '{name}': no such folder"):
        mf.backbones.load(name)
    with pytest.raises(mf.backbones.BackboneNotFoundError, match="no such folder"):
        mf.backbones.load_tokenizer(name)


@pytest.mark.parametrize("family", ENCODERS + DECODERS)
def test_set_dropout_reaches_every_dropout_of_a_backbone(family):
    """With every rate at 0.3 two training-mode passes differ; after set_dropout(0) they are equal, and the
    config says 0, so a saved copy reloads without dropout too."""
    config = tiny_config(family)
    rates = [key for key, value in config.to_dict().items() if ("dropout" in key or key.endswith("pdrop"))]
    for key in rates:
        if isinstance(getattr(config, key), float | int) and not isinstance(getattr(config, key), bool):
            setattr(config, key, 0.3)
    torch.manual_seed(0)
    auto = transformers.AutoModelForMaskedLM if family in ENCODERS else transformers.AutoModelForCausalLM
    model = auto.from_config(config).train()
    ids = random_ids(2, 12)
    assert not torch.equal(model(ids).logits, model(ids).logits)
    mf.backbones.set_dropout(model, 0.0)
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert all(getattr(model.config, key) in (0.0, None) for key in rates)


@pytest.mark.parametrize("family", ENCODERS + DECODERS)
def test_keep_layers_is_the_one_block_model_with_the_same_weights_and_reloads_so(family, tmp_path):
    """A 2-block backbone cut to its first block computes what a 1-block model of that family computes with the
    same weights (its state dict loads strictly), and its saved copy reloads with one block."""
    model = tiny_backbone(family)
    ids = random_ids(2, 12)
    mf.backbones.keep_layers(model, 1)
    config = tiny_config(family)
    for key in mf.backbones.LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, 1)
    auto = transformers.AutoModelForMaskedLM if family in ENCODERS else transformers.AutoModelForCausalLM
    one_block = auto.from_config(config).eval()
    one_block.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(model(ids).logits, one_block(ids).logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert len(list(reloaded.state_dict())) == len(list(model.state_dict()))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    for count in (0, 2, True):
        with pytest.raises(ValueError, match=r"count must be an int in \[1, 1\]"):
            mf.backbones.keep_layers(model, count)


@pytest.mark.parametrize("family", ENCODERS + DECODERS)
def test_set_attention_changes_the_kernel_not_the_outputs(family):
    model = tiny_backbone(family)
    ids = random_ids(2, 12)
    mf.backbones.set_attention(model, "sdpa")
    expected = model(ids).logits
    mf.backbones.set_attention(model, "eager")
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention must be one of \\('eager', 'sdpa'\\), got 'flash'"):
        mf.backbones.set_attention(model, "flash")


def test_real_backbones_read_through_memory():
    """Both real pretrained backbones run a multi-segment RMT with memory, with a finite loss."""
    for name, segment_size in (("minilm", 64), ("smollm2", 64)):
        backbone, tokenizer = mf.backbones.load(name, head="masked-lm" if name == "minilm" else None)
        model = mf.RecurrentMemoryTransformer(backbone.eval(), num_memory_tokens=4, segment_size=segment_size)
        ids = tokenizer("It is a truth universally acknowledged. " * 20, return_tensors="pt", add_special_tokens=False)
        ids = ids.input_ids[:, : model.content_size * 3]
        with torch.no_grad():
            out = model(ids, labels=ids)
        assert out.num_segments == 3 and torch.isfinite(out.loss)


# --- memory carries information; decoders stay causal -----------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_token_in_segment_one_changes_segment_three(family):
    model = tiny_rmt(family).eval()
    c = model.content_size
    ids = random_ids(1, 3 * c)
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 90
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert (before[0, 2 * c :] - after[0, 2 * c :]).abs().max() > 1e-4  # reached segment 3 through memory
    if model.info.is_decoder:  # nothing before the change moves
        torch.testing.assert_close(before[0, :5], after[0, :5], rtol=0, atol=0)


def test_without_memory_segments_are_independent():
    """The converse: with no memory tokens, segment 3 cannot know about segment 1."""
    model = tiny_rmt("gpt2", m=0).eval()
    c = model.content_size
    ids = random_ids(1, 3 * c)
    changed = ids.clone()
    changed[0, 5] += 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[0, 2 * c :], model(changed).logits[0, 2 * c :], rtol=0, atol=0)


# --- gradients ---------------------------------------------------------------------------------------------------


def _segment_input_grads(model, ids, labels):
    """Gradients of the loss w.r.t. each segment's input embeddings, in order."""
    captured = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = model.backbone.get_input_embeddings().register_forward_hook(keep)
    try:
        model(ids, labels=labels).loss.backward()
    finally:
        handle.remove()
    return [t.grad for t in captured]


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("depth", [None, 0, 1, 2, 3])
def test_gradient_reaches_exactly_bptt_depth(family, depth):
    k = 4  # loss only at segment 4: reaches segment 1 iff depth ≥ 3
    model = tiny_rmt(family, bptt_depth=depth)
    c = model.content_size
    ids = random_ids(1, k * c)
    labels = torch.full_like(ids, -100)
    labels[0, (k - 1) * c + 1 :] = ids[0, (k - 1) * c + 1 :]
    grads = _segment_input_grads(model, ids, labels)
    reach = [g is not None and bool(g.abs().sum() > 0) for g in grads]
    allowed = k - 1 if depth is None else min(depth, k - 1)
    assert reach == [i >= k - 1 - allowed for i in range(k)]
    assert all(g is None or g.abs().sum() == 0 for g, r in zip(grads, reach, strict=True) if not r)


def test_detach_schedule_counts_back_from_last_segment():
    assert [detach_before(i, 5, 1) for i in range(5)] == [False, True, False, True, False]
    assert [detach_before(i, None, 1) for i in range(5)] == [False, False, True, False, True]
    assert not any(detach_before(i, 5, None) for i in range(5))
    assert [detach_before(i, 3, 0) for i in range(3)] == [False, True, True]


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = tiny_rmt("llama")
    checkpointed = tiny_rmt("llama", gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    ids = random_ids(2, 3 * plain.content_size)
    for model in (plain, checkpointed):
        model.train()
        model(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert plain.memory.grad.abs().sum() > 0


def test_classification_loss_trains_memory_from_last_segment():
    model = tiny_rmt("bert", head="classification")
    ids = random_ids(3, 3 * model.content_size - 7)
    out = model(ids, labels=torch.tensor([0, 3, 5]))
    assert out.logits.shape == (3, 6)
    out.loss.backward()
    assert model.memory.grad.abs().sum() > 0


# --- streaming memory ----------------------------------------------------------------------------------------------


def _streaming_peak(model, num_segments: int) -> int:
    chunks = list(random_ids(1, num_segments * model.content_size)[0].split(97))
    with torch.no_grad(), PeakMemory() as meter:
        count = sum(1 for _ in model.stream(mf.stream_segments(iter(chunks), model.content_size)))
    assert count == num_segments
    return meter.peak_bytes


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_streaming_memory_is_flat(family):
    model = tiny_rmt(family).eval()
    short, long = _streaming_peak(model, 4), _streaming_peak(model, 256)
    assert long <= 1.10 * short, (short, long)


def test_peak_meter_sees_growth():
    """The meter is not blind: keeping every segment's logits does show up as growth."""
    model = tiny_rmt("gpt2").eval()
    ids = random_ids(1, 64 * model.content_size)
    peaks = []
    for length in (4, 64):
        with torch.no_grad(), PeakMemory() as meter:
            model(ids[:, : length * model.content_size], logits="all")
        peaks.append(meter.peak_bytes)
    assert peaks[1] > 5 * peaks[0]


# --- rows never mix -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("alignment", ["left", "right"])
def test_each_row_equals_running_it_alone(family, alignment):
    model = tiny_rmt(family, alignment=alignment).eval()
    c = model.content_size
    lengths = [3 * c + 5, c - 3, 2 * c]
    ids = random_ids(3, max(lengths))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    with torch.no_grad():
        together = model(ids, attention_mask=mask)
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, :n])
            torch.testing.assert_close(together.logits[row, :n], alone.logits[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(together.state.memory[row], alone.state.memory[0], rtol=1e-4, atol=1e-5)


def test_classification_rows_equal_running_alone():
    model = tiny_rmt("bert", head="classification").eval()
    c = model.content_size
    ids = random_ids(2, 3 * c)
    mask = torch.ones_like(ids)
    mask[1, c:] = 0
    with torch.no_grad():
        together = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(together[1], model(ids[1:, :c]).logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together[0], model(ids[:1]).logits[0], rtol=1e-4, atol=1e-5)


def test_reset_clears_only_marked_rows():
    model = tiny_rmt("gpt2").eval()
    ids = random_ids(2, 2 * model.content_size)
    with torch.no_grad():
        state = model(ids).state
    reset = state.reset(torch.tensor([True, False]))
    torch.testing.assert_close(reset.memory[0], model.memory)
    torch.testing.assert_close(reset.memory[1], state.memory[1])


# --- generation ---------------------------------------------------------------------------------------------------


def test_generate_reads_context_and_batches_like_single_rows():
    model = tiny_rmt("llama").eval()
    ids = assert_batch_generates_as_rows_alone(model)
    # the prompt segment alone does not decide the output: the memory read from earlier segments matters
    with torch.no_grad():
        logits_full = model(ids[:1]).logits[0, -1]
        changed = ids[:1].clone()
        changed[0, 3] += 1
        logits_changed = model(changed).logits[0, -1]
    assert (logits_full - logits_changed).abs().max() > 1e-4
    sampled = model.generate(ids[:1], max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape == (1, 4)


# --- save / load --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_save_and_load_round_trip_exact(family, tmp_path):
    model = tiny_rmt(family, bptt_depth=2).eval()
    with torch.no_grad():
        model.memory.add_(1.0)  # not the initial values
    model.save_pretrained(tmp_path / "rmt")
    loaded = mf.load(tmp_path / "rmt")
    assert loaded.config_dict() == model.config_dict()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = random_ids(1, 2 * model.content_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_rejects_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="path"):
        mf.load(tmp_path)


# --- bad input ----------------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    model = tiny_rmt("gpt2")
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.rand(1, 10))
    with pytest.raises(ValueError, match="attention_mask"):
        model(random_ids(1, 10), attention_mask=torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_size"):
        tiny_rmt("gpt2", m=16, segment_size=32)
    with pytest.raises(ValueError, match="segment_size"):
        tiny_rmt("bert", m=4, segment_size=7)
    with pytest.raises(ValueError, match="num_memory_tokens"):
        tiny_rmt("gpt2", m=-1)
    with pytest.raises(ValueError, match="labels"):  # class labels for a token head
        model(random_ids(2, 10), labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="labels"):  # token labels for a classification head
        classifier = tiny_rmt("bert", head="classification")
        classifier(random_ids(2, 10), labels=random_ids(2, 10))
    with pytest.raises(ValueError, match="cls_token_id"):
        mf.RecurrentMemoryTransformer(tiny_backbone("bert"), segment_size=32)
    with pytest.raises(ValueError, match="backbone"):  # wrong backbone kind for the head
        import transformers
        from conftest import tiny_config

        mf.RecurrentMemoryTransformer(transformers.GPT2ForSequenceClassification(tiny_config("gpt2")))
    with pytest.raises(ValueError, match="generate"):
        tiny_rmt("bert").generate(random_ids(1, 10))
