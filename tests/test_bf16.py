"""bf16 inference on the CPU (precision "bf16"/"auto", csrc/ops_dnnl.c): results against float32 within a
stated tolerance, the same spots found, refusal with the reason where the CPU lacks bf16 instructions,
and "auto" picking bf16 only where it runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepspot_napari import Model, _core, devices, metrics
from deepspot_napari.simulate import simulate_image

# Most convolutions multiply bf16 inputs (8-bit mantissa, relative rounding 2^-9) with float32 accumulation;
# measured on the bundled models: at most ~0.005 on the sigmoid map (docs/benchmarks.md).
BF16_TOLERANCE = 0.02

needs_bf16 = pytest.mark.skipif(not _core.cpu_has_bf16(), reason="this CPU has no bf16 instructions (AVX512-BF16/AMX)")


@needs_bf16
@pytest.mark.parametrize("weights", ["general", "hybrid"])
def test_bf16_enhances_like_float32(weights):
    rng = np.random.default_rng()  # fresh inputs every run
    exact, fast = Model.load(weights, device="cpu"), Model.load(weights, device="cpu", precision="bf16")
    assert fast.precision == "bf16" and exact.precision == "float32"
    image, truth = simulate_image(rng, "ds_var", n_spots=60, size=256)
    a, b = exact.enhance(image), fast.enhance(image)
    assert np.abs(a - b).max() < BF16_TOLERANCE
    assert np.abs(a - b).mean() < BF16_TOLERANCE / 20
    # the spots found: nearly the same list
    spots_a, spots_b = exact.detect(image, enhanced=a).coords, fast.detect(image, enhanced=b).coords
    assert metrics.match_nearest(spots_a, spots_b).f1 > 0.97
    assert abs(metrics.match_nearest(truth, spots_a).f1 - metrics.match_nearest(truth, spots_b).f1) < 0.03
    # a random input too (not only images the network knows)
    x = rng.random((2, 64, 96, 1), np.float32)
    assert np.abs(exact.forward(x) - fast.forward(x)).max() < BF16_TOLERANCE


@needs_bf16
def test_auto_is_bf16_on_this_cpu():
    assert devices.resolve_precision("auto", "cpu") == "bf16"
    assert Model.load(device="cpu", precision="auto").precision == "bf16"
    assert "bf16" in devices.precision_choices("cpu")


def test_auto_is_float32_without_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert devices.resolve_precision("auto", "cpu") == "float32"
    assert devices.resolve_precision("auto", "cuda") == "float32"
    assert devices.precision_choices("cpu") == ["auto", "float32"]
    assert Model.load(device="cpu", precision="auto").precision == "float32"
    with pytest.raises(ValueError, match="'bf16' needs a CPU with AVX512-BF16"):
        Model.load(device="cpu", precision="bf16")


def test_bf16_refused_by_the_c_core_where_the_cpu_lacks_it(tmp_path):
    # oneDNN limited to AVX-512 without BF16: the C core itself says why it cannot
    code = ("from deepspot_napari import _core, bundled\n"
            "print(_core.cpu_has_bf16())\n"
            "try:\n    _core.Network(str(bundled.bundled_weights_path()), math='bf16')\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    import deepspot_napari
    # the package this test imported (the working tree or the installed one), from a neutral folder
    home = str(Path(deepspot_napari.__file__).resolve().parents[1])
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=home)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "False"
    assert "refused: bf16 needs a CPU with AVX512-BF16" in out.stdout


def test_bf16_is_refused_on_the_gpu(monkeypatch):
    monkeypatch.setattr(devices, "probe", lambda device: (True, "a GPU") if device == "cuda" else (True, "cpu"))
    with pytest.raises(ValueError, match="'bf16' is the CPU backend's"):
        devices.resolve_device("auto", "bf16")
