"""The two kinds of failure a command reports in one line: the user's mistakes and runtime failures.

`UserError` means "what you asked for cannot be done as asked": a bad setting, a missing or malformed file,
an invalid config. Its message is written for the user and fits on one line; the CLI prints it as
`sana COMMAND: error: MESSAGE` (the server will answer it with a 4xx), without a traceback unless `--debug`
(or SANA_DEBUG=1) asks for one; the exit status is 2.

`RuntimeFailure` means "what you asked for was fine, but it could not be done here and now": the device ran out
of memory, the Hub could not be reached, a training run diverged. The user can act on it (free memory, retry,
resume with other settings) but did not cause it with a bad argument. The CLI prints it the same way, with exit
status 1. Every other exception (a bug, or an environment failure nobody foresaw, like an I/O error) keeps
its traceback (exit status 1).

UserError subclasses ValueError because most of these mistakes are bad values, and callers that already catch
ValueError around the library keep working; RuntimeFailure subclasses RuntimeError for the same reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(ValueError):
    """A mistake in what the user asked for (settings, files, configs), explained in one line."""


class RuntimeFailure(RuntimeError):
    """An expected failure of the run or its environment (not of what was asked), explained in one line."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist. Also a FileNotFoundError, for callers that catch that."""


# What an OSError means when it comes from a path the user gave: their mistake, not the machine's. Anything
# else (EIO, ENOSPC, ...) is an environment failure and keeps its traceback.
_PATH_MISTAKES = (IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


@contextmanager
def user_path(path: str | os.PathLike[str], what: str, verb: str = "read") -> Iterator[None]:
    """Turn a failure to `verb` the user's `what` at `path` (missing, a folder where a file belongs or the
    reverse, no permission, not UTF-8 text) into a one-line UserError naming both. Keep the block small: it
    converts these errors from anything inside it.

        with user_path(args.prompts_file, "prompts file"):
            text = Path(args.prompts_file).read_text(encoding="utf-8")
    """
    try:
        yield
    except UserError:  # already explained (a MissingFileError is a FileNotFoundError too)
        raise
    except FileNotFoundError as e:
        raise MissingFileError(f"{what} not found: {path}") from e
    except _PATH_MISTAKES as e:
        raise UserError(f"cannot {verb} {what} {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_user_file(path: str | os.PathLike[str], what: str, *, newline: str | None = None) -> str:
    """The UTF-8 text of a file the user named, or a one-line UserError (see `user_path`). newline="" keeps
    line endings exactly as written; the default turns "\\r\\n" and "\\r" into "\\n", as `open` does."""
    with user_path(path, what), open(path, encoding="utf-8", newline=newline) as f:
        return f.read()


def one_line(message: object) -> str:
    """`message` on one line: its lines stripped and joined with single spaces."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())
