"""The one gate in front of every Hugging Face hub download (CLIP, Stable Diffusion, DINOv2, SAM).

Without network, huggingface_hub retries each file for half a minute and the libraries above it chain
three tracebacks. Before a loader hands a hub name to its library it calls :func:`require_hub`, which
checks once per process (a TCP connection to the hub's host, or to the HTTPS proxy, with a short timeout)
whether the hub can be reached, and fails at once with one line naming ``HF_HUB_OFFLINE`` and local
directories when it cannot. With ``HF_HUB_OFFLINE=1`` no check is made (the libraries read their local
cache). :func:`hub_errors` turns what the hub libraries raise when a download or a cache lookup fails
into the same kind of one-line :class:`HubUnavailableError`.
"""

from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

from weakseg.core import HubUnavailableError

__all__ = ["HubUnavailableError", "hub_offline", "hub_reachable", "require_hub", "hub_error", "hub_errors"]

_TIMEOUT_S = 3.0
_reachable: bool | None = None  # the process-wide answer of hub_reachable()




def hub_offline() -> bool:
    """Whether the user switched the hub libraries to their local cache (``HF_HUB_OFFLINE`` set to a true
    value, as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _endpoint() -> tuple[str, int]:
    """(host, port) a hub request connects to first: the HTTPS proxy if one is set, else the endpoint."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(var):
            u = urlparse(os.environ[var] if "://" in os.environ[var] else "http://" + os.environ[var])
            if u.hostname:
                return u.hostname, u.port or (443 if u.scheme == "https" else 80)
    u = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return u.hostname or "huggingface.co", u.port or (80 if u.scheme == "http" else 443)


def _probe(host: str, port: int, timeout: float) -> bool:
    """One TCP connection attempt, name resolution included, bounded by ``timeout`` seconds in all."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=attempt, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def hub_reachable(refresh: bool = False) -> bool:
    """Whether the hub (or the HTTPS proxy in front of it) accepts a connection; checked once per process
    (``refresh=True`` checks again)."""
    global _reachable
    if _reachable is None or refresh:
        _reachable = _probe(*_endpoint(), _TIMEOUT_S)
    return _reachable


_ADVICE = ("set HF_HUB_OFFLINE=1 to use a copy already in the local hub cache, or give a local directory "
           "(written by save_pretrained) instead")


def _sync_offline() -> None:
    """huggingface_hub reads ``HF_HUB_OFFLINE`` once, when it is imported; a value set later (by the user's
    script, or a test) would leave it trying the network with retries. Its flag is read at call time, so
    set it to what the environment says now."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - every hub library depends on it
        return
    constants.HF_HUB_OFFLINE = True


def require_hub(name: str, what: str) -> None:
    """Call before handing the hub name ``name`` (``what``: the kind of model, e.g. "CLIP model") to a hub
    library: under ``HF_HUB_OFFLINE`` returns at once (and makes sure huggingface_hub reads only its local
    cache, even when the variable was set after it was imported), else raises :class:`HubUnavailableError`
    when the hub cannot be reached."""
    if hub_offline():
        _sync_offline()
        return
    if not hub_reachable():
        host, port = _endpoint()
        raise HubUnavailableError(f"{what} {name!r}: the Hugging Face hub is unreachable (no connection to "
                                  f"{host}:{port} within {_TIMEOUT_S:g} s); {_ADVICE}")


def hub_error(e: OSError, name: str, what: str) -> HubUnavailableError:
    """The one-line :class:`HubUnavailableError` for a hub library's failure ``e`` to load ``name``."""
    if isinstance(e, HubUnavailableError):
        return e
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    mode = " (HF_HUB_OFFLINE is set: only the local hub cache is read)" if hub_offline() else ""
    return HubUnavailableError(f"{what} {name!r}: could not load it from the Hugging Face hub{mode}: "
                               f"{type(e).__name__}: {first}; {_ADVICE}")


@contextmanager
def hub_errors(name: str, what: str) -> Iterator[None]:
    """Around a hub library's load of the hub name ``name``: its failures to fetch or find files (OSError and
    the hub's errors, which derive from it, also when a library wraps them in a RuntimeError) become one
    :class:`HubUnavailableError` line naming ``what``."""
    try:
        yield
    except OSError as e:
        raise hub_error(e, name, what) from None
    except RuntimeError as e:  # open_clip re-raises a failed weight download as a RuntimeError
        if not isinstance(e.__context__, OSError):
            raise
        raise hub_error(e.__context__, name, what) from None
