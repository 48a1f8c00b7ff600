"""Whether the Hugging Face Hub can be reached, asked once and quickly, before anything is loaded from it.

Without a network, ``from_pretrained`` and ``load_dataset`` retry for about a minute before they fail. A reference
that is not a local path is checked here first, so an offline machine gets a one-line error within seconds that
says how to go on (a local directory, or ``HF_HUB_OFFLINE=1`` for copies already in the Hugging Face cache).
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from selfcorrect.errors import UserError

PROBE_TIMEOUT_S = 3.0


def offline_mode() -> bool:
    """Whether the user asked huggingface_hub to stay offline (``HF_HUB_OFFLINE=1``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def unreachable() -> str | None:
    """Why the Hub's endpoint cannot be reached (a TCP connection within 3 s), or None when it can."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"
    return None


def require(ref: str, what: str, local_hint: str) -> None:
    """Raise a one-line UserError when ``ref`` (not a local path) cannot come from the Hub: offline without a cache.

    ``what`` says what ``ref`` names (``model``, ``dataset``); ``local_hint`` what a local reference would be. With
    ``HF_HUB_OFFLINE=1`` nothing is probed (the Hub libraries then read their cache at once).
    """
    if offline_mode():
        return
    reason = unreachable()
    if reason is not None:
        raise UserError(
            f"{ref}: no such local {local_hint}, and the Hugging Face Hub is unreachable ({reason}); give a local "
            f"{what} path, or set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache"
        )
