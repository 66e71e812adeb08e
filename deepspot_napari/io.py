"""File input and output shared by the CLI, the widgets and the tools: reading images (TIFF,
OME-TIFF, PNG), finding inputs (files, folders, globs), and writing results atomically (a
temporary file in the destination folder, fsync, rename), so that an interrupted run never
leaves a half-written output behind."""
from __future__ import annotations

import contextlib
import csv
import glob
import io as _io
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Yields a file object; on success the file replaces `path` at once, on error nothing is left."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as handle:
        handle.write(data)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads a TIFF/OME-TIFF or PNG image as an array; raises ValueError naming the file if unreadable."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile
            return tifffile.imread(path)
        if suffix == ".png":
            from PIL import Image
            with Image.open(path) as image:
                return np.asarray(image)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL and tifffile report corrupt files so
        raise ValueError(f"cannot read image '{path}': {exc}") from exc
    raise ValueError(f"'{path}': unsupported image format (expected {', '.join(IMAGE_SUFFIXES)})")


def write_tiff(path: str | os.PathLike, array: np.ndarray) -> None:
    import tifffile
    buffer = _io.BytesIO()
    tifffile.imwrite(buffer, array)
    write_bytes(path, buffer.getvalue())


def write_spots_table(path: str | os.PathLike, table: dict[str, np.ndarray]) -> None:
    """CSV with a header row: the coordinate columns (y, x or z, y, x) first, then the rest."""
    with atomic_write(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(table))
        columns = list(table.values())
        for row in zip(*columns):
            writer.writerow([f"{v:.6g}" if isinstance(v, (float, np.floating)) else v for v in row])


def find_images(inputs: list[str]) -> list[Path]:
    """Expands files, folders (their images, sorted) and glob patterns; raises if nothing matches."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no such file, folder or pattern: {item}")
            found.extend(matches)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise FileNotFoundError(f"no images found in {' '.join(inputs)}")
    return unique
