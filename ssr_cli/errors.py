"""The project's user-error type: a problem the user can fix (a bad recipe value, a missing or wrong file, an
unsupported option). The CLI turns it into one line on stderr and exit code 2; any other exception is a bug
and keeps its traceback."""

import re


class UserError(Exception):
    """Raise where the user can fix the problem; the message says what to change."""


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line, for a user error that quotes it. torch's ``weights_only`` refusal is cut to
    what the file asked for (e.g. "Unsupported global: GLOBAL builtins.open was not an allowed global by
    default."), without its advice to load the file with ``weights_only=False``."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    refused = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s+Please use\b|\n|$)", text)
    if refused:
        return refused.group(1).strip()
    return " ".join(text.split())
