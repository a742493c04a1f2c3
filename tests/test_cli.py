"""The command line's edge: bad input ends a command with one line on stderr and exit status 2 (no traceback),
suspicious input is warned about in one line, every computing command takes --threads, `eval --data` scores a
BABILong file as the grid scores the same samples, and `bench` ends with a sentence."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import typer
from test_evaluation import save_tiny_classifier, save_tiny_decoder
from typer.testing import CliRunner

import memformers as mf
from memformers import bench_results
from memformers.cli import (
    SHIPPED_CHECKPOINT,
    app,
    available_cores,
    crossover_sentence,
    default_threads,
    trained_tasks,
)
from memformers.cli.demo import recorded_evaluation, showcase_length
from memformers.errors import InputError, InputWarning
from memformers.evaluation import Cell, save_cells
from memformers.perplexity import markdown_table as perplexity_table
from memformers.saving import WEIGHTS_NAME, read_config, save_pretrained
from memformers.tasks import load_noise
from memformers.tasks.noise import distinct_sentences, tokenized_noise


@pytest.fixture(scope="module")
def tokenizer():
    return mf.backbones.load_tokenizer("minilm")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenizer) -> Path:
    """A tiny classifier RMT that records, as the trainer does, the tasks and tokenizer it was trained with."""
    path = tmp_path_factory.mktemp("models") / "classifier"
    save_tiny_classifier(path, tokenizer)
    model = mf.load(path)
    save_pretrained(model, path, tokenizer, {"task": "memorize,detect", "tokenizer": "minilm"})
    return path


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *names: str) -> None:
    """Exit status 2, exactly one line on stderr naming each of `names`, and no traceback anywhere."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("memformers: error: "), result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    for name in names:
        assert name in lines[0], lines[0]


def warning_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("memformers: warning: ")]


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["stream", "--backbone", "/missing/model"], ["--backbone", "/missing/model"]),
        (["stream", "--segments", "4,0"], ["--segments", "≥ 1"]),
        (["demo", "--task", "foo"], ["--task", "qa1, qa2, qa3, qa4, qa5", "'foo'"]),
        (["demo", "--task", "detect"], ["--task", "'detect'"]),  # the shipped model learnt qa1-qa5 only
        (["demo", "--samples", "0"], ["--samples"]),
        (["demo", "--table-samples", "0"], ["--table-samples"]),
        (["demo", "--table-lengths", "1024,x"], ["--table-lengths"]),
        (["eval", "/missing/model"], ["checkpoint", "/missing/model"]),
        (["data", "--task", "qa9", "--lengths", "512", "--out", "x.jsonl"], ["task", "qa9"]),
        (["data", "--task", "qa1", "--lengths", "512", "--split", "dev", "--out", "x.jsonl"], ["split", "dev"]),
        (["bench", "--threads", "0"], ["--threads"]),
        (["eval", str(SHIPPED_CHECKPOINT), "--device", "gpu"], ["--device", "'gpu'"]),
        (["perplexity", str(SHIPPED_CHECKPOINT), "--device", "tpu:x"], ["--device"]),
    ],
)
def test_bad_options_give_one_line_naming_them(args, names) -> None:
    assert_one_line_error(run(*args), *names)


def test_the_traceback_behind_an_error_line_on_request(monkeypatch) -> None:
    monkeypatch.setenv("MEMFORMERS_TRACEBACK", "1")
    result = run("stream", "--segments", "0")
    assert result.exit_code == 1 and isinstance(result.exception, InputError)


def test_a_bug_keeps_its_own_error_and_traceback(tmp_path, monkeypatch) -> None:
    import memformers.training

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not bad input")

    config = tmp_path / "run.toml"
    config.write_text('[task]\nname = "memorize"\n')
    monkeypatch.setattr(memformers.training, "train", broken)
    result = run("train", config)
    assert isinstance(result.exception, RuntimeError) and "a bug" in str(result.exception)


def test_train_given_a_missing_file_or_a_folder(tmp_path) -> None:
    assert_one_line_error(run("train", tmp_path / "none.toml"), "config", "none.toml", "not found")
    assert_one_line_error(run("train", tmp_path), "config", str(tmp_path), "folder")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    assert_one_line_error(run("train", broken), "config", "broken.toml", "TOML")


def test_curves_draws_one_run_or_several_and_names_a_bad_run(tmp_path) -> None:
    for name, loss in (("base", 1.0), ("lower-lr", 0.5)):
        (tmp_path / name).mkdir()
        lines = [{"type": "train", "step": s, "loss": loss / s, "accuracy": 0.5} for s in (10, 20)]
        lines.append({"type": "eval", "step": 20, "loss": loss, "accuracy": 0.6})
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    one = run("curves", tmp_path / "base", "--out", tmp_path / "one.png")
    both = run(
        "curves",
        tmp_path / "base",
        f"lr=1e-4={tmp_path / 'lower-lr' / 'metrics.jsonl'}",
        "--out",
        tmp_path / "both.png",
    )
    assert one.exit_code == both.exit_code == 0, one.output + both.output
    assert (tmp_path / "one.png").stat().st_size > 0 and (tmp_path / "both.png").stat().st_size > 0
    assert_one_line_error(run("curves", tmp_path / "none", "--out", tmp_path / "x.png"), "runs", "none", "metrics")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("curves", tmp_path / "empty", "--out", tmp_path / "x.png"), "runs", "empty", "metrics")
    twice = run("curves", tmp_path / "base", tmp_path / "base" / "metrics.jsonl", "--out", tmp_path / "x.png")
    assert_one_line_error(twice, "runs", "'base'", "twice", "LABEL=PATH")
    assert not (tmp_path / "x.png").exists()


def test_a_corrupt_checkpoint_names_its_file(classifier, tmp_path) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for item in classifier.iterdir():
        (corrupt / item.name).symlink_to(item)
    (corrupt / WEIGHTS_NAME).unlink()
    (corrupt / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    result = run("eval", corrupt, "--lengths", "64", "--samples", "1")
    assert_one_line_error(result, str(corrupt / WEIGHTS_NAME))
    with pytest.raises(InputError, match=WEIGHTS_NAME):  # the library says the same, as a ValueError
        mf.load(corrupt)
    truncated = tmp_path / "truncated"
    shutil.copytree(classifier, truncated)
    weights = truncated / "backbone" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_one_line_error(run("eval", truncated), str(weights), "not a readable safetensors file")


def test_demo_refuses_a_decoder(tokenizer, tmp_path) -> None:
    save_tiny_decoder(tmp_path / "decoder", tokenizer)
    result = run("demo", "--checkpoint", tmp_path / "decoder")
    assert_one_line_error(result, "--checkpoint", "LlamaForCausalLM", "memformers eval")


def test_demo_reads_the_shipped_model_by_default() -> None:
    """A wrong default would not fail: the demo would stream an untrained RMT instead."""
    demo = typer.main.get_command(app).commands["demo"]
    default = Path(next(p.default for p in demo.params if p.name == "checkpoint"))
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "babilong-armt"
    assert default == SHIPPED_CHECKPOINT == shipped
    assert (default / "memformers.json").is_file()


def test_demo_asks_only_the_tasks_its_checkpoint_was_trained_on(classifier) -> None:
    assert_one_line_error(run("demo", "--checkpoint", classifier, "--task", "reason"), "--task", "memorize, detect")
    shipped = trained_tasks(read_config(SHIPPED_CHECKPOINT))  # what the shipped demo may ask
    assert shipped == ["qa1", "qa2", "qa3", "qa4", "qa5"]
    weighted = {"extra": {"task": "qa1,qa2,qa5,qa5"}}  # a task listed twice trained twice as often; asked once
    assert trained_tasks(weighted) == ["qa1", "qa2", "qa5"]


def test_demo_says_what_it_shows_and_prints_the_chance_level(classifier) -> None:
    args = ["demo", "--checkpoint", classifier, "--length", "600", "--samples", "2", "--table-lengths", "256,512"]
    result = run(*args, "--table-samples", "2")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # the console wraps long lines
    assert "Showing: 2 detect samples (facts hidden in 600 tokens of books the model never saw)" in text
    assert text.count("(chance 17%)") == 2  # one per accuracy: 1 in 6 places


def _grid(path: Path, accuracies: dict[tuple[str, int], float]) -> None:
    """A recorded evaluation: cells as `memformers eval --json` writes them."""
    cells = [
        Cell(task, length, 100, round(100 * a), a, a, a, 1.0, 1.0, command="memformers eval …")
        for (task, length), a in accuracies.items()
    ]
    save_cells(path, cells)


@pytest.mark.parametrize(
    ("accuracies", "length", "said"),
    [
        ({}, 1 << 20, ""),  # nothing recorded: a million tokens
        ({("qa1", 0): 0.99, ("qa1", 1 << 20): 0.93, ("qa2", 1 << 20): 0.91}, 1 << 20, ""),
        (
            {("qa1", 4096): 0.97, ("qa2", 4096): 0.92, ("qa1", 1 << 20): 0.95, ("qa2", 1 << 20): 0.40},
            4096,
            "not right at 1M tokens (qa1 95%, qa2 40% at 1M); showing length 4K, the longest length where it is right",
        ),
        (  # 16K counts only where both tasks were measured
            {("qa1", 0): 0.99, ("qa2", 0): 0.95, ("qa1", 16384): 0.99},
            0,
            "recorded evaluation stops at 0, short of 1M tokens; showing length 0 (the story alone)",
        ),
        (
            {("qa1", 0): 0.80, ("qa2", 0): 0.60, ("qa1", 1024): 0.70, ("qa2", 1024): 0.30},
            0,
            "stops at 1K, short of 1M tokens, and it is right at no length (right: every task ≥ 90% in its recorded "
            "evaluation, evaluation.json); showing length 0 (the story alone), its best: qa1 80%, qa2 60%",
        ),
    ],
)
def test_the_demo_shows_the_longest_length_where_the_recorded_evaluation_says_the_model_is_right(
    tmp_path, accuracies, length, said
) -> None:
    _grid(tmp_path / "evaluation.json", accuracies)
    chosen, why = showcase_length(recorded_evaluation(tmp_path), ["qa1", "qa2"])
    assert chosen == length
    assert said in why and bool(said) == bool(why), why


def test_the_demo_reads_a_babilong_model_at_the_length_it_is_right_and_prints_its_recorded_table(
    tokenizer, tmp_path
) -> None:
    path = tmp_path / "babilong"
    save_tiny_classifier(path, tokenizer)
    save_pretrained(mf.load(path), path, tokenizer, {"task": "qa1,qa2", "tokenizer": "minilm"})
    _grid(path / "evaluation.json", {("qa1", 256): 0.95, ("qa2", 256): 0.9, ("qa1", 4096): 0.5, ("qa2", 4096): 0.2})
    result = run("demo", "--checkpoint", path)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "showing length 256, the longest length where it is right: qa1 95%, qa2 90%" in text
    assert "Showing: 2 qa1 and qa2 samples (facts hidden in 256 tokens of books the model never saw)" in text
    assert text.count("question:") == 2
    assert text.count("(chance 17%)") == 4  # the recorded 2 × 2 grid, nothing measured live
    assert "measured by: memformers eval …" in text


def test_the_demo_reads_stories_of_different_lengths_alone(tokenizer, classifier, tmp_path) -> None:
    path = tmp_path / "babilong"
    shutil.copytree(classifier, path)
    save_pretrained(mf.load(path), path, tokenizer, {"task": "qa1,qa2,qa3", "tokenizer": "minilm"})
    result = run("demo", "--checkpoint", path, "--length", "0", "--table-lengths", "0", "--table-samples", "2")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "Showing: 3 qa1, qa2 and qa3 samples (the story alone, no noise)" in text
    assert text.count("question:") == 3 and text.count("(chance 17%)") == 3


# ----------------------------------------------------------------------------------------------------------------
# Suspicious input: accepted, with one warning line


def test_a_checkpoint_evaluated_on_a_task_it_was_not_trained_on_is_warned_about(classifier) -> None:
    result = run("eval", classifier, "--task", "detect,reason", "--lengths", "64", "--samples", "2")
    assert result.exit_code == 0, result.output
    (line,) = warning_lines(result)
    assert "memorize, detect" in line and "not on reason" in line
    assert_one_line_error(run("eval", classifier, "--task", "detect,qa9"), "task", "qa9")  # no warning first
    trained = run("eval", classifier, "--task", "detect", "--lengths", "64", "--samples", "2")
    assert trained.exit_code == 0 and warning_lines(trained) == []


def test_ids_from_another_tokenizer_are_refused(tmp_path) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=6
    )
    backbone = transformers.BertForSequenceClassification(config)
    small = mf.RecurrentMemoryTransformer(backbone, num_memory_tokens=2, cls_token_id=101, sep_token_id=102)
    save_pretrained(small, tmp_path / "small", None, {"task": "memorize", "tokenizer": "minilm"})
    result = run("eval", tmp_path / "small", "--lengths", "64", "--samples", "1")
    assert_one_line_error(result, "tokenizer", "'minilm'", "30,521", "1,000")


def _books(folder: Path, names: list[str], sentences: int = 200) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        text = " ".join(f"The {name} clock struck {i} times while the rain kept falling." for i in range(sentences))
        (folder / f"{name}.txt").write_text("Chapter 1\n\n" + text + "\n")


def test_a_book_that_is_not_utf8_is_read_as_windows_1252_with_a_warning(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MEMFORMERS_CACHE", str(tmp_path / "cache"))
    _books(tmp_path / "books", ["a", "b"])
    (tmp_path / "books" / "c.txt").write_bytes("Chapter 1\n\nCafé crème was served.\n".encode("cp1252"))
    with pytest.warns(InputWarning, match=r"c\.txt is not UTF-8"):
        books = {book.name: book for book in load_noise("all", tmp_path / "books")}
    assert books["c"].sentences == ("Café crème was served.",)  # not "Caf crme"


def test_binary_files_are_refused_or_named(tmp_path) -> None:
    _books(tmp_path / "books", ["a", "b"])
    (tmp_path / "books" / "cover.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    with pytest.warns(InputWarning, match=r"1 file\(s\) that are not \.txt books \(e\.g\. 'cover\.jpg'\)"):
        load_noise("all", tmp_path / "books")
    (tmp_path / "books" / "c.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(InputError, match=r"c\.txt is binary"), pytest.warns(InputWarning, match="cover"):
        load_noise("all", tmp_path / "books")


def test_data_refusing_a_binary_book_leaves_no_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MEMFORMERS_CACHE", str(tmp_path / "cache"))
    _books(tmp_path / "books", ["a"])
    (tmp_path / "books" / "b.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    out = tmp_path / "out" / "qa1.jsonl"
    args = ["data", "--task", "qa1", "--lengths", "300", "--split", "all", "--noise-dir", tmp_path / "books"]
    assert_one_line_error(run(*args, "--out", out), "b.txt is binary")
    assert list(out.parent.iterdir()) == []  # neither the file nor a temporary one


def test_a_book_that_repeats_one_sentence_is_warned_about(tokenizer, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MEMFORMERS_CACHE", str(tmp_path / "cache"))
    _books(tmp_path / "varied", ["a", "b"])
    (tmp_path / "same").mkdir()
    (tmp_path / "same" / "one.txt").write_text("Chapter 1\n\n" + "The grass is green. " * 5000)
    with pytest.warns(InputWarning, match="hold only 1 distinct sentences"):
        noise = tokenized_noise(tokenizer, "all", tmp_path / "same")
    assert distinct_sentences(noise) == (1, 5000)
    varied = tokenized_noise(tokenizer, "all", tmp_path / "varied")  # no warning: 400 distinct sentences
    assert distinct_sentences(varied) == (400, 400)


def test_data_prints_noise_warnings_as_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MEMFORMERS_CACHE", str(tmp_path / "cache"))
    _books(tmp_path / "books", ["a", "b"])
    (tmp_path / "books" / "c.txt").write_bytes("Chapter 1\n\nCafé crème was served.\n".encode("cp1252"))
    args = ["data", "--task", "qa1", "--lengths", "300", "--samples", "1", "--noise-dir", tmp_path / "books"]
    assert_one_line_error(run(*args), "--out")  # a missing option is one line too
    result = run(*args, "--split", "all", "--out", tmp_path / "qa1.jsonl")
    assert result.exit_code == 0, result.output
    (line,) = warning_lines(result)
    assert "c.txt is not UTF-8" in line


# ----------------------------------------------------------------------------------------------------------------
# memformers data --split, memformers eval --data


def test_data_takes_a_split(tmp_path) -> None:
    rows = {}
    for split in ("test", "train"):
        out = tmp_path / f"{split}.jsonl"
        result = run("data", "--task", "qa1", "--lengths", "400", "--samples", "2", "--split", split, "--out", out)
        assert result.exit_code == 0, result.output
        rows[split] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["target"] for r in rows["test"]] == [r["target"] for r in rows["train"]]  # the same stories
    assert all(a["input"] != b["input"] for a, b in zip(rows["test"], rows["train"], strict=True))  # other books


def test_eval_data_scores_a_babilong_file_as_the_grid_scores_its_samples(classifier, tmp_path) -> None:
    data = tmp_path / "memorize.jsonl"
    args = ["data", "--task", "memorize", "--lengths", "0,300", "--samples", "4", "--out", data]
    made = run(*args, "--tokenizer", classifier)  # a saved model: the tokenizer it records
    assert made.exit_code == 0, made.output
    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert all({"input", "question", "target"} <= set(r) and r["tokenizer"] == "minilm" for r in records)

    from_file = run("eval", classifier, "--data", data, "--batch-size", "4", "--json", tmp_path / "file.json")
    assert from_file.exit_code == 0, from_file.output
    grid = ["--task", "memorize", "--lengths", "0,300", "--samples", "4", "--batch-size", "4"]
    from_grid = run("eval", classifier, *grid, "--json", tmp_path / "grid.json")
    assert from_grid.exit_code == 0, from_grid.output
    file_cells = json.loads((tmp_path / "file.json").read_text())
    grid_cells = json.loads((tmp_path / "grid.json").read_text())["results"]
    assert [(c["task"], c["length"], c["samples"], c["correct"]) for c in file_cells["results"]] == [
        (c["task"], c["length"], c["samples"], c["correct"]) for c in grid_cells
    ]
    assert file_cells["data"] == str(data) and "--data" in file_cells["command"]
    assert (tmp_path / "file.md").exists() and (tmp_path / "file.png").exists()

    bare = tmp_path / "qa1.json"  # the published schema: only input, question, target; the task from the name
    bare.write_text(json.dumps([{k: r[k] for k in ("input", "question", "target")} for r in records[4:]]))
    result = run("eval", classifier, "--data", bare, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "not on qa1" in warning_lines(result)[0]  # trained on memorize and detect
    assert_one_line_error(run("eval", classifier, "--data", tmp_path / "none.parquet"), "data", "none.parquet")


def test_eval_data_generates_and_scores_with_a_decoder(tokenizer, tmp_path) -> None:
    save_tiny_decoder(tmp_path / "decoder", tokenizer)
    data = tmp_path / "qa1.jsonl"
    assert run("data", "--task", "qa1", "--lengths", "200", "--samples", "3", "--out", data).exit_code == 0
    args = ["eval", tmp_path / "decoder", "--data", data, "--batch-size", "3", "--max-new-tokens", "4"]
    result = run(*args, "--json", tmp_path / "decoder.json")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "decoder.json").read_text())
    assert saved["scoring"] == "generation" and saved["scorer"] == "babilong-leaderboard"
    (cell,) = saved["results"]
    assert (cell["task"], cell["length"], cell["samples"], cell["split"]) == ("qa1", 200, 3, "file")
    assert len(cell["examples"]) == 3 and all(isinstance(e["output"], str) for e in cell["examples"])


def test_eval_data_warns_when_the_file_counts_another_tokenizers_tokens(classifier, tmp_path) -> None:
    data = tmp_path / "memorize.jsonl"
    assert run("data", "--task", "memorize", "--lengths", "300", "--samples", "2", "--out", data).exit_code == 0
    assert warning_lines(run("eval", classifier, "--task", "memorize", "--data", data, "--batch-size", "2")) == []
    other = "algorithmic:16"  # a tokenizer at hand that splits text differently
    records = [json.loads(line) | {"tokenizer": other} for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run("eval", classifier, "--data", data, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    (line,) = warning_lines(result)
    assert f"{other!r}" in line and "'minilm'" in line


# ----------------------------------------------------------------------------------------------------------------
# Threads, perplexity, bench's last sentence, tables


@pytest.mark.parametrize("command", ["demo", "stream", "data", "eval", "perplexity", "train", "bench"])
def test_every_computing_command_takes_threads(command) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0 and "--threads" in result.output


def test_default_threads_follow_omp_num_threads_else_half_the_cores(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == max(1, available_cores() // 2)


def test_threads_are_set_for_the_command(tmp_path, monkeypatch) -> None:
    for name in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS"):  # the command sets them for its libraries: restore after
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    before = torch.get_num_threads()
    try:
        args = ["data", "--task", "qa1", "--lengths", "64", "--samples", "1", "--out", tmp_path / "a.jsonl"]
        result = run(*args, "--threads", "3")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 3
        assert os.environ["OMP_NUM_THREADS"] == os.environ["RAYON_NUM_THREADS"] == "3"
    finally:
        torch.set_num_threads(before)


def test_bench_ends_with_a_sentence() -> None:
    measured = {"length": 4000, "how": "measured: between 1,000 and 4,000 tokens", "ratio": 2.0}
    measured["interpolated_length"] = 2000
    assert crossover_sentence(measured) == (
        "RMT reads faster than full attention from about 2,000 tokens on (between 1,000 and 4,000 tokens; 2.00× as "
        "fast at 4,000)."
    )
    points = (("full", 100, 1000.0), ("full", 200, 500.0), ("rmt", 100, 50.0), ("rmt", 200, 50.0))
    rates = [
        {"kind": "inference", "mechanism": m, "length": n, "status": "ok", "tokens_per_s": rate}
        for m, n, rate in points
    ]
    sentence = crossover_sentence(bench_results.crossover(rates))
    assert sentence.startswith("RMT would read faster than full attention from about 2,000 tokens (extrapolated")
    never = crossover_sentence(bench_results.crossover(rates[:1]))
    assert never.startswith("RMT did not read faster") and "{" not in never


def test_an_empty_perplexity_cell_reads_as_a_dash() -> None:
    row = {"perplexity": {"1": 12.3456, "2": math.nan}, "overall": 12.3456, "state_floats_per_row": 64}
    assert perplexity_table({"m": row}).splitlines()[-1] == "| m | 12.35 | – | – | – | – | 12.35 | 64 |"


# ----------------------------------------------------------------------------------------------------------------
# eval --set: a knob no weight depends on, read with another value


def _tiny_armt_classifier(path: Path, tokenizer) -> Path:
    """A 1-layer ARMT classifier whose every position writes, its W_V drawn (zero at initialisation: no reads)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=6
    )
    backbone = transformers.BertForSequenceClassification(config)
    model = mf.AssociativeMemoryTransformer(
        backbone, num_memory_tokens=2, segment_size=64, d_mem=4, writers="all", cls_token_id=101, sep_token_id=102
    )
    for layer in model.layers:
        torch.nn.init.normal_(layer.value.weight)
    save_pretrained(model, path, tokenizer, {"task": "qa1", "tokenizer": "minilm"})
    return path


@torch.no_grad()
def test_a_tunable_knob_set_on_a_loaded_model_changes_what_it_writes(tokenizer, tmp_path) -> None:
    from memformers.cli.checkpoints import tune_knobs

    model = mf.load(_tiny_armt_classifier(tmp_path / "armt", tokenizer))
    ids = torch.randint(1000, 2000, (2, 2 * model.content_size))
    before = model(ids).state.matrix
    assert float(before.abs().sum()) > 0
    assert tune_knobs(model, ["write_threshold=0.9999"]) == {"write_threshold": 0.9999}
    assert model.config.write_threshold == 0.9999
    assert float(model(ids).state.matrix.abs().sum()) == 0  # every gate (about 1/2) under it: A stays empty
    assert tune_knobs(model, []) == {} and model.config.write_threshold == 0.9999


@torch.no_grad()
def test_a_saved_model_can_be_read_with_its_layout_tokens_silent(tokenizer, tmp_path) -> None:
    from memformers.cli.checkpoints import tune_knobs

    model = mf.load(_tiny_armt_classifier(tmp_path / "armt", tokenizer))
    ids = torch.randint(1000, 2000, (2, 2 * model.content_size))
    every_position = model(ids).state.matrix
    assert tune_knobs(model, ["layout_writes=false"]) == {"layout_writes": False}
    content_only = model(ids).state.matrix
    assert float(content_only.abs().sum()) > 0 and not torch.allclose(content_only, every_position)


def test_eval_reads_with_a_set_knob_records_it_and_measures_again_where_it_differs(tokenizer, tmp_path) -> None:
    checkpoint = _tiny_armt_classifier(tmp_path / "armt", tokenizer)
    grid = tmp_path / "grid.json"
    args = ["eval", checkpoint, "--task", "qa1", "--lengths", "300", "--samples", "4", "--batch-size", "4"]
    args += ["--json", grid]
    assert run(*args, "--set", "write_threshold=0.5").exit_code == 0
    saved = json.loads(grid.read_text())
    assert saved["results"][0]["knobs"] == {"write_threshold": 0.5, "layout_writes": True}  # every one, as read
    assert "--set write_threshold=0.5" in saved["command"]
    seconds = saved["results"][0]["seconds"]
    assert run(*args, "--set", "write_threshold=0.5").exit_code == 0  # the same cell: skipped
    assert json.loads(grid.read_text())["results"][0]["seconds"] == seconds
    assert run(*args).exit_code == 0  # the saved knobs: measured again
    again = json.loads(grid.read_text())["results"]
    assert len(again) == 1 and again[0]["knobs"]["write_threshold"] == 0.0 and "--set" not in again[0]["command"]


def test_eval_of_an_exported_model_takes_up_the_cells_its_source_read_with_that_knob(tokenizer, tmp_path) -> None:
    source = _tiny_armt_classifier(tmp_path / "armt", tokenizer)
    assert run("export", source, tmp_path / "silent", "--set", "layout_writes=false").exit_code == 0
    grid = tmp_path / "grid.json"
    args = ["--task", "qa1", "--lengths", "300", "--samples", "4", "--batch-size", "4", "--json", grid]
    assert run("eval", source, *args, "--set", "layout_writes=false").exit_code == 0
    seconds = json.loads(grid.read_text())["results"][0]["seconds"]
    assert run("eval", tmp_path / "silent", *args).exit_code == 0  # reads as the source did with --set: skipped
    kept = json.loads(grid.read_text())["results"][0]
    assert kept["seconds"] == seconds and "--set layout_writes=false" in kept["command"]
    assert run("eval", source, *args).exit_code == 0  # the source as saved writes the layout: read again
    assert json.loads(grid.read_text())["results"][0]["knobs"]["layout_writes"] is True


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        ("d_mem=8", ["--set", "d_mem", "write_threshold"]),  # shapes weights
        ("write_threshold=1.5", ["--set", "write_threshold"]),
        ("write_threshold", ["--set", "KEY=VALUE"]),
    ],
)
def test_eval_refuses_a_knob_it_cannot_set(tokenizer, tmp_path, setting, names) -> None:
    checkpoint = _tiny_armt_classifier(tmp_path / "armt", tokenizer)
    result = run("eval", checkpoint, "--task", "qa1", "--lengths", "300", "--samples", "2", "--set", setting)
    assert_one_line_error(result, *names)


# ----------------------------------------------------------------------------------------------------------------
# export: a run's model, stored to share


def test_export_stores_a_model_in_half_precision_with_what_the_trainer_recorded(classifier, tmp_path) -> None:
    result = run("export", classifier, tmp_path / "shared")
    assert result.exit_code == 0, result.output
    original, shared = mf.load(classifier).state_dict(), mf.load(tmp_path / "shared").state_dict()
    for name, weight in original.items():
        assert torch.equal(shared[name], weight.half().float()), name  # stored in float16, computed in float32
    assert read_config(tmp_path / "shared")["extra"] == read_config(classifier)["extra"]
    assert read_config(tmp_path / "shared")["stored_as"] == "float16"
    assert (tmp_path / "shared" / "backbone" / "tokenizer_config.json").exists()
    half = (tmp_path / "shared" / "backbone" / "model.safetensors").stat().st_size
    assert half < 0.6 * (classifier / "backbone" / "model.safetensors").stat().st_size


def test_export_takes_a_runs_final_model_else_its_latest_checkpoints(classifier, tmp_path) -> None:
    run_dir = tmp_path / "run"

    def saved_as(folder: Path, step: object) -> None:  # a copy of the model that records its step
        shutil.copytree(classifier, folder)
        config = json.loads((folder / "memformers.json").read_text())
        config["extra"]["step"] = step
        (folder / "memformers.json").write_text(json.dumps(config))

    for step in (2, 4):
        saved_as(run_dir / f"checkpoint-{step:07d}" / "model", step)
        (run_dir / f"checkpoint-{step:07d}" / "trainer.pt").write_bytes(b"")
    assert run("export", run_dir, tmp_path / "latest").exit_code == 0
    assert read_config(tmp_path / "latest")["extra"]["step"] == 4
    saved_as(run_dir / "final", "final")
    assert run("export", run_dir, tmp_path / "final").exit_code == 0
    assert read_config(tmp_path / "final")["extra"]["step"] == "final"


def test_export_stores_a_tunable_knob_the_model_then_reads_with(tokenizer, tmp_path) -> None:
    source = _tiny_armt_classifier(tmp_path / "armt", tokenizer)
    result = run("export", source, tmp_path / "silent", "--set", "layout_writes=false", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert read_config(source)["config"]["layout_writes"] is True
    assert read_config(tmp_path / "silent")["config"]["layout_writes"] is False
    ids = torch.randint(1000, 2000, (2, 2 * mf.load(source).content_size))
    with torch.no_grad():
        every_position = mf.load(source)(ids).state.matrix
        content_only = mf.load(tmp_path / "silent")(ids).state.matrix
    assert not torch.allclose(content_only, every_position)
    assert_one_line_error(run("export", source, tmp_path / "out", "--set", "d_mem=8"), "--set d_mem", "layout_writes")


@pytest.mark.parametrize(("extra", "names"), [(["--dtype", "int8"], ["--dtype", "float16"]), ([], ["source"])])
def test_export_refuses_what_it_cannot_store(classifier, tmp_path, extra, names) -> None:
    source = classifier if extra else tmp_path  # an empty folder: neither a run nor a model
    assert_one_line_error(run("export", source, tmp_path / "out", *extra), *names)
