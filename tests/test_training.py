"""The curriculum trainer: stage changes, exact resume, atomic checkpoints, two processes, logs, config errors."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

import memformers as mf
from memformers import precision, training
from memformers.errors import InputWarning
from memformers.training import Trainer, load_config, train

# A 2-layer, 32-wide BERT from scratch on MiniLM's vocabulary: 48-position segments (43 content tokens).
TINY = {
    "model": {
        "backbone": "scratch",
        "num_memory_tokens": 2,
        "segment_size": 48,
        "scratch": {"layers": 2, "hidden": 32, "heads": 4, "intermediate": 64, "dropout": 0.1},
    },
    "task": {"name": "memorize", "tokenizer": "minilm"},
    "curriculum": {
        "segments": [1, 2],
        "threshold": 1.0,
        "max_steps_per_stage": 3,
        "eval_every": 0,
        "eval_at_start": False,
    },
    "optim": {"lr": 3e-3, "warmup_steps": 1, "batch_size": 4, "cpu": True},
    "output": {"checkpoint_every": 2, "log_every": 1},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster than contended two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tmp_path: Path, name: str = "run", **changes) -> training.TrainConfig:
    """The tiny config writing to tmp_path/name, with dotted-key changes."""
    overrides = {"output.dir": str(tmp_path / name), "curriculum.eval_samples": 6} | changes
    return load_config(None, training._flatten(TINY) | overrides)


def to_toml(config: training.TrainConfig) -> str:
    """A config as TOML text (scalars, lists and nested tables are all the trainer uses)."""
    lines: list[str] = []

    def table(name: str, data: dict) -> None:
        lines.append(f"[{name}]")
        nested = {k: v for k, v in data.items() if isinstance(v, dict)}
        for key, value in data.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {json.dumps(value)}")
        for key, value in nested.items():
            table(f"{name}.{key}", value)

    for section, values in config.to_dict().items():
        table(section, values)
    return "\n".join(lines) + "\n"


def records(run: Path, kind: str | None = None) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in lines]
    return [r for r in out if kind is None or r["type"] == kind]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return mf.load(path).state_dict()


def test_curriculum_advances_on_threshold_and_logs_jsonl(tmp_path):
    config = tiny(tmp_path, **{"curriculum.threshold": 0.0, "curriculum.eval_every": 1})
    final = train(config, progress=False)
    run = config.output_dir
    stages = records(run, "stage")
    assert [(r["step"], r["reason"], r["segments"], r["done"]) for r in stages] == [
        (1, "threshold", 2, False),
        (2, "threshold", 2, True),
    ]
    steps = records(run, "train")
    assert [(r["step"], r["segments"]) for r in steps] == [(1, 1), (2, 2)]
    for r in steps:
        assert {"loss", "accuracy", "lr", "tokens_per_s"} <= set(r) and r["tokens_per_s"] > 0
    evals = records(run, "eval")
    assert [(r["step"], r["segments"], r["samples"]) for r in evals] == [(1, 1, 6), (2, 2, 6)]
    assert plt.imread(run / "curves.png").shape[:2] == (456, 1320)  # redrawn at each validation, 11 × 3.8 in
    # the final model is loadable and says how to rebuild its samples
    model = mf.load(final)
    extra = mf.saving.read_config(final)["extra"]
    assert extra["task"] == "memorize" and extra["tokenizer"] == "minilm" and extra["segments"] == [1, 2]
    assert (final / "backbone" / "tokenizer_config.json").exists()
    assert model.content_size == 48 - 2 - 3


def test_a_fresh_run_validates_the_model_it_starts_from(tmp_path):
    """With `eval_at_start` (the default) a fresh run logs a validation at step 0, the starting model's as the
    trainer's own `evaluate` gives it, keeps that model as the best until a validation beats it, and a resumed
    run does not validate its start again."""
    changes = {"curriculum.eval_at_start": True, "curriculum.segments": [1], "curriculum.threshold": 0.0}
    config = tiny(tmp_path, **changes)
    assert load_config(None, {}).curriculum.eval_at_start  # the default
    starting = Trainer(config, progress=False, resume=False)
    expected = starting.evaluate()
    starting.close()
    train(config, stop_after_steps=1, progress=False)
    run = config.output_dir
    [start] = records(run, "eval")
    assert start["step"] == 0 and start["segments"] == 1 and start["samples"] == 6
    assert start["accuracy"] == expected["accuracy"] and start["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert mf.saving.read_config(run / "best")["extra"]["step"] == 0
    assert records(run, "stage") == []  # above the threshold (0), and still no stage's end
    train(config, progress=False)  # resumed from step 1: its budget's validation at step 3, no second start
    assert [r["step"] for r in records(run, "eval")] == [0, 3]


def test_validation_of_several_tasks_reports_each_tasks_accuracy(tmp_path, monkeypatch):
    """Each validation sample is counted under its own task: a judge that passes exactly the qa4 stories (the
    only ones that speak of compass directions) gives qa4 100% and qa1 0%."""
    config = tiny(tmp_path, **{"task.name": "qa1,qa4", "curriculum.eval_samples": 8, "model.segment_size": 128})
    trainer = Trainer(config, progress=False, resume=False)
    directions = set(trainer.batches.tokenizer.convert_tokens_to_ids(["north", "south", "east", "west"]))

    def qa4_only(logits, batch):
        return torch.tensor([bool(directions & set(row.tolist())) for row in batch["input_ids"]])

    monkeypatch.setattr(trainer, "_correct", qa4_only)
    record = trainer.evaluate(1)
    trainer.close()
    assert record["accuracy_by_task"] == {"qa1": 0.0, "qa4": 1.0} and record["accuracy"] == 0.5
    single = Trainer(tiny(tmp_path, "single"), progress=False, resume=False)
    assert "accuracy_by_task" not in single.evaluate(1)  # one task: its accuracy is the accuracy
    single.close()


def test_dropout_attention_and_fused_adamw(tmp_path):
    """`model.dropout` reaches every dropout of a saved backbone trained further (the scratch one had 0.1),
    `model.attention` picks its kernel, and the optimizer is torch's fused AdamW unless `optim.fused_adamw =
    false`."""
    first = train(tiny(tmp_path, "first", **{"curriculum.segments": [1]}), progress=False)
    changes = {"model.backbone": str(first), "model.dropout": 0.0, "model.attention": "eager"}
    trainer = Trainer(tiny(tmp_path, "again", **changes), progress=False, resume=False)
    assert trainer.unwrapped.backbone.config._attn_implementation == "eager"
    rates = [m.p for m in trainer.unwrapped.backbone.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and set(rates) == {0.0} and trainer.unwrapped.backbone.config.hidden_dropout_prob == 0.0
    assert all(group["fused"] for group in trainer.optimizer.param_groups)
    trainer.train_step()
    trainer.close()
    kept = Trainer(tiny(tmp_path, "kept", **{"optim.fused_adamw": False}), progress=False, resume=False)
    assert not any(group["fused"] for group in kept.optimizer.param_groups)
    assert {m.p for m in kept.unwrapped.backbone.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    kept.close()


def test_keep_layers_trains_a_pretrained_backbone_cut_to_its_first_blocks(tmp_path):
    """`model.keep_layers = 2` on MiniLM (6 blocks): the model trains with 2, and its saved copy reloads with 2."""
    from memformers.backbone_layers import layer_stack

    changes = {"model.backbone": "minilm", "model.keep_layers": 2, "curriculum.segments": [1]}
    trainer = Trainer(tiny(tmp_path, "cut", **changes), progress=False, resume=False)
    assert len(layer_stack(trainer.unwrapped.backbone)) == 2
    trainer.train_step()
    trainer.close()
    saved = train(tiny(tmp_path, "saved", **changes, **{"curriculum.max_steps_per_stage": 1}), progress=False)
    assert mf.load(saved).backbone.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match=r"model\.keep_layers: count must be an int in \[1, 6\]"):
        Trainer(tiny(tmp_path, "deep", **changes | {"model.keep_layers": 7}), progress=False, resume=False)


def test_a_last_stage_going_on_past_its_threshold_logs_no_stage_change(tmp_path):
    """With stop_at_threshold off the last stage trains to its budget: validations above the threshold are no
    stage change, and the one stage record is the run's end."""
    changes = {"curriculum.threshold": 0.0, "curriculum.eval_every": 1, "curriculum.stop_at_threshold": False}
    config = tiny(tmp_path, **changes, **{"curriculum.segments": [1]})
    train(config, progress=False)
    assert len(records(config.output_dir, "eval")) == 3
    stages = records(config.output_dir, "stage")
    assert [(r["step"], r["reason"], r["done"]) for r in stages] == [(3, "threshold", True)]


def test_curriculum_advances_on_step_budget(tmp_path):
    config = tiny(tmp_path, **{"curriculum.max_steps_per_stage": 2, "output.checkpoint_every": 0})
    train(config, progress=False)
    stages = records(config.output_dir, "stage")
    assert [(r["step"], r["reason"], r["done"]) for r in stages] == [(2, "budget", False), (4, "budget", True)]
    assert [r["segments"] for r in records(config.output_dir, "train")] == [1, 1, 2, 2]
    assert training.latest_checkpoint(config.output_dir).name == "checkpoint-0000004"


class Killed(Exception):
    pass


def kill_at(step: int):
    def callback(trainer: Trainer, record: dict) -> None:
        if record["step"] == step:
            raise Killed

    return callback


@pytest.mark.parametrize(("how", "carry"), [("kill", 0.0), ("stop", 0.0), ("kill", 0.9)])
def test_resume_after_kill_equals_uninterrupted(tmp_path, how, carry):
    # dropout on and mixed lengths: the RNG states and the data position must both be restored; with
    # curriculum.carry_memory, also the memories the rows carry into the next step
    changes = {"curriculum.vary_segments": True, "curriculum.segments": [1, 3], "curriculum.carry_memory": carry}
    straight = tiny(tmp_path, "straight", **changes)
    killed = tiny(tmp_path, "killed", **changes)
    final = train(straight, progress=False)
    if how == "kill":
        with pytest.raises(Killed):
            train(killed, callbacks=[kill_at(5)], progress=False)  # checkpoints at 2 and 4; step 5 is lost
        assert training.latest_checkpoint(killed.output_dir).name == "checkpoint-0000004"
    else:
        stopped = train(killed, stop_after_steps=3, progress=False)  # a checkpoint at 3, then a clean exit
        assert stopped.name == "checkpoint-0000003"
    carried = list(training.latest_checkpoint(killed.output_dir).glob("carried-*.pt"))
    assert len(carried) == (1 if carry else 0)
    resumed = train(killed, progress=False)  # automatic resume from the latest checkpoint
    a, b = weights(final), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    losses = [[r["loss"] for r in records(run.output_dir, "train")] for run in (straight, killed)]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_resuming_with_changed_settings_says_which(tmp_path):
    """A resumed run goes on with today's config; where it differs from the checkpoint's, a warning names each
    setting with both values. The same config resumes silently, also from a checkpoint saved before a setting
    existed (it trained with the setting's default)."""
    import warnings

    from memformers.errors import InputWarning

    config = tiny(tmp_path)
    train(config, stop_after_steps=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        train(config, stop_after_steps=3, progress=False)
    changed = tiny(tmp_path, **{"optim.lr": 3e-4, "curriculum.vary_fill": True})
    with pytest.warns(InputWarning, match=r"curriculum\.vary_fill: False → True; optim\.lr: 0\.003 → 0\.0003$"):
        train(changed, stop_after_steps=4, progress=False)

    # a checkpoint older than a setting (saved without it) trained with its default: silent at the default, and
    # the setting named, from its default, when today's config changes it
    def drop_max_grad_norm() -> None:
        latest = sorted((tmp_path / "run").glob("checkpoint-*"))[-1]
        record = json.loads((latest / "trainer.json").read_text())
        del record["train_config"]["optim"]["max_grad_norm"]
        (latest / "trainer.json").write_text(json.dumps(record))

    drop_max_grad_norm()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        train(changed, stop_after_steps=5, progress=False)
    drop_max_grad_norm()
    clipped = tiny(tmp_path, **{"optim.lr": 3e-4, "curriculum.vary_fill": True, "optim.max_grad_norm": 0.5})
    with pytest.warns(InputWarning, match=r"with settings it was not trained with: optim\.max_grad_norm: 1\.0 → 0\.5$"):
        train(clipped, stop_after_steps=6, progress=False)


def test_a_finished_run_goes_on_when_its_budget_is_raised_and_says_so_when_not(tmp_path):
    """Resuming a run that ended on its step budget with a larger curriculum.max_steps_per_stage trains the steps
    the larger budget adds to its last stage; with the same budget it trains nothing and says how to go on."""
    from memformers.errors import InputWarning

    changes = {"curriculum.max_steps_per_stage": 2, "output.checkpoint_every": 2}
    config = tiny(tmp_path, **changes)
    train(config, progress=False)
    assert [r["step"] for r in records(config.output_dir, "train")] == [1, 2, 3, 4]
    with pytest.warns(InputWarning, match="nothing to train; raise curriculum.max_steps_per_stage"):
        train(config, progress=False)
    assert len(records(config.output_dir, "train")) == 4
    longer = tiny(tmp_path, **changes | {"curriculum.max_steps_per_stage": 3})
    with pytest.warns(InputWarning) as said:  # the changed budget is named, and what it does
        train(longer, progress=False)
    messages = [str(warning.message) for warning in said]
    assert any("continuing from step 4 to at most 5" in message for message in messages)
    assert any("curriculum.max_steps_per_stage: 2 → 3" in message for message in messages)
    assert [(r["step"], r["segments"]) for r in records(config.output_dir, "train")][-2:] == [(4, 2), (5, 2)]
    assert records(config.output_dir, "stage")[-1] | {"accuracy": None} == {
        "type": "stage", "step": 5, "reason": "budget", "accuracy": None, "segments": 2, "done": True
    }  # fmt: skip
    assert training.latest_checkpoint(config.output_dir).name == "checkpoint-0000005"


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    config = tiny(tmp_path)
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if Path(path).name == "trainer.pt" and "0000004" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(training.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(config, progress=False)
    monkeypatch.setattr(training.torch, "save", real_save)
    latest = training.latest_checkpoint(config.output_dir)
    assert latest.name == "checkpoint-0000002"
    assert not (config.output_dir / "checkpoint-0000004").exists()
    assert isinstance(mf.load(latest / "model"), mf.RecurrentMemoryTransformer)
    trainer = Trainer(config, progress=False)  # resumes from the intact checkpoint
    assert trainer.resumed_from == latest and trainer.state.step == 2
    assert not list(config.output_dir.glob(".checkpoint-*"))  # the half-written folder is cleared away
    trainer.train()
    assert trainer.state.step == 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    # No dropout: both runs must compute the same function of the same global batches.
    changes = {"model.scratch.dropout": 0.0, "curriculum.max_steps_per_stage": 2, "output.checkpoint_every": 0}
    single = tiny(tmp_path, "single", **changes)
    double = tiny(tmp_path, "double", **changes)
    path = tmp_path / "double.toml"
    path.write_text(to_toml(double))
    port = free_port()
    procs = []
    for rank in range(2):
        env = os.environ | {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
        }
        command = [sys.executable, "-m", "memformers.cli", "train", str(path), "--no-progress"]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    final = train(single, progress=False)  # meanwhile, the single-process run
    for proc in procs:
        output = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 0, output
    # Same samples, same order, same updates: the only difference is float summation order (a batch of 4 versus
    # two batches of 2 averaged by all-reduce), ~1e-7 relative per gradient. Adam normalises each update to about
    # lr = 3e-3, so after 4 steps the weights may differ by a small fraction of lr; 1e-5 is 300× tighter than one
    # update and fails for any batch mismatch (which moves weights by ~lr).
    a, b = weights(final), weights(double.output_dir / "final")
    worst = max(float((a[name] - b[name]).abs().max()) for name in a)
    print(f"two processes vs one: max weight difference {worst:.1e}")
    assert worst < 1e-5, worst
    one, two = (records(run.output_dir, "train") for run in (single, double))
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], abs=1e-5)
    assert [r["segments"] for r in two] == [1, 1, 2, 2]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.head", "regression", "model.head"),
        ("model.alignment", "middle", "model.alignment"),
        ("model.scratch.hidden", 30, "model.scratch.hidden"),
        ("task.name", "memorize,copy", "task.name"),
        ("task.name", "nosuch", "task.name"),
        ("curriculum.threshold", 1.5, "curriculum.threshold"),
        ("curriculum.segments", [2, 1], "curriculum.segments"),
        ("curriculum.segments", "fibonacci:1:8", "curriculum.segments"),
        ("curriculum.eval_samples", 0, "curriculum.eval_samples"),
        ("optim.batch_size", 5, "optim.batch_size"),
        ("optim.lr", "fast", "optim.lr"),
        ("optim.schedule", "cosine", "optim.schedule"),
        ("optim.mixed_precision", "fp8", "optim.mixed_precision"),
        ("output.log_every", 0, "output.log_every"),
        ("optim.learning_rate", 1e-3, "optim.learning_rate"),
        ("model.dropout", 1.0, "model.dropout"),
        ("model.dropout", 0.0, r"model.dropout .* \[model.scratch\] dropout"),  # a scratch backbone has its own
        ("optim.fused_adamw", "yes", "optim.fused_adamw"),
        ("model.attention", "flash", "model.attention"),
        ("model.keep_layers", 0, "model.keep_layers"),
        ("model.keep_layers", 2, r"model\.keep_layers .* scratch backbone"),
    ],
)
def test_bad_config_values_name_the_key(tmp_path, key, value, message):
    changes = {"optim.grad_accum": 2} if key == "optim.batch_size" else {}
    if key == "model.dropout" and value == 1.0:
        changes = {"model.backbone": "minilm"}
    with pytest.raises(ValueError, match=message if "\\" in message else message.replace(".", r"\.")):
        tiny(tmp_path, **changes, **{key: value})


def test_segment_rules_and_overrides(tmp_path):
    assert training.parse_segments("linear:1:4") == [1, 2, 3, 4]
    assert training.parse_segments("double:1:16") == [1, 2, 4, 8, 16]
    assert training.parse_override("curriculum.segments=[1, 3]") == (["curriculum", "segments"], [1, 3])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(tiny(tmp_path)))
    config = load_config(path, ["curriculum.max_steps_per_stage=7", "task.name=detect"])
    assert config.curriculum.max_steps_per_stage == 7 and config.task.name == "detect"
    with pytest.raises(ValueError, match=r"\[curriculm\]|curriculm"):
        load_config(path, ["curriculm.threshold=0.5"])


@pytest.mark.parametrize(("head", "family"), [("causal-lm", "llama"), ("masked-lm", "bert")])
def test_token_heads_fill_exact_segments_and_train(tmp_path, head, family):
    config = tiny(tmp_path, **{"model.head": head, "model.scratch.family": family, "curriculum.segments": [2]})
    trainer = Trainer(config, progress=False)
    batch = trainer.batches.batch([0, 1, 2], 2, seed=0)
    content = trainer.unwrapped.content_size
    lengths = batch["attention_mask"].sum(1)
    assert bool((lengths > content).all() and (lengths <= 2 * content).all())  # exactly two segments each
    answer = batch["labels"] != -100
    assert bool(answer.any(1).all())  # labels only on the answer tokens
    if head == "masked-lm":
        assert bool((batch["input_ids"][answer] == trainer.tokenizer.mask_token_id).all())
    record = trainer.train_step()
    assert torch.isfinite(torch.tensor(record["loss"])) and 0 <= record["accuracy"] <= 1
    assert 0 <= trainer.evaluate()["accuracy"] <= 1


def test_training_continues_from_a_saved_model(tmp_path):
    first = train(tiny(tmp_path, "first"), progress=False)
    before = weights(first)
    second_config = tiny(tmp_path, "second", **{"model.backbone": str(first), "curriculum.segments": [2]})
    assert second_config.tokenizer_name == "minilm"  # read from the saved model
    second = train(second_config, progress=False)
    after = weights(second)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained further, from the saved weights
    still = train(tiny(tmp_path, "still", **{"model.backbone": str(first), "optim.lr": 1e-12}), progress=False)
    for key, value in weights(still).items():  # a vanishing learning rate leaves the saved weights as they were
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="model.num_memory_tokens"):
        train(tiny(tmp_path, "bad", **{"model.backbone": str(first), "model.num_memory_tokens": 3}), progress=False)


def test_a_saved_model_goes_on_in_other_segments_with_the_same_weights(tmp_path):
    first = train(tiny(tmp_path, "first"), progress=False)  # segments of 48 positions
    saved = mf.load(first)
    shorter = Trainer(tiny(tmp_path, "shorter", **{"model.backbone": str(first), "model.segment_size": 40}))
    model = shorter.unwrapped
    assert model.config.segment_size == 40 and model.content_size == saved.content_size - 8
    for key, value in saved.state_dict().items():  # the same weights, memory tokens included
        assert torch.equal(model.state_dict()[key], value), key
    longer = tiny(tmp_path, "longer", **{"model.backbone": str(first), "model.segment_size": 64})
    with pytest.raises(ValueError, match="model.segment_size: segment_size=64.*backbone's 48"):
        Trainer(longer)  # past the scratch backbone's window of 48 positions


@pytest.mark.parametrize("task", ["copy", "reverse", "associative"])
def test_algorithmic_tasks_fill_their_segments_and_train(tmp_path, task):
    flat = training._flatten(TINY) | {"output.dir": str(tmp_path / "run"), "curriculum.eval_samples": 6}
    flat = {k: v for k, v in flat.items() if k != "task.tokenizer"} | {"task.name": task, "task.vocab_size": 8}
    llama = {"model.head": "causal-lm", "model.scratch.family": "llama", "model.segment_size": 16}
    config = load_config(None, flat | llama)
    assert config.tokenizer_name == "algorithmic:8"
    trainer = Trainer(config, progress=False)
    assert len(trainer.tokenizer) == 10  # padding, separator, 8 symbols
    content = trainer.unwrapped.content_size
    batch = trainer.batches.batch([0, 1], 2, seed=0)
    target = batch["labels"] != -100
    separator = (batch["input_ids"] == 1).float().argmax(1)  # = the source's length
    if task == "associative":  # whole key-value pairs and the query: at most the two segments, nearly all of them
        assert bool((separator <= 2 * content).all() and (separator > 2 * content - 3).all())
    else:
        assert separator.tolist() == [2 * content, 2 * content]
    assert int(target.sum(1)[0]) == {"copy": 4 * content, "reverse": 2 * content, "associative": 1}[task]
    assert bool(target[:, : int(separator.min()) + 1].eq(False).all())  # no loss on the source or separator
    assert bool((batch["input_ids"][target] >= 2).all())  # targets are data symbols
    final = train(config, progress=False)
    assert mf.load(final).backbone.config.vocab_size == 10
    with pytest.raises(ValueError, match="model.head"):
        load_config(None, flat)


# --- every mechanism in the trainer ---------------------------------------------------------------------------

MECHANISM_CHANGES = {
    "rmt": {},
    "armt": {"model.armt.d_mem": 4},
    "cache": {},
    "knn": {"model.knn.memory_layers": [-1], "model.knn.memory_size": 256, "model.knn.top_k": 8},
    "longmem": {"model.longmem.memory_size": 256, "model.longmem.top_k_chunks": 4},
}


def decoder(tmp_path: Path, mechanism: str, name: str = "run", **changes) -> training.TrainConfig:
    """The tiny config as a scratch Llama (causal LM, no dropout) run by `mechanism`."""
    base = {"model.head": "causal-lm", "model.scratch.family": "llama", "model.scratch.dropout": 0.0}
    base |= {"model.mechanism": mechanism, "curriculum.segments": [2], "curriculum.max_steps_per_stage": 12}
    base |= {"optim.warmup_steps": 0, "output.checkpoint_every": 0}
    return tiny(tmp_path, name, **base | MECHANISM_CHANGES[mechanism] | changes)


@pytest.mark.parametrize("mechanism", ["rmt", "armt", "cache", "knn", "longmem"])
def test_every_mechanism_trains_saves_reloads_and_continues(tmp_path, mechanism):
    config = decoder(tmp_path, mechanism)
    trainer = Trainer(config, progress=False)
    model = trainer.unwrapped
    expected = {"rmt": "RecurrentMemoryTransformer", "cache": "SegmentCacheTransformer"}
    expected |= {"armt": "AssociativeMemoryTransformer"}
    expected |= {"knn": "MemorizingTransformer", "longmem": "LongMem"}
    assert type(model).__name__ == expected[mechanism]
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    backbone = {id(p) for p in model.backbone.parameters()}
    if mechanism == "longmem":  # the frozen backbone is not in the optimizer; the SideNet is
        assert not trained & backbone and trained
    else:
        assert backbone <= trained
    final = trainer.train()
    losses = [r["loss"] for r in records(config.output_dir, "train")]
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # it learns (the answer tokens of memorize)

    reloaded = mf.load(final)
    assert type(reloaded) is type(model)
    ids = torch.randint(5, 1000, (2, 3 * model.content_size - 7))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)

    more = train(decoder(tmp_path, mechanism, "more", **{"model.backbone": str(final)}), progress=False)
    again = weights(more)
    before = weights(final)
    assert before.keys() == again.keys()
    assert any(not torch.equal(before[k], again[k]) for k in before)  # trained further from the saved weights
    if mechanism == "longmem":  # ... but never its backbone
        assert all(torch.equal(before[k], again[k]) for k in before if k.startswith("backbone."))


def test_a_saved_backbone_goes_into_another_mechanism(tmp_path):
    base = train(decoder(tmp_path, "rmt", "base", **{"model.num_memory_tokens": 0}), progress=False)
    with pytest.raises(ValueError, match="model.mechanism"):
        Trainer(decoder(tmp_path, "knn", "bad", **{"model.backbone": str(base)}), progress=False)
    trainer = Trainer(decoder(tmp_path, "knn", "knn", **{"model.backbone": str(base / "backbone")}), progress=False)
    saved = mf.load(base).backbone.state_dict()
    for name, value in trainer.unwrapped.backbone.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_a_saved_encoder_backbone_goes_into_armt_with_its_classification_head(tmp_path):
    """The BABILong recipe: a stage-0 classifier without memory, then its backbone/ folder wrapped in ARMT."""
    base = train(tiny(tmp_path, "base", **{"model.num_memory_tokens": 0}), progress=False)
    armt = {"model.mechanism": "armt", "model.backbone": str(base / "backbone"), "model.armt.d_mem": 4}
    config = tiny(tmp_path, "armt", **armt)
    trainer = Trainer(config, progress=False)
    model = trainer.unwrapped
    assert type(model).__name__ == "AssociativeMemoryTransformer" and model.info.head == "classification"
    saved = mf.load(base).backbone.state_dict()
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, saved[name]), name
    final = trainer.train()
    reloaded = mf.load(final)
    assert type(reloaded) is mf.AssociativeMemoryTransformer and reloaded.config_dict()["d_mem"] == 4
    assert any(not torch.equal(value, saved[name]) for name, value in reloaded.backbone.state_dict().items())
    with pytest.raises(ValueError, match="model.armt.d_mem"):
        tiny(tmp_path, "bad", **armt | {"model.armt.d_mem": 0})
    with pytest.raises(ValueError, match="num_memory_tokens"):
        tiny(tmp_path, "bad", **armt | {"model.num_memory_tokens": 0})


def test_the_babilong_armt_config_parses():
    config = load_config(Path(__file__).parent.parent / "configs" / "cpu_babilong_qa1_armt.toml")
    assert config.model.mechanism == "armt" and config.model.head == "classification"
    assert config.model.mechanism_config().d_mem == 64


COMMITTED_CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", COMMITTED_CONFIGS, ids=lambda path: path.stem)
def test_every_committed_config_is_one_the_trainer_accepts(path):
    """A README command names each config: a key renamed or a value out of range fails here, not in a user's run."""
    config = load_config(path)
    config.model.mechanism_config()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.mechanism", "lstm", "model.mechanism"),
        ("model.knn.memory_size", 0, "model.knn.memory_size"),
        ("model.knn.combine", "sum", "model.knn.combine"),
        ("model.knn.memory_layers", [-1.5], "model.knn.memory_layers"),
        ("model.knn.memory_layers", [9], r"model\.knn.*memory_layers"),
        ("model.knn.depth", 2, "model.knn.depth"),
        ("model.longmem.memory_size", 250, "model.longmem.memory_size"),
        ("model.longmem.sidenet_layers", 3, r"model\.longmem.*sidenet_layers"),
    ],
)
def test_bad_mechanism_values_name_the_key(tmp_path, key, value, message):
    mechanism = key.split(".")[1] if key.split(".")[1] in ("knn", "longmem") else "longmem"
    with pytest.raises(ValueError, match=message.replace("model.", r"model\.") if "*" not in message else message):
        Trainer(decoder(tmp_path, mechanism, **{key: value}), progress=False)
    with pytest.raises(ValueError, match="model.head"):
        tiny(tmp_path, **{"model.mechanism": "cache"})  # the segment cache needs a decoder


def test_lm_task_trains_on_book_windows_and_reports_perplexity(tmp_path):
    config = decoder(tmp_path, "rmt", **{"task.name": "lm", "optim.lr": 1e-2, "curriculum.max_steps_per_stage": 10})
    trainer = Trainer(config, progress=False)
    batch = trainer.batches.batch([0, 1], 2, seed=0)
    content = trainer.unwrapped.content_size
    assert batch["input_ids"].shape == (2, 2 * content) and bool(batch["attention_mask"].all())
    assert torch.equal(batch["labels"], batch["input_ids"])  # every token a target (shifted by the driver)
    assert torch.equal(trainer.batches.batch([1], 2, seed=0)["input_ids"][0], batch["input_ids"][1])
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert after["perplexity"] < 0.5 * before["perplexity"], (before, after)  # from ~vocab size towards unigrams
    assert 0 <= before["accuracy"] < after["accuracy"] <= 1  # token accuracy, for the curriculum's threshold
    with pytest.raises(ValueError, match="model.head"):
        tiny(tmp_path, **{"task.name": "lm"})


def test_algorithmic_targets_are_scored_on_every_segment():
    """A copy target spans several segments: one wrong symbol in an early one makes the row wrong."""
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, 9]])  # source, separator, then the target
    mask = torch.ones_like(labels)
    perfect = torch.nn.functional.one_hot(training.shift_labels(labels, mask).clamp(min=0), 12).float()
    args = (labels, mask, True, 3, "left")
    assert bool(training.answer_correct(perfect, *args, whole_input=True).all())
    wrong = perfect.clone()
    wrong[0, 2] = wrong[0, 2].roll(1)  # the first target symbol, in the first segment
    assert not bool(training.answer_correct(wrong, *args, whole_input=True).any())
    assert bool(training.answer_correct(wrong[:, -1:], *args).all())  # the last segment alone never sees it


def test_tasks_with_different_answers_share_one_class_vocabulary(tmp_path, monkeypatch):
    """qa1 answers places, qa5 people and objects: one classifier over both has their union as classes, every item's
    class names its sample's answer, and evaluation reads the class names rather than the task's own indices."""
    from memformers import evaluation
    from memformers.tasks import ANSWERS, make_sample

    config = tiny(tmp_path, **{"task.name": "qa1,qa5", "model.segment_size": 128})
    model, tokenizer = training.build_model(config)
    union = tuple(ANSWERS["qa1"]) + tuple(ANSWERS["qa5"])
    assert evaluation.class_answers(model) == union and model.backbone.config.num_labels == len(union)
    batches = training.TaskBatches(config, tokenizer, model.content_size)
    for index in range(8):
        item = batches.item(index, 3, seed=5)
        task = config.task_names[index % 2]
        sample = make_sample(task, 3 * model.content_size, tokenizer, 5, index, "train")
        assert union[int(item["labels"])] == sample.target

    fred = union.index("Fred")  # the classifier always answers "Fred": right exactly where the target is Fred
    monkeypatch.setattr(evaluation, "predict_classes", lambda _model, batch, *a, **k: [fred] * len(batch))
    cell = evaluation.evaluate_cell(model, "qa5", 0, 24, tokenizer, batch_size=8)
    targets = [make_sample("qa5", 0, tokenizer, 0, i, "test").target for i in range(24)]
    assert 0 < targets.count("Fred") < 24 and cell.correct == targets.count("Fred")


def test_varied_lengths_stay_between_min_segments_and_the_stage(tmp_path):
    """Long stories (qa3: up to 20 facts) do not fit one segment: `min_segments` bounds the lengths drawn."""
    config = tiny(tmp_path, **{"curriculum.vary_segments": True, "curriculum.min_segments": 3})
    batches = training.TaskBatches(config, None, 43)
    assert {batches.segments_of(i, 6) for i in range(200)} == {3, 4, 5, 6}
    assert {batches.segments_of(i, 2) for i in range(20)} == {2}  # a stage shorter than the minimum: its own
    with pytest.raises(ValueError, match="curriculum.min_segments"):
        tiny(tmp_path, **{"curriculum.min_segments": 0})


def test_a_task_listed_twice_is_scored_once_over_all_its_samples(tmp_path):
    """task.name "qa1,qa2,qa2" draws qa2 twice as often; its validation accuracy counts every qa2 sample."""
    changes = {"task.name": "qa1,qa2,qa2", "curriculum.eval_samples": 6, "model.segment_size": 200}
    config = tiny(tmp_path, **changes)
    trainer = Trainer(config, progress=False)
    trainer.eval_batch = 6  # one batch: validation samples 0..5 are qa1, qa2, qa2, qa1, qa2, qa2
    trainer._correct = lambda logits, batch: torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    record = trainer.evaluate(1)
    assert record["accuracy_by_task"] == {"qa1": 1.0, "qa2": 0.5}


def test_training_stories_are_never_evaluation_stories(tmp_path):
    """At length 0 no noise book tells a training story from a test one: the trainer draws from a stream of its
    own, so the evaluation's samples (seed 0, indices 0..n) are stories it never trained on."""
    from memformers.tasks import make_sample

    config = tiny(tmp_path, **{"task.name": "qa1", "curriculum.no_noise_fraction": 1.0, "curriculum.segments": [1]})
    trainer = Trainer(config, progress=False)
    batch = trainer.batches.batch(list(range(8)), 1, seed=0)  # training samples 0..7, each its story alone
    trained = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    stream = [make_sample("qa1", 0, trainer.tokenizer, 0, i, "train", training=True).ids.tolist() for i in range(8)]
    tested = [make_sample("qa1", 0, trainer.tokenizer, 0, i, "test").ids.tolist() for i in range(8)]
    assert trained == stream  # the training stream, reproducible from (seed, task, length, index)
    assert (
        sum(a == b for a, b in zip(trained, tested, strict=True)) <= 1
    )  # evaluation's stories: another stream (≤ a coincidence)


def test_facts_placed_first_must_be_carried_to_the_question(tmp_path):
    """`task.facts_first`: that fraction of samples has every fact before the noise, so at two segments none shares
    the question's segment; `task.facts_apart` spaces another fraction's facts evenly; the others keep the task's
    scattered facts. Adding `facts_apart` leaves the samples `facts_first` places where they were."""
    from memformers.tasks import make_sample

    changes = {"task.name": "qa1", "task.facts_first": 0.4, "curriculum.segments": [2], "model.segment_size": 128}
    trainer = Trainer(tiny(tmp_path, **changes), progress=False)
    content, indices = trainer.unwrapped.content_size, list(range(16))
    batch = trainer.batches.batch(indices, 2, seed=0, vary=False)
    placed = [trainer.batches.placement(i) for i in indices]
    assert set(placed) == {"start", ""}  # a mix, drawn per sample
    for index, row in zip(indices, batch["input_ids"], strict=True):
        first = placed[index] == "start"
        sample = make_sample("qa1", 2 * content, trainer.tokenizer, 0, index, "train", facts_first=first)
        assert row.tolist() == sample.ids.tolist()
        if first:  # facts from token 0 on, contiguous, all in the first segment; the question in the second
            facts_end = sample.fact_positions[-1] + len(trainer.tokenizer(sample.facts[-1])["input_ids"]) - 2
            assert sample.fact_positions[0] == 0 and facts_end <= content <= sample.question_position
    apart = Trainer(tiny(tmp_path, **changes, **{"task.facts_apart": 0.4}), progress=False)
    placed_too = [apart.batches.placement(i) for i in indices]
    assert set(placed_too) == {"start", "apart", ""}
    assert [p == "start" for p in placed_too] == [p == "start" for p in placed]
    batch = apart.batches.batch(indices, 2, seed=0, vary=False)
    for index, row in zip(indices, batch["input_ids"], strict=True):
        options = {"facts_first": placed_too[index] == "start", "facts_apart": placed_too[index] == "apart"}
        sample = make_sample("qa1", 2 * content, apart.tokenizer, 0, index, "train", **options)
        assert row.tolist() == sample.ids.tolist()
    with pytest.raises(ValueError, match="task.facts_first"):
        tiny(tmp_path, **{"task.facts_first": 1.5})
    with pytest.raises(ValueError, match="task.facts_apart"):
        tiny(tmp_path, **{"task.facts_first": 0.6, "task.facts_apart": 0.6})


def test_vary_fill_draws_each_samples_length_within_its_last_segment(tmp_path):
    """`curriculum.vary_fill`: a sample of n segments is 0 .. one segment less one tokens shorter, drawn per
    sample, so its partly filled segment (and its facts' places in their segments) differs from sample to sample;
    validation draws its own; one segment stays whole; facts placed first stay in the first segment. Off, every
    sample of a count has one length."""
    from memformers.tasks import make_sample

    changes = {"task.name": "qa1", "curriculum.segments": [3], "model.segment_size": 64}
    trainer = Trainer(tiny(tmp_path, **changes, **{"curriculum.vary_fill": True}), progress=False)
    batches, content, indices = trainer.batches, trainer.unwrapped.content_size, list(range(24))
    full = 3 * content - batches.reserve
    lengths = batches.batch(indices, 3, seed=0)["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 10 and full - content < min(lengths) and max(lengths) <= full
    for index, length in zip(indices[:4], lengths, strict=False):
        sample = make_sample("qa1", length, trainer.tokenizer, 0, index, "train", training=True)
        assert length == sample.num_tokens  # classification: the sample is the row
    validation = [next(batches.lengths(i, 3, 7, full)) for i in indices]
    assert validation != [next(batches.lengths(i, 3, 0, full)) for i in indices]
    assert [list(batches.lengths(i, 1, 0, content)) for i in indices] == [[content]] * len(indices)
    fixed = Trainer(tiny(tmp_path, "fixed", **changes), progress=False).batches.batch(indices, 3, seed=0)
    assert set(fixed["attention_mask"].sum(1).tolist()) == {full}

    changes |= {"curriculum.segments": [2], "curriculum.vary_fill": True, "task.facts_first": 1.0}
    first = Trainer(tiny(tmp_path, "first", **changes), progress=False)
    kept = first.batches.batch(list(range(40)), 2, seed=0)["attention_mask"].sum(1).tolist()
    assert len(set(kept)) > 5 and min(kept) < 2 * content - 20
    for index, length in enumerate(kept):
        sample = make_sample("qa1", length, first.tokenizer, 0, index, "train", training=True, facts_first=True)
        facts_end = sample.story_tokens - (sample.num_tokens - sample.question_position)
        assert sample.fact_positions[0] == 0 and facts_end <= length - content  # all before the last segment
    with pytest.raises(ValueError, match="curriculum.vary_fill"):
        tiny(tmp_path, **{"task.name": "copy", "model.head": "causal-lm", "model.scratch.family": "llama",
                          "curriculum.vary_fill": True})  # fmt: skip


def test_num_facts_trains_on_stories_of_that_many_sentences(tmp_path):
    """`task.num_facts`: training (and validation) stories have that many facts; the rows are make_sample's with
    the same range, and stories without it have their task's own, longer range."""
    from memformers.tasks import make_sample

    changes = {"task.name": "qa1", "curriculum.segments": [2], "model.segment_size": 64}
    few = Trainer(tiny(tmp_path, **changes, **{"task.num_facts": [2, 3]}), progress=False)
    full = 2 * few.unwrapped.content_size - few.batches.reserve
    indices = list(range(30))
    batch = few.batches.batch(indices, 2, seed=0, vary=False)
    counts = []
    for index, row in zip(indices, batch["input_ids"], strict=True):
        sample = make_sample("qa1", full, few.tokenizer, 0, index, "train", num_facts=(2, 3))
        assert row.tolist() == sample.ids.tolist()
        counts.append(len(sample.facts))
    assert set(counts) == {2, 3}
    trained = few.batches.batch(indices[:8], 2, seed=0)  # the training stream, drawn as validation's
    for index, row in zip(indices, trained["input_ids"], strict=False):
        sample = make_sample("qa1", full, few.tokenizer, 0, index, "train", training=True, num_facts=(2, 3))
        assert row.tolist() == sample.ids.tolist() and len(sample.facts) in (2, 3)
    own = [len(make_sample("qa1", full, few.tokenizer, 0, i, "train").facts) for i in indices]
    assert max(own) > 3
    for value in (0, [3, 2], "two", True, [2, 3, 4]):
        with pytest.raises(ValueError, match="task.num_facts"):
            tiny(tmp_path, **changes, **{"task.num_facts": value})
    with pytest.raises(ValueError, match="task.num_facts"):
        tiny(tmp_path, **{"task.num_facts": 2})  # the tiny config's task, memorize, has a fixed story


def test_distinct_actors_fraction_draws_such_stories_per_sample(tmp_path):
    """`task.distinct_actors`: that fraction of the samples (training and validation) are make_sample's stories with
    every sentence moving another actor; the key is refused for other tasks, for stories longer than the cast, and
    outside [0, 1]."""
    from memformers.tasks import make_sample

    changes = {"task.name": "qa1", "curriculum.segments": [2], "model.segment_size": 64, "task.num_facts": [2, 3]}
    trainer = Trainer(tiny(tmp_path, **changes, **{"task.distinct_actors": 0.5}), progress=False)
    full = 2 * trainer.unwrapped.content_size - trainer.batches.reserve
    indices = list(range(40))
    batch = trainer.batches.batch(indices, 2, seed=0, vary=False)
    kinds = []
    for index, row in zip(indices, batch["input_ids"], strict=True):
        samples = {
            distinct: make_sample("qa1", full, trainer.tokenizer, 0, index, "train", num_facts=(2, 3),
                                  distinct_actors=distinct)
            for distinct in (False, True)
        }  # fmt: skip
        matches = [d for d, sample in samples.items() if row.tolist() == sample.ids.tolist()]
        assert len(matches) == 1
        kinds.append(matches[0])
        if matches[0]:
            actors = [fact.split()[0] for fact in samples[True].facts]
            assert len(set(actors)) == len(actors)
    assert 10 <= sum(kinds) <= 30
    trained = trainer.batches.batch(indices[:8], 2, seed=0)  # the training stream: the same draw per sample
    for index, row in zip(indices, trained["input_ids"], strict=False):
        sample = make_sample("qa1", full, trainer.tokenizer, 0, index, "train", training=True, num_facts=(2, 3),
                             distinct_actors=kinds[index])  # fmt: skip
        assert row.tolist() == sample.ids.tolist()
    for value in (-0.1, 1.5):
        with pytest.raises(ValueError, match="task.distinct_actors"):
            tiny(tmp_path, **changes, **{"task.distinct_actors": value})
    with pytest.raises(ValueError, match="task.distinct_actors.*num_facts"):
        tiny(tmp_path, **(changes | {"task.distinct_actors": 1.0, "task.num_facts": [2, 6]}))
    with pytest.raises(ValueError, match="task.distinct_actors"):
        tiny(tmp_path, **(changes | {"task.distinct_actors": 1.0, "task.name": "qa2", "task.num_facts": None}))


def test_lengths_drawn_per_batch_are_one_count_a_global_batch(tmp_path):
    """`vary_per = "batch"`: every sample of a global batch (all its micro-batches and processes) has the same
    count, so no row runs the longest row's segments; the counts still cover min_segments .. the stage."""
    changes = {"curriculum.vary_segments": True, "curriculum.vary_per": "batch", "optim.batch_size": 4}
    batches = training.TaskBatches(tiny(tmp_path, **changes), None, 43)
    per_batch = [{batches.segments_of(step * 4 + row, 5) for row in range(4)} for step in range(60)]
    assert all(len(counts) == 1 for counts in per_batch)
    assert set.union(*per_batch) == {1, 2, 3, 4, 5}
    per_sample = training.TaskBatches(tiny(tmp_path, **{"curriculum.vary_segments": True}), None, 43)
    assert any(len({per_sample.segments_of(step * 4 + row, 5) for row in range(4)}) > 1 for step in range(60))
    with pytest.raises(ValueError, match="curriculum.vary_per"):
        tiny(tmp_path, **{"curriculum.vary_per": "step"})


def test_each_step_logs_the_segments_its_batch_had(tmp_path):
    """With lengths drawn per batch, a step's record says how many segments its batch ran, not only the stage's."""
    changes = {"curriculum.vary_segments": True, "curriculum.vary_per": "batch", "curriculum.segments": [4]}
    config = tiny(tmp_path, **changes, **{"curriculum.max_steps_per_stage": 8})
    train(config, progress=False)
    steps = records(config.output_dir, "train")
    batches = training.TaskBatches(config, None, 43)
    drawn = [batches.segments_of((r["step"] - 1) * config.optim.batch_size, 4) for r in steps]
    assert [r["batch_segments"] for r in steps] == drawn
    assert {r["segments"] for r in steps} == {4} and min(drawn) < 4


@pytest.mark.parametrize("mechanism", ["rmt", "knn"])
def test_a_frozen_backbone_stays_as_loaded_while_the_memory_trains(tmp_path, mechanism):
    base = train(decoder(tmp_path, "rmt", "base", **{"model.num_memory_tokens": 0}), progress=False)
    frozen = {"model.backbone": str(base / "backbone"), "model.freeze_backbone": True}
    frozen |= {"optim.memory_lr": 5e-2, "curriculum.max_steps_per_stage": 4}
    trainer = Trainer(decoder(tmp_path, mechanism, "frozen", **frozen), progress=False)
    model = trainer.unwrapped
    own = [name for name, p in model.named_parameters() if not name.startswith("backbone.") and p.requires_grad]
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert own and trained == {id(p) for name, p in model.named_parameters() if name in own}
    assert {group["lr"] for group in trainer.optimizer.param_groups if group["params"]} == {5e-2}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    final = trainer.train()
    after = mf.load(final).state_dict()
    saved = mf.load(base).backbone.state_dict()
    for name, value in saved.items():  # the backbone bit for bit as loaded, its head included
        assert torch.equal(after[f"backbone.{name}"], value), name
    assert any(not torch.equal(after[name], before[name]) for name in own)  # ... and the memory moved
    if mechanism == "knn":  # Adam moves the zero-initialised mix by about memory_lr a step: the gates open
        mix = torch.cat([layer.mix.detach().abs() for layer in mf.load(final).layers])
        assert float(mix.max()) > 0.05, mix


def test_memory_lr_applies_to_the_mechanisms_own_weights_only(tmp_path):
    trainer = Trainer(decoder(tmp_path, "knn", **{"optim.memory_lr": 1e-1, "optim.lr": 1e-3}), progress=False)
    names = {id(p): name for name, p in trainer.unwrapped.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for parameter in group["params"]:
            expected = 1e-3 if names[id(parameter)].startswith("backbone.") else 1e-1
            assert group["initial_lr"] == expected, names[id(parameter)]
    with pytest.raises(ValueError, match=r"model\.freeze_backbone"):  # the cache has no weights of its own
        Trainer(decoder(tmp_path, "cache", "cache", **{"model.freeze_backbone": True}), progress=False)
    with pytest.raises(ValueError, match=r"model\.freeze_backbone"):
        tiny(tmp_path, **{"model.freeze_backbone": True, "model.num_memory_tokens": 0})
    with pytest.raises(ValueError, match=r"optim\.memory_lr"):
        tiny(tmp_path, **{"optim.memory_lr": -1.0})


def test_no_noise_fraction_trains_on_stories_alone_and_validates_in_noise(tmp_path):
    """Length-0 evaluation reads stories alone in a partly filled segment: training can mix in that shape."""
    from memformers.backbones import load_tokenizer

    config = tiny(tmp_path, **{"task.name": "qa1", "curriculum.no_noise_fraction": 0.5})
    batches = training.TaskBatches(config, load_tokenizer("minilm"), 43 * 3)
    drawn = [batches.without_noise(i) for i in range(400)]
    assert 0.4 < sum(drawn) / len(drawn) < 0.6
    quiet = [i for i in range(40) if drawn[i]][:4]
    noisy = [i for i in range(40) if not drawn[i]][:4]
    lengths = batches.batch(quiet, 1, 0)["attention_mask"].sum(1)
    assert (lengths < 43 * 3).all()  # the story and question alone
    assert (batches.batch(noisy, 1, 0)["attention_mask"].sum(1) == 43 * 3).all()
    assert (batches.batch(quiet, 1, 0, vary=False)["attention_mask"].sum(1) == 43 * 3).all()  # validation: noise
    with pytest.raises(ValueError, match="curriculum.no_noise_fraction"):
        tiny(tmp_path, **{"curriculum.no_noise_fraction": 1.5})


def test_prefetching_batches_changes_nothing_but_speed(tmp_path):
    changes = {"curriculum.vary_segments": True, "curriculum.segments": [1, 3], "optim.grad_accum": 2}
    ahead = train(tiny(tmp_path, "ahead", **changes), progress=False)
    inline = train(tiny(tmp_path, "inline", **changes, **{"optim.prefetch": False}), progress=False)
    a, b = weights(ahead), weights(inline)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_trains_in_fp32_and_says_so(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    if native:
        assert training._usable_precision("bf16", on_cpu=True) == "bf16"
    else:
        with pytest.warns(InputWarning, match=r"optim\.mixed_precision bf16: this CPU .* no bf16 instructions.*fp32"):
            assert training._usable_precision("bf16", on_cpu=True) == "no"
    assert training._usable_precision("bf16", on_cpu=False) == "bf16"  # a GPU decides for itself
    assert training._usable_precision("no", on_cpu=True) == "no"


def test_a_saved_classifier_keeps_its_classes_when_they_cover_the_tasks_answers(tmp_path):
    from memformers.tasks import answer_vocabulary

    five = answer_vocabulary(["qa1", "qa2", "qa3", "qa4", "qa5"])
    saved = list(reversed(five))  # a class order of its own, which the head's rows follow
    (tmp_path / "five").mkdir()
    (tmp_path / "five" / "config.json").write_text(json.dumps({"id2label": {str(i): a for i, a in enumerate(saved)}}))
    config = tiny(
        tmp_path, **{"task.name": "qa1", "model.head": "classification", "model.backbone": str(tmp_path / "five")}
    )
    assert training.class_vocabulary(config) == tuple(saved)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "config.json").write_text(json.dumps({"id2label": {"0": "kitchen", "1": "garden"}}))
    config = tiny(
        tmp_path, **{"task.name": "qa1", "model.head": "classification", "model.backbone": str(tmp_path / "one")}
    )
    assert training.class_vocabulary(config) == answer_vocabulary(["qa1"])  # too few classes: the task's own


def test_validation_at_a_long_length_is_logged_apart_and_changes_nothing_else(tmp_path):
    """curriculum.eval_long_segments: at every eval_long_every steps, eval_long_samples samples of that many
    segments, logged as "eval_long"; the stages, the other records and the weights are those of the same run
    without it."""
    plain = tiny(tmp_path, "plain", **{"curriculum.eval_every": 2})
    watched = tiny(
        tmp_path,
        "watched",
        **{
            "curriculum.eval_every": 2,
            "curriculum.eval_long_segments": 5,
            "curriculum.eval_long_every": 3,
            "curriculum.eval_long_samples": 4,
        },
    )
    train(plain, progress=False)
    train(watched, progress=False)
    longs = records(watched.output_dir, "eval_long")
    assert [(r["step"], r["segments"], r["samples"]) for r in longs] == [(3, 5, 4), (6, 5, 4)]
    assert 0 <= longs[0]["accuracy"] <= 1 and math.isfinite(longs[0]["loss"]) and longs[0]["seconds"] > 0

    def without_long_and_speed(run: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if k not in ("tokens_per_s", "steps_per_s", "seconds")}
            for r in records(run)
            if r["type"] != "eval_long"
        ]

    assert without_long_and_speed(watched.output_dir) == without_long_and_speed(plain.output_dir)
    for name, tensor in weights(plain.output_dir / "final").items():
        assert torch.equal(tensor, weights(watched.output_dir / "final")[name]), name


def test_the_long_validation_can_read_facts_where_the_task_puts_them(tmp_path):
    """curriculum.eval_long_placement "task": the long validation's samples place their facts as the task does (as
    `memformers eval` reads them), whatever share of training samples task.facts_first puts first."""
    from memformers.tasks import make_sample

    changes = {
        "task.name": "qa1",
        "task.facts_first": 1.0,
        "model.segment_size": 128,
        "curriculum.segments": [2],
        "curriculum.eval_every": 2,
        "curriculum.eval_long_segments": 3,
        "curriculum.eval_long_samples": 4,
    }
    trainer = Trainer(tiny(tmp_path, **changes, **{"curriculum.eval_long_placement": "task"}), progress=False)
    content, indices = trainer.unwrapped.content_size, list(range(6))
    own = trainer.batches.batch(indices, 3, seed=0, vary=False, placement="")
    first = trainer.batches.batch(indices, 3, seed=0, vary=False)
    for index in indices:
        for batch, facts_first in ((own, False), (first, True)):
            sample = make_sample("qa1", 3 * content, trainer.tokenizer, 0, index, "train", facts_first=facts_first)
            assert batch["input_ids"][index][batch["attention_mask"][index].bool()].tolist() == sample.ids.tolist()
    assert not torch.equal(own["input_ids"], first["input_ids"])
    trainer.train()
    longs = records(trainer.output_dir, "eval_long")
    assert longs and all(r["placement"] == "task" and r["segments"] == 3 for r in longs)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"curriculum.eval_long_placement": "first"}, "curriculum.eval_long_placement"),
        ({"curriculum.eval_long_segments": -1}, "curriculum.eval_long_segments"),
        ({"curriculum.eval_long_segments": 8, "curriculum.eval_long_samples": 0}, "curriculum.eval_long_samples"),
        ({"curriculum.eval_long_segments": 8}, "curriculum.eval_long_every"),  # eval_every is 0 in TINY
    ],
)
def test_bad_long_validation_settings_name_the_key(tmp_path, changes, key):
    with pytest.raises(ValueError, match=key):
        tiny(tmp_path, **changes)


def test_a_run_written_to_a_log_file_reports_its_progress_and_validations(tmp_path, capsys):
    """Where the output is not a terminal (`nohup … > log`), rich draws no bar: the log still gets the bar's line
    (every `every_s` seconds; here 0) and one line a validation and a stage's end."""
    config = tiny(tmp_path, **{"curriculum.threshold": 0.0, "curriculum.eval_every": 1})
    trainer = Trainer(config, progress=True, resume=False)
    original = trainer._progress_bar

    def bar_every_update():
        bar, task = original()
        bar.every_s = 0.0
        return bar, task

    trainer._progress_bar = bar_every_update
    trainer.train()
    log = capsys.readouterr().out
    assert log.count("step 1: validation at 1 segments") == 1 and "step 2: validation at 2 segments" in log
    assert "step 1: stage ends (threshold) at" in log and "; next stage: 2 segments" in log
    assert "step 2: stage ends (threshold)" in log and "; done" in log
    assert "train" in log and "2/6 loss" in log  # the bar's own line: steps done of all, the last loss


def test_the_logged_bar_prints_at_most_every_so_often_and_never_on_a_terminal():
    from rich.console import Console

    from memformers.progress import LoggedProgress

    def lines(every_s: float, terminal: bool) -> list[str]:
        console = Console(file=io.StringIO(), force_terminal=terminal, width=60)
        with LoggedProgress(console=console, every_s=every_s, transient=True) as bar:
            job = bar.add_task("reading", total=3)
            for done in range(1, 4):
                bar.update(job, completed=done)
        return [line for line in console.file.getvalue().splitlines() if "reading" in line]

    assert len(lines(0.0, terminal=False)) == 3  # one line an update
    assert lines(3600.0, terminal=False) == []  # not yet due
    assert LoggedProgress(console=Console(file=io.StringIO(), force_terminal=True)).draws_live  # rich draws there
