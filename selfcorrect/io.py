"""Small file helpers used everywhere: JSONL with line-numbered errors, atomic writes and directories (written in a
staging directory, renamed into place), appends, downloads."""

from __future__ import annotations

import contextlib
import csv
import errno
import gzip
import io
import json
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from selfcorrect.errors import UserError


def iter_jsonl(path: str | Path, *, tolerate_torn_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-empty line (``.gz`` files too); a malformed line is a UserError.

    With ``tolerate_torn_tail`` a malformed *last* line without a newline (a write cut short by a kill)
    is skipped instead: that is how per-item result files are read back.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb") as f:
            lines = f.read().split(b"\n")
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    last = len(lines)
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if tolerate_torn_tail and number == last:
                return
            raise UserError(f"{path}: line {number}: malformed JSON ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


# How libraries that write files themselves report a failed write: safetensors ("I/O error: No space left on device
# (os error 28)"), torch.save (a RuntimeError from its zip writer, the OSError of a Python file object as its context).
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]|\berrno:? ?(\d+)|\bcode: ?(\d+)", re.IGNORECASE)
_STRERRORS = {
    text.lower(): code
    for text, code in (
        ("No space left on device", errno.ENOSPC),
        ("Disk quota exceeded", getattr(errno, "EDQUOT", errno.ENOSPC)),
        ("File too large", errno.EFBIG),
        ("Read-only file system", errno.EROFS),
        ("Input/output error", errno.EIO),
        ("Permission denied", errno.EACCES),
    )
}
_WRITING = re.compile(r" \(writing (.+)\)$")
_WRITER_FAILURES = ("i/o error", "pytorchstreamwriter", "inline_container.cc", "iostream error", "failed writing")


def write_error(error: BaseException, path: str | Path, staging: str | Path | None = None) -> OSError | None:
    """``error`` (raised while writing ``path``) as an ``OSError(errno, strerror, str(path))``, or None if it is not
    a failed write.

    An OSError keeps its errno; an exception of a library that writes files itself (safetensors, torch.save) becomes
    one when its message says it failed writing: its errno is that of the OSError it was raised from (a Python file
    object's), or the one its text gives (``os error 28``, ``File too large``...), else EIO. A file named by the
    error under ``staging`` (the temporary file or directory being written, removed afterwards) is named relative to
    it in the strerror: the path named is the one the user knows.
    """
    if not isinstance(error, Exception):
        return None
    text = str(error)
    chained = error if isinstance(error, OSError) else None
    if chained is None and any(marker in text.lower() for marker in _WRITER_FAILURES):
        link: BaseException | None = error
        for _ in range(8):  # the OSError a library's writer was raised from, if any
            link = (link.__cause__ or link.__context__) if link is not None else None
            if isinstance(link, OSError) and link.errno is not None:
                chained = link
                break
        if chained is None:
            found = _ERRNO_IN_TEXT.search(text)
            code = next((int(g) for g in found.groups() if g), None) if found else None
            if code is None:
                code = next((c for t, c in _STRERRORS.items() if t in text.lower()), errno.EIO)
            return OSError(code, os.strerror(code), str(path))
    if chained is None:
        return None
    code = chained.errno if chained.errno is not None else errno.EIO
    reason = chained.strerror or (os.strerror(code) if chained.errno is not None else text) or os.strerror(code)
    name = chained.filename
    if name is not None and staging is not None:
        name, inside = Path(os.fsdecode(name)), Path(staging)
        if name == inside:
            name = None
        elif inside in name.parents:
            within = _WRITING.search(reason)  # a nested writing(): "(writing model.safetensors)" of a subdirectory
            rel = name.relative_to(inside) / within.group(1) if within else name.relative_to(inside)
            reason = f"{reason[: within.start()] if within else reason} (writing {rel})"
            name = None
    if name is not None and Path(os.fsdecode(name)) != Path(path):
        reason = f"{reason} ({os.fsdecode(name)})"
    return OSError(code, reason, str(path))


@contextlib.contextmanager
def writing(path: str | Path, *, staging: str | Path | None = None) -> Iterator[None]:
    """Writes of ``path`` (a file or a directory being saved): any failed write in the block, whatever the library
    raised, leaves as an ``OSError`` with its errno and ``filename`` ``path`` (:func:`write_error`), which the CLI
    prints as one line (a full disk, a quota or a file-size limit: exit 74). Cleaning up is the caller's."""
    try:
        yield
    except Exception as exc:
        converted = write_error(exc, path, staging)
        if converted is None:
            raise
        if isinstance(exc, OSError) and (exc.filename, exc.strerror) == (converted.filename, converted.strerror):
            raise  # already as wanted
        raise converted from exc


def _umask() -> int:
    """This process's umask (read by setting it and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    """The mode a plain new file gets (mkstemp would make it 0600)."""
    return 0o666 & ~_umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file so that readers see the old or the new content, never a half-written one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a half-written one."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with writing(path, staging=tmp):
            os.chmod(tmp, _umask_mode())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_dir(staging: str | Path, target: str | Path, *, replace: bool = True) -> Path:
    """Move a finished staging directory to ``target`` by rename (same file system), so readers see all or nothing.

    With ``replace`` an earlier ``target`` is moved aside first and removed after; without it an existing ``target``
    is a UserError and nothing moves.
    """
    staging, target = Path(staging), Path(target)
    if target.exists() and not replace:
        raise UserError(f"{target}: already exists")
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "previous")
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def staged_dir(
    dest: str | Path, *, replace: bool = True, staging: str | Path | None = None, wrap_writes: bool = False
) -> Iterator[Path]:
    """Write a directory all or nothing: yield a staging directory beside ``dest``, rename it into place when the block
    succeeds (:func:`install_dir`), remove it when the block fails (``dest`` is then untouched).

    * The staging directory is a fresh ``.<name>.tmp-XXXXXXXX`` sibling of ``dest`` with the usual permissions (the
      umask's, not mkdtemp's 0700), or with ``staging`` that fixed path (removed first if an earlier, killed writer
      left it, then made): a path every process of a distributed save knows, where one process uses this helper
      and the others write into the path itself.
    * ``replace``: an existing ``dest`` is replaced (moved aside, then removed); without it, it is a UserError at the
      rename and nothing moves.
    * ``wrap_writes``: a failed write anywhere (making the staging directory, the block, the rename) is an ``OSError``
      naming ``dest`` (:func:`writing`); without it errors pass as raised. Nothing is fsynced.
    """
    dest = Path(dest)

    def wrapped(**staged: Any) -> contextlib.AbstractContextManager:
        return writing(dest, **staged) if wrap_writes else contextlib.nullcontext()

    with wrapped():
        dest.parent.mkdir(parents=True, exist_ok=True)
        if staging is None:
            made = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        else:
            made = Path(staging)
            shutil.rmtree(made, ignore_errors=True)
            made.mkdir(parents=True)
    try:
        with wrapped(staging=made):
            if staging is None:
                os.chmod(made, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result gets the usual permissions
            yield made
            install_dir(made, dest, replace=replace)
    except BaseException:
        shutil.rmtree(made, ignore_errors=True)
        raise


def check_writable_dir(path: str | Path, what: str) -> None:
    """A one-line UserError unless ``path`` is a directory this process can write, or can be created as one.

    Nothing is created: the nearest existing ancestor gets a probe file that is removed at once, so a read-only file
    system or a missing permission shows before any work starts.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: {what} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{path}: {what} cannot be created ({existing} is not a directory)")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".selfcorrect-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{path}: {what} is not writable ({exc.strerror or exc})") from None


def append_jsonl(path: str | Path, objects: Iterable[dict[str, Any]]) -> None:
    """Append objects as JSON lines in one write, flushed and synced (a kill loses whole lines only).

    If an earlier writer was killed mid-line, the torn tail is cut off first.
    """
    path = Path(path)
    data = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects).encode()
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+b", buffering=0) as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(max(0, size - 1))
                if f.read(1) != b"\n":
                    f.seek(0)
                    size = f.read().rfind(b"\n") + 1
                    f.truncate(size)
                    f.seek(0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:  # a raw file: a short write (a file-size limit reached) shows as an error, not a loss
                    view = view[f.write(view) :]
                os.fsync(f.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    f.truncate(size)  # no torn line left behind (and the space given back)
                raise


def csv_text(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """A CSV document as text."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    writer.writerows(rows)
    return buf.getvalue()


DOWNLOAD_TIMEOUT = 30.0


def download(url: str, dest: Path, *, what: str) -> Path:
    """Fetch a public file once into ``dest`` (atomically); offline is a one-line UserError."""
    if dest.is_file():
        return dest
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp:
            data = resp.read()
    except OSError as exc:
        raise UserError(
            f"{what}: no data directory given (--data-dir or SELFCORRECT_DATA_DIR) and the official "
            f"release could not be downloaded from {url} ({exc.__class__.__name__}; offline?)"
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.chmod(tmp, _umask_mode())
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    return dest
