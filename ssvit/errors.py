"""Bad input gets a clear error: what is wrong and how to fix it, printed without a traceback by the commands."""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from typing import Optional


class UsageError(ValueError):
    """Bad input from the user (a flag, a path, a file, the data): the message names the problem and the fix."""


class NonFiniteLossError(RuntimeError):
    """Training diverged: the message names the step, the last good checkpoint and what to change."""


class CollapseError(RuntimeError):
    """The objective's health check failed (Objective.health, e.g. DINO's collapsed outputs): the message names the
    step, what failed and the last good checkpoint."""


class PeerLostError(RuntimeError):
    """Another process of a multi-process run stopped (a host died, a process was killed): this one cannot go on."""


class Interrupted(Exception):
    """A run stopped by a signal (SIGTERM from a scheduler, Ctrl-C) after writing a checkpoint: the message names it
    and the command that resumes; the command exits with 128 + the signal's number, as a shell reports a signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# What the commands print as one line instead of a traceback: our own messages, written for the user.
USER_ERRORS = (UsageError, NonFiniteLossError, CollapseError, PeerLostError, FileNotFoundError, FileExistsError, ConnectionError, PermissionError)


def user_message(e: BaseException) -> str:
    """The message written for the user. An error raised in a DataLoader worker reaches the main process as the same
    type with the worker's whole traceback in its message (torch's ExceptionWrapper): keep only what was raised."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        marker = f"{type(e).__qualname__}: "
        text = text[text.rfind(marker) + len(marker):] if marker in text else text
    return text.strip()


@contextmanager
def user_errors(prog: str, cli: bool):
    """As a command (cli=True), turn a user error into `prog: error: message` and exit status 2, and a run stopped
    by a signal into its one line and 128 + the signal; called from Python (tests, notebooks), let them propagate."""
    try:
        yield
    except USER_ERRORS as e:
        if not cli:
            raise
        print(f"{prog}: error: {user_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as e:
        if not cli:
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler is installed (imports, parsing)
        if not cli:
            raise
        print(f"{prog}: interrupted before training started; nothing was written.", file=sys.stderr)
        raise SystemExit(130) from None


def range_problems(rows: list[tuple[str, object, bool, str]], prefix: str = "--") -> list[str]:
    """One line per option out of its range: rows of (option, value, within range, the range in words), each read as
    '<prefix><option> <value>: must be <range>.'"""
    return [f"{prefix}{name} {value}: must be {rule}." for name, value, ok, rule in rows if not ok]


def check_ranges(rows: list[tuple[str, object, bool, str]], prefix: str = "--") -> None:
    """Refuse every option out of its range at once (range_problems), the one range check of ssvit: TrainConfig's
    options (prefix --) and each objective's (prefix --<objective>.)."""
    if problems := range_problems(rows, prefix):
        raise UsageError("\n".join(problems))


def command(prog: str):
    """`main = command("ssvit-x")(run_command)`: the command's entry point, with user_errors around it. `main()` is the
    command line (sys.argv, one-line errors, returns None: a console script exits with what main returns);
    `main(argv)` is the call from Python (exceptions propagate, the result is returned). `cli` overrides that."""

    def wrap(run):
        @functools.wraps(run)
        def main(argv=None, *, cli: Optional[bool] = None):
            cli = argv is None if cli is None else cli
            with user_errors(prog, cli=cli):
                result = run(argv)
            return None if cli else result

        return main

    return wrap
