"""`memformers …`: the command line (typer), the edge of the library; nothing in the library imports it.

`typer_app` holds the app and its one-line errors; each command lives in the module of its concept and is
registered here, in the order `memformers --help` lists them.
"""

from __future__ import annotations

from . import demo, evaluate, measure, train
from .checkpoints import SHIPPED_CHECKPOINT, trained_tasks
from .measure import crossover_sentence
from .options import available_cores, default_threads
from .typer_app import app

app.command()(demo.demo)
app.command()(measure.stream)
app.command()(evaluate.data)
app.command("eval")(evaluate.evaluate)
app.command("perplexity")(evaluate.perplexity_command)
app.command()(train.train)
app.command()(train.curves)
app.command()(train.export)
app.command()(measure.flops)
app.command()(measure.bench)

# what callers import from `memformers.cli`: the app (the entry point) and what the tests check
__all__ = ["SHIPPED_CHECKPOINT", "app", "available_cores", "crossover_sentence", "default_threads", "trained_tasks"]
