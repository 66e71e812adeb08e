"""The realistic benchmark: its test family is disjoint from training data and deterministic, U-FISH
runs its own pipeline, missing data or packages skip a row with the reason, and the CLI writes the
report."""
from __future__ import annotations

import numpy as np
import pytest

from deepspot_napari import bundled_weights_path, evaluate, realistic_eval as RE
from deepspot_napari.cli import main

from realdata import PEERS, REALDATA

HAVE_UFISH = (PEERS / RE.UFISH_ONNX).is_file()


def test_test_family_is_deterministic_and_its_snr_bins_are_exact():
    a = RE.realistic_datasets(n_images=2, size=64)
    b = RE.realistic_datasets(n_images=2, size=64)
    assert [d.name for d in a] == ["snr2", "snr3", "snr5", "snr8", "snr12", "snr20",
                                   "density_sparse", "density_medium", "density_crowded"]
    for x, y in zip(a[0], b[0]):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.truth, y.truth)
    # other seeds than the training script's streams: the first test image differs from a training one
    from deepspot_napari.realistic import realistic_image
    train = realistic_image(np.random.default_rng(np.random.SeedSequence(1100).spawn(1)[0]), 64)
    assert not np.array_equal(next(iter(a[0])).image, train.image)
    empty = RE.empty_datasets(n_images=2, size=64)
    assert all(len(s.truth) == 0 for d in empty for s in d)


def test_ufish_scaling_and_spot_calling_follow_its_pipeline():
    pytest.importorskip("skimage", reason="U-FISH's pipeline needs scikit-image (the bench extra)")
    img = np.full((32, 32), 100, np.uint16)
    img[5, 5] = 60000  # an outlier: the range is then 0..the 99.99th percentile
    scaled = RE.ufish_scale(img)
    assert scaled.dtype == np.float32 and scaled.max() == 255
    plain = RE.ufish_scale(np.linspace(10, 20, 64 * 64).reshape(64, 64))
    assert plain.min() == 0 and plain.max() == pytest.approx(255)
    enhanced = np.zeros((40, 40), np.float32)
    enhanced[10, 12] = enhanced[30, 25] = 1.0
    enhanced[20, 5] = 0.1  # its Laplace peak (4 x 0.1) is below the threshold
    assert RE.ufish_call_spots(enhanced).tolist() == [[10.0, 12.0], [30.0, 25.0]]


def test_missing_real_backgrounds_and_peers_are_skipped_with_the_reason(tmp_path, monkeypatch):
    sources, why = RE.real_background_sources(tmp_path, "test")
    assert sources == [] and "missing" in why
    methods, notes = RE.peer_methods(tmp_path)
    assert methods == [] and "not found" in notes[0]
    if HAVE_UFISH:
        monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
        methods, notes = RE.peer_methods(PEERS)
        assert methods == [] and "onnxruntime" in notes[0]


@pytest.mark.skipif(not all((REALDATA / name).is_file() for name in RE.REAL_BACKGROUND_FILES),
                    reason=f"the real background images ({', '.join(RE.REAL_BACKGROUND_FILES)}) are not all in "
                           f"{REALDATA}: set DEEPSPOT_REALDATA to the folder holding them")
def test_real_backgrounds_are_the_test_quarters():
    sources, why = RE.real_background_sources(REALDATA, "test")
    assert why is None and len(sources) == len(RE.REAL_BACKGROUND_FILES)
    assert all(s.min() >= 0 and s.max() <= 1 for s in sources)


@pytest.mark.skipif(not HAVE_UFISH, reason=f"U-FISH's ONNX model ({RE.UFISH_ONNX}) is not in {PEERS}: set "
                                             "DEEPSPOT_PEERS to the folder holding it")
def test_ufish_finds_bright_spots():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the bench extra)")
    from deepspot_napari.realistic import realistic_image
    sim = realistic_image(3, 128, kinds=("flat",), n_spots=(15, 15), snr=(30.0, 30.0), sigma=(1.5, 1.5))
    found = RE.ufish_method(PEERS / RE.UFISH_ONNX).detect(evaluate.Sample("x", sim.image, sim.spots), None)
    assert evaluate.score_image(sim.spots, found)["f1"] > 0.8


def test_cli_realistic_report(tmp_path, capsys):
    out = tmp_path / "r"
    other = tmp_path / "other.safetensors"
    other.write_bytes(bundled_weights_path().read_bytes())
    args = ["evaluate", "--realistic", "--n-images", "1", "--size", "64", "-o", str(out), "--no-bigfish",
            "--realdata", str(tmp_path), "--peers", str(tmp_path), "--compare", "hybrid", str(other), "-q"]
    assert main(args) == 0
    text = (out / "realistic.md").read_text()
    assert "| SNR 2 |" in text and "noise_only" in text and "real backgrounds missing" in text
    assert "U-FISH row skipped" in text and (out / "evaluation.md").is_file()
    no_spots = (out / "evaluation_no_spots.csv").read_text().splitlines()
    assert "fp_mean" in no_spots[0] and any(",noise_only," in line for line in no_spots)
    assert text.count("DeepSpot deepspot_hybrid") == text.count("DeepSpot other") == 4  # 4 tables, hybrid once
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
