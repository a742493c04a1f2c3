"""Training-step time with and without skipping the LM-head logits nobody reads, on the CPU-tier decoder QA run.

    python benchmarks/logits_skipping.py                        # configs/cpu_decoder_qa12.toml at 1, 2, 4 segments
    python benchmarks/logits_skipping.py --rounds 5 --segments 1 4 --batch-size 8

The question-answering loss sits on a few answer tokens of the last segment, so with the skip the LM head (a
30,522-way projection for a 3-layer, 128-wide Llama) runs on those positions only; without it
(`model.skip_unused_logits = False`) it runs on every position of every segment, as before. Two timings per
number of segments, each round running the skip on and off back to back (the ratio of medians within one run is
what to read; the machine is noisy):
- `train_step`: the trainer's whole optimizer step (batch building, forward, backward, clipping, update);
- `forward_backward`: the model's forward and backward on one fixed batch, where the loss and gradients with and
  without the skip must be equal (their largest differences are recorded).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import write_result
from rich.progress import track

from memformers.training import Trainer
from memformers.training_config_parsing import load_config


def forward_backward(trainer: Trainer, batch: dict, skip: bool) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(seconds, loss, gradients) of one forward and backward with the skip on or off."""
    model = trainer.unwrapped
    model.skip_unused_logits = skip
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model(**batch, logits=trainer._logits_mode)
    out.loss.backward()
    seconds = time.perf_counter() - start
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return seconds, float(out.loss.detach()), grads


def train_step(trainer: Trainer, skip: bool) -> float:
    trainer.unwrapped.skip_unused_logits = skip
    start = time.perf_counter()
    trainer.train_step()
    return time.perf_counter() - start


def measure(trainer: Trainer, segments: int, rounds: int) -> dict:
    trainer.state.stage = trainer.stages.index(segments)
    batch = trainer.batches.batch(list(range(trainer.micro_batch)), segments, trainer.seed, vary=False)
    trainer.unwrapped.train()
    times: dict[str, list[float]] = {"fb_skip": [], "fb_full": [], "step_skip": [], "step_full": []}
    _, loss_skip, grads_skip = forward_backward(trainer, batch, True)  # warm-up, and the equality check
    _, loss_full, grads_full = forward_backward(trainer, batch, False)
    max_grad_diff = max(float((grads_skip[k] - grads_full[k]).abs().max()) for k in grads_full)
    for _ in track(range(rounds), description=f"{segments} segment(s)"):
        for skip in (True, False):
            seconds, _, _ = forward_backward(trainer, batch, skip)
            times["fb_skip" if skip else "fb_full"].append(seconds)
        for skip in (True, False):
            times["step_skip" if skip else "step_full"].append(train_step(trainer, skip))
    median = {key: statistics.median(values) for key, values in times.items()}
    return {
        "segments": segments,
        "tokens_per_row": int(batch["attention_mask"].sum(1).max()),
        "loss_skip": loss_skip,
        "loss_full": loss_full,
        "max_grad_abs_diff": max_grad_diff,
        "seconds": times,
        "median_seconds": median,
        "forward_backward_speedup": median["fb_full"] / median["fb_skip"],
        "train_step_speedup": median["step_full"] / median["step_skip"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cpu_decoder_qa12.toml")
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="logits_skipping")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as output:
        overrides = {
            "output.dir": output,
            "curriculum.segments": sorted(set(args.segments)),
            "curriculum.vary_segments": False,  # every sample of a step has exactly `segments` segments
        }
        if args.batch_size is not None:
            overrides["optim.batch_size"] = args.batch_size
        config = load_config(args.config, overrides)
        trainer = Trainer(config, progress=False)
        results = []
        for segments in args.segments:
            result = measure(trainer, segments, args.rounds)
            results.append(result)
            m = result["median_seconds"]
            print(
                f"{segments} segment(s): forward+backward {m['fb_full']:.3f} s → {m['fb_skip']:.3f} s "
                f"(×{result['forward_backward_speedup']:.2f}); train step {m['step_full']:.3f} s → "
                f"{m['step_skip']:.3f} s (×{result['train_step_speedup']:.2f}); loss {result['loss_full']:.6f} vs "
                f"{result['loss_skip']:.6f}, max |Δgrad| {result['max_grad_abs_diff']:.2e}"
            )
    path = write_result(
        args.name,
        {
            "config": args.config,
            "batch_size": config.optim.batch_size,
            "rounds": args.rounds,
            "threads": args.threads,
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
