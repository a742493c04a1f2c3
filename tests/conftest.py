"""Tiny random-weight backbones of every supported family, built in code (no downloads)."""

from __future__ import annotations

import pytest
import torch
import transformers

VOCAB = 96
HIDDEN = 32


def _common(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, **extra)


def tiny_config(family: str):
    """A 2-layer, 32-wide config of `family`, deterministic and fast on a CPU.

    Weights are drawn wider than the families' defaults (std 0.2) so that a random model's attention is not
    nearly uniform and information visibly moves through it.
    """
    config = _tiny_config(family)
    config.initializer_range = 0.2
    return config


def _tiny_config(family: str):
    if family == "bert":
        return transformers.BertConfig(**_common(intermediate_size=64, max_position_embeddings=256))
    if family == "roberta":
        return transformers.RobertaConfig(**_common(intermediate_size=64, max_position_embeddings=260, pad_token_id=1))
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "llama":
        return transformers.LlamaConfig(
            **_common(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256)
        )
    if family == "qwen2":
        return transformers.Qwen2Config(
            **_common(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256)
        )
    if family == "mistral":
        return transformers.MistralConfig(
            **_common(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256, sliding_window=None)
        )
    if family == "opt":
        return transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=256,
            word_embed_proj_dim=HIDDEN,
        )
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(**_common(intermediate_size=64, max_position_embeddings=256))
    raise KeyError(family)


ENCODERS = ("bert", "roberta")
DECODERS = ("gpt2", "llama", "qwen2", "mistral", "opt", "gpt_neox")


def tiny_backbone(family: str, head: str = "token", num_labels: int = 6, seed: int = 0):
    """A random-weight backbone in eval mode (no dropout), so outputs are exactly reproducible."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    if family in ENCODERS:
        auto = {
            "token": transformers.AutoModelForMaskedLM,
            "classification": transformers.AutoModelForSequenceClassification,
            "none": transformers.AutoModel,
        }[head]
        if head == "classification":
            config.num_labels = num_labels
    else:
        auto = {"token": transformers.AutoModelForCausalLM, "none": transformers.AutoModel}[head]
    model = auto.from_config(config)
    return model.eval()


def open_knn_gates(model, gate_bias: float = 50.0):
    """A MemorizingTransformer whose memory layers read memory wherever there is some (gates near 1)."""
    with torch.no_grad():
        for layer in model.layers:
            layer.mix.fill_(1.0)
            layer.gate_bias.fill_(gate_bias)
    return model


def tiny_longmem(family: str = "llama", segment_size: int = 16, gate_bias: float = 50.0):
    """A LongMem on a 4-layer random decoder, its fusion gate open so that memory visibly matters."""
    import memformers as mf

    torch.manual_seed(0)
    config = tiny_config(family)
    config.num_hidden_layers = 4
    backbone = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = mf.LongMem(backbone, memory_size=64, chunk_size=4, top_k_chunks=3, segment_size=segment_size)
    with torch.no_grad():
        model.fusion.gate_bias.fill_(gate_bias)
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Token ids clear of the tiny vocabularies' special ids (0-4)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, 90, (batch, length), generator=generator)


def assert_batch_generates_as_rows_alone(model) -> torch.Tensor:
    """Greedy generation over a padded batch of two rows (3 and 2 segments and a bit) equals each row's own; returns
    the batch's ids, for the caller's checks of what the memory read."""
    c = model.content_size
    ids = random_ids(2, 3 * c + 4)
    mask = torch.ones_like(ids)
    mask[1, 2 * c + 1 :] = 0
    together = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    first = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    second = model.generate(ids[1:, : 2 * c + 1], max_new_tokens=6, do_sample=False)
    assert together.shape == (2, 6)
    assert torch.equal(together[0], first[0]) and torch.equal(together[1], second[0])
    return ids
