"""The one exception type for bad input from the user."""


class UserError(Exception):
    """Bad input (a config, a data file, a model path, a flag).

    The CLI prints the message on one line, without a traceback, and exits with code 2.
    The message names the file and the field or line at fault.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if empty), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
