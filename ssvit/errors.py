"""Bad input gets a clear error: what is wrong and how to fix it, printed without a traceback by the commands."""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager


class UsageError(ValueError):
    """Bad input from the user (a flag, a path, a file, the data): the message names the problem and the fix."""


class NonFiniteLossError(RuntimeError):
    """Training diverged: the message names the step, the last good checkpoint and what to change."""


class PeerLostError(RuntimeError):
    """Another process of a multi-process run stopped (a host died, a process was killed): this one cannot go on."""


# What the commands print as one line instead of a traceback: our own messages, written for the user.
USER_ERRORS = (UsageError, NonFiniteLossError, PeerLostError, FileNotFoundError, FileExistsError, ConnectionError, PermissionError)


@contextmanager
def user_errors(prog: str, cli: bool):
    """As a command (cli=True), turn a user error into `prog: error: message` and exit status 2; called from
    Python (tests, notebooks), let it propagate."""
    try:
        yield
    except USER_ERRORS as e:
        if not cli:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def command(prog: str):
    """`main = command("ssvit-x")(run_command)`: the command's entry point, with user_errors around it."""

    def wrap(run):
        @functools.wraps(run)
        def main(argv=None):
            with user_errors(prog, cli=argv is None):
                return run(argv)

        return main

    return wrap
