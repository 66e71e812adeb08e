"""File input and output shared by the CLI, the widgets and the tools: reading images (TIFF,
OME-TIFF, PNG, Zarr/OME-Zarr), opening large ones for reading in parts (`open_image`), finding
inputs (files, folders, globs), and writing results atomically (a temporary file or Zarr folder
in the destination folder, then a rename), so that an interrupted run never leaves a
half-written output behind. Zarr needs the optional `zarr` package (the `scale` extra)."""
from __future__ import annotations

import contextlib
import csv
import glob
import io as _io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
ZARR_SUFFIX = ".zarr"
# Files that mark a folder as a Zarr store (format 2 array/group/attributes, format 3).
ZARR_MARKERS = (".zarray", ".zgroup", ".zattrs", "zarr.json")


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
    """Reads a TIFF/OME-TIFF, PNG or Zarr/OME-Zarr image as an array; raises ValueError naming the
    file if unreadable. (A Zarr image is read whole: use open_image to read a large one in parts.)"""
    path = Path(path)
    suffix = path.suffix.lower()
    if is_zarr(path):
        with open_image(path) as source:
            return source.read_full()
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
    raise ValueError(f"'{path}': unsupported image format (expected {', '.join(IMAGE_SUFFIXES + (ZARR_SUFFIX,))})")


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
    """Expands files, folders (their images, sorted) and glob patterns; raises if nothing matches.
    A Zarr store (a folder ending .zarr, or one holding .zarray/.zgroup/zarr.json) is one image."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and not is_zarr(path):
            found.extend(sorted(p for p in path.iterdir() if _is_image_entry(p)))
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


def _is_image_entry(path: Path) -> bool:
    return (path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir()) or (path.is_dir() and is_zarr(path))


# ---------------------------------------------------------------- Zarr and large images


class MissingDependency(RuntimeError):
    """An optional package needed for this input or output is not installed."""


def _zarr():
    try:
        import zarr
    except ImportError as exc:
        raise MissingDependency("Zarr input/output needs the 'zarr' package: pip install 'deepspot-napari[scale]' "
                                "(or pip install zarr)") from exc
    return zarr


def zarr_available() -> bool:
    try:
        import zarr  # noqa: F401
    except ImportError:
        return False
    return True


def is_zarr(path: str | os.PathLike) -> bool:
    """A path ending .zarr, or a folder holding Zarr metadata."""
    path = Path(path)
    if path.suffix.lower() == ZARR_SUFFIX:
        return True
    return path.is_dir() and any((path / marker).exists() for marker in ZARR_MARKERS)


class ImageSource:
    """An image opened for reading in parts: `shape` and `dtype` without reading the pixels, and
    `read(key)` for a region. Leading axes of length 1 (an OME (t, c, z, y, x) image of one time
    point and channel) are dropped from `shape`; `full_shape` keeps them, and `full_key` maps a key
    of `shape` onto them (an output mirrors the input's full shape). Use as a context manager."""

    def __init__(self, path, array, close=None, axes: list[dict] | None = None):
        self.path = Path(path) if path is not None else None
        self.array = array
        self._close = close
        self.full_shape = tuple(int(n) for n in array.shape)
        dropped = 0
        while len(self.full_shape) - dropped > 2 and self.full_shape[dropped] == 1:
            dropped += 1
        self.dropped = dropped
        self.shape = self.full_shape[dropped:]
        self.dtype = np.dtype(array.dtype)
        self.axes = axes

    @classmethod
    def from_array(cls, array) -> "ImageSource":
        """Wraps an in-memory or Zarr array (anything with shape, dtype and slicing)."""
        if not hasattr(array, "shape") or not hasattr(array, "dtype"):
            array = np.asarray(array)
        return cls(None, array)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def full_key(self, key) -> tuple:
        key = key if isinstance(key, tuple) else (key,)
        return (0,) * self.dropped + key

    def read(self, key=()) -> np.ndarray:
        """The region `key` (a tuple of slices/indices over `shape`) as a NumPy array."""
        try:
            return np.asarray(self.array[self.full_key(key)])
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - codecs, stores and tifffile raise many kinds
            raise ValueError(f"cannot read {_describe_key(key)} of '{self.name}': {type(exc).__name__}: {exc}") \
                from exc

    def read_full(self) -> np.ndarray:
        """The whole image in its full shape (leading axes of length 1 kept)."""
        return self.read(())[(np.newaxis,) * self.dropped]

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "the image"

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe_key(key) -> str:
    key = key if isinstance(key, tuple) else (key,)
    if not key:
        return "the pixels"
    parts = [f"{k.start or 0}:{'' if k.stop is None else k.stop}" if isinstance(k, slice) else str(k) for k in key]
    return f"region [{', '.join(parts)}]"


def open_image(path: str | os.PathLike, *, memory_limit_pixels: int | None = None) -> ImageSource:
    """Opens an image for reading in parts: Zarr/OME-Zarr (level 0 of a multiscale image), TIFF and
    OME-TIFF through tifffile's Zarr store (chunked reads; a memory map or a whole read when zarr
    is missing), PNG in memory. Raises ValueError naming the file if it cannot be opened."""
    path = Path(path)
    suffix = path.suffix.lower()
    if is_zarr(path):
        array, axes = _open_zarr_image(path)
        return ImageSource(path, array, axes=axes)
    if suffix in (".tif", ".tiff"):
        return _open_tiff(path)
    if suffix == ".png":
        return ImageSource(path, read_image(path))
    if not path.exists():
        raise FileNotFoundError(f"no such image: {path}")
    raise ValueError(f"'{path}': unsupported image format (expected {', '.join(IMAGE_SUFFIXES + (ZARR_SUFFIX,))})")


def image_shape(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an image from its metadata, without reading the pixels."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        try:
            from PIL import Image
            with Image.open(path) as image:
                bands = len(image.getbands())
                shape = (image.height, image.width) + ((bands,) if bands > 1 else ())
                return shape, np.dtype(np.uint16 if image.mode.startswith("I;16") else np.uint8)
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"cannot read image '{path}': {exc}") from exc
    if path.suffix.lower() in (".tif", ".tiff") and not is_zarr(path):
        import tifffile
        try:
            with tifffile.TiffFile(path) as tiff:
                series = tiff.series[0]
                return tuple(int(n) for n in series.shape), np.dtype(series.dtype)
        except Exception as exc:  # noqa: BLE001 - tifffile reports corrupt files with many kinds
            raise ValueError(f"cannot read image '{path}': {exc}") from exc
    with open_image(path) as source:
        return source.full_shape, source.dtype


def _open_tiff(path: Path) -> ImageSource:
    """Through tifffile's Zarr store when zarr is installed (chunked reads of tiled, striped or
    compressed files), else a memory map (uncompressed files), else a whole read."""
    import tifffile
    errors = []
    if zarr_available():
        zarr = _zarr()
        store = None
        try:
            store = tifffile.imread(path, aszarr=True)
            node = zarr.open(store, mode="r")
            if not hasattr(node, "shape"):  # a pyramid: level 0 is the full resolution
                node = node[_first_dataset_path(node)]
            return ImageSource(path, node, close=store.close)
        except Exception as exc:  # noqa: BLE001 - tifffile and zarr report corrupt files with many kinds
            errors.append(exc)
            if store is not None:
                store.close()
    for read in (lambda: tifffile.memmap(path, mode="r"), lambda: tifffile.imread(path)):
        try:
            return ImageSource(path, read())
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - as above
            errors.append(exc)
    raise ValueError(f"cannot read image '{path}': {errors[-1]}") from errors[-1]


def _first_dataset_path(group) -> str:
    """The full-resolution array of an OME-Zarr multiscale group (NGFF 0.4 or 0.5), or the only/first array."""
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if multiscales:
        return str(multiscales[0]["datasets"][0]["path"])
    names = sorted(name for name, _ in group.arrays())
    if not names:
        raise ValueError("the Zarr group holds no array")
    return "0" if "0" in names else names[0]


def _ome_axes(group) -> list[dict] | None:
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if multiscales and isinstance(multiscales[0].get("axes"), list):
        return [a if isinstance(a, dict) else {"name": str(a)} for a in multiscales[0]["axes"]]
    return None


def _open_zarr_image(path: Path):
    zarr = _zarr()
    if not path.exists():
        raise FileNotFoundError(f"no such Zarr image: {path}")
    try:
        node = zarr.open(str(path), mode="r")
        axes = None
        if not hasattr(node, "shape"):
            axes = _ome_axes(node)
            node = node[_first_dataset_path(node)]
        if not hasattr(node, "shape"):
            raise ValueError("the multiscale dataset is not an array")
    except MissingDependency:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr reports bad metadata with many exception types
        raise ValueError(f"cannot read Zarr image '{path}': {type(exc).__name__}: {exc}") from exc
    if axes is not None and len(axes) != len(node.shape):
        axes = None
    return node, axes


def _default_axes(ndim: int) -> list[dict]:
    names = ("t", "c", "z", "y", "x")[-ndim:] if ndim <= 5 else None
    if names is None:
        return [{"name": f"dim_{i}"} for i in range(ndim - 2)] + [{"name": "y", "type": "space"},
                                                                 {"name": "x", "type": "space"}]
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    return [{"name": n, "type": kinds[n]} for n in names]


def create_zarr(path: str | os.PathLike, shape: tuple[int, ...], dtype, chunks: tuple[int, ...],
                axes: list[dict] | None = None, name: str | None = None):
    """Creates an OME-Zarr image (NGFF 0.4: a Zarr format 2 group with one full-resolution array
    "0", readable by napari, Fiji and any Zarr library) at `path`, which must not exist; returns
    the array for writing."""
    zarr = _zarr()
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists")
    shape = tuple(int(n) for n in shape)
    chunks = tuple(max(1, min(int(c), n)) for c, n in zip(chunks, shape))
    kwargs = {"zarr_format": 2} if int(zarr.__version__.split(".")[0]) >= 3 else {}
    group = zarr.open_group(str(path), mode="w-", **kwargs)
    if hasattr(group, "create_array"):
        array = group.create_array("0", shape=shape, chunks=chunks, dtype=np.dtype(dtype), fill_value=0)
    else:  # zarr 2
        array = group.create_dataset("0", shape=shape, chunks=chunks, dtype=np.dtype(dtype), fill_value=0)
    axes = axes if axes is not None and len(axes) == len(shape) else _default_axes(len(shape))
    group.attrs["multiscales"] = [{
        "version": "0.4", "name": name or path.stem, "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(shape)}]}],
    }]
    return array


def open_zarr_for_writing(path: str | os.PathLike):
    """The array of an OME-Zarr image made by create_zarr, opened for writing (from another process)."""
    zarr = _zarr()
    return zarr.open_group(str(path), mode="r+")["0"]


def write_zarr(path: str | os.PathLike, array: np.ndarray, chunks: tuple[int, ...] | None = None,
               overwrite: bool = False) -> None:
    """Writes an in-memory array as an OME-Zarr image, atomically."""
    array = np.asarray(array)
    if chunks is None:
        chunks = (1,) * (array.ndim - 2) + (1024, 1024)
    with atomic_zarr(path, overwrite=overwrite) as tmp:
        create_zarr(tmp, array.shape, array.dtype, chunks, name=Path(path).stem)[...] = array


@contextlib.contextmanager
def atomic_zarr(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder path beside `path` to write a Zarr store into; on success it is
    renamed to `path`, on error (or interruption) it is removed. An existing `path` raises
    FileExistsError unless overwrite is set, then it is replaced once the new one is complete."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --overwrite to replace it")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    tmp = holder / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(f"nothing was written to {tmp}")
        replace_dir(tmp, path, overwrite=overwrite)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def replace_dir(source: Path, target: Path, overwrite: bool = False) -> None:
    """Moves the folder `source` to `target` by renames; an existing target is moved aside first
    and deleted after (overwrite) or raises FileExistsError."""
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{target} exists")
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, trash / target.name)
        try:
            os.replace(source, target)
        except BaseException:
            os.replace(trash / target.name, target)
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, target)
