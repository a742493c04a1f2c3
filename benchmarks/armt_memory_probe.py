"""What an ARMT model's memory tokens write, layer by layer: how open the write gates are, whether the memory
tokens write different things, and how selectively the question reads them.

    python benchmarks/armt_memory_probe.py --checkpoint checkpoints/babilong-armt --name armt_memory_probe_shipped
    python benchmarks/armt_memory_probe.py --backbone checkpoints/babilong-stage0/backbone --name armt_memory_probe_init
    python benchmarks/armt_memory_probe.py --backbone checkpoints/babilong-stage0/backbone --memory-attention causal \
        --name armt_memory_probe_init_causal

Each sample is a qa1 story with its facts first, in two segments: the first holds the story, the second noise and
the question, so everything the question learns about the story passes through the first segment's writes.
Per layer, over the first segment's m memory tokens:
- `beta`: the write strength σ(W_β m_i) (0: the layer writes nothing);
- `key_cosine` and `hidden_cosine`: the mean cosine between two different memory tokens' keys φ(W_K m_i), and
  between their outputs m_i; near 1, the m writes are copies of one, and the memory holds one association;
- `read_entropy`: for the question's tokens in the second segment, the entropy of the shares φ(q)ᵀk_i / Σ_j φ(q)ᵀk_j
  of the m keys in their read, over log m; 1 means every read is the same average of all m values;
- `read_ratio`: how large what those tokens read is beside their hidden states, ‖y‖ / ‖x‖ (0 at initialisation,
  where W_V = 0: how far training has made the memory matter to the layer).
`--backbone` wraps a backbone in a fresh ARMT (seed 0) to show the same numbers at initialisation. Writes
results/NAME.json.
"""

from __future__ import annotations

import argparse
import math

import torch
from common import write_result

import memformers as mf
from memformers.cli.checkpoints import checkpoint_tokenizer
from memformers.evaluation import sample_segments
from memformers.saving import read_config
from memformers.tasks import make_sample

QUESTION_TOKENS = 8  # the last content tokens of the second segment: "where is mary ?" and its neighbours


def pairwise_cosine(x: torch.Tensor) -> float:  # x [batch, m, d] → mean cosine over pairs i ≠ j
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = unit @ unit.transpose(1, 2)  # [batch, m, m]
    m = x.shape[1]
    return float((cosine.sum((1, 2)) - cosine.diagonal(dim1=1, dim2=2).sum(-1)).mean() / (m * (m - 1)))


def recording(method, store: dict, index: int, first_call: bool):
    """`method` (a layer's read or write), keeping its first argument in `store[index]` on the way: from its
    first call (the write's memory outputs of the first segment) or its last (the read's hidden states)."""

    def call(tensor: torch.Tensor, *rest, **options):
        if not (first_call and index in store):
            store[index] = tensor.detach()
        return method(tensor, *rest, **options)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default="checkpoints/babilong-armt", help="A saved ARMT model.")
    source.add_argument("--backbone", help="A backbone to wrap in a fresh ARMT instead.")
    parser.add_argument("--num-memory-tokens", type=int, default=16, help="With --backbone.")
    parser.add_argument("--segment-size", type=int, default=512, help="With --backbone.")
    parser.add_argument("--tokenizer", default="minilm", help="With --backbone.")
    parser.add_argument("--memory-attention", choices=("full", "causal"), help="With --backbone (ARMTConfig).")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="armt_memory_probe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.backbone:
        options = {"num_memory_tokens": args.num_memory_tokens, "segment_size": args.segment_size}
        options["memory_attention"] = args.memory_attention
        model, tokenizer = mf.AssociativeMemoryTransformer(args.backbone, **options), args.tokenizer
    else:
        model = mf.load(args.checkpoint)
        tokenizer = checkpoint_tokenizer(args.checkpoint, read_config(args.checkpoint))
    if not isinstance(model, mf.AssociativeMemoryTransformer):
        parser.error(f"--checkpoint: an ARMT model is needed, got {type(model).__name__}")
    model.eval()
    length = 2 * model.content_size - 100  # two segments; the story's facts fit in the first
    samples = [make_sample("qa1", length, tokenizer, 0, i, "test", facts_first=True) for i in range(args.samples)]
    first, second = sample_segments(samples, model.content_size, model.alignment)
    writes: dict[int, torch.Tensor] = {}  # layer → the first segment's memory outputs [batch, m, hidden]
    reads: dict[int, torch.Tensor] = {}  # layer → hidden states entering it in the second segment [batch, L, hidden]
    for index, layer in enumerate(model.layers):  # this instance only: record what each layer writes and reads
        layer.write = recording(layer.write, writes, index, first_call=True)
        layer.read = recording(layer.read, reads, index, first_call=False)
    with torch.no_grad():
        _, state = model.step(first, model.init_state(len(samples)))
        model.step(second, state)
    ends = model.prefix + second.attention_mask.sum(1)  # [batch] after ([CLS] and) the content: the question ends
    layers = []
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            memory = writes[index].float()  # [batch, m, hidden]
            keys, _, beta = layer.write_terms(memory)  # [batch, m, d_key], [batch, m]
            hidden = reads[index]
            question = torch.stack([hidden[row, end - QUESTION_TOKENS : end] for row, end in enumerate(ends.tolist())])
            queries = layer.queries(question).float()  # [batch, q, d_key]
            scores = queries @ keys.transpose(1, 2)  # [batch, q, m]
            shares = scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)
            entropy = -(shares * shares.clamp_min(1e-12).log()).sum(-1) / math.log(shares.shape[-1])
            unrecorded = type(layer).read  # the method itself: the instance's is wrapped by `recording`
            read = unrecorded(layer, question, state.matrix[index], state.normalizer[index]).float()  # [b, q, hidden]
            ratio = read.norm(dim=-1) / question.float().norm(dim=-1).clamp_min(1e-12)
            row = {
                "layer": model.memory_blocks[index],
                "beta": round(float(beta.mean()), 4),
                "beta_range": [round(float(beta.min()), 4), round(float(beta.max()), 4)],
                "key_cosine": round(pairwise_cosine(keys), 4),
                "hidden_cosine": round(pairwise_cosine(memory), 4),
                "read_entropy": round(float(entropy.mean()), 4),
                "read_top_share": round(float(shares.max(-1).values.mean()), 4),
                "read_ratio": round(float(ratio.mean()), 4),
            }
            layers.append(row)
            print(row)
    source = {"backbone": args.backbone} if args.backbone else {"checkpoint": args.checkpoint}
    result = source | {"num_memory_tokens": model.num_memory_tokens, "samples": args.samples, "length": length}
    result["memory_attention"] = model.config.memory_attention
    print(write_result(args.name, result | {"layers": layers}))


if __name__ == "__main__":
    main()
