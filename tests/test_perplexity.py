"""Perplexity per segment index: exact bookkeeping against the driver's loss, the backbone-alone baseline, the
state's size, the held-out documents and `memformers eval --perplexity`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_backbone

import memformers as mf
from memformers.perplexity import SegmentScores, evaluate_perplexity, score_documents
from memformers.tasks import get_tokenizer, lm_documents, lm_window

S = 16  # content tokens per segment


def mechanisms() -> dict[str, mf.MemoryModel]:
    """Each mechanism around the same tiny random Llama (2 layers, 2 key-value heads of 8)."""
    return {
        "rmt": mf.RecurrentMemoryTransformer(tiny_backbone("llama"), num_memory_tokens=2, segment_size=S + 4),
        "cache": mf.SegmentCacheTransformer(tiny_backbone("llama"), segment_size=S),
        "knn": mf.MemorizingTransformer(
            tiny_backbone("llama"), memory_layers=(-1,), memory_size=40, top_k=4, segment_size=S
        ),
        "longmem": mf.LongMem(tiny_backbone("llama"), memory_size=40, chunk_size=4, top_k_chunks=2, segment_size=S),
    }


@pytest.mark.parametrize("name", ["rmt", "cache", "knn", "longmem"])
def test_segment_perplexities_add_up_to_the_drivers_loss(name):
    model = mechanisms()[name].eval()
    if name == "knn":  # open the gates, so that the memory really changes the outputs
        for layer in model.layers:
            torch.nn.init.constant_(layer.gate_bias, 2.0)
    ids = torch.randint(3, 90, (2, 4 * S + 5))  # 5 segments, the last one partial
    scores, _ = score_documents(model, ids)
    assert scores.tokens == [2 * S] * 4 + [2 * 4]  # the document's last token predicts nothing
    with torch.no_grad():
        whole = model(ids, labels=ids).loss
    torch.testing.assert_close(torch.tensor(scores.loss()), whole.double().float(), rtol=1e-5, atol=1e-5)
    for k in range(1, 5):  # the first k segments and one token more: exactly the targets predicted in 1..k
        with torch.no_grad():
            prefix = model(ids[:, : k * S + 1], labels=ids[:, : k * S + 1]).loss
        assert scores.loss(1, k) == pytest.approx(float(prefix), rel=1e-5, abs=1e-6), k
        assert scores.perplexity(1, k) == pytest.approx(math.exp(float(prefix)), rel=1e-4)


def test_no_memory_rmt_scores_each_segment_as_the_plain_backbone():
    backbone = tiny_backbone("llama")
    model = mf.RecurrentMemoryTransformer(backbone, num_memory_tokens=0, segment_size=S).eval()
    ids = torch.randint(3, 90, (3, 3 * S + 1))
    scores, floats = score_documents(model, ids)
    assert floats == 0  # the backbone alone carries nothing
    for k in range(3):
        with torch.no_grad():
            logits = backbone(ids[:, k * S : (k + 1) * S]).logits  # the segment on its own
        targets = ids[:, k * S + 1 : (k + 1) * S + 1]  # its last token predicts the next segment's first
        expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        assert scores.loss(k + 1, k + 1) == pytest.approx(float(expected), rel=1e-5), k


def test_state_size_is_read_off_the_state():
    models = mechanisms()
    ids = torch.randint(3, 90, (2, 3 * S))
    floats = {name: score_documents(model.eval(), ids)[1] for name, model in models.items()}
    assert floats["rmt"] == 2 * 32  # m × hidden
    assert floats["cache"] == 2 * 2 * 2 * S * 8  # keys and values × layers × kv heads × segment × head_dim
    assert floats["knn"] == 2 * 2 * 40 * 8  # keys and values × kv heads × memory_size × head_dim
    assert floats["longmem"] == 2 * (40 // 4) * (8 + 4 * (2 * 8 + 1))  # chunk keys + chunk payloads, per head


def test_evaluate_perplexity_batches_rows_independently():
    model = mechanisms()["rmt"].eval()
    docs = [torch.randint(3, 90, (3 * S,)) for _ in range(3)]
    together = evaluate_perplexity(model, docs, batch_size=3)
    alone = evaluate_perplexity(model, docs, batch_size=1)
    assert together["overall"] == pytest.approx(alone["overall"], rel=1e-5)
    assert together["perplexity"].keys() == {"1", "2", "3", "16+"}
    assert math.isnan(together["perplexity"]["16+"])  # no segment that far
    scores = SegmentScores()
    scores.add(0, 2.0, 1, 1)
    scores.add(17, 4.0, 2, 0)
    assert scores.summary()["perplexity"]["16+"] == pytest.approx(math.exp(2.0))


def test_lm_windows_and_documents_are_deterministic_and_held_out():
    tokenizer = get_tokenizer("minilm")
    a, b = lm_window(tokenizer, 300, seed=0, index=5), lm_window(tokenizer, 300, seed=0, index=5)
    assert a.shape == (300,) and (a == b).all()
    assert not (lm_window(tokenizer, 300, seed=0, index=6) == a).all()
    docs = lm_documents(tokenizer, 1000, 4, split="test")
    assert [len(d) for d in docs] == [1000] * 4
    assert not (docs[0] == docs[2]).all()  # the same book's next stretch
    with pytest.raises(ValueError, match="documents"):
        lm_documents(tokenizer, 200_000, 3, split="test")


def test_eval_perplexity_command_on_a_saved_model_and_on_its_bare_backbone(tmp_path):
    import transformers
    from typer.testing import CliRunner

    from memformers.cli import app
    from memformers.saving import save_pretrained

    tokenizer = get_tokenizer("minilm")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    model = mf.RecurrentMemoryTransformer(transformers.LlamaForCausalLM(config), num_memory_tokens=0, segment_size=S)
    save_pretrained(model, tmp_path / "model", tokenizer, {"tokenizer": "minilm"})
    runner = CliRunner()
    common = ["--tokens", str(3 * S), "--documents", "2", "--batch-size", "2", "--device", "cpu"]
    saved = runner.invoke(app, ["perplexity", str(tmp_path / "model"), *common, "--json", str(tmp_path / "a.json")])
    assert saved.exit_code == 0, saved.output
    assert json.loads((tmp_path / "a.json").read_text())["command"].startswith("memformers perplexity ")
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["mechanism"] == "RecurrentMemoryTransformer" and result["tokens"] == 2 * (3 * S - 1)
    assert result["perplexity"].keys() == {"1", "2", "3", "16+"}
    assert "| seg 1 |" in (tmp_path / "a.md").read_text()
    docs = [torch.from_numpy(d) for d in lm_documents(tokenizer, 3 * S, 2)]
    expected = evaluate_perplexity(model.eval(), docs, batch_size=1)
    assert result["overall"] == pytest.approx(expected["overall"], rel=1e-5)
    bare = runner.invoke(
        app,
        [
            "eval",  # the old spelling still works, with a line that says so
            str(tmp_path / "model" / "backbone"),
            "--perplexity",
            *common,
            "--segment-size",
            str(S),
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert bare.exit_code == 0, bare.output
    assert "memformers: warning: eval --perplexity is deprecated: use memformers perplexity" in bare.stderr
    assert json.loads((tmp_path / "b.json").read_text())["perplexity"] == pytest.approx(
        result["perplexity"], nan_ok=True
    )
    missing = runner.invoke(app, ["perplexity", str(tmp_path / "model" / "backbone"), *common])
    assert missing.exit_code == 2 and "segment_size" in missing.stderr
