"""deepspot_napari.evaluate and `deepspot evaluate` on tiny simulated sets: the report files are
written, the numbers are those of metrics.* on the same inputs, a perfect detector scores 1, the
CLI runs end to end, and bad inputs give clear errors."""
import csv
import sys

import numpy as np
import pytest
from PIL import Image

from deepspot_napari import evaluate, metrics
from deepspot_napari.cli import main
from deepspot_napari.detect import DEFAULT_DETECTION, detect_spots
from deepspot_napari.simulate import simulate_dataset, simulate_image, write_spots_csv


@pytest.fixture(scope="module")
def model():
    from deepspot_napari.model import Model
    return Model.load()


@pytest.fixture
def sim_folder(tmp_path):
    simulate_dataset(tmp_path / "sim", 3, recipe="ds_var", n_spots=(10, 30), seed=5, size=64)
    return tmp_path / "sim"


def perfect_method():
    return evaluate.Method("perfect", "perfect", lambda sample, enhanced: sample.truth)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_dataset_streams_images_with_their_truth(sim_folder):
    dataset = evaluate.folder_dataset(sim_folder)
    assert dataset.name == "sim" and len(dataset) == 3
    samples = list(dataset)
    assert [s.name for s in samples] == ["0000.tif", "0001.tif", "0002.tif"]
    assert all(s.image.shape == (64, 64) and s.truth.shape[1] == 2 and 10 <= len(s.truth) <= 30 for s in samples)
    assert len(list(dataset)) == 3  # re-iterable


def test_perfect_detector_scores_one_and_report_files_are_written(sim_folder, tmp_path):
    datasets = [evaluate.folder_dataset(sim_folder)] + evaluate.simulated_datasets(n_images=2, size=64,
                                                                                  names=["DS_fixed_10", "DS_fixed_20"])
    results = evaluate.run_evaluation(datasets, [perfect_method()])
    assert len(results.rows) == 7
    for metric in ("f1", "precision", "recall", "f1_one_to_one", "f1_integral"):
        assert results.summary("perfect", metric).mean == pytest.approx(1.0)
    assert results.summary("perfect", "ambiguous").mean == 0
    assert results.summary("perfect", "spot_intensity") is None
    scopes = [label for label, _ in results.scopes()]
    assert scopes == ["sim", "DS_fixed_10", "DS_fixed_20", "DS_fixed (all)", "all images"]
    assert [label for label, _ in results.top_scopes()] == ["sim", "DS_fixed (all)", "all images"]

    paths = evaluate.write_report(results, tmp_path / "report", title="tiny")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(evaluate.REPORT_FILES)
    text = paths["markdown"].read_text()
    assert text.startswith("# tiny") and "| perfect | 100.00 ± 0.00 |" in text and "Table 4" in text
    summary = read_csv(paths["summary_csv"])
    assert {r["scope"] for r in summary} == set(scopes)
    assert all(float(r["f1_mean"]) == 1.0 for r in summary)
    per_image = read_csv(paths["per_image_csv"])
    assert len(per_image) == 7 and per_image[0]["dataset"] == "sim" and per_image[0]["spot_intensity"] == ""
    with Image.open(paths["heat_map"]) as png:
        assert png.format == "PNG" and png.size[0] > 100


def test_numbers_match_metrics_on_the_same_inputs(sim_folder, model):
    dataset = evaluate.folder_dataset(sim_folder)
    methods = [evaluate.deepspot_method(), evaluate.raw_detector_method()]
    results = evaluate.run_evaluation([dataset], methods, model)
    samples = list(dataset)
    enhanced = [model.enhance(s.image) for s in samples]
    pairs = {methods[0].name: [(s.truth, detect_spots(e).coords) for s, e in zip(samples, enhanced)],
             methods[1].name: [(s.truth, detect_spots(s.image / s.image.max()).coords) for s in samples]}
    for name, method_pairs in pairs.items():
        expected = metrics.evaluate(method_pairs)
        for metric in ("f1", "precision", "recall", "ambiguous", "f1_integral"):
            got = results.summary(name, metric)
            assert got.mean == pytest.approx(expected[metric].mean)
            assert got.low == pytest.approx(expected[metric].low, nan_ok=True)
        one_to_one = metrics.evaluate(method_pairs, protocol="hungarian")["f1"]
        assert results.summary(name, "f1_one_to_one").mean == pytest.approx(one_to_one.mean)
        for row, (truth, found) in zip((r for r in results.rows if r["method"] == name), method_pairs):
            counts = metrics.match_nearest(truth, found)
            assert (row["tp"], row["fp"], row["fn"], row["ambiguous"]) == (counts.tp, counts.fp, counts.fn,
                                                                          counts.ambiguous)
    # spot intensity: the enhanced value at the annotated pixels, on the 0..255 scale
    yx = samples[0].truth.astype(int)
    expected = float(np.mean(enhanced[0][yx[:, 0], yx[:, 1]])) * 255
    assert results.rows[0]["spot_intensity"] == pytest.approx(expected, rel=1e-6)
    assert 150 < expected <= 255


def test_score_image_counts():
    truth = np.array([[10.0, 10.0], [10.0, 12.0], [30.0, 30.0]])
    found = np.array([[10.0, 11.0], [50.0, 50.0]])
    scores = evaluate.score_image(truth, found)
    assert (scores["tp"], scores["fp"], scores["fn"], scores["ambiguous"]) == (1, 1, 1, 1)
    assert scores["f1"] == pytest.approx(2 / 5)
    assert scores["f1_one_to_one"] == pytest.approx(2 / 5)
    empty = evaluate.score_image(np.zeros((0, 2)), np.zeros((0, 2)))
    assert empty["f1"] == 1.0 and np.isnan(empty["spot_intensity"])


def test_cli_end_to_end(sim_folder, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["evaluate", f"mine={sim_folder}", "--simulated", "--sets", "DS_var_10", "--n-images", "2", "--size", "64",
            "-o", str(out), "-q", "--no-bigfish"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "DeepSpot (ours, bundled weights) + fixed detector" in stdout and "mine (3 img)" in stdout
    text = (out / "evaluation.md").read_text()
    from deepspot_napari.model import detection_defaults
    assert "same detector on the raw image" in text and f"threshold={detection_defaults(None).threshold}" in text
    assert len(read_csv(out / "evaluation_per_image.csv")) == 2 * 5
    assert main(args) == 2  # never overwrites silently
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--threshold", "0.5"]) == 0
    assert "threshold=0.5" in (out / "evaluation.md").read_text()
    # other weights: the row says which, and their own detection defaults apply
    from deepspot_napari.model import Model
    from deepspot_napari.train import _save_weights
    own = tmp_path / "own.safetensors"
    _save_weights(Model.load("hybrid").make_trainer(), own, False, {"detection": '{"threshold": 0.6}'})
    assert main(args + ["--overwrite", "--weights", str(own)]) == 0
    text = (out / "evaluation.md").read_text()
    assert "DeepSpot (own.safetensors) + fixed detector" in text and "threshold=0.6" in text


def test_cli_without_data_is_an_error(tmp_path, capsys):
    assert main(["evaluate", "-o", str(tmp_path / "r")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_csv_without_matching_image_is_an_error(sim_folder, capsys):
    write_spots_csv(sim_folder / "csv" / "0007.csv", np.array([[5.0, 5.0]]))
    with pytest.raises(ValueError, match=r"1 CSV\(s\) without a matching image: 0007.csv"):
        evaluate.folder_dataset(sim_folder)
    assert main(["evaluate", str(sim_folder), "-o", str(sim_folder / "r")]) == 2
    assert "0007.csv" in capsys.readouterr().err


def test_mismatched_counts_are_an_error(sim_folder):
    (sim_folder / "csv" / "0001.csv").unlink()
    with pytest.raises(ValueError, match=r"3 images .* 2 CSVs.*image\(s\) without a ground-truth CSV: 0001.tif"):
        evaluate.folder_dataset(sim_folder)


def test_truth_outside_the_image_is_an_error(sim_folder):
    write_spots_csv(sim_folder / "csv" / "0002.csv", np.array([[5.0, 5.0], [80.0, 10.0]]))
    dataset = evaluate.folder_dataset(sim_folder)
    with pytest.raises(ValueError, match="0002.csv: 1 annotated spot.* outside the image of shape"):
        list(dataset)


def test_separate_csv_folder_and_authors_xy_files(tmp_path, rng):
    images, csvs = tmp_path / "original", tmp_path / "truth"
    images.mkdir()
    csvs.mkdir()
    truths = []
    for k in (1, 2, 10):
        image, truth = simulate_image(rng, "code", n_spots=15, size=64)
        Image.fromarray(image).save(images / f"{k}.png")
        # the authors' format: x,y without a header
        (csvs / f"{k}.csv").write_text("".join(f"{int(x)},{int(y)}\n" for y, x in truth))
        truths.append(truth)
    dataset = evaluate.parse_dataset_spec(f"authors={images},{csvs}")
    assert dataset.name == "authors"
    samples = list(dataset)
    assert [s.name for s in samples] == ["1.png", "2.png", "10.png"]  # natural order
    for sample, truth in zip(samples, truths):
        np.testing.assert_array_equal(sample.truth, truth)
    results = evaluate.run_evaluation([dataset], [perfect_method()])
    assert results.summary("perfect", "f1").mean == 1.0


def test_dataset_spec_of_one_image_file_and_its_csv(sim_folder):
    image, table = sim_folder / "images" / "0001.tif", sim_folder / "csv" / "0001.csv"
    dataset = evaluate.parse_dataset_spec(f"one={image},{table}")
    (sample,) = list(dataset)
    assert dataset.name == "one" and sample.name == "0001.tif" and sample.image.shape == (64, 64)
    np.testing.assert_array_equal(sample.truth, np.loadtxt(table, delimiter=",", skiprows=1).reshape(-1, 2))
    with pytest.raises(ValueError, match="give its ground truth too"):
        evaluate.parse_dataset_spec(str(image))
    with pytest.raises(FileNotFoundError, match="file not found"):
        list(evaluate.parse_dataset_spec(f"{image},{sim_folder / 'missing.csv'}"))


def test_dataset_that_yields_fewer_images_than_announced_is_an_error():
    truth = np.array([[5.0, 5.0]])
    short = evaluate.Dataset("short", 2, lambda: iter([evaluate.Sample("a", np.ones((16, 16)), truth)]))
    with pytest.raises(ValueError, match="announced 2 images but yielded 1"):
        evaluate.run_evaluation([short], [perfect_method()])


def test_unknown_simulated_set_and_missing_model_are_errors():
    with pytest.raises(ValueError, match="unknown simulated test sets"):
        evaluate.simulated_datasets(names=["DS_var_15"])
    dataset = evaluate.simulated_datasets(n_images=1, size=64, names=["DS_var_10"])
    with pytest.raises(ValueError, match="a model is needed"):
        evaluate.run_evaluation(dataset, [evaluate.deepspot_method()])


def test_heat_map_falls_back_to_pillow(monkeypatch, tmp_path):
    datasets = evaluate.simulated_datasets(n_images=1, size=64, names=["DS_var_10", "DS_var_20"])
    results = evaluate.run_evaluation(datasets, [perfect_method()])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert evaluate.write_heat_map(results, tmp_path / "f1.png") == "pillow"
    with Image.open(tmp_path / "f1.png") as png:
        assert png.format == "PNG" and png.mode == "RGB" and png.size[0] > 100


def test_bigfish_row_is_skipped_with_a_note_when_missing(monkeypatch):
    monkeypatch.setattr(evaluate, "bigfish_available", lambda: False)
    methods, notes = evaluate.default_methods()
    assert [m.label for m in methods] == ["DeepSpot + detector", "detector on raw"]
    assert "big-fish is not installed" in notes[0]
    methods, notes = evaluate.default_methods(raw=False, bigfish=False)
    assert len(methods) == 1 and notes == []


@pytest.mark.skipif(not evaluate.bigfish_available(), reason="big-fish not installed (optional)")
def test_bigfish_baseline_finds_the_spots():
    image, truth = simulate_image(np.random.default_rng(3), "ds_fixed", n_spots=20, size=128)
    found = evaluate.bigfish_method().detect(evaluate.Sample("x", image, truth), None)
    assert found.shape[1] == 2 and metrics.match_nearest(truth, found).f1 > 0.8


def test_default_detection_is_the_chosen_one():
    # tools/choose_detection_defaults.py on validation data (docs/detection_defaults.md)
    assert DEFAULT_DETECTION.method == "peak" and DEFAULT_DETECTION.threshold == 0.75
    assert evaluate.TEST_SEED != evaluate.VALIDATION_SEED
