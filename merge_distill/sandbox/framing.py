"""Framing shared by the host and its workers: a 4-byte big-endian length, then a UTF-8 JSON object.

Standard library only: it is shipped into the sandbox with the worker (see
:func:`merge_distill.sandbox.policy._worker_source`), and the host's :mod:`merge_distill.sandbox.pool`
re-exports :func:`write_frame` and :func:`read_frame`.
"""

from __future__ import annotations

import json
import os
import struct

_HEADER = struct.Struct("!I")


def write_frame(fd: int, obj: dict) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    data = _HEADER.pack(len(data)) + data
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, need = [], n
    while need:
        chunk = os.read(fd, min(need, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict | None:
    """Read one frame; None on EOF (the other side is gone)."""
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(head)[0])
    if body is None:
        return None
    return json.loads(body.decode("utf-8", "surrogatepass"))
