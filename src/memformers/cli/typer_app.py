"""The typer app and its edge: bad input ends a command with one line, warnings about input are one line too.

Every command raises (or lets the library raise) a `ValueError` that names the argument and what is allowed, and
`OneLineErrors` prints it as `memformers: error: …` on stderr with exit status 2, no traceback. Suspicious input the
library accepts (`memformers.errors.InputWarning`) is printed as one `memformers: warning: …` line.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer
from typer.core import TyperGroup

from ..backbones import BackboneNotFoundError
from ..errors import InputWarning

EXIT_BAD_INPUT = 2  # click's status for a usage error
# click's exceptions, wherever this typer takes click from (newer releases carry their own copy)
CLICK = sys.modules[typer.BadParameter.__module__]
# Ctrl-C: click's Abort where this copy of click has one (typer's own copy lets KeyboardInterrupt through)
INTERRUPTED = (KeyboardInterrupt, getattr(CLICK, "Abort", KeyboardInterrupt))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class OneLineErrors(TyperGroup):
    """Runs a command so that bad input ends it with one line on stderr and exit status 2, never a traceback.

    Bad input is click's usage errors (an option's value, a missing option) and the library's `ValueError`s (the
    house rule: they name the argument and what is allowed), including a backbone that cannot be found. Anything
    else is a bug and keeps its traceback.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        shown = warnings.showwarning
        warnings.showwarning = _show_warning
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except CLICK.NoArgsIsHelpError as error:  # `memformers` alone: the help
            error.show()
            sys.exit(error.exit_code)
        except CLICK.ClickException as error:
            _fail(error.format_message())
        except (ValueError, BackboneNotFoundError) as error:
            if os.environ.get("MEMFORMERS_TRACEBACK"):  # where a ValueError came from, when it is a bug after all
                raise
            _fail(str(error))
        except INTERRUPTED:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        finally:
            warnings.showwarning = shown
        sys.exit(result if isinstance(result, int) else 0)


def _fail(message: str) -> None:
    typer.echo(f"memformers: error: {_one_line(message)}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`InputWarning`s as one line; other warnings as Python shows them."""
    if issubclass(category, InputWarning):
        typer.echo(f"memformers: warning: {_one_line(message)}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


app = typer.Typer(
    cls=OneLineErrors,
    help="Read millions of tokens through memory with any Hugging Face transformer.",
    no_args_is_help=True,
)


@app.callback()
def _startup() -> None:
    """Settings every command shares: the allocator's (for speed on the CPU), and no progress bars of transformers'
    own (loading a model's weights), which would bury the command's output and its one-line errors."""
    from transformers.utils import logging as transformers_logging

    from ..profiling import keep_freed_memory

    keep_freed_memory()
    transformers_logging.disable_progress_bar()
