"""The training config: a TOML record of every knob of `memformers train`, as dataclasses with their defaults.

Config (TOML; every key optional unless marked):

[model]
  mechanism               "rmt" (default; RecurrentMemoryTransformer), "armt" (AssociativeMemoryTransformer, knobs
                          in [model.armt]), "cache" (SegmentCacheTransformer), "knn" (MemorizingTransformer, knobs
                          in [model.knn]) or "longmem" (LongMem, knobs in [model.longmem]: only its SideNet trains,
                          the backbone stays frozen); all but "rmt" and "armt" need a decoder (head "causal-lm").
                          rmt with num_memory_tokens = 0 is the backbone alone on the same segments (the no-memory
                          baseline)
  backbone                "scratch" (a small model built from `[model.scratch]`), "minilm", "smollm2", a Hugging
                          Face model folder (e.g. the backbone/ of a saved model, to wrap it in another mechanism),
                          or a folder saved by memformers with the same mechanism (training continues from it)
  head                    "classification" (default; one class per answer of the tasks: their union),
                          "causal-lm", "masked-lm"
  num_memory_tokens       memory vectors (default 10; rmt and armt)
  segment_size            backbone positions per segment, memory and special tokens included (default 512); a
                          saved model goes on with the same weights in segments of another size
  bptt_depth              memory transitions gradients cross (int ≥ 0); leave out for full back-propagation
  gradient_checkpointing  recompute each segment in backward (default false)
  freeze_backbone         train only the mechanism's own weights (RMT memory, kNN gates, LongMem SideNet): the
                          backbone, its head included, stays as loaded, so any change in quality is the memory's
                          (default false; LongMem always freezes it)
  alignment               "right" (default: the question ends the last segment) or "left"
  dropout                 every dropout of a pretrained or saved backbone (its config's rates, its Dropout modules,
                          its attention dropout); leave out to keep the backbone's own. With fresh samples at every
                          step there is nothing to overfit; on a CPU, 0 pays with attention = "eager" (below); a
                          scratch backbone takes [model.scratch] dropout
  attention               the backbone's attention kernel: "eager" or "sdpa"; leave out to keep the backbone's
                          (sdpa where it has one). On a CPU, "eager" with dropout = 0 trained a MiniLM step 1.5×
                          faster than sdpa, whose backward is slow there (0.79 against 1.17 s); on a GPU keep sdpa
  keep_layers             keep only the first N blocks of a pretrained backbone or a Hugging Face folder (its
                          embeddings, final norm and head stay): a step costs about N/L, and the blocks start
                          pretrained. Leave out to keep them all
[model.scratch]           only for backbone = "scratch"; vocabulary = the task tokenizer's
  family                  "bert" (default; encoder) or "llama" (decoder, for head = "causal-lm")
  layers, hidden, heads, intermediate   default 4, 128, 4, 512
  dropout                 default 0.1
[model.<mechanism>]       that mechanism's own knobs: the fields of its config class (registry.py), which checks
                          them; the keys every mechanism shares (segment_size, alignment, bptt_depth,
                          gradient_checkpointing) stay in [model]
[model.rmt]               num_memory_tokens (also read from [model], where older configs set it)
[model.armt]              ARMTConfig; num_memory_tokens (also read from [model]), d_mem (64), nu (3): associative
                          keys of 2·nu·d_mem DPFP features in every layer; memory_attention ("full", an encoder's
                          default, or "causal": memory tokens in a decoder's order); normalize_features (true:
                          queries' and keys' features at unit length, as the ARMT authors' code); memory_layers
                          (blocks with a memory, negative from the top; default all); normalize_gate (false: write
                          strengths β from the memory outputs as they are; true: scaled to unit RMS first); gate_bias,
                          memory_init_std (at creation only: W_β's bias, the memory embeddings' std; default
                          nn.Linear's draw and the backbone embeddings' std; the authors' later code: 1.0, 0.02);
                          writers ("memory", the paper's: the memory tokens write; "all": every real position too);
                          layout_writes (with writers "all": true, [CLS], [SEP] and the memory tokens write too;
                          false: the content's tokens alone; "first": the layout too while a row's memory is
                          empty, its first segment; no weight depends on it, a saved model takes the config's);
                          write_threshold (gates at or under it write nothing into A);
                          share_query_key (false: the paper's W_Q; true: reads use W_K, so a token asks with
                          the key its own hidden state writes with)
[model.knn]               KNNConfig; defaults from MemorizingTransformer
  memory_layers           decoder layers with kNN memory, negative = from the end (default [-4])
  memory_size, top_k      stored (key, value) pairs per row, head and layer (65536); neighbours per query (32)
  combine                 "gate" (default) or "joint"
  normalize_keys          L2-normalised keys with a learned temperature (default false)
  search                  "torch" (default) or "faiss"
[model.longmem]           LongMemConfig; defaults from LongMem (None = the backbone's default)
  sidenet_layers, memory_layer, fusion_layer   ints (default L/2, 3L/4 − 1, S/2)
  memory_size, chunk_size, top_k_chunks        default 65536, 4, 16
[task]
  name                    memorize | detect | reason | qa1 .. qa5 (default "memorize") | copy | reverse | associative
                          (the source fills the curriculum's segment count; the target follows it); several
                          comma-separated take turns, and one listed twice is drawn twice as often
  tokenizer               tokenizer name or folder; default: the backbone's, or "minilm" for a scratch model
  split                   noise books to train on: "train" (default), "test", "all"
  seed                    training samples' seed (default 0)
  eval_seed               validation samples' seed (default seed + 1000003: never a training sample)
  noise_dir               folder of .txt books instead of the shipped Austen novels (optional)
  facts_first             bAbI tasks: this fraction of samples (drawn per sample) puts every fact before the
                          noise, so each one must be carried to the question across segments: a signal for a
                          memory that reads nothing yet. The others keep the task's placement (qa1-qa5:
                          scattered). 1.0 alone teaches a model to ignore the facts beside the question.
                          Default 0
  facts_apart             bAbI tasks: this fraction of samples (drawn with facts_first, the two add up to at most
                          1) spaces the facts evenly through the noise: about one at a time for the memory, as far
                          apart as the length allows. Default 0
  num_facts               qa1-qa5: sentences a story has, an int or a [low, high] range (validation too; evaluation
                          keeps the task's own, e.g. 2-10 for qa1): fewer facts, fewer actors for a memory to bind
                          before it meets whole stories. Default: the task's own range
  distinct_actors         qa1: this fraction of samples (drawn per sample, validation too) has every sentence move
                          another actor to another place (num_facts at most 4, qa1's actors), so the answer is
                          any sentence's place alike: answering the last place, a shortcut worth about 64% of
                          2-3 fact stories, scores 1/n, and only an actor bound to a place answers. Default 0
  vocab_size, key_size, value_size   algorithmic tasks (copy, reverse, associative): symbols, and the associative
                          task's key and value lengths (default 16, 2, 1); their own tokenizer, head "causal-lm"
[curriculum]
  segments                list of segment counts, e.g. [1, 2, 3, 5, 7] (default), or a rule string
                          "linear:START:STOP[:STEP]" or "double:START:STOP"
  threshold               validation accuracy that ends a stage early (default 0.95)
  max_steps_per_stage     step budget of a stage (default 1000)
  vary_segments           also train on min_segments .. current segments (default false)
  vary_per                "sample" (default): each sample draws its own count; "batch": one count a global batch,
                          so no row waits on the batch's longest (the driver runs every row of the longest),
                          about 1.6× fewer segments a step at 4 segments and 1.8× at 8
  min_segments            the shortest length vary_segments draws (default 1; more where a story needs it)
  no_noise_fraction       bAbI tasks: this fraction of training samples is the story alone, no noise (length 0),
                          drawn per sample (default 0): the partly filled segment that length-0 evaluation reads
  carry_memory            the chance that a training row starts from the memory the previous step's row in its place
                          left (detached), not an empty one (default 0: always empty). Memories then age over many
                          samples, so training meets states of far more segments than one sample has: what a
                          memory meets past its training lengths. Validation starts empty
  vary_fill               bAbI tasks: each sample (validation too) is up to one segment shorter, drawn per sample,
                          so the partly filled segment, and where the facts sit in their segments, varies (default
                          false). Without it every sample of a count has one layout, and a memory can learn one
                          that breaks at other lengths
  eval_every              steps between validations inside a stage (default 100; 0 = only at the budget's end)
  eval_at_start           validate the model a fresh run starts from, logged at step 0 (default true): a curve
                          then shows what training added to it, not only where it went; it moves no stage, and
                          stays the best model until a validation beats it
  eval_samples            validation samples at the stage's length (default 128)
  eval_batch_size         default: the per-process micro-batch
  eval_long_segments      also validate at this many segments (default 0: off), every eval_long_every steps (default
                          eval_every) on eval_long_samples samples (default 32), logged as "eval_long" beside
                          "eval" and drawn in the curves. It moves no stage and picks no best model: a memory that
                          holds at the stage's length can still drift at far longer ones, and this shows when
  eval_long_placement     where the long validation's facts sit: "training" (default: task.facts_first and
                          task.facts_apart's mix, as every validation) or "task" (the task's own placement, facts
                          anywhere in the noise, as `memformers eval` reads them), so it tracks the test grid
  stop_at_threshold       end the run when the last stage passes the threshold (default true)
[optim]
  lr (1e-4), weight_decay (0.01), warmup_steps (100)
  memory_lr               learning rate of the mechanism's own weights (RMT memory, kNN gates and mix, LongMem
                          SideNet); default: lr. Zero-initialised gates open in few steps only with a larger one
  schedule                "global" (default: warm-up, then linear decay over total_steps), "per-stage" (warm-up
                          and decay restart every stage, over max_steps_per_stage) or "constant" (after warm-up)
  total_steps             hard cap on optimizer steps; 0 (default) = stages × max_steps_per_stage
  batch_size              samples per optimizer step, over all processes and accumulation steps (default 32)
  grad_accum              accumulation steps (default 1); batch_size must divide by grad_accum × processes
  max_grad_norm           gradient clipping, 0 = off (default 1.0)
  read_loss_weight        ARMT with writers "all", bAbI tasks: weight of a loss naming the write the question's
                          actor, object or place should read, the supporting facts' share of its read in every memory
                          layer (memformers.read_supervision; default 0 = the answer's loss alone)
  read_target             what of the supporting facts that loss names: "fact" (default: every token of them),
                          "answer" (the answer's word alone, "garden" in "mary went to the garden .") or "named"
                          (only the facts naming what the question names: the first hop of qa2's and qa3's chains)
                          or "last" (the supporting fact that comes last: the one that must write what the chain
                          says, read from earlier segments' writes, where the question comes in a later segment)
  noise_write_weight      the same models, with [model.armt] write_threshold > 0: weight of a loss keeping the
                          noise's write gates under a quarter of the threshold, so that they write nothing however
                          long the input (default 0)
  noise_write_mean        what that loss averages over: "all" (default: every noise write) or "breaking" (the
                          writes above a quarter of the threshold alone, so a rare noise word that writes hard,
                          a place named in a novel's sentence, weighs as much as a common one)
  seed                    model init and dropout seed (default 0)
  mixed_precision         "no" (default) or "bf16" (autocast, on a GPU or a CPU; on a CPU with AVX512-BF16 a
                          MiniLM step is ~1.4× faster; a CPU without bf16 instructions, AVX2 only, trains in fp32
                          instead, with a warning: there bf16 would be ~10× slower)
  prefetch                build the next batch in a thread while a step runs (default true)
  fused_adamw             torch's fused AdamW kernel (default true; the same update, one pass over the weights:
                          12 ms against 107 ms a MiniLM step on one CPU thread); false: the per-weight loop
  cpu                     train on the CPU even when a GPU is there (default false)
[output]
  dir                     output folder (default "runs/<task>")
  checkpoint_every        steps between checkpoints (default 200; 0 = only at the end)
  keep_checkpoints        how many recent checkpoints to keep (default 2)
  log_every               steps between metrics lines (default 10)

The rest of training (the trainer, the model a config describes, its samples, its checkpoints) reads this record;
the keys are documented here, beside the fields that hold them. Reading a file and its `section.key=value`
overrides into a checked `TrainConfig` is `training_config_parsing`'s, the one way in; it imports this module, never
the other way round.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

EVAL_SEED_OFFSET = 1_000_003
CHECKPOINT_PREFIX = "checkpoint-"

# --------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ScratchConfig:
    family: str = "bert"
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    intermediate: int = 512
    dropout: float = 0.1


@dataclass
class ModelConfig:
    mechanism: str = "rmt"
    backbone: str = "scratch"
    head: str = "classification"
    num_memory_tokens: int = 10
    segment_size: int = 512
    bptt_depth: int | None = None
    gradient_checkpointing: bool = False
    freeze_backbone: bool = False
    alignment: str = "right"
    dropout: float | None = None  # every dropout rate of a pretrained or saved backbone; None: its own
    attention: str | None = None  # the backbone's attention kernel ("eager", "sdpa"); None: its own
    keep_layers: int | None = None  # a pretrained backbone's first N blocks only; None: all of them
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    # [model.<mechanism>] tables, by registry name: that mechanism's own knobs (its config class's fields)
    knobs: dict[str, dict] = field(default_factory=dict)

    def mechanism_config(self, name: str | None = None):
        """The config of mechanism `name` (default: `mechanism`) from these keys, checked by its config class; an
        error names the key (`model.<mechanism>.<knob>`, or `model.<knob>` for the keys every mechanism shares)."""
        from . import registry

        name = name or self.mechanism
        cls = registry.get(name).config
        top = {f.name for f in fields(ModelConfig)}
        common = {key: getattr(self, key) for key in ("segment_size", "alignment", "bptt_depth")}
        common["gradient_checkpointing"] = self.gradient_checkpointing
        # A knob of the mechanism that [model] also has (num_memory_tokens) is read there unless the table gives it.
        shared = {key: getattr(self, key) for key in cls.knobs() if key in top}
        table = self.knobs.get(name, {})
        clash = sorted(set(table) & set(common))
        if clash:
            raise ValueError(f"model.{name}.{clash[0]}: set it in [model], where every mechanism reads it")
        try:
            return cls.from_dict(common | shared | table)
        except ValueError as error:
            key = str(error).split(" ", 1)[0].rstrip(":")
            prefix = "model." if key in common or key in shared and key not in table else f"model.{name}."
            raise ValueError(f"{prefix}{error}") from None


@dataclass
class TaskConfig:
    name: str = "memorize"
    tokenizer: str | None = None
    split: str = "train"
    seed: int = 0
    eval_seed: int | None = None
    noise_dir: str | None = None
    vocab_size: int = 16  # algorithmic tasks: data symbols
    key_size: int = 2  # associative: symbols per key
    value_size: int = 1  # associative: symbols per value
    facts_first: float = 0.0  # bAbI tasks: fraction of samples with every fact before the noise
    facts_apart: float = 0.0  # bAbI tasks: fraction of samples with the facts evenly spaced through the noise
    num_facts: int | list[int] | None = None  # qa1-qa5: sentences a story has, or a [low, high] range; None: the task's
    distinct_actors: float = 0.0  # qa1: fraction of samples whose sentences each move another actor


@dataclass
class CurriculumConfig:
    segments: list[int] | str = field(default_factory=lambda: [1, 2, 3, 5, 7])
    threshold: float = 0.95
    max_steps_per_stage: int = 1000
    vary_segments: bool = False
    vary_per: str = "sample"
    min_segments: int = 1
    no_noise_fraction: float = 0.0
    vary_fill: bool = False  # bAbI tasks: samples up to one segment shorter, drawn per sample
    carry_memory: float = 0.0  # chance a training row starts from the memory its place's previous row left
    eval_every: int = 100
    eval_at_start: bool = True  # validate the starting model at step 0 (a fresh run only)
    eval_samples: int = 128
    eval_batch_size: int | None = None
    eval_long_segments: int = 0  # also validate at this many segments (0: off); moves no stage
    eval_long_every: int = 0  # 0: eval_every
    eval_long_samples: int = 32
    eval_long_placement: str = "training"  # "task": the task's own placement, as `memformers eval` reads
    stop_at_threshold: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-4
    memory_lr: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "global"
    total_steps: int = 0
    batch_size: int = 32
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    read_loss_weight: float = 0.0  # ARMT, writers "all", bAbI: weight of the read-share loss (read_supervision)
    read_target: str = "fact"  # the supporting tokens that loss names: "fact" (all), "answer", "named", "last"
    noise_write_weight: float = 0.0  # ARMT, writers "all", write_threshold > 0, bAbI: the noise-write loss
    noise_write_mean: str = "all"  # that loss's mean: over every noise write, or over the "breaking" ones alone
    seed: int = 0
    mixed_precision: str = "no"
    prefetch: bool = True
    fused_adamw: bool = True
    cpu: bool = False


@dataclass
class OutputConfig:
    dir: str | None = None
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.task.name}")

    @property
    def stages(self) -> list[int]:
        return parse_segments(self.curriculum.segments)

    @property
    def task_names(self) -> list[str]:
        """`task.name` may list several tasks ("memorize,detect,reason"): sample i is of task i mod their count."""
        return [name.strip() for name in self.task.name.split(",") if name.strip()]

    @property
    def algorithmic(self) -> bool:
        """Copy / reverse / associative: own vocabulary, a decoder writes the target after the source."""
        from .tasks import TASKS

        return all(name in TASKS and TASKS[name].kind == "algorithmic" for name in self.task_names)

    @property
    def tokenizer_name(self) -> str:
        if self.task.tokenizer:
            return self.task.tokenizer
        if self.algorithmic:
            from .tasks import algorithmic_tokenizer_name

            return algorithmic_tokenizer_name(self.task.vocab_size)
        if self.model.backbone == "scratch":
            return "minilm"
        saved = Path(self.model.backbone) / "memformers.json"
        if saved.exists():  # a saved memformers model records its tokenizer
            return json.loads(saved.read_text()).get("extra", {}).get("tokenizer") or str(saved.parent / "backbone")
        return self.model.backbone

    @property
    def total_steps(self) -> int:
        return self.optim.total_steps or len(self.stages) * self.curriculum.max_steps_per_stage

    def to_dict(self) -> dict:
        """Plain data (TOML/JSON-ready: None values left out), mechanism tables under [model] as in the file."""
        data = _drop_none(asdict(self))
        data["model"] |= data["model"].pop("knobs", {})
        return data


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def parse_segments(rule: list[int] | str) -> list[int]:
    """The curriculum's segment counts: a list, or "linear:START:STOP[:STEP]" / "double:START:STOP"."""
    if isinstance(rule, str):
        parts = rule.split(":")
        try:
            kind, numbers = parts[0], [int(p) for p in parts[1:]]
        except ValueError:
            numbers, kind = [], ""
        if kind == "linear" and len(numbers) in (2, 3) and numbers[0] >= 1 and numbers[-1] >= 1:
            values = list(range(numbers[0], numbers[1] + 1, numbers[2] if len(numbers) == 3 else 1))
        elif kind == "double" and len(numbers) == 2 and numbers[0] >= 1:
            values, n = [], numbers[0]
            while n <= numbers[1]:
                values.append(n)
                n *= 2
        else:
            raise ValueError(
                f"curriculum.segments must be a list of ints or 'linear:START:STOP[:STEP]' / 'double:START:STOP', "
                f"got {rule!r}"
            )
    else:
        values = list(rule) if isinstance(rule, list | tuple) else []
    if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise ValueError(f"curriculum.segments must hold at least one int ≥ 1, got {rule!r}")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"curriculum.segments must be increasing, got {values}")
    return values
