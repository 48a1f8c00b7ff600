"""Kept checkpoints and the resume state (``last/``) of a training run.

Where they go under a stage's output directory ``root`` (e.g. ``runs/<name>/ppo``) is :mod:`selfcorrect.rundir`'s
(:func:`~selfcorrect.rundir.checkpoint_dir`, :func:`~selfcorrect.rundir.last_dir`); what they hold is this module's:
a kept checkpoint has the model's safetensors weights (or the LoRA adapter: :mod:`selfcorrect.train.weights`), config,
tokenizer files and ``manifest.json``; ``last/`` has everything needed to resume (see :func:`save_last`).

Kept checkpoints are the steps listed in ``save_at_steps``; they are written once and never overwritten or
pruned. ``last/`` is replaced at every save. Both are written atomically: into a temporary directory in the
same parent, then renamed into place, so a reader (or a restarted run) sees a complete directory or none.

Only one process may write under ``root`` (with accelerate: the main process); leftover temporary
directories from a killed writer are removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfcorrect.config import check_save_at_steps
from selfcorrect.errors import UserError
from selfcorrect.io import writing
from selfcorrect.provenance import library_versions, now, stamp, to_json
from selfcorrect.rundir import MANIFEST, checkpoint_dir, engine_dir, kept_steps, last_dir, parse_step, step_name
from selfcorrect.train.weights import save_weights, weights_info

__all__ = [
    "MANIFEST_REQUIRED_KEYS",
    "capture_rng",
    "dependent_checkpoints",
    "describe_kept",
    "load_last",
    "restore_rng",
    "save_checkpoint",
    "save_last",
    "validate_save_at_steps",
]

MANIFEST_REQUIRED_KEYS: tuple[str, ...] = ("episodes", "tokens", "mean_reward", "kl", "config_hash")
"""Keys every kept checkpoint's manifest must receive from the caller (values may be None at step 0)."""

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
TENSORS_FILE = "tensors.safetensors"
LAST_FORMAT = 1


# --------------------------------------------------------------------------------------------------------------
# Schedule, names, hashes, versions
# --------------------------------------------------------------------------------------------------------------


def validate_save_at_steps(steps: list[int], total_steps: int, where: str) -> list[int]:
    """Check a ``save_at_steps`` list (:func:`selfcorrect.config.check_save_at_steps`) and return it as a new list
    of ints; a problem is a :class:`UserError` whose message starts with ``where`` and names the offending value."""
    try:
        return check_save_at_steps(steps, total_steps)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def _fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` and the directory entries themselves to disk."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(to_json(obj), encoding="utf-8")


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file object: a failed write then carries its errno (a full disk, a file-size
    limit), which ``torch.save`` to a path loses (a RuntimeError of its zip writer); see
    :func:`selfcorrect.io.writing`."""
    with writing(path), path.open("wb") as f:
        torch.save(obj, f)


# --------------------------------------------------------------------------------------------------------------
# Kept checkpoints
# --------------------------------------------------------------------------------------------------------------


def _remove_stale_temp_dirs(parent: Path, prefix: str) -> None:
    if parent.is_dir():
        for stale in parent.glob(f"{prefix}*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    root: Path, step: int, model: Any, tokenizer: Any, manifest: dict[str, Any], *, verify: bool = False
) -> Path:
    """Write the kept checkpoint of ``step`` atomically and return its directory (:func:`rundir.checkpoint_dir`).

    The directory holds ``model.save_pretrained`` output in safetensors (for a PEFT model: the adapter, with
    the base model reference in ``adapter_config.json`` and in the manifest), the tokenizer, and
    ``manifest.json``: ``step``, ``created_at`` (UTC ISO-8601), ``library_versions``, ``weights``
    (``"full"`` or ``"adapter"``), ``base_model`` (the adapter's base model reference, else None; for a local base
    also ``base_model_relative`` and ``base_model_fingerprint``, :func:`selfcorrect.models.base_record`), then every
    key of ``manifest``, which must include :data:`MANIFEST_REQUIRED_KEYS` (``episodes``, ``tokens``,
    ``mean_reward``, ``kl``, ``config_hash``; values may be None, e.g. at step 0). Pass the unwrapped model
    (``accelerator.unwrap_model``), from the main process only.

    Written into a temporary directory beside it (``.<name>.tmp-<pid>``) and renamed into place when complete.

    **An existing checkpoint is never overwritten**: if the directory already exists (a resumed run reaching a
    step it had saved before it was killed) it is returned unchanged, unless its manifest records a different
    ``config_hash``, which is a :class:`UserError` (another configuration wrote into this run directory). With
    ``verify`` (a run retraining from step 0 over kept checkpoints, its ``last/`` gone) ``model``'s weights must also
    be exactly those the existing checkpoint holds (:func:`_check_same_weights`), else a :class:`UserError`.

    A failed write (a full disk, a quota, a file-size limit: whatever the library raised) is an ``OSError`` with its
    errno and ``filename`` the checkpoint's directory (:func:`selfcorrect.io.writing`); the temporary directory is
    removed and nothing appears under the final name.
    """
    missing = [key for key in MANIFEST_REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"save_checkpoint: the manifest lacks {', '.join(missing)}")
    if "step" in manifest and manifest["step"] != step:
        raise ValueError(f"save_checkpoint: manifest step {manifest['step']} differs from step {step}")
    final = checkpoint_dir(root, step)
    if final.exists():
        _check_existing_checkpoint(final, manifest.get("config_hash"))
        if verify:
            _check_same_weights(Path(root), final, model)
        return final

    weights = weights_info(model)
    base = {}
    if weights["weights"] == "adapter" and isinstance(weights["base_model"], str):
        from selfcorrect.models import base_record

        base = base_record(weights["base_model"], final)  # the base's relative path and fingerprint, if local
    full_manifest = stamp({"step": step, **weights, **base, **manifest})
    encoded = to_json(full_manifest)  # fail early

    parent = final.parent
    prefix = f".{final.name}.tmp-"
    tmp = parent / f"{prefix}{os.getpid()}"
    try:  # a failed write (a full disk, a file-size limit) is an OSError naming ``final``; nothing stays behind
        with writing(final, staging=tmp):
            parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temp_dirs(parent, prefix)
            tmp.mkdir()
            save_weights(model, tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / MANIFEST).write_text(encoded, encoding="utf-8")
            _fsync_tree(tmp)
            os.rename(tmp, final)  # fails rather than replace if ``final`` appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return final


def dependent_checkpoints(root: Path, base_dir: Path) -> list[Path]:
    """The kept checkpoints under ``root`` (a PPO stage's directory) that are adapters on ``base_dir``: replacing
    ``base_dir`` (retraining the SFT stage) would leave them on another base, so they would be refused when loaded."""
    from selfcorrect.models import adapter_base_paths

    target = Path(base_dir).resolve()
    found = []
    for step in kept_steps(root):
        kept = checkpoint_dir(root, step)
        if (kept / "adapter_config.json").is_file() and any(
            place.resolve() == target for place in adapter_base_paths(kept)
        ):
            found.append(kept)
    return found


def describe_kept(paths: list[Path]) -> str:
    """Kept checkpoints of one directory in a few words: ``runs/x/ppo/checkpoints/{step-000000,step-000004}``."""
    return f"{paths[0].parent}/{{{','.join(p.name for p in paths)}}}" if len(paths) > 1 else str(paths[0])


def _check_same_weights(root: Path, final: Path, model: Any) -> None:
    """``model``'s weights, saved as :func:`save_checkpoint` would (into a temporary directory beside ``final``, removed
    after), are exactly those of the existing checkpoint ``final`` (every tensor of its safetensors files); a
    difference is a :class:`UserError`: a retraining that did not reproduce the kept checkpoint it reached."""
    from safetensors.torch import load_file

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(final, staging=tmp):
            save_weights(model, tmp)
        ours = {p.name: load_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        kept = {p.name: load_file(p) for p in sorted(final.glob("*.safetensors"))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same = ours.keys() == kept.keys() and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in ((ours[n], kept[n]) for n in ours)
    )
    if not same:
        raise UserError(
            f"{final}: a training again from step 0 (begun as {last_dir(root)} was missing) reached step "
            f"{parse_step(final.name)} with other weights than this kept checkpoint holds, so the kept checkpoints "
            f"and this training are not one run; put back the {last_dir(root)} saved with them, or move {root} aside "
            "and rerun to start over"
        )


def _check_existing_checkpoint(final: Path, expected_hash: str | None) -> None:
    manifest_path = final / MANIFEST
    try:
        existing = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(
            f"{manifest_path}: an existing checkpoint without a readable manifest ({error}); "
            "move it away to save this step again"
        ) from error
    old_hash = existing.get("config_hash")
    if expected_hash is not None and old_hash is not None and old_hash != expected_hash:
        raise UserError(
            f"{final}: already holds a checkpoint of another configuration (config_hash {old_hash}, "
            f"this run {expected_hash}); use another output directory"
        )


# --------------------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """The global RNG states: python ``random``, numpy's legacy global generator, torch CPU, and torch CUDA
    (every device) when CUDA is available. Plain python values and tensors, loadable with ``weights_only``."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Set the global RNG states from :func:`capture_rng` output (as returned in ``load_last(...)["rng"]``).

    CUDA states are restored only when CUDA is available and the saved state has one entry per device.
    """
    python_state = rng["python"]
    version, internal, gauss_next = python_state
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = rng["numpy"]
    keys = np.asarray(
        numpy_state["keys"].numpy() if isinstance(numpy_state["keys"], torch.Tensor) else numpy_state["keys"],
        dtype=np.uint32,
    )
    np.random.set_state(
        (numpy_state["kind"], keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    )
    torch.set_rng_state(rng["torch"])
    cuda_states = rng.get("cuda")
    if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------------------------------
# Resume state: last/
# --------------------------------------------------------------------------------------------------------------


def _model_dirs(model: Any) -> dict[str, Any]:
    """``{"model": model}`` for one model, or the mapping itself (names become subdirectory names)."""
    models = dict(model) if isinstance(model, Mapping) else {"model": model}
    reserved = {STATE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, TENSORS_FILE}
    for name in models:
        if not name or not name.replace("_", "").replace("-", "").isalnum() or name in reserved:
            raise ValueError(f"save_last: model name {name!r} must be letters, digits, '_' or '-'")
    return models


def save_last(
    root: Path,
    state: dict[str, Any],
    model: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    rng: bool = True,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Replace ``root/last`` atomically with everything needed to resume; returns ``root/last``.

    Contents: the weights of ``model`` via ``save_pretrained`` in ``last/model/`` (a PEFT model writes its
    adapter; a mapping ``{"policy": ..., "value": ...}`` writes one subdirectory per name), ``optimizer.pt``
    (``optimizer.state_dict()``), ``scheduler.pt`` (``scheduler.state_dict()``), ``rng_state.pt``
    (:func:`capture_rng`, when ``rng``), ``tensors.safetensors`` (any named tensors of the caller, e.g. an EMA of the
    weights, when given), and ``state.json``: ``{"format", "created_at", "library_versions",
    "models", "state"}`` where ``state`` is the caller's dict (it must hold ``step``; put episodes, tokens, the
    data position, the KL controller's ``state_dict()``... there). It must be JSON-serialisable; it is checked
    before anything is written.

    Replacement protocol (a kill at any point leaves a loadable state, see :func:`load_last`):
    write everything into ``last.tmp-<pid>``; rename ``last`` to ``last.old``; rename ``last.tmp-<pid>`` to
    ``last``; delete ``last.old``. If ``last`` is missing but ``last.old`` exists (a kill between the two
    renames), ``last.old`` is kept until the new ``last`` is in place.
    """
    if "step" not in state:
        raise ValueError("save_last: state must contain 'step'")
    root = Path(root)
    models = _model_dirs(model)
    record = {
        "format": LAST_FORMAT,
        "created_at": now(),
        "library_versions": library_versions(),
        "models": {name: weights_info(m) for name, m in models.items()},
        "has_optimizer": optimizer is not None,
        "has_scheduler": scheduler is not None,
        "has_rng": bool(rng),
        "has_tensors": tensors is not None,
        "state": state,
    }
    encoded = to_json(record)  # fail before writing

    last = last_dir(root)
    old, tmp_prefix = last.with_name(f"{last.name}.old"), f"{last.name}.tmp-"
    tmp = root / f"{tmp_prefix}{os.getpid()}"
    # A failed write (a full disk, a file-size limit) is an OSError naming ``last``; the temporary directory goes and
    # the previous ``last`` (or ``last.old``) stays as it was.
    try:
        with writing(last, staging=tmp):
            root.mkdir(parents=True, exist_ok=True)
            _remove_stale_temp_dirs(root, tmp_prefix)
            tmp.mkdir()
            for name, m in models.items():
                save_weights(m, tmp / name)
            if optimizer is not None:
                _torch_save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            if scheduler is not None:
                _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            if rng:
                _torch_save(capture_rng(), tmp / RNG_FILE)
            if tensors is not None:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
            (tmp / STATE_FILE).write_text(encoded, encoding="utf-8")  # written last: marks a complete directory
            _fsync_tree(tmp)
            if last.exists():
                if old.exists():  # a stale leftover: ``last`` is complete, so ``last.old`` is not needed
                    shutil.rmtree(old)
                os.rename(last, old)
            os.rename(tmp, last)  # if this fails, ``last.old`` is what load_last reads
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    if old.exists():
        shutil.rmtree(old)
    return last


class _Torn(Exception):
    """A file of a resume state that cannot be read back: ``path`` and what is wrong with it."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _reading(path: Path, read: Any) -> Any:
    """``read()``; whatever goes wrong reading ``path`` (missing, cut short, not what was saved) is a ``_Torn``."""
    try:
        return read()
    except FileNotFoundError:
        raise _Torn(path, "missing") from None
    except json.JSONDecodeError as exc:
        raise _Torn(path, f"not valid JSON ({exc})") from None
    except Exception as exc:  # torch.load, safetensors, a wrong structure: one reason each, on one line
        text = " ".join(str(exc).split())
        raise _Torn(path, f"unreadable ({type(exc).__name__}: {text[:160]})") from None


def _check_weights(directory: Path, kind: Any) -> None:
    """The weights directory of a resume state is whole: its JSON files parse, and its safetensors files (at least
    one; their headers say how long they must be) are complete, without reading the weights themselves. ``kind``: the
    record's ``weights`` entry as read from JSON (``"full"`` or ``"adapter"`` name a config file that must be there)."""
    from safetensors import safe_open

    if not directory.is_dir():
        raise _Torn(directory, "missing")
    needed = {"full": "config.json", "adapter": "adapter_config.json"}.get(kind)
    if needed is not None and not (directory / needed).is_file():
        raise _Torn(directory / needed, "missing")
    for path in sorted(directory.glob("*.json")):
        _reading(path, lambda path=path: json.loads(path.read_text(encoding="utf-8")))
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise _Torn(directory, "holds no safetensors weights")
    for path in found:

        def check(path: Path = path) -> None:
            with safe_open(str(path), framework="pt"):  # checks that the file covers every tensor of its header
                pass

        _reading(path, check)


def _read_last(directory: Path) -> dict[str, Any]:
    """Everything :func:`load_last` returns, read from ``directory``; a torn file is a ``_Torn``."""
    from safetensors.torch import load_file

    state_path = directory / STATE_FILE
    record = _reading(state_path, lambda: json.loads(state_path.read_text(encoding="utf-8")))
    fields = ("state", "models", "has_optimizer", "has_scheduler", "has_rng", "created_at", "library_versions")
    if not isinstance(record, dict) or any(key not in record for key in fields):
        raise _Torn(state_path, "not a resume state written by selfcorrect (cut short or edited)")
    if not isinstance(record["state"], dict) or "step" not in record["state"] or not isinstance(record["models"], dict):
        raise _Torn(state_path, "not a resume state written by selfcorrect (no step or models)")
    model_dirs = {name: directory / name for name in record["models"]}
    for name, model_dir in model_dirs.items():
        info = record["models"][name]
        _check_weights(model_dir, info.get("weights") if isinstance(info, dict) else None)

    def load(name: str, present: bool) -> Any:
        path = directory / name
        return _reading(path, lambda: torch.load(path, map_location="cpu", weights_only=True)) if present else None

    tensors_path = directory / TENSORS_FILE
    return {
        "path": directory,
        "state": record["state"],
        "model_dirs": model_dirs,
        "optimizer": load(OPTIMIZER_FILE, record["has_optimizer"]),
        "scheduler": load(SCHEDULER_FILE, record["has_scheduler"]),
        "rng": load(RNG_FILE, record["has_rng"]),
        "tensors": _reading(tensors_path, lambda: load_file(str(tensors_path))) if record.get("has_tensors") else None,
        "created_at": record["created_at"],
        "library_versions": record["library_versions"],
    }


def load_last(root: Path) -> dict[str, Any] | None:
    """Read the resume state written by :func:`save_last`, or None if ``root`` has none.

    Uses ``root/last``; if it is missing but ``root/last.old`` exists (a run killed between the two renames of
    :func:`save_last`), uses ``last.old``. Nothing is renamed or deleted here (the next save tidies up).
    Returns::

        {"path": Path,                        # the directory read (last/ or last.old/)
         "state": dict,                       # the caller's state as saved
         "model_dirs": {name: Path},          # "model" for a single model; pass to weights.restore_weights
         "optimizer": dict | None,            # for optimizer.load_state_dict
         "scheduler": dict | None,            # for scheduler.load_state_dict
         "rng": dict | None,                  # for restore_rng
         "tensors": dict | None,              # the named tensors given to save_last (on the CPU)
         "created_at": str, "library_versions": dict}

    Tensors are loaded to CPU with ``weights_only=True``; the weights are checked whole (their safetensors headers)
    but not loaded (:func:`selfcorrect.train.weights.restore_weights` does that).

    **A torn resume state is never skipped** (starting over would retrain over the kept checkpoints): a file of it
    missing, cut short or unreadable is a one-line :class:`UserError` naming the file and what is wrong, and how to
    go on (:func:`torn_last_message`).
    """
    root = Path(root)
    directory = last_dir(root)
    if not directory.is_dir():
        directory = directory.with_name(f"{directory.name}.old")
        if not directory.is_dir():
            return None
    try:
        return _read_last(directory)
    except _Torn as torn:
        raise UserError(torn_last_message(root, directory, torn.path, torn.reason)) from None


def torn_last_message(root: Path, directory: Path, path: Path, reason: str) -> str:
    """One line: the file of the resume state ``directory`` (``last/`` or ``last.old/`` of ``root``) that cannot be
    read and why, then the ways on: restore it; resume from an intact older ``last.old`` (an earlier step: not the
    same state, so only if asked); start over. The newest kept checkpoint is named, and why it cannot be resumed
    from: it holds the policy weights only."""
    root = Path(root)
    parts = [f"{path}: {reason}; {directory} is torn, so the run cannot resume from it"]
    kept = kept_steps(root)
    if kept and kept[-1] > 0:
        parts.append(
            f"the newest kept checkpoint, {checkpoint_dir(root, kept[-1])} (step {kept[-1]}), holds the policy "
            "weights only (not the value model, optimizer or scheduler), so no exact resume from it is possible"
        )
    ways = [f"restore {directory} from a copy"]
    old = last_dir(root).with_name(f"{last_dir(root).name}.old")
    if directory != old and old.is_dir():
        try:
            step = _read_last(old)["state"]["step"]
        except _Torn:
            pass
        else:
            ways.append(f"replace it by {old} (an intact earlier save, of step {step}: the steps after it run again)")
    ways.append(f"move {root} aside and rerun to start over from step 0")
    parts.append("to go on: " + ", or ".join(ways))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Under DeepSpeed: engine checkpoints named by last/
# --------------------------------------------------------------------------------------------------------------
# Under DeepSpeed the weights and the optimizer state are split between the processes (ZeRO), so ``last/`` names a
# DeepSpeed engine checkpoint that every process writes its share of (rundir.engine_dir); the atomic replacement of
# ``last/`` stays the moment a save counts, and older engine checkpoints go after it.


def save_engine_checkpoint(engine: Any, root: Path, step: int) -> str:
    """Every process writes its share of the engine's state for ``step``; returns the tag for ``last/``'s state.

    A collective: every process must call it.
    """
    tag = step_name(step)
    with writing(engine_dir(root) / tag):  # a partial one is never named by last/; the next save's prune removes it
        engine.save_checkpoint(str(engine_dir(root)), tag=tag, save_latest=False)
    return tag


def prune_engine_checkpoints(root: Path, keep: str) -> None:
    """Remove the engine checkpoints other than ``keep`` (after ``last/`` names ``keep``; main process only)."""
    for old in engine_dir(root).iterdir():
        if old.is_dir() and old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_engine_checkpoint(engine: Any, root: Path, tag: str, named_by: Path) -> None:
    """Load the engine checkpoint ``tag`` that ``named_by`` (``last/``) names; a missing or unreadable one is a
    UserError (a collective: every process must call it)."""
    checkpoint = engine_dir(root) / tag
    if not checkpoint.is_dir():
        raise UserError(f"{checkpoint}: missing (named by {named_by}); cannot resume")
    loaded, _ = engine.load_checkpoint(str(engine_dir(root)), tag=tag, load_lr_scheduler_states=False)
    if loaded is None:
        raise UserError(f"{checkpoint}: DeepSpeed could not load it; cannot resume")
