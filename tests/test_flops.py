"""The FLOPs model: the RMT paper's ratios, linear against quadratic growth, HF configs, the CLI, clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import transformers
from conftest import tiny_config
from typer.testing import CliRunner

from memformers import flops
from memformers.cli import app

PAPER_LENGTH = 4096 * 499  # 2,043,904 tokens: 4096 segments of 512 positions, 10 memory tokens


@pytest.mark.parametrize(("config", "paper"), [("opt-125m", 295), ("opt-175b", 29)])
def test_paper_ratios(config, paper):
    """Memory counted: 277 and 27.7 (6% and 4.5% under); the paper's convention (every 512 input tokens one
    512-position segment, `overhead=0`) at 4096·512 tokens: within 1.5%."""
    ours = flops.compare(config, PAPER_LENGTH, segment_size=512, memory_tokens=10).ratio
    assert ours == pytest.approx(paper, rel=0.07)
    assert ours < paper  # the memory positions cost compute the paper's figure does not count
    convention = flops.compare(config, 4096 * 512, segment_size=512, memory_tokens=10, overhead=0).ratio
    assert convention == pytest.approx(paper, rel=0.015)


def test_opt_table():
    spec = flops.OPT_CONFIGS["opt-175b"]
    assert (spec.layers, spec.d_model, spec.heads, spec.ffn) == (96, 12288, 96, 4 * 12288)
    assert flops.OPT_CONFIGS["opt-125m"].non_embedding_params == 12 * 12 * 768**2  # 85M without embeddings
    assert len(flops.OPT_CONFIGS) == 9


def test_rmt_is_linear_and_full_attention_quadratic():
    n = 512 * 499
    rmt = [flops.rmt_flops("opt-1.3b", k * n) for k in (1, 2, 4)]
    assert rmt[1] == pytest.approx(2 * rmt[0]) and rmt[2] == pytest.approx(4 * rmt[0])
    spec = flops.OPT_CONFIGS["opt-1.3b"]
    full = [flops.full_attention_flops(spec, k * n) for k in (1, 2, 4)]
    linear = [k * n * 2 * spec.weight_params for k in (1, 2, 4)]
    quadratic = [f - lin for f, lin in zip(full, linear, strict=True)]  # the attention term alone
    assert quadratic[1] == pytest.approx(4 * quadratic[0]) and quadratic[2] == pytest.approx(16 * quadratic[0])
    # one segment's worth of input costs the same either way (no memory overhead)
    assert flops.rmt_flops(spec, 512, 512, 0, overhead=0) == flops.full_attention_flops(spec, 512)


def test_knn_and_longmem_become_linear_once_memory_is_full():
    step = 1 << 20
    for fn in (flops.knn_flops, flops.longmem_flops):
        a, b, c = (fn("opt-125m", k * step) for k in (1, 2, 3))
        assert c - b == pytest.approx(b - a, rel=1e-6)  # 65,536-token store full after the first 1M
        assert fn("opt-125m", 4096) < flops.full_attention_flops("opt-125m", 1 << 21)


def test_config_from_hf_object_and_folder(tmp_path):
    config = tiny_config("llama")  # 2 layers, 32 wide, 4 heads, 2 kv heads, ffn 64, SwiGLU
    spec = flops.resolve_spec(config)
    assert (spec.layers, spec.d_model, spec.ffn, spec.heads, spec.kv_heads, spec.gated) == (2, 32, 64, 4, 2, True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    embeddings = config.vocab_size * config.hidden_size
    counted = sum(p.numel() for name, p in model.named_parameters() if "norm" not in name) - 2 * embeddings
    assert spec.non_embedding_params == counted
    config.save_pretrained(tmp_path)
    assert dataclasses.replace(flops.resolve_spec(tmp_path), name=spec.name) == spec
    opt = flops.resolve_spec(transformers.OPTConfig(hidden_size=64, num_hidden_layers=3, ffn_dim=128))
    assert (opt.layers, opt.d_model, opt.ffn, opt.gated) == (3, 64, 128, False)
    gpt2 = flops.resolve_spec(tiny_config("gpt2"))
    assert (gpt2.layers, gpt2.d_model, gpt2.ffn) == (2, 32, 128)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: flops.full_attention_flops("opt-125m", 0), "length"),
        (lambda: flops.rmt_flops("opt-125m", 100, segment_size=12, memory_tokens=10), "segment_size=12"),
        (lambda: flops.rmt_flops("opt-125m", 100, memory_tokens=-1), "memory_tokens"),
        (lambda: flops.rmt_flops("opt-125m", 100, layout="sideways"), "layout"),
        (lambda: flops.resolve_spec("opt-7b"), "opt-125m"),
        (lambda: flops.knn_flops("opt-125m", 100, memory_layers=13), "memory_layers=13"),
        (lambda: flops.ModelSpec("x", 0, 8, 8, 1, 8), "layers"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cli_json_table_and_plot(tmp_path):
    runner = CliRunner()
    args = ["flops", "--config", "opt-125m", "--length", str(PAPER_LENGTH), "--segment-size", "512"]
    result = runner.invoke(app, [*args, "--memory-tokens", "10", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ratio"] == pytest.approx(277.0, rel=1e-3)
    assert report["full_attention_flops"] > report["rmt_flops"] and "knn_flops" in report
    plot = tmp_path / "flops.png"
    result = runner.invoke(app, ["flops", "--config", "opt-175b", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "2M" in result.output and plot.stat().st_size > 1000
    result = runner.invoke(app, ["flops", "--config", "opt-9b"])
    assert result.exit_code != 0 and "opt-125m" in result.output
