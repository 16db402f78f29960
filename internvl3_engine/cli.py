"""How the project's commands end a user's mistake: one line on stderr and exit status 2, never a traceback
(``INTERNVL3_DEBUG=1`` shows it, for a bug report).

``ArgumentParser``: argparse's parser whose errors are that one line (argparse prints its usage first).
``run_command(prog, command)``: runs ``command()`` and returns its status; a user error it raises (a missing or
unreadable file, a bad value or type, a missing optional package) becomes the line and status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

DEBUG_VARIABLE = "INTERNVL3_DEBUG"
USER_ERRORS = (OSError, ValueError, TypeError, ImportError)
USER_ERROR_STATUS = 2


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def error_line(prog: str, message: str) -> str:
    """``prog: error: message`` on one line (a multi-line message's lines joined)."""
    return f"{prog}: error: {' '.join(str(message).split())}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser ending a bad command line with one line (the usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        print(error_line(self.prog, f"{message} (see --help)"), file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)


def run_command(prog: str, command: Callable[[], int]) -> int:
    """``command()``'s status, or USER_ERROR_STATUS after one line on stderr when it raises a user error
    (USER_ERRORS); other exceptions, and every exception under INTERNVL3_DEBUG=1, propagate."""
    try:
        return command()
    except USER_ERRORS as error:
        if debugging():
            raise
        message = str(error) or type(error).__name__
        if isinstance(error, OSError) and error.filename is not None and error.strerror:
            message = f"{error.filename}: {error.strerror}"
        print(error_line(prog, message), file=sys.stderr)
        return USER_ERROR_STATUS
