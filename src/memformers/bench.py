"""Side by side: speed and memory of every mechanism on one decoder backbone and one input.

Why: a memory mechanism is worth its complexity only where it beats reading the whole input with full attention,
and only if its own cost stays flat as the input grows. So every mechanism (RMT, kNN memory, LongMem, the segment
cache) and the backbone with full attention (one SDPA forward over the whole input) read the *same* random token
ids with the *same* backbone weights (a fresh copy per mechanism, so no mechanism's hooks or frozen parameters leak
into another's run), and we measure:

- inference: tokens/s and peak memory at each length, streaming one document (`profiling.stream_throughput`); full
  attention as one forward pass whose LM head runs segment by segment (logits are discarded as streaming does);
- training: the time of one forward + backward over 1, 2, 4, 8 segments (full back-propagation through them);
- where a measurement would exceed the time budget (predicted from the previous lengths) or memory, it is skipped
  and the record says why.

Peak memory: `PeakMemory` (CPU: live tensors; CUDA: the allocator's peak).

This module measures: the settings, the models it builds, the clock, the records of a run and RMT's model FLOPs
utilisation. What the records say (the crossover with full attention, tables, plots) is read in `bench_results`,
which needs no model and no device.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
import transformers

from . import backbone_layers, backbones, registry
from . import flops as flops_model
from .mechanism import MemoryModel
from .profiling import PeakMemory, peak_rss_bytes, reset_peak_rss, stream_throughput
from .segments import count_segments, stream_segments

MECHANISMS = (*registry.MECHANISMS, "full")  # every registered mechanism, and the backbone with full attention
LABELS = {name: m.label for name, m in registry.MECHANISMS.items()} | {"full": "full attention"}
DEFAULT_LENGTHS = (1024, 2048, 4096, 16_384, 65_536, 262_144, 1_048_576)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Record = dict
OnRecord = Callable[[Record], None]
Progress = Callable[[str, "int | None"], AbstractContextManager]  # (description, segments) → yields a callback


@dataclass
class BenchSettings:
    """Everything a run depends on; recorded in full beside the numbers."""

    backbone: str = "tiny"  # "tiny": a random-weight Llama built in code; else a name/folder for backbones.load
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    segment_size: int = 512
    device: str = "cpu"
    dtype: str = "fp32"
    mechanisms: tuple[str, ...] = MECHANISMS
    train_segments: tuple[int, ...] = (1, 2, 4, 8)
    train_batch: int = 1
    repeats: int = 3  # timed training steps after one warm-up; the median is reported
    time_budget_s: float = 150.0  # a cell predicted to take longer is skipped
    memory_up_to: int = 65_536  # CPU: the metered memory pass of recurrent mechanisms up to this length
    memory_tokens: int = 16  # RMT decoder: content = segment_size − 2m; ARMT decoder: segment_size − m
    armt_d_mem: int = 64  # ARMT's associative keys: 2·3·d_mem features per layer
    knn_memory_size: int = 65_536
    knn_top_k: int = 32
    knn_layer: int = -1
    longmem_memory_size: int = 65_536
    longmem_chunk_size: int = 4
    longmem_top_k_chunks: int = 16
    seed: int = 0
    tiny: dict = field(default_factory=lambda: {"hidden": 128, "layers": 2, "heads": 4, "vocab": 2048})

    def check(self) -> BenchSettings:
        """Fail early, naming the argument and what is allowed."""
        unknown = [m for m in self.mechanisms if m not in MECHANISMS]
        if not self.mechanisms or unknown:
            raise ValueError(f"mechanisms must be a non-empty subset of {MECHANISMS}, got {tuple(self.mechanisms)}")
        for name in ("lengths", "train_segments"):
            values = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be integers ≥ 1, got {tuple(values)}")
        if not self.lengths:
            raise ValueError("lengths must hold at least one length, got ()")
        if not isinstance(self.segment_size, int) or self.segment_size <= 2 * self.memory_tokens:
            raise ValueError(
                f"segment_size must be an int > 2·memory_tokens = {2 * self.memory_tokens} (the RMT decoder spends "
                f"2m positions on memory), got {self.segment_size!r}"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda': no CUDA device is available here; use device='cpu'")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in ("train_batch", "repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {getattr(self, name)!r}")
        if not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 seconds, got {self.time_budget_s!r}")
        return self

    def knobs(self, name: str) -> dict:
        """The knobs these settings give mechanism `name` (its config's defaults for the rest)."""
        chosen = {
            "rmt": {"num_memory_tokens": self.memory_tokens},
            "armt": {"num_memory_tokens": self.memory_tokens, "d_mem": self.armt_d_mem},
            "knn": {"memory_layers": (self.knn_layer,), "memory_size": self.knn_memory_size, "top_k": self.knn_top_k},
            "longmem": {
                "memory_size": self.longmem_memory_size,
                "chunk_size": self.longmem_chunk_size,
                "top_k_chunks": self.longmem_top_k_chunks,
            },
        }
        return chosen.get(name, {})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# --- building ---------------------------------------------------------------------------------------------------


def build_backbone(settings: BenchSettings) -> transformers.PreTrainedModel:
    """The decoder every mechanism wraps, freshly built (same weights every call), on the device, in eval mode."""
    dtype = DTYPES[settings.dtype]
    if settings.backbone == "tiny":
        t = settings.tiny
        config = transformers.LlamaConfig(
            vocab_size=t["vocab"],
            hidden_size=t["hidden"],
            intermediate_size=t["hidden"] * 8 // 3,
            num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"],
            num_key_value_heads=t["heads"],
            # full attention reads the whole input: positions for the longest length (rotary: computed on the fly)
            max_position_embeddings=max(
                max(settings.lengths), settings.segment_size * max(settings.train_segments, default=1)
            ),
            attn_implementation="sdpa",
        )
        torch.manual_seed(settings.seed)
        model = transformers.LlamaForCausalLM(config)
    else:
        model, _ = backbones.load(settings.backbone)
        if not backbones.describe(model).is_decoder:
            raise ValueError(f"backbone: the benchmark needs a decoder, got {type(model).__name__}")
    return model.to(device=settings.device, dtype=dtype).eval()


def describe_backbone(settings: BenchSettings) -> dict:
    """The backbone's shape and attention implementation, for the record."""
    backbone = build_backbone(settings)
    config = backbone.config
    summary = (
        f"{type(backbone).__name__}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads, vocab {config.vocab_size}"
    )
    return {
        "summary": summary,
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "attention": config._attn_implementation,
        "weights": "random (seeded)" if settings.backbone == "tiny" else settings.backbone,
    }


def build_mechanism(name: str, settings: BenchSettings) -> tuple[MemoryModel | None, transformers.PreTrainedModel]:
    """(mechanism, its backbone); `None` for full attention, which is the backbone itself."""
    backbone = build_backbone(settings)
    s = settings.segment_size
    if name == "full":
        return None, backbone
    model = registry.get(name).model(backbone, segment_size=s, **settings.knobs(name))
    return model.to(device=settings.device, dtype=DTYPES[settings.dtype]).eval(), backbone


def token_chunks(length: int, vocab: int, seed: int, device: str, chunk: int = 4096) -> Iterator[torch.Tensor]:
    """The benchmark's input, chunk by chunk (never whole in memory): identical for every mechanism."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, length, chunk):
        yield torch.randint(0, vocab, (min(chunk, length - start),), generator=generator).to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Seconds a block takes: on a CPU the process's CPU time (the machine may be shared with other work, whose
    load wall time would measure too), on CUDA wall time after synchronising. Wall time is kept beside it."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = self.wall_seconds = 0.0

    def __enter__(self) -> Stopwatch:
        _sync(self.device)
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.wall_seconds = time.perf_counter() - self._wall
        self.seconds = self.wall_seconds if self.device == "cuda" else time.process_time() - self._cpu


# --- measuring --------------------------------------------------------------------------------------------------


def no_progress(description: str, total: int | None) -> nullcontext:
    """Progress display off (the default): the driver gets no callback."""
    return nullcontext(None)


def measure_inference(
    name: str,
    model: MemoryModel | None,
    backbone,
    length: int,
    settings: BenchSettings,
    progress: Progress = no_progress,
) -> Record:
    """Read `length` tokens once: tokens/s, peak memory (bytes) and the process's peak resident memory.

    Time is taken without the CPU's live-tensor meter, which slows a mechanism of many small operations by up to
    a third (full attention, a few large ones, hardly at all); on the CPU a second, metered pass (the CLI's
    `profiling.stream_throughput`) measures memory, up to `memory_up_to` tokens. CUDA: one pass, the allocator's peak.
    """
    vocab = backbone.get_input_embeddings().num_embeddings
    cuda = settings.device == "cuda"
    record = {"kind": "inference", "mechanism": name, "length": length, "status": "ok"}
    if model is None:  # few, large operations: the meter costs nothing measurable, one pass
        ids = torch.cat(list(token_chunks(length, vocab, settings.seed, settings.device)))[None]  # [1, length]
        reset_peak_rss()
        with Stopwatch(settings.device) as clock, torch.no_grad(), PeakMemory(settings.device) as meter:
            _full_attention_forward(backbone, ids, settings.segment_size)
        return record | {
            "seconds": _digits(clock.seconds),
            "wall_seconds": _digits(clock.wall_seconds),
            "tokens_per_s": round(length / clock.seconds, 1),
            "peak_bytes": meter.peak_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
        }
    segments = count_segments(length, model.content_size)
    chunks = token_chunks(length, vocab, settings.seed, settings.device)
    reset_peak_rss()
    with (
        progress(f"{LABELS[name]} · {length:,} tokens", segments) as callback,
        torch.no_grad(),
        PeakMemory(settings.device) if cuda else nullcontext() as meter,
        Stopwatch(settings.device) as clock,
    ):
        for _ in model.stream(stream_segments(chunks, model.content_size), callback=callback):
            pass
    record |= {"seconds": round(clock.seconds, 4), "wall_seconds": round(clock.wall_seconds, 4)}
    record["tokens_per_s"] = round(length / clock.seconds, 1)
    record |= {"peak_bytes": meter.peak_bytes if cuda else None, "peak_rss_bytes": peak_rss_bytes()}
    if not cuda and length <= settings.memory_up_to:
        chunks = token_chunks(length, vocab, settings.seed, settings.device)
        with progress(f"{LABELS[name]} · memory", segments) as callback:
            _, record["peak_bytes"], _ = stream_throughput(model, chunks, callback)
    return record


def _full_attention_forward(backbone, ids: torch.Tensor, segment_size: int) -> None:
    """One causal SDPA forward over the whole input (no mask tensor: `is_causal`), then the LM head in
    segment-sized slices whose logits are dropped, as a streaming mechanism drops each segment's."""
    base = backbone.base_model
    hidden = base(input_ids=ids, **backbone_layers.cache_arguments(base, None)).last_hidden_state  # [1, length, hidden]
    head = backbone.get_output_embeddings()
    for start in range(0, hidden.shape[1], segment_size):
        head(hidden[:, start : start + segment_size])


def measure_training(name: str, model: MemoryModel | None, backbone, segments: int, settings: BenchSettings) -> Record:
    """One training step (forward + backward, gradients through all `segments`): median seconds of `repeats`."""
    content = settings.segment_size if model is None else model.content_size
    vocab = backbone.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, vocab, (settings.train_batch, segments * content), generator=generator)
    ids = ids.to(settings.device)  # [batch, segments · content]
    module = backbone if model is None else model
    module.train()  # LongMem reads its frozen backbone in eval mode all the same

    def step() -> None:
        if model is None:
            loss = backbone(input_ids=ids, labels=ids, **backbone_layers.cache_arguments(backbone, None)).loss
        else:
            loss = model(ids, labels=ids, logits="none").loss
        loss.backward()
        module.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    with PeakMemory(settings.device) if settings.device == "cuda" else nullcontext() as meter:
        for _ in range(settings.repeats):
            with Stopwatch(settings.device) as clock:
                step()
            times.append(clock.seconds)
    module.eval()
    seconds = statistics.median(times)
    return {
        "kind": "training",
        "mechanism": name,
        "segments": segments,
        "tokens": settings.train_batch * segments * content,
        "status": "ok",
        "step_seconds": _digits(seconds),
        "all_seconds": [_digits(t) for t in times],
        "tokens_per_s": round(settings.train_batch * segments * content / seconds, 1),
        # the CPU meter sees no tensors kept only by autograd, so training memory is measured on CUDA only
        "peak_bytes": getattr(meter, "peak_bytes", None),
    }


def _digits(seconds: float) -> float:
    """Four significant digits: a fast cell never rounds to 0 s (which would predict 0 s for every longer one)."""
    return float(f"{seconds:.4g}")


def predict_seconds(done: list[tuple[int, float]], length: int) -> float | None:
    """Seconds for `length` from the measured (length, seconds): the log-log slope of the last two (≥ 1), or
    linear from one point. What the time budget is checked against, and how skipped cells are extrapolated."""
    if not done:
        return None
    (n1, t1) = done[-1]
    slope = 1.0
    if len(done) >= 2:
        n0, t0 = done[-2]
        slope = max(1.0, math.log(t1 / t0) / math.log(n1 / n0)) if t0 > 0 and n1 != n0 else 1.0
    return t1 * (length / n1) ** slope


def run(
    settings: BenchSettings,
    done: list[Record] | None = None,
    on_record: OnRecord | None = None,
    say: Callable[[str], None] = print,
    progress: Progress = no_progress,
) -> list[Record]:
    """Every mechanism: inference at every length, then training at every segment count. `done` records (from an
    interrupted run with the same settings) are kept and not measured again; `on_record` sees every record;
    `progress(description, segments)` is a context manager yielding a progress callback for each streamed pass
    (the CLI's shows a bar)."""
    settings.check()
    records = list(done or [])
    have = {_key(r) for r in records}

    def add(record: Record) -> None:
        records.append(record)
        have.add(_key(record))
        if on_record is not None:
            on_record(record)

    for name in settings.mechanisms:
        model, backbone = build_mechanism(name, settings)
        _warm_up(model, backbone, settings)
        limit = backbones.describe(backbone).max_positions if model is None else None
        done = [r for r in records if record_is(r, "inference", name) and r["status"] == "ok"]
        measured = [(r["length"], r["seconds"]) for r in done]
        blocked: str | None = None  # what stops every longer length too (the window, memory)
        for length in sorted(settings.lengths):
            if ("inference", name, length) in have:
                continue
            predicted = predict_seconds(sorted(measured), length)
            stop = blocked
            if stop is None and limit is not None and length > limit:
                stop = blocked = f"longer than the backbone's {limit:,} positions"
            if stop is None and predicted is not None and predicted > settings.time_budget_s:
                stop = f"predicted {predicted:.3g} s > time budget {settings.time_budget_s:.3g} s"
            if stop is None:
                try:
                    record = measure_inference(name, model, backbone, length, settings, progress)
                except torch.OutOfMemoryError:
                    stop = blocked = "out of memory"
                    torch.cuda.empty_cache()
                else:
                    measured.append((length, record["seconds"]))
                    say(_describe(record))
                    add(record)
                    continue
            record = {"kind": "inference", "mechanism": name, "length": length, "status": "skipped", "reason": stop}
            if predicted is not None:  # labelled: an extrapolation from the measured lengths, not a measurement
                record["extrapolated_seconds"] = _digits(predicted)
                record["extrapolated_tokens_per_s"] = round(length / predicted, 1)
            say(f"{LABELS[name]:>15} {length:>10,} tokens: skipped ({stop})")
            add(record)
        for count in sorted(settings.train_segments):
            if ("training", name, count) in have:
                continue
            try:
                record = measure_training(name, model, backbone, count, settings)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                record = {"kind": "training", "mechanism": name, "segments": count, "status": "skipped"}
                record["reason"] = "out of memory"
            say(_describe(record))
            add(record)
        del model, backbone
    return records


def _warm_up(model: MemoryModel | None, backbone, settings: BenchSettings) -> None:
    """Two segments read once before timing (first calls pay for allocations and kernel selection)."""
    vocab = backbone.get_input_embeddings().num_embeddings
    content = settings.segment_size if model is None else model.content_size
    ids = torch.randint(0, vocab, (1, 2 * content), device=settings.device)
    with torch.no_grad():
        if model is None:
            _full_attention_forward(backbone, ids, settings.segment_size)
        else:
            model(ids, logits="none")


def _key(record: Record) -> tuple:
    return record["kind"], record["mechanism"], record.get("length", record.get("segments"))


def record_is(record: Record, kind: str, name: str) -> bool:
    """Whether `record` measured mechanism `name` in `kind` ("inference" or "training")."""
    return record["kind"] == kind and record["mechanism"] == name


def mib_text(peak: int | None) -> str:
    """A peak in MiB for tables, or why there is none (a device whose memory is not metered)."""
    return "memory not metered" if peak is None else f"{peak / 2**20:,.1f} MiB"


def _describe(record: Record) -> str:
    label = LABELS[record["mechanism"]]
    if record["status"] != "ok":
        return f"{label:>15} {record['kind']}: skipped ({record['reason']})"
    if record["kind"] == "inference":
        return (
            f"{label:>15} {record['length']:>10,} tokens: {record['tokens_per_s']:>10,.0f} tokens/s, "
            f"peak {mib_text(record['peak_bytes'])}, {record['seconds']:.1f} s"
        )
    return f"{label:>15} training over {record['segments']} segments: {record['step_seconds']:.3f} s a step"


# --- model FLOPs utilisation ------------------------------------------------------------------------------------


def matmul_flops_per_s(device: str, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """The device's practical peak: FLOP/s of the fastest of `repeats` square `size`×`size` matmuls."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        with Stopwatch(device) as clock:
            a @ b
        best = min(best, clock.seconds)
    return 2 * size**3 / best


def rmt_mfu(settings: BenchSettings, batch: int = 16, segments: int = 8, matmul_size: int | None = None) -> dict:
    """Model FLOPs utilisation of RMT inference at `batch` rows: FLOPs (flops.py's count) per second over the
    measured matmul peak of the same device and dtype. On a CPU (fp32) only a smoke test of the code."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int ≥ 1, got {batch!r}")
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments must be an int ≥ 1, got {segments!r}")
    settings.check()
    dtype = DTYPES[settings.dtype]
    size = matmul_size or (8192 if settings.device == "cuda" else 1024)
    peak = matmul_flops_per_s(settings.device, dtype, size)
    model, backbone = build_mechanism("rmt", settings)
    length = segments * model.content_size
    vocab = backbone.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, length), device=settings.device)
    spec = flops_model.spec_from_config(backbone.config)
    work = batch * flops_model.rmt_flops(spec, length, settings.segment_size, settings.memory_tokens, "decoder")
    with torch.no_grad():
        model(ids, logits="none")  # warm-up
        times = []
        for _ in range(settings.repeats):
            with Stopwatch(settings.device) as clock:
                model(ids, logits="none")
            times.append(clock.seconds)
    achieved = work / min(times)
    return {
        "device": settings.device,
        "dtype": settings.dtype,
        "matmul_size": size,
        "matmul_tflops": round(peak / 1e12, 3),
        "batch": batch,
        "segments": segments,
        "tokens": batch * length,
        "rmt_flops": work,
        "rmt_seconds": round(min(times), 4),
        "rmt_tflops": round(achieved / 1e12, 4),
        "mfu": round(achieved / peak, 4),
    }
