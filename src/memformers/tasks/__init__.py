"""Long-context memory tasks: bAbI-style stories (qa1..qa5), the RMT paper's memorize / detect / reason, facts
hidden in book noise at an exact token length, algorithmic tasks, language modelling on long book windows, torch
datasets and JSONL export."""

from memformers.tasks.algorithmic import ALGORITHMIC_TASKS, AlgorithmicSample, algorithmic_tokenizer, make_algorithmic
from memformers.tasks.babi import ANSWERS, Story, World, generate_story
from memformers.tasks.datasets import StreamingTaskDataset, TaskDataset, collate, make_collate, sample_item
from memformers.tasks.haystack import NoiseSpan, Sample, build_haystack, encode_sentence
from memformers.tasks.icl import ICL_LABELS, TOKENS_PER_ITEM, ICLEpisode, icl_vocabulary, make_icl_episode
from memformers.tasks.lm import lm_documents, lm_window
from memformers.tasks.noise import Book, TokenizedNoise, load_noise, split_sentences, tokenized_noise
from memformers.tasks.registry import (
    TASKS,
    TaskSpec,
    algorithmic_tokenizer_name,
    answer_vocabulary,
    export_jsonl,
    get_tokenizer,
    make_algorithmic_sample,
    make_sample,
    task_spec,
)

__all__ = [
    "ALGORITHMIC_TASKS",
    "ANSWERS",
    "ICL_LABELS",
    "TASKS",
    "TOKENS_PER_ITEM",
    "AlgorithmicSample",
    "Book",
    "ICLEpisode",
    "NoiseSpan",
    "Sample",
    "Story",
    "StreamingTaskDataset",
    "TaskDataset",
    "TaskSpec",
    "TokenizedNoise",
    "World",
    "algorithmic_tokenizer",
    "algorithmic_tokenizer_name",
    "answer_vocabulary",
    "build_haystack",
    "collate",
    "encode_sentence",
    "export_jsonl",
    "generate_story",
    "get_tokenizer",
    "icl_vocabulary",
    "lm_documents",
    "lm_window",
    "load_noise",
    "make_algorithmic",
    "make_algorithmic_sample",
    "make_collate",
    "make_icl_episode",
    "make_sample",
    "sample_item",
    "split_sentences",
    "task_spec",
    "tokenized_noise",
]
