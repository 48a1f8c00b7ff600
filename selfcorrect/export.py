"""``selfcorrect export CHECKPOINT OUT``: a kept checkpoint as a plain model directory any tool can load.

A kept LoRA checkpoint is an adapter whose base is the SFT stage's output, itself an adapter on the pretrained
model: only selfcorrect's loader rebuilds that chain (``PeftModel.from_pretrained(<base>, checkpoint)`` silently
leaves the SFT adapter out). The export merges every adapter of the chain into the base weights and writes a
Hugging Face directory with safetensors weights, the tokenizer and a ``manifest.json`` (the checkpoint's own, plus
``exported_from``), so ``AutoModelForCausalLM.from_pretrained(OUT)``, lm-eval's ``hf`` model, vLLM and
``selfcorrect evaluate OUT`` (in the recorded dialogue format) all load the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfcorrect.errors import UserError
from selfcorrect.io import staged_dir, writing
from selfcorrect.provenance import now, to_json
from selfcorrect.rundir import MANIFEST


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Merge ``checkpoint`` (any model reference; typically a kept PPO checkpoint) into full weights at
    ``out``, atomically (a temporary directory beside ``out``, renamed into place). ``out`` must not exist yet.

    ``dtype`` is that of the written weights (default: float32, the dtype the checkpoints train in on a CPU).

    A failed write (a full disk, a quota, a file-size limit) is an ``OSError`` naming ``out``
    (:func:`selfcorrect.io.writing`); the temporary directory is removed and ``out`` does not appear.
    """
    from selfcorrect.models import load_model

    source, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    if out.exists():
        raise UserError(f"{out}: already exists; export into a new directory")
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(str(checkpoint), dtype=dtype or "float32", device="cpu")
    manifest = _read_manifest(source)
    manifest.update(
        exported_from=str(source.resolve()) if source.exists() else str(checkpoint),
        exported_at=now(),
        weights="full",
        base_model=None,
    )
    with staged_dir(out, replace=False, wrap_writes=True) as staging:
        model.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
        (staging / MANIFEST).write_text(to_json(manifest))
    return out


def _read_manifest(source: Path) -> dict:
    path = source / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the manifest ({exc})") from None
    return manifest if isinstance(manifest, dict) else {}
