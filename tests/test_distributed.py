"""Scale-out on Dask (deepspot_napari.distributed): a LocalCluster of 2 single-threaded worker
processes on the loopback interface gives the same outputs as a single-process run, for a batch
of small files (one task each) and for a Zarr image in blocks (one task per block); each worker
loads the model once; a corrupt input fails alone. The cluster lives for this module only."""
import csv
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

distributed = pytest.importorskip("distributed", reason="--scheduler needs the optional 'dask[distributed]' package "
                                                        "(the 'scale' extra)")
pytest.importorskip("zarr", reason="Zarr input/output needs the optional 'zarr' package (the 'scale' extra)")

from deepspot_napari import io  # noqa: E402
from deepspot_napari.cli import main  # noqa: E402
from deepspot_napari.simulate import simulate_image  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as local:
        yield local


@pytest.fixture
def inputs(tmp_path, rng):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        image, _ = simulate_image(rng, "ds_var", n_spots=30, size=128)
        tifffile.imwrite(folder / f"field{i}.tif", image)
    image, _ = simulate_image(rng, "code", n_spots=20, size=64)
    Image.fromarray(image).save(folder / "field3.png")
    image, _ = simulate_image(rng, "ds_var", n_spots=50, size=264)
    io.write_zarr(folder / "mosaic.zarr", image[:264, :200], chunks=(100, 100))
    return folder


def read(path):
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.reader(f))
    return io.read_image(path)


def test_cluster_run_equals_single_process_run(cluster, inputs, tmp_path, capsys):
    common = ["run", str(inputs), "--save-enhanced", "--block-size", "128", "-q"]
    assert main(common + ["-o", str(tmp_path / "local")]) == 0
    assert main(common + ["-o", str(tmp_path / "dask"), "--scheduler", cluster.scheduler_address]) == 0
    assert "5 done, 0 skipped, 0 failed" in capsys.readouterr().out
    names = sorted(os.listdir(tmp_path / "local"))
    assert names == sorted(os.listdir(tmp_path / "dask"))
    assert "mosaic.enhanced.zarr" in names and "field3.spots.csv" in names and len(names) == 10
    for name in names:
        local, remote = read(tmp_path / "local" / name), read(tmp_path / "dask" / name)
        if isinstance(local, list):
            assert local == remote and len(local) > 5, name
        else:
            np.testing.assert_allclose(remote, local, rtol=0, atol=1e-6, err_msg=name)


def test_each_worker_loads_the_model_once_and_failures_stay_per_file(cluster, inputs, tmp_path, capsys):
    (inputs / "broken.tif").write_bytes(b"II*\x00garbage")
    out = tmp_path / "out"
    assert main(["run", str(inputs / "*.tif"), "-o", str(out), "-q", "--scheduler", cluster.scheduler_address]) == 1
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("broken.tif") == 1  # in the table at the end, once
    assert "3 done, 0 skipped, 1 failed" in captured.out
    assert main(["run", str(inputs / "*.tif"), "-o", str(out), "--resume", "-q",
                 "--scheduler", cluster.scheduler_address]) == 1  # the broken file only
    assert "0 done, 3 skipped, 1 failed" in capsys.readouterr().out

    def cached_models():
        from deepspot_napari import model
        return len(model._CACHE)

    with distributed.Client(cluster) as client:
        assert set(client.run(cached_models).values()) <= {0, 1}
        assert sum(client.run(cached_models).values()) >= 1


def test_unreachable_scheduler_is_a_clear_error(inputs, tmp_path, capsys):
    import dask
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(["detect", str(inputs / "field0.tif"), "-o", str(tmp_path / "o"), "-q",
                     "--scheduler", "tcp://127.0.0.1:9"]) == 2
    assert "Dask scheduler" in capsys.readouterr().err
