"""What the library raises and warns about when the user's input is wrong or suspicious.

`InputError` is a `ValueError` (the house rule: bad input fails with a ValueError naming the argument, its value and
what is allowed); it is raised where a foreign error about a user's file or folder (a corrupt safetensors file, a
missing config) would otherwise surface without naming it. `InputWarning` marks input that is accepted but probably
not what was meant (a book that is not UTF-8, a checkpoint evaluated on a task it never saw). The command line prints
either as one line.
"""

from __future__ import annotations

import warnings


class InputError(ValueError):
    """Bad input from the user: the message names the argument or file and says what is allowed."""


class InputWarning(UserWarning):
    """Input that is accepted but probably not what was meant: the message says what was seen and why it matters."""


def warn_input(message: str) -> None:
    """Warn about suspicious input (one line at the command line; a Python warning elsewhere)."""
    warnings.warn(message, InputWarning, stacklevel=3)
