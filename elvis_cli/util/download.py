"""Resumable HTTP downloads with checksum verification.

Benchmark archives are gigabytes: an interrupted transfer is kept as `<file>.part` and the next
attempt asks the server for the rest with a Range request. The file takes its final name only
after its size and (when known) SHA-256 check out, so a present file is a complete one.
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from elvis_cli.util.errors import InputError, OfflineError

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where downloads live: $ELVIS_CACHE, else ~/.cache/elvis."""
    return Path(os.environ.get("ELVIS_CACHE") or Path.home() / ".cache" / "elvis").expanduser()


class UnreachableError(OfflineError):
    """A server that could not be reached or did not send the file; the URL and the reason
    are kept apart, so that a message that lists URLs itself shows each once."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


def download_to_cache(url: str, target: Path, what: str, alternative: str) -> Path:
    """`target`, fetched from `url` the first time (resumable); offline, one line that says
    where to put the file instead."""
    if target.is_file():
        return target
    try:
        fetch(url, target)
    except OfflineError as error:
        raise OfflineError(
            f"could not download {what} ({error}); copy the file to {target} or {alternative}"
        ) from None
    return target


def offline_forced() -> bool:
    """$ELVIS_OFFLINE=1 means: never touch the network (air-gapped machines, tests)."""
    return os.environ.get("ELVIS_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the host of `url` (or to the proxy that reaches it) opens
    within `timeout` seconds: a second's check before a client that retries for half a minute
    when there is no network (Hugging Face's)."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, target: Path, sha256: str | None = None, timeout: float = 30.0,
          on_bytes: Callable[[int], None] | None = None) -> str:
    """Download `url` to `target`, resuming a `.part` file; returns the file's SHA-256.

    Raises OfflineError when the server cannot be reached (the `.part` is kept for next time)
    and InputError when the finished file fails its checksum (the `.part` is removed, since
    resuming it would only repeat the mismatch).
    """
    if offline_forced():
        raise OfflineError("offline ($ELVIS_OFFLINE is set)")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    start = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "elvis-cli"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = response.status == 206
            expected = _expected_size(response, start if resumed else 0)
            with open(partial, "ab" if resumed else "wb") as handle:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    handle.write(block)
                    if on_bytes is not None:
                        on_bytes(len(block))
    except urllib.error.HTTPError as error:
        if error.code != 416 or not start:  # 416: the .part already holds every byte
            raise UnreachableError(url, f"HTTP {error.code} {error.reason}") from None
        expected = None
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", None) or error
        raise UnreachableError(url, str(reason).splitlines()[0][:120]) from None
    size = partial.stat().st_size
    if expected is not None and size != expected:
        raise UnreachableError(url, f"transfer stopped at {size} of {expected} bytes; run "
                               "again to resume")
    digest = sha256_of(partial)
    if sha256 is not None and digest != sha256.lower():
        partial.unlink()
        raise InputError(f"{url}: checksum mismatch (sha256 {digest}, expected {sha256}); "
                         "the download was removed")
    os.replace(partial, target)
    return digest


def _expected_size(response, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return None if length is None else offset + int(length)
