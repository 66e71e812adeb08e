"""Large images in blocks (deepspot_napari.large) and Zarr input/output (deepspot_napari.io):
a Zarr image enhanced block by block equals the in-memory result; blocked detection finds the
same spots as a whole-image pass, spots on block borders once; stacks use each plane's own
maximum; the CLI runs end to end on Zarr inputs (OME-Zarr metadata, --resume, no silent
overwrite); a corrupt Zarr is reported and skipped without leaving a partial output; an
interrupted run leaves nothing behind. Sizes are small so that the whole file runs in seconds."""
import csv
import os

import numpy as np
import pytest
import tifffile

zarr = pytest.importorskip("zarr", reason="Zarr input/output needs the optional 'zarr' package (the 'scale' extra)")

from deepspot_napari import io, large  # noqa: E402
from deepspot_napari.cli import main  # noqa: E402
from deepspot_napari.detect import detect_spots  # noqa: E402
from deepspot_napari.model import Cancelled, Model  # noqa: E402
from deepspot_napari.simulate import simulate_image  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return Model.load()


def simulated(rng, height, width, n_spots=60):
    image, _ = simulate_image(rng, "ds_var", n_spots=n_spots, size=max(height, width))
    return np.ascontiguousarray(image[:height, :width])


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def synthetic_enhanced(rng, shape, centres):
    """An 'enhanced-looking' image: 3x3 spots of value ~1 at the given centres on a low background."""
    image = rng.uniform(0.0, 0.3, shape).astype(np.float32)
    for centre in centres:
        y, x = centre[-2:]
        plane = image[centre[0]] if len(centre) == 3 else image
        plane[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = np.maximum(
            plane[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2], 0.8)
        plane[y, x] = 0.9 + 0.1 * rng.random()
    return image


def sorted_spots(spots):
    order = np.lexsort(spots.coords.T[::-1])
    return spots.coords[order], spots.score[order], spots.intensity[order], spots.size[order]


# ---------------------------------------------------------------- enhancement


def test_zarr_image_enhanced_in_blocks_equals_in_memory(model, rng, tmp_path):
    image = simulated(rng, 603, 701, n_spots=90)  # not multiples of 8: the bottom/right padding path
    source = io.create_zarr(tmp_path / "in.zarr", image.shape, image.dtype, (100, 100))  # chunks unlike blocks
    source[...] = image
    expected = model.enhance(image)
    with io.atomic_zarr(tmp_path / "out.zarr") as tmp:
        target = io.create_zarr(tmp, image.shape, np.float32, large.output_chunks(image.shape, 256))
        steps = []
        large.enhance_blocks(model, tmp_path / "in.zarr", target, block_size=256,
                             progress=lambda done, total: steps.append((done, total)))
    assert steps[-1] == (18, 18)  # 9 blocks: the maximum pass, then the network
    result = io.read_image(tmp_path / "out.zarr")
    assert result.dtype == np.float32 and result.shape == image.shape
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)
    assert zarr.open(str(tmp_path / "out.zarr"), mode="r")["0"].chunks == (256, 256)


def test_stack_planes_are_scaled_by_their_own_whole_plane_maximum(model, rng):
    stack = np.stack([simulated(rng, 136, 150, 20), simulated(rng, 136, 150, 20) // 3])
    stack[1, 5, 5] = 0  # keep plane 1 non-constant in every block
    blocked = large.enhance_blocks(model, stack, block_size=128)
    np.testing.assert_allclose(blocked, model.enhance(stack), rtol=0, atol=1e-6)


def test_whole_image_checks_apply_to_blocked_runs(model):
    with pytest.raises(ValueError, match="constant"):
        large.enhance_blocks(model, np.full((100, 90), 7, np.uint16), block_size=64)
    with pytest.raises(ValueError, match="maximum 0"):
        large.enhance_blocks(model, np.zeros((100, 90), np.uint16), block_size=64)
    image = np.ones((100, 90), np.float32)
    image[50, 60] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        large.enhance_blocks(model, image, block_size=64)


def test_block_geometry_and_arguments():
    cores = large.block_grid(603, 701, 256)
    assert len(cores) == 9 and all(c[0] % 8 == 0 and c[2] % 8 == 0 for c in cores)
    covered = np.zeros((603, 701), int)
    for y0, y1, x0, x1 in cores:
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()
    assert large.HALO_PX >= large.RECEPTIVE_FIELD_PX == 192
    with pytest.raises(ValueError, match="multiple of 8"):
        large.block_grid(100, 100, 100)
    with pytest.raises(ValueError, match="receptive-field"):
        large.check_halo(128)
    assert large.output_chunks((5, 20000, 20000), 4096) == (1, 2048, 2048)


# ---------------------------------------------------------------- detection


def test_blocked_detect_equals_whole_image_detect_with_spots_on_block_borders(rng):
    height, width, block = 300, 260, 64
    border = [(64, 100), (127, 30), (128, 200), (191, 64), (10, 63), (250, 192), (64, 64), (255, 255)]
    others = [(int(y), int(x)) for y, x in zip(rng.integers(3, height - 3, 60), rng.integers(3, width - 3, 60))]
    # random spots touching a border spot's 3x3 would merge with it into one peak
    others = [(y, x) for y, x in others if min(max(abs(y - by), abs(x - bx)) for by, bx in border) > 3]
    enhanced = synthetic_enhanced(rng, (height, width), border + others)
    raw = rng.integers(0, 4000, (height, width)).astype(np.uint16)
    whole = detect_spots(enhanced, raw=raw)
    blocked = large.detect_blocks(enhanced, raw=raw, block_size=block)
    # the default detector (peak, no subpixel): the same table, in the same order
    for a, b in zip((whole.coords, whole.score, whole.intensity, whole.size),
                    (blocked.coords, blocked.score, blocked.intensity, blocked.size)):
        np.testing.assert_array_equal(a, b)
    found = {tuple(c) for c in blocked.coords.astype(int).tolist()}
    assert {(y, x) for y, x in border} <= found  # on core borders: found once (the arrays are equal)
    for subpixel in ("centroid", "gaussian"):
        a = sorted_spots(detect_spots(enhanced, raw=raw, subpixel=subpixel, min_distance=3))
        b = sorted_spots(large.detect_blocks(enhanced, raw=raw, block_size=block, subpixel=subpixel, min_distance=3))
        assert len(a[0]) == len(b[0])
        np.testing.assert_allclose(a[0], b[0], atol=1e-3)
        for x, y in zip(a[1:], b[1:]):
            np.testing.assert_array_equal(x, y)


def test_blocked_detect_of_a_z_stack_equals_whole_stack_detect(rng):
    centres = [(z, int(y), int(x)) for z, y, x in zip(rng.integers(0, 4, 50), rng.integers(2, 150, 50),
                                                      rng.integers(2, 170, 50))]
    centres += [(1, 64, 80), (2, 64, 80), (2, 65, 128), (3, 64, 129)]  # molecules across planes, on borders
    enhanced = synthetic_enhanced(rng, (4, 152, 172), centres)
    whole = sorted_spots(detect_spots(enhanced))
    blocked = sorted_spots(large.detect_blocks(enhanced, block_size=64))
    for a, b in zip(whole, blocked):
        np.testing.assert_array_equal(a, b)


def test_detect_blocks_reads_zarr_and_keeps_spots_in_global_coordinates(rng, tmp_path):
    enhanced = synthetic_enhanced(rng, (200, 200), [(150, 170), (20, 30)])
    io.write_zarr(tmp_path / "e.zarr", enhanced, chunks=(64, 64))
    spots = large.detect_blocks(tmp_path / "e.zarr", block_size=64)
    assert sorted(map(tuple, spots.coords.astype(int).tolist())) == [(20, 30), (150, 170)]


# ---------------------------------------------------------------- input and output


def test_tiff_is_read_in_parts_through_a_zarr_store(rng, tmp_path):
    image = rng.integers(0, 60000, (3, 300, 400)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "tiled.ome.tif", image, tile=(128, 128), compression="zlib", ome=True)
    with io.open_image(tmp_path / "tiled.ome.tif") as source:
        assert source.shape == (3, 300, 400) and source.dtype == np.uint16
        if int(zarr.__version__.split(".")[0]) >= 3:  # tifffile's Zarr store needs zarr 3 (else: a whole read)
            assert not isinstance(source.array, np.ndarray)  # chunked reads, not a whole-file read
        np.testing.assert_array_equal(source.read((1, slice(100, 250), slice(30, 390))), image[1, 100:250, 30:390])
    assert io.image_shape(tmp_path / "tiled.ome.tif") == ((3, 300, 400), np.dtype(np.uint16))


def test_ome_zarr_leading_axes_of_one_are_dropped_and_kept_in_the_output(rng, tmp_path):
    image = rng.integers(0, 1000, (1, 1, 2, 40, 50)).astype(np.uint16)
    io.write_zarr(tmp_path / "x.ome.zarr", image, chunks=(1, 1, 1, 32, 32))
    assert [a["name"] for a in zarr.open(str(tmp_path / "x.ome.zarr"), mode="r").attrs["multiscales"][0]["axes"]] \
        == ["t", "c", "z", "y", "x"]
    with io.open_image(tmp_path / "x.ome.zarr") as source:
        assert source.shape == (2, 40, 50) and source.full_shape == image.shape
        np.testing.assert_array_equal(source.read((1, slice(0, 10), slice(5, 9))), image[0, 0, 1, :10, 5:9])
    np.testing.assert_array_equal(io.read_image(tmp_path / "x.ome.zarr"), image)
    assert io.find_images([str(tmp_path)]) == [(tmp_path / "x.ome.zarr").resolve()]


def test_atomic_zarr_never_overwrites_silently_and_cleans_up(tmp_path):
    io.write_zarr(tmp_path / "a.zarr", np.ones((10, 10), np.float32))
    with pytest.raises(FileExistsError):
        io.write_zarr(tmp_path / "a.zarr", np.zeros((10, 10), np.float32))
    io.write_zarr(tmp_path / "a.zarr", np.full((10, 10), 2, np.float32), overwrite=True)
    assert (io.read_image(tmp_path / "a.zarr") == 2).all()
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_zarr(tmp_path / "b.zarr") as tmp:
            io.create_zarr(tmp, (10, 10), np.float32, (5, 5))
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["a.zarr"]


def test_cancelled_blocked_run_leaves_no_output(model, rng, tmp_path):
    image = simulated(rng, 200, 200, 10)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        with io.atomic_zarr(tmp_path / "out.zarr") as tmp:
            target = io.create_zarr(tmp, image.shape, np.float32, (64, 64))
            large.enhance_blocks(model, image, target, block_size=64, cancel=cancel)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- the command line


@pytest.fixture
def zarr_input(rng, tmp_path):
    """A 300x280 OME-Zarr image (t, c, z, y, x) = (1, 1, 1, 300, 280) and the same pixels as a TIFF."""
    folder = tmp_path / "in"
    folder.mkdir()
    image = simulated(rng, 300, 280, 60)
    io.write_zarr(folder / "mosaic.zarr", image[None, None, None], chunks=(1, 1, 1, 128, 128))
    (tmp_path / "tiff").mkdir()
    tifffile.imwrite(tmp_path / "tiff" / "mosaic.tif", image)
    return folder, image


def test_cli_runs_end_to_end_on_a_zarr_input(model, zarr_input, tmp_path, capsys):
    folder, image = zarr_input
    out = tmp_path / "out"
    assert main(["run", str(folder), "-o", str(out), "--save-enhanced", "--block-size", "256", "-q"]) == 0
    assert "1 done, 0 skipped, 0 failed" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["mosaic.enhanced.zarr", "mosaic.spots.csv"]
    enhanced = io.read_image(out / "mosaic.enhanced.zarr")
    assert enhanced.shape == (1, 1, 1, 300, 280) and enhanced.dtype == np.float32
    np.testing.assert_allclose(enhanced[0, 0, 0], model.enhance(image), rtol=0, atol=1e-6)
    # the same pixels as a TIFF, whole and in memory: the same table, line for line
    assert main(["run", str(tmp_path / "tiff"), "-o", str(tmp_path / "mem"), "-q"]) == 0
    rows = read_rows(out / "mosaic.spots.csv")
    assert rows[0] == ["y", "x", "score", "intensity", "size"]  # the leading axes of length 1 are not stack axes
    assert rows == read_rows(tmp_path / "mem" / "mosaic.spots.csv") and len(rows) > 10
    # detect on the enhanced Zarr (blocks, no network) finds the same positions
    assert main(["detect", str(out / "mosaic.enhanced.zarr"), "-o", str(tmp_path / "det"), "-q"]) == 0
    assert [r[:2] for r in read_rows(tmp_path / "det" / "mosaic.enhanced.spots.csv")] == [r[:2] for r in rows]
    # nothing overwritten silently; --resume skips; --overwrite replaces
    before = (out / "mosaic.spots.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(folder), "-o", str(out), "--save-enhanced", "-q"]) == 1
    assert "exists: pass --overwrite or --resume" in capsys.readouterr().out
    assert main(["run", str(folder), "-o", str(out), "--save-enhanced", "--resume", "-q"]) == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out
    assert (out / "mosaic.spots.csv").stat().st_mtime_ns == before
    assert main(["enhance", str(folder), "-o", str(out), "--overwrite", "-q", "--block-size", "256"]) == 0
    assert sorted(os.listdir(out)) == ["mosaic.enhanced.zarr", "mosaic.spots.csv"]  # no temporary folders left


def test_cli_writes_zarr_for_images_over_the_size_threshold(model, rng, tmp_path, monkeypatch):
    image = simulated(rng, 128, 136, 10)
    tifffile.imwrite(tmp_path / "field.tif", image)
    monkeypatch.setattr(large, "LARGE_IMAGE_PIXELS", 10_000)
    assert main(["enhance", str(tmp_path / "field.tif"), "-o", str(tmp_path / "out"), "-q"]) == 0
    np.testing.assert_allclose(io.read_image(tmp_path / "out" / "field.enhanced.zarr"), model.enhance(image),
                               rtol=0, atol=1e-6)
    assert main(["enhance", str(tmp_path / "field.tif"), "-o", str(tmp_path / "tif"), "--output-format", "tiff",
                 "-q"]) == 0
    assert tifffile.imread(tmp_path / "tif" / "field.enhanced.tif").shape == image.shape


def test_corrupt_zarr_is_reported_and_skipped(rng, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    io.write_zarr(folder / "good.zarr", simulated(rng, 64, 72, 5), chunks=(32, 32))
    bad = folder / "bad.zarr"
    bad.mkdir()
    (bad / ".zarray").write_text("{ this is not json")
    chunk = folder / "chunk.zarr"  # valid metadata, a damaged chunk: found while reading the pixels
    io.write_zarr(chunk, simulated(rng, 100, 100, 5), chunks=(64, 64))
    (chunk / "0" / "1.1").write_bytes(b"garbage")
    out = tmp_path / "out"
    assert main(["run", str(folder), "-o", str(out), "--save-enhanced", "-q"]) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.out.splitlines() if "FAILED" in line]  # each failure once, in the table
    assert len(failed) == 2 and "bad.zarr" in failed[0] + failed[1] and "chunk.zarr" in failed[0] + failed[1]
    assert "1 done, 0 skipped, 2 failed" in captured.out
    assert sorted(os.listdir(out)) == ["good.enhanced.zarr", "good.spots.csv"]  # nothing partial, no temporaries


def test_zarr_needs_its_package_and_says_so(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_zarr(name, *args, **kwargs):
        if name == "zarr":
            raise ImportError("no zarr")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zarr)
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(io.MissingDependency, match="pip install"):
        io.open_image(tmp_path / "x.zarr")
