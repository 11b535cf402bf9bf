"""Environment faults: a full, read-only or forbidden disk, or an address where nothing answers, is the machine's
problem, not a trial's.

Such an error is not retried trial by trial; it is said once, in one line naming the path (or address), its free
space and the fix, and the launch stops (exit code 2, like bad input) so `--resume` can continue once it is fixed.
An address is probed (`unreachable`) in seconds before a client library would retry it for minutes.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
_WORDS = {  # how storage libraries that drop errno (pyarrow) still say it
    "no space left": errno.ENOSPC,
    "read-only file system": errno.EROFS,
    "permission denied": errno.EACCES,
    "disk quota exceeded": errno.EDQUOT,
}
_FIX = {
    errno.ENOSPC: "free some space or point `storage:` (--set storage=...) at a larger disk",
    errno.EDQUOT: "free some space or point `storage:` (--set storage=...) at a larger disk",
    errno.EROFS: "point `storage:` (--set storage=...) at a writable disk",
    errno.EACCES: "make it writable for this user or point `storage:` (--set storage=...) elsewhere",
    errno.EPERM: "make it writable for this user or point `storage:` (--set storage=...) elsewhere",
}


def human_bytes(n: float) -> str:
    """`1.2 GB`, `5.1 MB`, `3.0 KB`, `12 bytes`."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} bytes"


def free_space(path: str | Path) -> str:
    """Free space of the disk holding `path` (or its nearest existing parent), e.g. `1.2 GB free`."""
    here = Path(path)
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return f"{human_bytes(shutil.disk_usage(here).free)} free"
    except OSError:
        return "free space unknown"


def _named_in(text: str) -> int | None:
    """The fault an error's text names in words (`No space left on device`), if any."""
    text = text.lower()
    return next((code for words, code in _WORDS.items() if words in text), None)


def _errno(exc: BaseException) -> int | None:
    for err in (exc, exc.__cause__, exc.__context__):
        if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
            return err.errno
    return _named_in(str(exc)) if isinstance(exc, OSError) else None


def _line(code: int, where: str) -> str:
    return f"{where}: {errno.errorcode.get(code, code)} ({os.strerror(code)}, {free_space(where)}); {_FIX[code]}"


def describe_fault(exc: BaseException, fallback_path: str = "") -> str | None:
    """One line for an environment fault (`path: No space left on device (0 bytes free); fix`), else None."""
    code = _errno(exc)
    if code is None:
        return None
    path = next((e.filename for e in (exc, exc.__cause__) if isinstance(e, OSError) and e.filename), fallback_path)
    return _line(code, str(path) if path else fallback_path or "storage")


def describe_fault_text(text: str, storage: str = "") -> str | None:
    """`describe_fault`'s line for an error known only by its text (a retried trial's, from Tune), at `storage`."""
    code = _named_in(text)
    return None if code is None else _line(code, storage or "storage")


def unreachable(host: str, port: int, timeout_s: float = 5.0) -> str | None:
    """Why no TCP connection opens to `host`:`port` within about `timeout_s` each for the name lookup and the
    connection (`host h does not resolve: ...`, `connection refused: nothing listens on h:p`, `no answer from
    h:p within 5s`), or None when one opens. Signals interrupt the wait."""
    found: list[Any] = []

    def resolve() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)

    lookup = threading.Thread(target=resolve, name="fasweep-resolve", daemon=True)  # getaddrinfo has no timeout
    lookup.start()
    lookup.join(timeout_s)
    if not found:
        return f"host {host} does not resolve within {timeout_s:.0f}s"
    if isinstance(found[0], OSError):
        return f"host {host} does not resolve: {found[0].strerror or found[0]}"
    error: OSError | None = None
    for family, kind, proto, _, address in found[0]:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.settimeout(timeout_s)
                probe.connect(address)
                return None
        except OSError as exc:
            error = exc
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused: nothing listens on {host}:{port}"
    if isinstance(error, TimeoutError):
        return f"no answer from {host}:{port} within {timeout_s:.0f}s"
    return f"{host}:{port} unreachable: {error.strerror if error else 'no address'}"
