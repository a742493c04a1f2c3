"""A progress bar that also reports into a log file. On a terminal rich draws a live bar; where the output is a file
(`nohup … > log`, a batch job) it draws nothing until the end, so hours of training or reading would leave the log
empty. There this bar prints its line every `every_s` seconds instead."""

from __future__ import annotations

import time

from rich.progress import Progress, TaskID


class LoggedProgress(Progress):
    """rich's `Progress`, plus a printed line every `every_s` seconds where the console is not a terminal."""

    def __init__(self, *columns, every_s: float = 60.0, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self.every_s = every_s
        self._printed_at = time.monotonic()

    @property
    def draws_live(self) -> bool:
        """Whether rich draws the bar itself (a terminal or a notebook), so no lines are needed."""
        return self.console.is_terminal or self.console.is_jupyter

    def update(self, task_id: TaskID, **changes) -> None:
        super().update(task_id, **changes)
        now = time.monotonic()
        if now - self._printed_at < self.every_s or self.draws_live:  # the clock first: no terminal check a segment
            return
        self._printed_at = now
        self.console.print(self.get_renderable())
