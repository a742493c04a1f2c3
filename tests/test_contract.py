"""What every mechanism owes the driver and the user: exact gradients under checkpointing, states that are values,
and a backbone that is the same after the mechanism has been built and run."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import VOCAB, tiny_backbone, tiny_config

import memformers as mf
from memformers.knn import KNNStore

SEGMENT = 16


def build(name: str, backbone):
    """Each mechanism on `backbone`, with its memory visibly read (kNN mix at 0.5, LongMem gate open)."""
    if name == "rmt":
        return mf.RecurrentMemoryTransformer(backbone, num_memory_tokens=2, segment_size=SEGMENT + 4)
    if name == "knn":
        model = mf.MemorizingTransformer(backbone, memory_layers=(-1,), memory_size=64, top_k=4, segment_size=SEGMENT)
        with torch.no_grad():
            for layer in model.layers:
                layer.mix.fill_(0.5)
        return model
    if name == "longmem":
        model = mf.LongMem(backbone, memory_size=64, chunk_size=4, top_k_chunks=3, segment_size=SEGMENT)
        with torch.no_grad():
            model.fusion.gate_bias.fill_(1.0)
        return model
    if name == "cache":
        return mf.SegmentCacheTransformer(backbone, segment_size=SEGMENT)
    if name == "armt":
        model = mf.AssociativeMemoryTransformer(backbone, num_memory_tokens=2, segment_size=SEGMENT + 2, d_mem=4)
        with torch.no_grad():
            for layer in model.layers:  # W_V starts at 0 (nothing read); as after training, it writes something
                layer.value.weight.normal_(0, 0.2)
        return model
    raise KeyError(name)


MECHANISMS = ("rmt", "armt", "knn", "longmem", "cache")


def four_layer_llama():
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.num_hidden_layers = 4  # LongMem's SideNet needs an even count
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def tensors_of(value) -> list[torch.Tensor]:
    """Every tensor a state holds, in a fixed order (dataclasses, stores, lists and tuples); of a kNN store, what
    it holds: each row's entries and its count (slots past a row's size are never read, so never compared)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, KNNStore):
        return [value.count] + [t for row in range(value.batch_size) for t in value.entries(row)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_of(item)]
    if hasattr(value, "__dict__"):
        return [t for key in sorted(vars(value)) for t in tensors_of(vars(value)[key])]
    return []


@pytest.mark.parametrize("name", MECHANISMS)
def test_checkpointing_gives_the_same_loss_gradients_and_state(name: str) -> None:
    model = build(name, four_layer_llama())
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT))
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads, [t.detach().clone() for t in tensors_of(out.state)]))
    (loss, grads, state), (loss_c, grads_c, state_c) = results
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-6)
    assert grads and grads.keys() == grads_c.keys()
    for key in grads:
        torch.testing.assert_close(grads_c[key], grads[key], rtol=0, atol=1e-6, msg=key)
    assert len(state) == len(state_c) and state
    for a, b in zip(state, state_c, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", MECHANISMS)
def test_a_step_never_changes_the_state_it_was_given(name: str) -> None:
    model = build(name, four_layer_llama())
    ids = torch.randint(0, VOCAB, (2, SEGMENT))
    with torch.no_grad():
        _, state = model.step(ids, model.init_state(2))
        before = [t.clone() for t in tensors_of(state)]
        _, after = model.step(ids, state)
    assert after is not state
    assert all(torch.equal(a, b) for a, b in zip(before, tensors_of(state), strict=True))


def fingerprint(module: torch.nn.Module) -> list:
    """What a mechanism must leave as it was: flags, hooks, patched methods and modes of every submodule."""
    out = []
    for name, child in module.named_modules():
        hooks = (child._forward_hooks, child._forward_pre_hooks, child._backward_hooks, child._backward_pre_hooks)
        patched = sorted(key for key, value in vars(child).items() if callable(value) and not key.startswith("_"))
        out.append((name, child.training, [len(h) for h in hooks], patched))
    out += [(name, p.requires_grad, p.grad is None) for name, p in module.named_parameters()]
    return out


def test_every_mechanism_trains_in_turn_on_one_backbone_which_stays_as_it_was() -> None:
    """The README's "Use": one backbone, every mechanism built on it, each trained a step in turn."""
    backbone = four_layer_llama()
    ids = torch.randint(0, VOCAB, (2, 2 * SEGMENT))
    with torch.no_grad():  # transformers installs its own output-capturing hooks on a first call
        backbone(ids, output_hidden_states=True)
    before = fingerprint(backbone)
    weights = {name: p.detach().clone() for name, p in backbone.named_parameters()}
    models = {name: build(name, backbone) for name in MECHANISMS}
    assert fingerprint(backbone) == before  # built: nothing changed
    for name, model in models.items():
        trainable = [p for _, p in model.trainable_parameters()]
        optimizer = torch.optim.SGD(trainable, lr=1e-2)
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None for p in trainable), name  # every trainable weight gets a gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2)
    assert fingerprint(backbone) == before  # run, trained and generated from: still nothing changed
    longmem = models["longmem"]
    assert not any(name.startswith("backbone.") for name, _ in longmem.trainable_parameters())
    # The frozen backbone of LongMem kept its weights; the others trained it (their trainable set includes it).
    changed = [name for name, p in backbone.named_parameters() if not torch.equal(p, weights[name])]
    assert changed


def test_a_frozen_backbone_gets_no_gradient_and_keeps_its_flags() -> None:
    backbone = tiny_backbone("llama")
    model = mf.MemorizingTransformer(backbone, memory_layers=(-1,), memory_size=64, top_k=4, segment_size=SEGMENT)
    model.freeze_backbone = True
    ids = torch.randint(0, VOCAB, (1, 2 * SEGMENT))
    model(ids, labels=ids).loss.backward()
    assert all(p.requires_grad and p.grad is None for p in backbone.parameters())
    assert {name for name, _ in model.trainable_parameters()} == {"layers.0.gate_bias", "layers.0.mix"}
    assert model.layers[0].mix.grad is not None


def test_configs_check_themselves_and_name_the_knob() -> None:
    for make, knob in (
        (lambda: mf.RMTConfig(num_memory_tokens=-1), "num_memory_tokens"),
        (lambda: mf.KNNConfig(top_k=0), "top_k"),
        (lambda: mf.KNNConfig(memory_layers=()), "memory_layers"),
        (lambda: mf.LongMemConfig(memory_size=10, chunk_size=4), "memory_size"),
        (lambda: mf.CacheConfig(alignment="middle"), "alignment"),
        (lambda: mf.CacheConfig(segment_size=0), "segment_size"),
    ):
        with pytest.raises(ValueError, match=knob):
            make()
    backbone = tiny_backbone("llama")
    with pytest.raises(ValueError, match="topk: not a knob of KNNConfig"):
        mf.MemorizingTransformer(backbone, topk=3)
    model = mf.MemorizingTransformer(backbone, mf.KNNConfig(memory_layers=[-1], segment_size=SEGMENT))
    assert model.config.memory_layers == (-1,) and model.top_k == 32  # knobs read through the config
    model.top_k = 4  # and written through it, checked again
    assert model.config.top_k == 4 and model.config_dict()["top_k"] == 4
    with pytest.raises(ValueError, match="top_k"):
        model.top_k = 0
    assert model.config.top_k == 4


def test_every_registered_mechanism_saves_and_loads_through_the_registry(tmp_path) -> None:
    backbone = four_layer_llama()
    for name in MECHANISMS:
        model = build(name, backbone)
        assert mf.MECHANISMS[name].model is type(model) and isinstance(model.config, mf.MECHANISMS[name].config)
        model.save_pretrained(tmp_path / name)
        loaded = mf.load(tmp_path / name)
        assert type(loaded) is type(model) and loaded.config == model.config


def test_the_library_never_imports_its_cli() -> None:
    import subprocess
    import sys

    code = (
        "import sys, memformers, memformers.bench, memformers.bench_results, memformers.training,"
        " memformers.evaluation, memformers.babilong_files, memformers.perplexity;"
        "assert 'memformers.cli' not in sys.modules, 'memformers.cli imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", ["bert", "gpt2"])  # gpt2 ties its output head to the embeddings
def test_a_model_stored_in_float16_halves_its_files_and_loads_back_in_float32(tmp_path, family) -> None:
    torch.manual_seed(0)
    ids = {"cls_token_id": 1, "sep_token_id": 2} if family == "bert" else {}
    model = mf.RecurrentMemoryTransformer(tiny_backbone(family), num_memory_tokens=2, segment_size=16, **ids)
    model.save_pretrained(tmp_path / "float32")
    model.save_pretrained(tmp_path / "float16", dtype="float16")
    assert {n: t.dtype for n, t in model.state_dict().items()} == {
        n: t.dtype for n, t in mf.load(tmp_path / "float32").state_dict().items()
    }, "saving must not change the model it saves"

    def size(folder):
        return sum(f.stat().st_size for f in (tmp_path / folder).rglob("*.safetensors"))

    assert 0.45 < size("float16") / size("float32") < 0.55  # tied weights written once, as in float32
    half = mf.load(tmp_path / "float16")
    for name, tensor in model.state_dict().items():
        loaded = half.state_dict()[name]
        assert loaded.dtype == tensor.dtype, name
        torch.testing.assert_close(loaded, tensor.half().to(tensor.dtype), rtol=0, atol=0, msg=name)
    ids = torch.randint(3, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(half(ids).logits, model.eval()(ids).logits, rtol=0.02, atol=0.02)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        model.save_pretrained(tmp_path / "int8", dtype="int8")
