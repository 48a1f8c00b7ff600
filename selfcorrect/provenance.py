"""Provenance: what every result records about how it was made, written one way.

* :func:`config_hash`: the identity of a configuration (canonical JSON, sorted keys);
* :func:`content_fingerprint`: the identity of a local file or directory by its bytes (size and sha256), cached per
  (absolute path, size, mtime) so a big file is hashed once, not at every run;
* :func:`library_versions`: the versions of the libraries that made a result;
* :func:`stable_seed`: a seed from any parts, the same in every process and Python version (data order, CoT
  samples, bootstrap resamples, rollouts);
* :func:`stamp` and :func:`to_json`: a manifest's common fields (``created_at``, ``library_versions``) and its JSON
  text, for the manifests of the SFT stage, the reward model, kept PPO checkpoints and exports.

Pure Python: training and evaluation both use it, and neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "selfcorrect")


def stable_seed(*parts: object) -> int:
    """A 32-bit seed from any parts, identical across processes and Python versions."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def library_versions() -> dict[str, str]:
    """Installed versions of python, torch, transformers, trl, peft, accelerate, datasets and selfcorrect.

    A library that is not installed is reported as ``"not installed"``.
    """
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def json_default(value: Any) -> Any:
    """JSON encoding of the non-JSON values a caller may reasonably pass (paths, tensor and numpy scalars)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    item = getattr(value, "item", None)  # torch and numpy scalars
    size = getattr(value, "numel", None) or getattr(value, "size", None)
    if callable(item) and (size == 1 or (callable(size) and size() == 1)):
        return item()
    tolist = getattr(value, "tolist", None)  # arrays and tensors
    if callable(tolist):
        return tolist()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def config_hash(config: dict[str, Any]) -> str:
    """First 16 hex digits of the sha256 of ``config`` as canonical JSON (sorted keys, no spaces, UTF-8).

    Paths are written as strings; two configs that differ only in key order have the same hash.
    """
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_default)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


HASH_CACHE = "file-hashes.json"  # under selfcorrect.config.cache_dir(): {absolute path: {size, mtime_ns, sha256}}


def content_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a local file's content; of a directory, over its files (their paths
    relative to it, sizes and hashes; hidden files left out).

    Each file's hash is cached in ``cache_dir()/file-hashes.json`` per absolute path, size and mtime, so a file is
    hashed again only once it changes. The cache is written atomically; a cache that cannot be read or written is
    only a cache (the file is hashed, nothing fails).
    """
    path = Path(path).expanduser().resolve()
    cache = _read_hash_cache()
    before = dict(cache)
    if path.is_dir():
        files = sorted(
            f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        listing = [(str(f.relative_to(path)), *_file_hash(f, cache)) for f in files]
        size = sum(n for _, n, _ in listing)
        digest = hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()
    else:
        size, digest = _file_hash(path, cache)
    if cache != before:
        _write_hash_cache(cache)
    return {"size": size, "sha256": digest}


def _file_hash(path: Path, cache: dict[str, Any]) -> tuple[int, str]:
    """A file's size and sha256: from ``cache`` when its size and mtime are those recorded, else hashed (and
    recorded in ``cache``)."""
    stat = path.stat()
    entry = cache.get(str(path))
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return stat.st_size, entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    cache[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return stat.st_size, digest.hexdigest()


def _hash_cache_path() -> Path:
    from selfcorrect.config import cache_dir

    return cache_dir() / HASH_CACHE


def _read_hash_cache() -> dict[str, Any]:
    try:
        cache = json.loads(_hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_hash_cache(cache: dict[str, Any]) -> None:
    from selfcorrect.io import atomic_write_text

    try:
        atomic_write_text(_hash_cache_path(), json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only cache directory: the next run hashes again
        pass


def now() -> str:
    """The current UTC time, ISO-8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stamp(record: dict[str, Any]) -> dict[str, Any]:
    """A manifest: ``created_at`` and ``library_versions``, then the caller's fields (which win)."""
    return {"created_at": now(), "library_versions": library_versions(), **record}


def to_json(record: dict[str, Any]) -> str:
    """A manifest's JSON text (indented, sorted keys, paths and tensor scalars converted); fails before any write."""
    return json.dumps(record, indent=2, sort_keys=True, default=json_default) + "\n"
