"""The one exception type for bad input from the user."""


class UserError(Exception):
    """Bad input (a config, a data file, a model path, a flag).

    The CLI prints the message on one line, without a traceback, and exits with code 2.
    The message names the file and the field or line at fault.
    """
