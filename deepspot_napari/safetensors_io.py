"""Minimal, dependency-free *writer* for the safetensors format (float32 only).

Used by ``tools/convert_reference_weights.py`` (and by training code that saves checkpoints) to write
weight files that the strict C reader in ``csrc/`` loads.  Layout written, per the safetensors spec:

* 8 bytes: little-endian uint64 N, the length of the JSON header;
* N bytes: UTF-8 JSON ``{"<name>": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
  "__metadata__": {str: str}}``, padded with spaces so that ``8 + N`` is a multiple of 8;
* the raw little-endian float32 data of every tensor, C-contiguous, in sorted-name order, with no gaps.

The file is written atomically: a temporary file in the destination folder, fsync, ``os.replace``.
On any error nothing is left at ``path`` (and the temporary file is removed).  Tensors are read only
by the strict reader in C; ``read_metadata`` here reads the header's ``__metadata__`` (the model's
settings, such as the training target it was made for).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping

import numpy as np

__all__ = ["save_safetensors", "read_metadata"]

_ALIGN = 8


def _check_tensors(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    if not isinstance(tensors, Mapping):
        raise TypeError("tensors must be a mapping of name -> numpy array")
    items: list[tuple[str, np.ndarray]] = []
    for name, arr in tensors.items():
        if not isinstance(name, str) or name == "":
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"tensor {name!r}: expected a numpy.ndarray, got {type(arr).__name__}")
        if arr.dtype.kind != "f" or arr.dtype.itemsize != 4:
            raise ValueError(f"tensor {name!r}: only float32 is supported, got {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"tensor {name!r}: contains NaN or Inf")
        # Little-endian and C-contiguous (no copy when it already is; keeps 0-d arrays 0-d).
        items.append((name, arr.astype("<f4", order="C", copy=False)))
    items.sort(key=lambda kv: kv[0])
    return items


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    out: dict[str, str] = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata keys and values must be str, got {k!r}: {v!r}")
        out[k] = v
    return out


def _build_header(items: list[tuple[str, np.ndarray]], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, arr in items:
        nbytes = int(arr.nbytes)
        header[name] = {
            "dtype": "F32",
            "shape": [int(d) for d in arr.shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    pad = (-(8 + len(raw))) % _ALIGN
    return raw + b" " * pad


def _chmod_like_new_file(fd: int) -> None:
    """mkstemp creates 0600 files; give the result the permissions open() would (0666 & ~umask)."""
    if not hasattr(os, "fchmod"):
        return
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> float32 array) to ``path`` in the safetensors format, atomically.

    Raises ``ValueError`` for a non-float32 array, NaN/Inf values, an empty (or reserved) name, or
    non-string metadata.  Validation happens before anything is written; if anything fails, no file
    is created at ``path`` (a file already there is left untouched) and the temporary file is removed.
    """
    items = _check_tensors(tensors)
    meta = _check_metadata(metadata)
    header = _build_header(items, meta)

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    try:
        _chmod_like_new_file(fd)
        with os.fdopen(fd, "wb") as fh:
            fh.write(len(header).to_bytes(8, "little"))
            fh.write(header)
            for _, arr in items:
                fh.write(arr.tobytes(order="C"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable where the platform allows it.
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


_MAX_HEADER = 100 * 1024 * 1024


def read_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` object of a safetensors file ({} when it has none). A file too short or
    with a header that is not a JSON object raises ValueError naming the file."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (no valid header length)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8")) if len(raw) == n else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (the header is not a JSON object, or it is truncated)")
    meta = header.get("__metadata__", {})
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
