"""Downloads that fail fast and clearly where there is no internet.

Library loaders (torchvision, timm, open_clip) fetch weights from the web or the Hugging Face hub. Here,
a loader is first tried against the local cache only; if that fails and the hub cannot be reached, the
user gets one line naming the tag and the config key to point at a local file, instead of a minute of
retries and a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

from polypure.errors import ConfigError, PolypureError

T = TypeVar("T")
HF_HUB = "https://huggingface.co"


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a connection on its port."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_error(what: str, tag: str, key: str, reason: str) -> PolypureError:
    """The one-line error for weights that cannot be fetched, saying how to supply a local file."""
    return PolypureError(
        f"{key}: could not get the {tag!r} weights of {what} ({reason}); without internet, download them on "
        f"another machine and set {key} to the local file (.safetensors or a torch state dict)")


@contextlib.contextmanager
def quiet_logs():
    """Silence libraries that log through the root logger (open_clip's "initialized randomly", retries)."""
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(old_level)


@contextlib.contextmanager
def hub_offline():
    """Make the Hugging Face hub client use its local cache only, and keep loaders' retry logs quiet."""
    import huggingface_hub.constants as constants

    old_flag, old_env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with quiet_logs():
            yield
    finally:
        constants.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def fetch(load: Callable[[], T], *, what: str, tag: str, key: str, host: str = HF_HUB) -> T:
    """Run a loader that may download: local cache first, then the network if it can be reached.

    Parameters
    ----------
    load : callable
        Builds the model (and downloads its weights when needed).
    what, tag, key : str
        The model, the weights tag and the config key, for the error message.
    host : str
        Where the weights come from.

    Raises
    ------
    PolypureError
        One line, when the weights are neither cached nor downloadable.
    """
    try:
        with hub_offline():
            return load()
    except ConfigError:
        raise
    except Exception:  # not in the cache (each library words this differently)
        pass
    if not host_reachable(host):
        raise download_error(what, tag, key, f"{urlparse(host).hostname} unreachable and not in the local cache")
    try:
        return load()
    except (OSError, RuntimeError) as exc:
        raise download_error(what, tag, key, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
