"""A model's weights on disk as safetensors: saved, described, restored in place.

Three kinds of model: a PEFT model (its active LoRA adapter), a transformers model (``save_pretrained``), a plain
``torch.nn.Module`` (its state dict as ``model.safetensors``). :mod:`selfcorrect.train.checkpoints` writes them into
kept checkpoints and ``last/``; weights are never written as pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from selfcorrect.io import writing

__all__ = ["is_peft", "restore_weights", "save_weights", "weights_info"]


def is_peft(model: Any) -> bool:
    """Whether ``model`` is a PEFT model (its weights: the adapter)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def weights_info(model: Any) -> dict[str, Any]:
    """What kind of weights ``model`` saves: a LoRA/PEFT adapter (and on which base model) or a full model."""
    if is_peft(model):
        adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
        peft_config = model.peft_config[adapter]
        return {
            "weights": "adapter",
            "adapter_type": str(
                peft_config.peft_type.value if hasattr(peft_config.peft_type, "value") else peft_config.peft_type
            ),
            "base_model": peft_config.base_model_name_or_path,
        }
    if hasattr(model, "save_pretrained"):
        return {"weights": "full", "base_model": None}
    return {"weights": "state_dict", "base_model": None}


def save_weights(model: Any, directory: Path) -> None:
    """Save ``model`` into ``directory`` as safetensors: ``save_pretrained`` (a PEFT model writes its adapter),
    or for a plain ``torch.nn.Module`` its state dict as ``model.safetensors``. A save that produced no
    safetensors file is a RuntimeError (weights are never written as pickle)."""
    with writing(directory, staging=directory):  # a failed write names the directory (a library's may name no file)
        directory.mkdir(parents=True, exist_ok=True)
        if is_peft(model):
            model.save_pretrained(directory, safe_serialization=True)
        elif hasattr(model, "save_pretrained"):
            model.save_pretrained(directory)  # transformers 5 always writes safetensors
        else:
            from safetensors.torch import save_model

            save_model(model, str(directory / "model.safetensors"))
    if not any(directory.glob("*.safetensors")):
        raise RuntimeError(f"{directory}: saving {type(model).__name__} wrote no safetensors file")


def restore_weights(model: Any, directory: str | Path) -> None:
    """Load weights saved by :func:`~selfcorrect.train.checkpoints.save_last` /
    :func:`~selfcorrect.train.checkpoints.save_checkpoint` back into ``model``, in place.

    A PEFT model gets its active adapter's weights from ``adapter_model.safetensors``; a transformers model
    is reloaded with ``from_pretrained`` (so any key renaming of the save is undone) and copied in with a
    strict ``load_state_dict``; a plain module reads ``model.safetensors``. Parameters keep their device and
    dtype, so an optimizer built on them stays valid.
    """
    directory = Path(directory)
    if is_peft(model):
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
        result = set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"), adapter)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{directory}: adapter weights do not fit the model: {unexpected[:5]}")
    elif hasattr(model, "save_pretrained"):
        loaded = type(model).from_pretrained(directory, use_safetensors=True, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
    else:
        from safetensors.torch import load_model

        load_model(model, str(directory / "model.safetensors"))
