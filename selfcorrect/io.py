"""Small file helpers used everywhere: JSONL with line-numbered errors, atomic writes, appends, downloads."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
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


def _umask_mode() -> int:
    """The mode a plain new file gets (mkstemp would make it 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file so that readers see the old or the new content, never a half-written one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, _umask_mode())
    try:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects).encode()
    with path.open("a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(max(0, size - 1))
            if f.read(1) != b"\n":
                f.seek(0)
                keep = f.read().rfind(b"\n") + 1
                f.truncate(keep)
                f.seek(0, os.SEEK_END)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
