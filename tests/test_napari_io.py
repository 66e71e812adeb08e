"""The napari plugin's files, without a viewer: the npe2 manifest validates and imports, the spot
CSV reader and writer round-trip our tables (y,x / z,y,x with features, as the CLI writes them)
and napari's own points CSV (index,axis-0,axis-1,...), and the sample data loads."""
import csv
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="napari is not installed (pip install 'deepspot-napari[napari]')")
npe2 = pytest.importorskip("npe2", reason="npe2 is not installed")

from deepspot_napari._reader_writer import get_reader, read_spot_table, write_points  # noqa: E402


def manifest_path() -> Path:
    """The installed manifest (site-packages/deepspot_napari/napari.yaml), else the checkout's."""
    import deepspot_napari
    installed = Path(deepspot_napari.__file__).parent / "napari.yaml"
    return installed if installed.is_file() else Path(__file__).resolve().parents[1] / "napari.yaml"


def test_manifest_validates_and_every_command_imports():
    manifest = npe2.PluginManifest.from_file(manifest_path())
    assert manifest.name == "deepspot-napari"
    manifest.validate_imports()  # what `npe2 validate --imports` checks
    contributions = manifest.contributions
    assert {w.display_name for w in contributions.widgets} == {"Enhance spots", "Detect spots",
                                                                "Train on annotated layers", "Polarity"}
    assert [s.key for s in contributions.sample_data] == ["smfish"]
    assert contributions.readers[0].filename_patterns == ["*.csv"]
    assert contributions.writers[0].layer_types == ["points"]


def points_layer(coords, **features):
    return napari.layers.Points(np.asarray(coords, float), features=features or None)


@pytest.mark.parametrize("ndim", [2, 3, 4])
def test_napari_points_csv_round_trips(tmp_path, rng, ndim):
    """napari's own writer (File > Save Selected Layers) -> our reader: same points and features."""
    coords = rng.uniform(0, 50, size=(12, ndim))
    layer = points_layer(coords, score=rng.uniform(0.7, 1, 12), size=rng.integers(1, 20, 12).astype(float))
    path = tmp_path / "napari_points.csv"
    from napari_builtins.io import napari_write_points  # the writer of File > Save Selected Layers
    _, meta, _ = layer.as_layer_data_tuple()
    assert napari_write_points(str(path), layer.data, meta) == str(path)
    with open(path) as f:
        assert next(csv.reader(f))[:3] == ["index", "axis-0", "axis-1"]
    reader = get_reader(str(path))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "points" and kwargs["name"] == "napari_points"
    np.testing.assert_allclose(data, coords, rtol=1e-12)
    np.testing.assert_allclose(kwargs["features"]["score"], layer.features["score"], rtol=1e-12)
    np.testing.assert_allclose(kwargs["features"]["size"], layer.features["size"])
    # and back through our writer: napari's layout for >3 dimensions, which napari reads too
    again = tmp_path / "again.csv"
    write_points(str(again), data, {"features": napari.layers.Points(data, features=kwargs["features"]).features})
    data2, features2 = read_spot_table(again)
    np.testing.assert_array_equal(data2, coords)
    np.testing.assert_array_equal(features2["score"], layer.features["score"].to_numpy())
    if ndim > 3:
        from napari_builtins.io import csv_to_layer_data
        back, meta, _ = csv_to_layer_data(str(again), require_type="points")
        np.testing.assert_allclose(back, coords)


@pytest.mark.parametrize("axes", ["y,x", "z,y,x"])
def test_cli_spot_table_round_trips_with_features(tmp_path, rng, axes):
    """What the CLI writes (Spots.to_csv / write_spots_table) is read as a Points layer with the
    score/intensity/size features, sized and coloured by score; our writer writes it back."""
    from deepspot_napari.detect import Spots
    from deepspot_napari.io import write_spots_table
    ndim = len(axes.split(","))
    spots = Spots(coords=rng.uniform(0, 60, (9, ndim)), score=rng.uniform(0.7, 1, 9),
                  intensity=rng.uniform(10, 200, 9), size=rng.integers(1, 12, 9).astype(float))
    path = tmp_path / "cli.spots.csv"
    write_spots_table(path, spots.as_table())
    [(data, kwargs, kind)] = get_reader(str(path))(str(path))
    assert kind == "points" and kwargs["ndim"] == ndim
    np.testing.assert_allclose(data, spots.coords, rtol=1e-5)
    assert list(kwargs["features"]) == ["score", "intensity", "size"]
    assert kwargs["face_color"] == "score" and np.ptp(kwargs["size"]) > 0
    layer = napari.layers.Points(data, **{k: v for k, v in kwargs.items() if k != "name"})
    out = tmp_path / "out.csv"
    assert write_points(str(out), layer.data, {"features": layer.features}) == [str(out)]
    with open(out) as f:
        assert next(csv.reader(f)) == axes.split(",") + ["score", "intensity", "size"]
    data2, features2 = read_spot_table(out)
    np.testing.assert_array_equal(data2, data)
    for name in ("score", "intensity", "size"):
        np.testing.assert_array_equal(features2[name], kwargs["features"][name])


def test_reader_formats_and_refusals(tmp_path):
    authors = tmp_path / "authors.csv"  # the DeepSpot authors' ground truth: x,y without a header
    authors.write_text("10,20\n30.5,40\n")
    [(data, kwargs, _)] = get_reader(str(authors))(str(authors))
    np.testing.assert_array_equal(data, [[20, 10], [40, 30.5]])
    assert kwargs["features"] == {}
    reordered = tmp_path / "xy.csv"
    reordered.write_text("x,y,label\n1,2,a\n3,4,b\n")
    data, features = read_spot_table(reordered)
    np.testing.assert_array_equal(data, [[2, 1], [4, 3]])
    assert list(features["label"]) == ["a", "b"]
    empty = tmp_path / "empty_table.csv"
    empty.write_text("y,x,score\n")
    data, features = read_spot_table(empty)
    assert data.shape == (0, 2)
    other = tmp_path / "other.csv"
    other.write_text("name,value\na,1\n")
    assert get_reader(str(other)) is None  # not ours: napari asks the next reader
    assert get_reader(str(tmp_path / "missing.csv")) is None
    assert get_reader(str(tmp_path / "image.tif")) is None
    bad = tmp_path / "bad.csv"
    bad.write_text("y,x\n1,2\n3\n")
    with pytest.raises(ValueError, match="line 3"):
        read_spot_table(bad)


def test_writer_is_atomic_and_adds_the_suffix(tmp_path):
    written = write_points(str(tmp_path / "spots"), np.zeros((0, 2)), {"features": None})
    assert written == [str(tmp_path / "spots.csv")]
    assert (tmp_path / "spots.csv").read_text().strip() == "y,x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_sample_data_is_the_bundled_image_and_its_true_spots():
    from deepspot_napari._sample_data import make_sample_data
    from deepspot_napari.simulate import read_spots_csv
    from deepspot_napari.data import sample_spots_path
    (image, image_kwargs, image_kind), (points, points_kwargs, points_kind) = make_sample_data()
    assert (image_kind, points_kind) == ("image", "points")
    assert image.ndim == 2 and image.shape == (512, 512)
    np.testing.assert_array_equal(points, read_spots_csv(sample_spots_path()))
    assert points.shape[1] == 2 and len(points) > 0
