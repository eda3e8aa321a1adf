"""The project's user-error type: a problem the user can fix (a bad recipe value, a missing or wrong file, an
unsupported option). The CLI turns it into one line on stderr and exit code 2; any other exception is a bug
and keeps its traceback."""

import re


class UserError(Exception):
    """Raise where the user can fix the problem; the message says what to change."""


# Siblings that keep the builtin type too, so callers (and tests) that catch ValueError, FileNotFoundError or
# RuntimeError keep working. Raise them where the user can reach and fix the problem; keep the builtins for our
# own invariants (a bug: the CLI shows its traceback).


class UserValueError(UserError, ValueError):
    """A value the user chose (a recipe key, a command option, a file's content) that cannot work: a grid that
    does not fit the tokenizer's channels, an unsupported option, a batch size the ranks do not divide, …"""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named (weights, data, a reference) or an earlier stage's output is missing."""


class UserRuntimeError(UserError, RuntimeError):
    """The machine cannot do what the recipe asks (e.g. run.device = "cuda" without a CUDA device)."""


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line, for a user error that quotes it. torch's ``weights_only`` refusal is cut to
    what the file asked for (e.g. "Unsupported global: GLOBAL builtins.open was not an allowed global by
    default."), without its advice to load the file with ``weights_only=False``."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    refused = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s+Please use\b|\n|$)", text)
    if refused:
        return refused.group(1).strip()
    return " ".join(text.split())
