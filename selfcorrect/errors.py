"""The exceptions the CLI turns into one-line messages, and the exit codes it gives them.

Exit codes (README "Running on a cluster"): 0 done; 1 an unexpected error (with its traceback); 2 bad input;
74 a write failed (a full disk, a quota, a file-size limit, an I/O error), the previous good state kept;
75 stopped by SIGTERM or SIGUSR1 after saving what resumes it (rerun the same command, or requeue the job);
130 interrupted from the keyboard.
"""

import errno

EXIT_BAD_INPUT = 2
EXIT_WRITE_FAILED = 74  # sysexits.h EX_IOERR
EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: try again later (a scheduler's requeue)

# The errnos of a write that failed because of the machine, not the path the user gave: exit EXIT_WRITE_FAILED.
WRITE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EIO", "EROFS") if hasattr(errno, name)
)


class UserError(Exception):
    """Bad input (a config, a data file, a model path, a flag).

    The CLI prints the message on one line, without a traceback, and exits with code 2.
    The message names the file and the field or line at fault.
    """


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGUSR1) ended the command after it saved what resumes it; the message says where.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it. Exit code 75.
    """


class StageFailed(Exception):
    """A training stage's process exited with a non-zero code (its own message is above)."""

    def __init__(self, stage: str, returncode: int):
        if returncode == EXIT_STOPPED:
            message = f"stage '{stage}' stopped on a signal (exit code {returncode}); rerun to continue"
        else:
            message = f"stage '{stage}' failed (exit code {returncode}); fix the cause and rerun to continue"
        super().__init__(message)
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
