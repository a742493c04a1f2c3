"""`python -m memformers.cli …` (and `accelerate launch -m memformers.cli train …`): the same app as `memformers`."""

from . import app

app()
