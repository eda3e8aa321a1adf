"""The project's user-error type: a problem the user can fix (a bad recipe value, a missing or wrong file, an
unsupported option). The CLI turns it into one line on stderr and exit code 2; any other exception is a bug
and keeps its traceback."""


class UserError(Exception):
    """Raise where the user can fix the problem; the message says what to change."""
