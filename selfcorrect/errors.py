"""The exceptions the CLI turns into one-line errors: bad input from the user, and a failed stage process."""


class UserError(Exception):
    """Bad input (a config, a data file, a model path, a flag).

    The CLI prints the message on one line, without a traceback, and exits with code 2.
    The message names the file and the field or line at fault.
    """


class StageFailed(Exception):
    """A training stage's process exited with a non-zero code (its own message is above)."""

    def __init__(self, stage: str, returncode: int):
        super().__init__(f"stage '{stage}' failed (exit code {returncode}); fix the cause and rerun to continue")
        self.returncode = returncode


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if empty), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception's whole message on one line (its lines joined, pydantic's help links dropped; at most ``limit``
    characters), for a library whose reason is not on its first line (vLLM's configuration errors)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(line for line in lines if not line.startswith("For further information"))
    return (text or type(error).__name__)[:limit]
