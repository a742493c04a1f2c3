"""Give chosen layers of a saved ARMT model a fresh memory: W_V = 0 (they read nothing, as at initialisation) and
W_β = 0 with a zero bias (every write at strength σ(0) = 0.5), everything else kept.

    python scripts/armt_restart_layers.py checkpoints/babilong-armt runs/armt_restart/model --layers 0,1,2,3,4

Why: a trained model whose write gates β fell to ~0 in some layers (benchmarks/armt_memory_probe.py shows them)
gets almost no gradient through them again (σ' = β(1 − β)), so training alone does not reopen them. The output
model computes what the input did wherever those layers wrote nothing.
"""

from __future__ import annotations

import argparse

import torch

import memformers as mf
from memformers.saving import read_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="A saved ARMT model.")
    parser.add_argument("output", help="Folder for the new model.")
    parser.add_argument("--layers", required=True, help="Comma-separated layer indices, e.g. 0,1,2,3,4.")
    args = parser.parse_args()
    model = mf.load(args.model)
    if not isinstance(model, mf.AssociativeMemoryTransformer):
        parser.error(f"model: an ARMT model is needed, got {type(model).__name__}")
    try:
        layers = sorted({int(index) for index in args.layers.split(",")})
    except ValueError:
        parser.error(f"--layers: comma-separated ints, got {args.layers!r}")
    if not layers or not set(layers) <= set(model.memory_blocks):
        parser.error(f"--layers: blocks with a memory, {list(model.memory_blocks)}, got {args.layers!r}")
    with torch.no_grad():
        for block in layers:
            memory = model.layers[model.memory_blocks.index(block)]
            memory.value.weight.zero_()
            memory.beta.weight.zero_()
            memory.beta.bias.zero_()
    extra = read_config(args.model).get("extra", {}) | {"restarted_layers": layers, "restarted_from": args.model}
    print(mf.save_pretrained(model, args.output, extra=extra))


if __name__ == "__main__":
    main()
