"""The accuracy grid is honest: samples stream whole and in order, answers must come through the state, finished
cells are kept, and the CLI writes what it promises."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import transformers
from conftest import VOCAB, tiny_backbone, tiny_config
from typer.testing import CliRunner

import memformers as mf
from memformers.babilong_metric import BABILONG_SCORER, WHOLE_WORD_SCORER, babilong_labels
from memformers.cli import app
from memformers.evaluation import (
    ReadingCheckpoint,
    babilong_correct,
    evaluate_cell,
    evaluate_grid,
    format_length,
    generate_answers,
    markdown_table,
    predict_classes,
    sample_segments,
    score_samples,
    wilson_interval,
)
from memformers.mechanism import MemoryModel
from memformers.plots import accuracy_heatmap
from memformers.recurrence import StepOutput
from memformers.segments import count_segments, right_aligned_sizes, stack_segments, stream_segments
from memformers.tasks import make_sample, task_spec


@pytest.fixture(scope="module")
def tokenizer():
    return mf.backbones.load_tokenizer("minilm")


@dataclass
class LastFactState:
    answer: torch.Tensor  # [batch] class index of the latest "<actor> … <place>" fact, -1 before any

    def detach(self):
        return self

    def reset(self, rows):
        return LastFactState(torch.where(rows, -1, self.answer))

    def select(self, rows, other):
        return LastFactState(torch.where(rows, self.answer, other.answer))


class LastFactOracle(MemoryModel):
    """Answers with the place of the latest "<actor> <verb> to the <place>" it has read; `forget` drops the state
    at every segment, so it can only answer from the segment holding the question."""

    token_level = False
    causal = False
    alignment = "right"

    def __init__(self, tokenizer, content_size: int = 100, forget: bool = False) -> None:
        super().__init__()
        self.content_size = content_size
        self.forget = forget
        self.places = [tokenizer.convert_tokens_to_ids(p) for p in task_spec("memorize").answers]
        self.actors = set(tokenizer.convert_tokens_to_ids(["mary", "john", "daniel", "sandra"]))

    def init_state(self, batch_size):
        return LastFactState(torch.full((batch_size,), -1))

    def step(self, segment, state, logit_positions=None):  # logits everywhere: it cannot skip
        answer = state.answer.clone() if not self.forget else torch.full_like(state.answer, -1)
        for row, ids in enumerate(segment.input_ids.tolist()):
            for i, token in enumerate(ids):
                if token in self.actors:
                    window = ids[i + 1 : i + 6]
                    hits = [self.places.index(t) for t in window if t in self.places]
                    if hits and "?" not in window:
                        answer[row] = hits[0]
        logits = torch.nn.functional.one_hot(answer.clamp(min=0), len(self.places)).float()
        return StepOutput(logits=logits), LastFactState(answer)


def test_wilson_interval():
    assert wilson_interval(0, 100)[0] == 0 and wilson_interval(0, 100)[1] > 0.02
    low, high = wilson_interval(100, 100)
    assert high == 1 and 0.95 < low < 1
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and abs((0.5 - low) - (high - 0.5)) < 1e-9
    with pytest.raises(ValueError, match="total"):
        wilson_interval(0, 0)


def test_samples_stream_whole_and_right_aligned(tokenizer):
    samples = [make_sample("detect", 1000, tokenizer, index=i, split="test") for i in range(3)]
    segments = list(sample_segments(samples, 128, "right"))
    # the remainder second: the first segment full (an ARMT's normalizer takes its scale from it), the last too
    assert [s.input_ids.shape for s in segments] == [(3, 128), (3, 1000 % 128)] + [(3, 128)] * (1000 // 128 - 1)
    assert segments[-1].is_last.all() and not segments[0].is_last.any()
    for row, sample in enumerate(samples):
        np.testing.assert_array_equal(torch.cat([s.input_ids[row] for s in segments]).numpy(), sample.ids)


def test_accuracy_needs_the_state(tokenizer):
    """The oracle answers every memorize sample when it keeps its state, and is at chance when it forgets."""
    remembers = evaluate_cell(LastFactOracle(tokenizer), "memorize", 2000, 24, tokenizer, batch_size=8)
    forgets = evaluate_cell(LastFactOracle(tokenizer, forget=True), "memorize", 2000, 24, tokenizer, batch_size=8)
    truncated = evaluate_cell(LastFactOracle(tokenizer), "memorize", 2000, 24, tokenizer, batch_size=8, window=300)
    assert remembers.accuracy == 1.0 and remembers.correct == 24
    assert forgets.accuracy < 0.5 and truncated.accuracy < 0.5


def test_window_streams_only_the_tail(tokenizer):
    samples = [make_sample("memorize", 1000, tokenizer, index=i, split="test") for i in range(2)]
    segments = list(sample_segments(samples, 128, "right", window=300))
    assert sum(s.input_ids.shape[1] for s in segments) == 300 and segments[-1].input_ids.shape[1] == 128
    for row, sample in enumerate(samples):
        np.testing.assert_array_equal(torch.cat([s.input_ids[row] for s in segments]).numpy(), sample.ids[-300:])


def test_grid_resumes_from_saved_cells(tokenizer, tmp_path):
    path = tmp_path / "grid.json"
    first = evaluate_grid(LastFactOracle(tokenizer), ["memorize"], [300, 600], 4, tokenizer, path, batch_size=4)
    assert [c.length for c in first] == [300, 600]
    saved = json.loads(path.read_text())["results"]
    assert {r["length"] for r in saved} == {300, 600} and all(r["accuracy"] == 1.0 for r in saved)

    class Refuses(LastFactOracle):
        def step(self, segment, state, logit_positions=None):
            raise AssertionError("a finished cell was evaluated again")

    again = evaluate_grid(Refuses(tokenizer), ["memorize"], [300, 600], 4, tokenizer, path, batch_size=4)
    assert [c.accuracy for c in again] == [1.0, 1.0]
    table = markdown_table(again)
    assert "| memorize | 100 | 100 |" in table
    png = accuracy_heatmap(again, tmp_path / "grid.png")
    assert png.stat().st_size > 1000


def test_facts_first_puts_the_facts_out_of_the_window(tokenizer, tmp_path):
    """The same stories with every fact first: a reader of the last 500 of 600 tokens, which mostly holds the fact
    where it is scattered, holds none; a memory still answers. The grid measures such cells apart."""
    oracle = LastFactOracle(tokenizer)
    options = {"batch_size": 8, "window": 500}
    scattered = evaluate_cell(oracle, "detect", 600, 24, tokenizer, **options)
    first = evaluate_cell(oracle, "detect", 600, 24, tokenizer, facts_first=True, **options)
    remembers = evaluate_cell(oracle, "detect", 600, 24, tokenizer, batch_size=8, facts_first=True)
    assert scattered.accuracy > 0.6 and first.accuracy < 0.3 and remembers.accuracy == 1.0
    assert first.facts_first and not scattered.facts_first

    path, measured = tmp_path / "grid.json", []
    evaluate_grid(oracle, ["detect"], [600], 4, tokenizer, path, batch_size=4)
    evaluate_grid(oracle, ["detect"], [600], 4, tokenizer, path, on_cell=measured.append, facts_first=True)
    assert [c.facts_first for c in measured] == [True]
    assert [r["facts_first"] for r in json.loads(path.read_text())["results"]] == [True]
    evaluate_grid(oracle, ["detect"], [600], 4, tokenizer, path, on_cell=measured.append, facts_apart=True)
    assert [(c.facts_first, c.facts_apart) for c in measured] == [(True, False), (False, True)]  # measured again
    assert [r["facts_apart"] for r in json.loads(path.read_text())["results"]] == [True]


def test_format_length():
    assert [format_length(n) for n in (512, 4096, 65536, 2043904, 1 << 20)] == ["512", "4K", "64K", "1.9M", "1M"]


def test_model_without_classification_or_causal_head_is_refused(tokenizer):
    """A masked-LM encoder neither classifies nor generates: no way to score it."""
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = mf.RecurrentMemoryTransformer(
        transformers.BertForMaskedLM(config), num_memory_tokens=2, segment_size=64, cls_token_id=101, sep_token_id=102
    )
    with pytest.raises(ValueError, match="model"):
        evaluate_cell(model, "memorize", 300, 2, tokenizer)


def save_tiny_classifier(path, tokenizer) -> None:
    """A 1-layer, 32-wide BERT classifier RMT on MiniLM's vocabulary, saved like a trained model."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=6,
    )
    model = mf.RecurrentMemoryTransformer(
        transformers.BertForSequenceClassification(config),
        num_memory_tokens=2,
        segment_size=64,
        alignment="right",
        cls_token_id=101,
        sep_token_id=102,
    )
    model.save_pretrained(path, tokenizer)


def test_cli_data_and_eval(tokenizer, tmp_path):
    runner = CliRunner()
    out = tmp_path / "qa1.jsonl"
    result = runner.invoke(app, ["data", "--task", "qa1", "--lengths", "512,1024", "--samples", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and {r["length"] for r in rows} == {512, 1024}
    assert all({"task", "length", "input", "question", "target", "fact_positions"} <= set(r) for r in rows)

    bad = runner.invoke(app, ["data", "--task", "qa9", "--lengths", "512", "--out", str(out)])
    assert bad.exit_code != 0 and "qa9" in bad.output
    apart_file = tmp_path / "apart.jsonl"
    result = runner.invoke(app, ["data", "--task", "qa1", "--lengths", "512", "--samples", "2", "--facts-apart",
                                 "--out", str(apart_file)])  # fmt: skip
    assert result.exit_code == 0 and all(json.loads(line)["facts_apart"] for line in apart_file.open())
    both = runner.invoke(app, ["data", "--task", "qa1", "--lengths", "512", "--facts-first", "--facts-apart",
                               "--out", str(apart_file)])  # fmt: skip
    assert both.exit_code == 2 and "choose one" in both.output

    save_tiny_classifier(tmp_path / "tiny", tokenizer)
    grid = tmp_path / "grid.json"
    result = runner.invoke(
        app,
        [
            "eval",
            str(tmp_path / "tiny"),
            "--task",
            "memorize,detect",
            "--lengths",
            "256,1024",
            "--samples",
            "4",
            "--json",
            str(grid),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(grid.read_text())
    assert len(saved["results"]) == 4 and saved["command"].startswith("memformers eval")
    assert {"task", "length", "samples", "accuracy"} <= set(saved["results"][0])
    assert grid.with_suffix(".png").exists() and grid.with_suffix(".md").exists()

    first = runner.invoke(app, ["eval", str(tmp_path / "tiny"), "--task", "detect", "--lengths", "256",
                                "--samples", "2", "--facts-first", "--json", str(tmp_path / "first.json")])  # fmt: skip
    assert first.exit_code == 0, first.output
    saved = json.loads((tmp_path / "first.json").read_text())
    assert saved["results"][0]["facts_first"] and "--facts-first" in saved["command"]
    both = runner.invoke(app, ["eval", str(tmp_path / "tiny"), "--data", str(out), "--facts-first"])
    assert both.exit_code == 2 and "--facts-first" in both.output
    apart = runner.invoke(app, ["eval", str(tmp_path / "tiny"), "--task", "detect", "--lengths", "256",
                                "--samples", "2", "--facts-apart", "--json", str(tmp_path / "apart.json")])  # fmt: skip
    assert apart.exit_code == 0, apart.output
    saved = json.loads((tmp_path / "apart.json").read_text())
    assert saved["results"][0]["facts_apart"] and "--facts-apart" in saved["command"]
    two_ways = runner.invoke(app, ["eval", str(tmp_path / "tiny"), "--task", "detect", "--facts-first",
                                   "--facts-apart"])  # fmt: skip
    assert two_ways.exit_code == 2 and "choose one" in two_ways.output


def test_cli_demo_answers_questions_with_a_saved_model(tokenizer, tmp_path):
    save_tiny_classifier(tmp_path / "tiny", tokenizer)
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--checkpoint",
            str(tmp_path / "tiny"),
            "--length",
            "3000",
            "--samples",
            "2",
            "--table-lengths",
            "256,512",
            "--table-samples",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("question: ") == 2 and "model: " in result.output and "accuracy" in result.output
    missing = CliRunner().invoke(app, ["demo", "--checkpoint", str(tmp_path / "nothing")])
    assert missing.exit_code != 0 and "checkpoint" in missing.output


# ----------------------------------------------------------------------------------------------------------------
# Decoders: scored by generating the answer


def tiny_decoder(alignment: str = "right") -> mf.RecurrentMemoryTransformer:
    """A 2-layer, 32-wide Llama RMT on MiniLM's vocabulary ([SEP] ends the text), random but not near-uniform."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )
    backbone = transformers.LlamaForCausalLM(config).eval()
    return mf.RecurrentMemoryTransformer(backbone, num_memory_tokens=2, segment_size=48, alignment=alignment).eval()


def test_streamed_generation_equals_generate_on_the_whole_input(tokenizer):
    """Streaming the haystack segment by segment generates exactly what `generate` does on the materialised input,
    and what the memory read from the haystack changes the answers (it is not just the last segment talking)."""
    model = tiny_decoder()
    samples = [make_sample("qa2", 700, tokenizer, index=i, split="test") for i in range(4)]
    ids = torch.from_numpy(np.stack([s.ids for s in samples]))  # [4, 700]
    whole = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None)  # [4, 5]
    streamed = model.generate_streamed(
        sample_segments(samples, model.content_size, model.alignment), 4, max_new_tokens=5, do_sample=False
    )
    assert torch.equal(streamed, whole)
    answers = generate_answers(model, samples, tokenizer, max_new_tokens=5)
    expected = [tokenizer.decode(row[: row.index(102)] if 102 in row else row) for row in whole.tolist()]
    assert answers == [e.strip() for e in expected]
    last_segment_only = generate_answers(model, samples, tokenizer, max_new_tokens=5, window=model.content_size)
    assert last_segment_only != answers


def _mechanism(name: str):
    if name == "rmt":
        return mf.RecurrentMemoryTransformer(
            tiny_backbone("llama"), num_memory_tokens=2, segment_size=20, alignment="right"
        )
    if name == "knn":
        return mf.MemorizingTransformer(
            tiny_backbone("llama"), memory_layers=(-1,), memory_size=64, top_k=8, segment_size=16, alignment="right"
        )
    if name == "cache":
        return mf.SegmentCacheTransformer(tiny_backbone("llama"), segment_size=16, alignment="right")
    config = tiny_config("llama")
    config.num_hidden_layers = 4
    model = mf.LongMem(
        transformers.LlamaForCausalLM(config).eval(),
        memory_size=64,
        chunk_size=4,
        top_k_chunks=3,
        segment_size=16,
        alignment="right",
    )
    with torch.no_grad():
        model.fusion.gate_bias.fill_(50.0)  # the fusion layer reads memory: what was read matters
    return model


@pytest.mark.parametrize("name", ["rmt", "knn", "longmem", "cache"])
def test_every_mechanism_generates_the_same_streamed(name: str):
    """`generate_streamed` (segments from a stream, right-aligned) equals `generate` on the whole input."""
    model = _mechanism(name).eval()
    ids = torch.randint(3, VOCAB, (3, 3 * model.content_size + 5))  # [3, length]: a partial second segment
    whole = model.generate(ids, max_new_tokens=4, do_sample=False)
    first = right_aligned_sizes(ids.shape[1], model.content_size)
    streams = [stream_segments(iter(row.split(7)), model.content_size, first) for row in ids]
    segments = (stack_segments(list(rows)) for rows in zip(*streams, strict=True))
    assert torch.equal(model.generate_streamed(segments, 3, max_new_tokens=4, do_sample=False), whole)


class Answers(MemoryModel):
    """A decoder stand-in: reads the haystack with the driver, then answers qa1 with a fixed text, or (`oracle`) with
    the place the question's actor last went to according to what it read, prompt included."""

    token_level = True
    causal = True
    generates = True
    alignment = "right"

    def __init__(self, tokenizer, fixed: str | None = None) -> None:
        super().__init__()
        self.content_size, self.tokenizer, self.fixed = 100, tokenizer, fixed
        self.places = set(tokenizer.convert_tokens_to_ids(list(task_spec("qa1").answers)))
        self.actors = set(tokenizer.convert_tokens_to_ids(["mary", "john", "daniel", "sandra"]))

    def init_state(self, batch_size):
        return LastPlaces([{} for _ in range(batch_size)])

    def _read(self, places: dict, ids: list[int]) -> None:
        for i, token in enumerate(ids):
            hits = [t for t in ids[i + 1 : i + 6] if t in self.places]
            if token in self.actors and hits and "?" not in self.tokenizer.convert_ids_to_tokens(ids[i + 1 : i + 6]):
                places[token] = hits[0]

    def step(self, segment, state, logit_positions=None):  # logits everywhere: it cannot skip
        assert not torch.is_grad_enabled(), "reading for generation must not build a graph over the haystack"
        rows = [dict(places) for places in state.rows]
        for row, ids in enumerate(segment.input_ids.tolist()):
            if bool(segment.attention_mask[row].any()):
                self._read(rows[row], ids)
        return StepOutput(), LastPlaces(rows)

    def generate_from(self, state, prompts, max_new_tokens=8, **kwargs):
        out = []
        for places, prompt in zip(state.rows, prompts, strict=True):
            text = self.fixed
            if text is None:
                places, ids = dict(places), prompt.tolist()
                self._read(places, ids[:-4])
                text = self.tokenizer.convert_ids_to_tokens(places.get(ids[-2], 0))  # "… where is mary ?"
            new = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [102] * max_new_tokens
            out.append(new[:max_new_tokens])
        return torch.tensor(out)


@dataclass
class LastPlaces:
    rows: list[dict]  # per row: actor id → id of the place it last went to

    def detach(self):
        return self

    def reset(self, rows):
        return LastPlaces([{} if r else p for p, r in zip(self.rows, rows.tolist(), strict=True)])

    def select(self, rows, other):
        return LastPlaces([p if r else o for p, o, r in zip(self.rows, other.rows, rows.tolist(), strict=True)])


def test_generated_answers_are_scored_right_and_wrong(tokenizer):
    """The same samples score 100% for an oracle that reads the facts, 0% for a fixed answer that is never right
    ("the football": not a place) or that lists every place, and every cell keeps a few example outputs."""
    run = lambda model: evaluate_cell(model, "qa1", 600, 12, tokenizer, batch_size=5, max_new_tokens=6)  # noqa: E731
    oracle = run(Answers(tokenizer))
    assert oracle.correct == 12 and oracle.accuracy == 1.0
    assert len(oracle.examples) == 3 and all(e["correct"] and e["output"] == e["target"] for e in oracle.examples)
    assert run(Answers(tokenizer, "the football.")).correct == 0
    assert run(Answers(tokenizer, " ".join(task_spec("qa1").answers))).correct == 0
    assert not babilong_correct("the football.", "garden", "where is mary?", list(task_spec("qa1").answers))
    assert oracle.scorer == BABILONG_SCORER  # the cell names the rule that judged its answers


def test_a_decoder_cell_judged_by_an_older_rule_is_measured_again(tokenizer, tmp_path):
    """Finished cells are skipped only where their answers were judged by today's rule, so a grid never mixes
    rules; a classifier's cells have no rule and are kept."""
    path = tmp_path / "grid.json"
    evaluate_grid(Answers(tokenizer), ["qa1"], [300, 600], 4, tokenizer, path, batch_size=4)
    saved = json.loads(path.read_text())
    assert saved["scorer"] == BABILONG_SCORER and {r["scorer"] for r in saved["results"]} == {BABILONG_SCORER}
    saved["results"][0]["scorer"] = WHOLE_WORD_SCORER  # as the rescoring script marks an older cell
    path.write_text(json.dumps(saved))
    measured = []
    evaluate_grid(Answers(tokenizer), ["qa1"], [300, 600], 4, tokenizer, path, on_cell=measured.append, batch_size=4)
    assert [c.length for c in measured] == [300]
    assert json.loads(path.read_text())["scorer"] == BABILONG_SCORER
    classes = evaluate_grid(LastFactOracle(tokenizer), ["memorize"], [300], 4, tokenizer, tmp_path / "c.json")
    assert classes[0].scorer == "" and "scorer" not in json.loads((tmp_path / "c.json").read_text())


def save_tiny_decoder(path, tokenizer) -> None:
    tiny_decoder().save_pretrained(path, tokenizer)


def test_cli_eval_generates_with_a_saved_decoder(tokenizer, tmp_path):
    save_tiny_decoder(tmp_path / "decoder", tokenizer)
    grid = tmp_path / "decoder.json"
    args = ["eval", str(tmp_path / "decoder"), "--task", "qa1,qa2", "--lengths", "200,600", "--samples", "3"]
    result = CliRunner().invoke(app, args + ["--batch-size", "2", "--max-new-tokens", "4", "--json", str(grid)])
    assert result.exit_code == 0, result.output
    saved = json.loads(grid.read_text())
    assert saved["scoring"] == "generation" and "--max-new-tokens 4" in saved["command"]
    assert saved["scorer"] == BABILONG_SCORER
    assert [(r["task"], r["length"], r["samples"]) for r in saved["results"]] == [
        ("qa1", 200, 3),
        ("qa1", 600, 3),
        ("qa2", 200, 3),
        ("qa2", 600, 3),
    ]
    for row in saved["results"]:
        assert 0 <= row["accuracy"] <= 1 and len(row["examples"]) == 3
        assert [e["index"] for e in row["examples"]] == [0, 1, 2]
        assert all(isinstance(e["output"], str) and e["target"] in task_spec("qa1").answers for e in row["examples"])
    assert grid.with_suffix(".png").exists() and grid.with_suffix(".md").exists()
    bad = CliRunner().invoke(app, args + ["--max-new-tokens", "0"])
    assert bad.exit_code != 0 and "max_new_tokens" in bad.output


def test_grid_takes_one_sample_count_per_length_and_keeps_each_cells_command(tokenizer, tmp_path):
    """Long cells cost more, so they get fewer samples; a second command fills more of the same grid."""
    path = tmp_path / "grid.json"
    oracle = LastFactOracle(tokenizer)
    evaluate_grid(oracle, ["memorize"], [300, 600], [4, 2], tokenizer, path, {"command": "first"}, batch_size=4)
    cells = evaluate_grid(oracle, ["detect"], [300], 3, tokenizer, path, {"command": "second"}, batch_size=4)
    assert {(c.task, c.length, c.samples, c.command) for c in cells} == {
        ("memorize", 300, 4, "first"),
        ("memorize", 600, 2, "first"),
        ("detect", 300, 3, "second"),
    }
    with pytest.raises(ValueError, match="samples"):
        evaluate_grid(oracle, ["memorize"], [300, 600], [4], tokenizer, path, batch_size=4)


def test_length_zero_cells_batch_stories_of_different_lengths(tokenizer):
    """At length 0 a sample is its story alone, so lengths differ: they are read in batches of equal length."""
    lengths = {make_sample("memorize", 0, tokenizer, index=i, split="test").num_tokens for i in range(12)}
    assert len(lengths) > 1
    cell = evaluate_cell(LastFactOracle(tokenizer), "memorize", 0, 12, tokenizer, batch_size=4)
    assert cell.correct == 12
    forgetful = evaluate_cell(LastFactOracle(tokenizer, content_size=4, forget=True), "memorize", 0, 12, tokenizer)
    assert forgetful.correct < 12  # the oracle really reads the stories: without its memory it fails


class _Stopped(Exception):
    pass


class CountingOracle(LastFactOracle):
    """LastFactOracle that counts the rows it starts reading, and stops (raises) when a batch numbered `stop_at`
    begins: a run killed part way through a cell."""

    def __init__(self, tokenizer, stop_at: int | None = None, **kwargs) -> None:
        super().__init__(tokenizer, **kwargs)
        self.stop_at, self.batches, self.rows = stop_at, 0, 0

    def init_state(self, batch_size):
        self.batches += 1
        if self.batches == self.stop_at:
            raise _Stopped
        self.rows += batch_size
        return super().init_state(batch_size)


def test_a_stopped_cell_resumes_from_its_last_finished_batch(tokenizer, tmp_path):
    """A cell stopped part way keeps its finished batches ("partial" in the JSON); run again, it reads only the
    samples still to answer and ends as the same cell read in one go, and its partial record is gone. A run that
    reads otherwise (here: facts first) does not take another's partial cell up."""
    grid = {"tasks": ["detect"], "lengths": [600], "samples": 6, "tokenizer": tokenizer, "batch_size": 2}
    grid["window"] = 500  # the last 500 tokens alone: some right, some wrong
    whole = evaluate_grid(CountingOracle(tokenizer), **grid)[0]
    assert 0 < whole.correct < 6
    path = tmp_path / "grid.json"
    with pytest.raises(_Stopped):
        evaluate_grid(CountingOracle(tokenizer, stop_at=3), **grid, json_path=path)
    saved = json.loads(path.read_text())
    assert saved["results"] == [] and len(saved["partial"]) == 1
    assert [index for index, _ in saved["partial"][0]["right"]] == [0, 1, 2, 3]
    assert saved["partial"][0]["tokens"] == 4 * 500
    reading_otherwise = CountingOracle(tokenizer)
    evaluate_grid(reading_otherwise, **grid, json_path=tmp_path / "other.json", facts_first=True)
    assert reading_otherwise.rows == 6
    (tmp_path / "other.json").write_text(path.read_text())
    evaluate_grid(reading_otherwise, **grid, json_path=tmp_path / "other.json", facts_first=True)
    assert reading_otherwise.rows == 12  # the partial cell was read with facts scattered: all six again
    resuming = CountingOracle(tokenizer)
    resumed = evaluate_grid(resuming, **grid, json_path=path)[0]
    assert resuming.rows == 2  # samples 4 and 5 alone
    assert (resumed.correct, resumed.samples, resumed.accuracy) == (whole.correct, 6, whole.accuracy)
    assert resumed.tokens_per_s > 0
    saved = json.loads(path.read_text())
    assert "partial" not in saved and [r["correct"] for r in saved["results"]] == [whole.correct]


def test_a_cell_names_the_samples_it_got_wrong(tokenizer, tmp_path):
    """`wrong` lists exactly the samples answered wrong (each read alone agrees), so that two readings of one cell
    can be compared story by story, and `wrong_answers` what was said to each; a cell resumed from its finished
    batches names the same ones."""
    grid = {"tasks": ["detect"], "lengths": [600], "samples": 6, "tokenizer": tokenizer, "batch_size": 2}
    cell = evaluate_grid(CountingOracle(tokenizer), **grid, window=500)[0]
    assert 0 < len(cell.wrong) < 6 and len(cell.wrong) == cell.samples - cell.correct
    made = [make_sample("detect", 600, tokenizer, 0, index, "test") for index in range(6)]
    labels = list(babilong_labels("detect"))
    alone = [score_samples(CountingOracle(tokenizer), [s], labels, tokenizer, window=500).correct for s in made]
    assert cell.wrong == [index for index, right in enumerate(alone) if not right]
    assert len(cell.wrong_answers) == len(cell.wrong) and set(cell.wrong_answers) <= set(labels)
    assert all(said != made[index].target for index, said in zip(cell.wrong, cell.wrong_answers, strict=True))
    path = tmp_path / "grid.json"
    with pytest.raises(_Stopped):
        evaluate_grid(CountingOracle(tokenizer, stop_at=3), **grid, window=500, json_path=path)
    resumed = evaluate_grid(CountingOracle(tokenizer), **grid, window=500, json_path=path)[0]
    assert resumed.wrong == cell.wrong and json.loads(path.read_text())["results"][0]["wrong"] == cell.wrong
    assert resumed.wrong_answers == cell.wrong_answers  # the answers before the stop came back from the partial cell


class StoppingOracle(LastFactOracle):
    """LastFactOracle that counts the segments it reads and stops (raises) when it would read segment `stop_at`
    of the run: a reader killed in the middle of a batch."""

    def __init__(self, tokenizer, stop_at: int | None = None) -> None:
        super().__init__(tokenizer)
        self.stop_at, self.steps = stop_at, 0

    def step(self, segment, state, logit_positions=None):
        self.steps += 1
        if self.steps == self.stop_at:
            raise _Stopped
        return super().step(segment, state, logit_positions)


def test_a_batch_stopped_part_way_goes_on_from_its_saved_state(tokenizer, tmp_path):
    """A long batch saves its memory state as it reads (beside the JSON); stopped in the middle, the next run reads
    only the segments after it, ends with the answers of a reading in one go, and leaves no state file behind."""
    grid = {"tasks": ["memorize"], "lengths": [2000], "samples": 4, "tokenizer": tokenizer, "batch_size": 2}
    per_batch = count_segments(2000, 100)  # 20 segments of 100 tokens
    whole = evaluate_grid(LastFactOracle(tokenizer), **grid)[0]
    assert whole.correct == 4
    path = tmp_path / "grid.json"
    with pytest.raises(_Stopped):  # in the second batch, after 7 of its segments
        evaluate_grid(StoppingOracle(tokenizer, stop_at=per_batch + 8), **grid, json_path=path, reading_every_s=0)
    states = list(tmp_path.glob("grid.json.*.state.pt"))
    assert len(states) == 1 and torch.load(states[0], weights_only=True)["segments"] == 7
    assert [index for index, _ in json.loads(path.read_text())["partial"][0]["right"]] == [0, 1]
    resuming, shown = StoppingOracle(tokenizer), []
    resumed = evaluate_grid(resuming, **grid, json_path=path, reading_every_s=0, progress=lambda *p: shown.append(p))[0]
    assert resuming.steps == per_batch - 7  # the second batch's segments after the seventh, and nothing more
    assert shown[0] == (8, per_batch) and shown[-1] == (per_batch, per_batch)  # the batch left: from where it was
    assert (resumed.correct, resumed.samples, resumed.tokens_per_s > 0) == (4, 4, True)
    assert not list(tmp_path.glob("*.state.pt")) and "partial" not in json.loads(path.read_text())
    again = tmp_path / "again.json"  # the same cell stopped again, then read otherwise into the same file
    with pytest.raises(_Stopped):
        evaluate_grid(StoppingOracle(tokenizer, stop_at=8), **grid, json_path=again, reading_every_s=0)
    facts_first = StoppingOracle(tokenizer)
    evaluate_grid(facts_first, **grid, json_path=again, reading_every_s=0, facts_first=True)
    assert facts_first.steps == 2 * per_batch  # a state of its own to keep: none of the other's taken up
    assert len(list(tmp_path.glob("again.json.*.state.pt"))) == 1


def test_an_armt_goes_on_from_a_saved_reading_state_exactly(tokenizer, tmp_path):
    """A real memory (ARMT, writing) saved part way through a batch and loaded again: the same state, bit for bit,
    and the same classes as reading the batch in one go."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    config.num_labels = 6
    model = mf.AssociativeMemoryTransformer(
        transformers.BertForSequenceClassification(config),
        num_memory_tokens=2,
        segment_size=40,
        d_mem=4,
        alignment="right",
        cls_token_id=101,
        sep_token_id=102,
    ).eval()
    with torch.no_grad():
        for layer in model.layers:  # values drawn at random (as after training): the memory holds something
            layer.value.weight.normal_(0, 0.5)
    samples = [make_sample("qa1", 600, tokenizer, index=i, split="test") for i in range(3)]
    saved = {}

    def keep(segments_read, state):
        if segments_read == 5:
            saved["state"] = state
            checkpoint.save([0, 1, 2], segments_read, state, 1.0)

    checkpoint = ReadingCheckpoint(tmp_path / "reading.pt", every_s=0)
    whole = predict_classes(model, samples, on_segment=keep)
    skip, state, seconds = checkpoint.load(model, [0, 1, 2])
    assert (skip, seconds) == (5, 1.0) and state.matrix.abs().sum() > 0
    assert torch.equal(state.matrix, saved["state"].matrix) and torch.equal(state.normalizer, saved["state"].normalizer)
    assert predict_classes(model, samples, state=state, skip=skip) == whole
    assert checkpoint.load(model, [0, 1]) is None  # another batch's samples: not this state


def test_knobs_compare_by_value_whichever_model_set_them(tokenizer, tmp_path):
    """A cell records the tunable knobs it was read with; a later reading takes it up when it reads with the same
    values, whether they were set with --set or stored in the model (`saved_knobs`), and reads again when they
    differ. A cell begun when only the knobs set were recorded goes on from its saved state."""
    grid = {"tasks": ["memorize"], "lengths": [2000], "samples": 4, "tokenizer": tokenizer, "batch_size": 2}
    per_batch = count_segments(2000, 100)
    writing = {"write_threshold": 0.002, "layout_writes": True}  # a model as trained
    silent = {"write_threshold": 0.002, "layout_writes": False}  # the same with the layout silent
    path = tmp_path / "grid.json"
    with pytest.raises(_Stopped):  # begun as older runs recorded it: only the knob set
        evaluate_grid(
            StoppingOracle(tokenizer, stop_at=per_batch + 8),
            **grid,
            json_path=path,
            reading_every_s=0,
            knobs={"layout_writes": False},
        )
    resuming = StoppingOracle(tokenizer)
    evaluate_grid(resuming, **grid, json_path=path, reading_every_s=0, knobs=silent, saved_knobs=writing)
    assert resuming.steps == per_batch - 7  # its batch and state taken up: the same reading
    exported = StoppingOracle(tokenizer)  # a model stored with the layout silent, read with no --set
    evaluate_grid(exported, **grid, json_path=path, knobs=silent, saved_knobs=silent)
    assert exported.steps == 0
    as_trained = StoppingOracle(tokenizer)
    cells = evaluate_grid(as_trained, **grid, json_path=path, knobs=writing, saved_knobs=writing)
    assert as_trained.steps == 2 * per_batch and cells[0].knobs == writing
    assert json.loads(path.read_text())["results"][0]["knobs"] == writing
    one_batch = tmp_path / "one_batch.json"  # stopped in its first batch: no partial record, only the state
    with pytest.raises(_Stopped):
        evaluate_grid(
            StoppingOracle(tokenizer, stop_at=8),
            **grid,
            json_path=one_batch,
            reading_every_s=0,
            knobs={"layout_writes": False},
        )
    resuming = StoppingOracle(tokenizer)
    evaluate_grid(resuming, **grid, json_path=one_batch, reading_every_s=0, knobs=silent, saved_knobs=writing)
    assert resuming.steps == 2 * per_batch - 7  # its state found under the name it was begun with
