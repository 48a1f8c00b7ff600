"""Reading back what an offline W&B run recorded, without an account or network (a test helper).

An offline run directory holds a ``.wandb`` file: a LevelDB-style log of protobuf ``Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32768  # the log is written in 32 KiB blocks
_HEADER = 7  # per chunk: crc32 (4 bytes), length (2), type (1); the file starts with ":W&B", magic, version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing the ':W&B' header)")
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding up to the next block
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
            pending = b""
    return records


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """What an offline W&B run directory (``.../offline-run-*``) recorded, read from its ``.wandb`` file.

    Returns ``{"name", "group", "history", "metrics", "summary"}``; ``history`` holds one dict per ``wandb.log``
    call, ``metrics`` maps each ``define_metric`` name (or glob) to its step metric, ``summary`` holds what was set
    in ``run.summary`` (the last value of each key).
    """
    from wandb.proto import wandb_internal_pb2

    files = sorted(Path(run_dir).glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no .wandb file")
    run: dict[str, Any] = {"name": None, "group": None, "history": [], "metrics": {}, "summary": {}}
    for raw in _chunks(files[0].read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["group"] = record.run.display_name, record.run.run_group
        elif kind == "history":
            items = record.history.item
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "metric":
            run["metrics"][record.metric.name or record.metric.glob_name] = record.metric.step_metric
    return run
