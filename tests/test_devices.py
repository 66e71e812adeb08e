"""Device choice (devices.py) and its use by Model, training and Dask workers: "auto" takes the GPU
only when it works, "cuda" without one and TF32 on the CPU fail with the reason, unknown names
list the choices. The GPU's presence is simulated by replacing devices.probe, so both branches run
on a machine without one; the tests of the real probe hold whether or not _core_cuda was built."""
import sys

import numpy as np
import pytest

from deepspot_napari import Model, _core, devices
from deepspot_napari.simulate import simulate_image

FAKE_GPU = "Fake GPU 80GB (sm_90, 79 GiB)"
NO_GPU = "no usable CUDA device: no CUDA-capable device is detected"


@pytest.fixture(autouse=True)
def fresh_probe():
    """Every test sees (and leaves) an empty probe cache."""
    cached_probe = devices.probe
    cached_probe.cache_clear()
    yield
    cached_probe.cache_clear()


def fake_probe(gpu_works: bool):
    answers = {"cpu": (True, "CPU, test"), "cuda": (True, FAKE_GPU) if gpu_works else (False, NO_GPU)}
    return lambda device: answers[device]


@pytest.fixture
def with_gpu(monkeypatch):
    monkeypatch.setattr(devices, "probe", fake_probe(True))


@pytest.fixture
def without_gpu(monkeypatch):
    monkeypatch.setattr(devices, "probe", fake_probe(False))


def real_gpu_works() -> bool:
    return devices.probe("cuda")[0]


def test_auto_is_the_gpu_when_it_works(with_gpu):
    assert devices.resolve_device("auto") == "cuda"
    assert devices.resolve_device("auto", "tf32") == "cuda"
    assert devices.resolve_device("cuda") == "cuda"
    assert devices.resolve_device("cpu") == "cpu"
    assert devices.available_devices() == [("cpu", "CPU, test"), ("cuda", FAKE_GPU)]


def test_auto_falls_back_to_the_cpu_without_a_gpu(without_gpu):
    assert devices.resolve_device("auto") == "cpu"
    assert devices.available_devices() == [("cpu", "CPU, test")]


def test_cuda_without_a_gpu_names_the_reason(without_gpu):
    with pytest.raises(RuntimeError, match=f"device 'cuda' requested but .*{NO_GPU}.*use device='cpu' or 'auto'"):
        devices.resolve_device("cuda")


def test_tf32_needs_the_gpu(without_gpu):
    with pytest.raises(ValueError, match="'tf32' needs the GPU backend"):
        devices.resolve_device("cpu", "tf32")
    with pytest.raises(ValueError, match=f"'tf32' needs the GPU backend.*{NO_GPU}"):
        devices.resolve_device("auto", "tf32")


def test_unknown_device_or_precision_lists_the_choices():
    with pytest.raises(ValueError, match="device must be one of 'auto', 'cpu', 'cuda'; got 'tpu'"):
        devices.resolve_device("tpu")
    with pytest.raises(ValueError, match="precision must be one of 'auto', 'float32', 'tf32', 'bf16'; got 'float16'"):
        devices.resolve_device("cpu", "float16")
    with pytest.raises(ValueError, match="device must be one of 'cpu', 'cuda'; got 'auto'"):
        devices.core_module("auto")


def test_the_cpu_backend_always_works():
    assert devices.core_module("cpu") is _core and _core.BACKEND == "cpu"
    works, description = devices.probe("cpu")
    assert works and description == _core.probe()
    assert devices.available_devices()[0] == ("cpu", description)


def test_a_missing_cuda_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspot_napari._core_cuda", None)  # its import now fails
    with pytest.raises(RuntimeError, match="CUDA backend is not available: deepspot_napari._core_cuda is not built"):
        devices.core_module("cuda")
    works, reason = devices.probe("cuda")
    assert not works and "not built or not installed" in reason
    assert devices.resolve_device("auto") == "cpu"
    assert [name for name, _ in devices.available_devices()] == ["cpu"]


def test_the_probe_is_asked_once(monkeypatch):
    calls = []
    monkeypatch.setattr(_core, "probe", lambda: calls.append(1) or "CPU, counted")
    assert devices.probe("cpu") == devices.probe("cpu") == (True, "CPU, counted")
    assert len(calls) == 1


def test_real_cuda_request_without_a_gpu_says_why():
    works, reason = devices.probe("cuda")
    if works:
        pytest.skip(f"a GPU works here ({reason}): the failure cannot be shown")
    assert reason
    with pytest.raises(RuntimeError, match="device 'cuda' requested but") as info:
        Model.load(device="cuda")
    assert reason in str(info.value)


def test_model_on_the_cpu_matches_the_default_path_exactly(monkeypatch, rng):
    image, _ = simulate_image(rng, "hybrid", size=64)
    cpu = Model.load(device="cpu")
    assert (cpu.device, cpu.precision) == ("cpu", "float32")
    monkeypatch.setattr(devices, "probe", fake_probe(False))  # the default path on a machine without a GPU
    default = Model.load()
    assert default.device == "cpu"
    np.testing.assert_array_equal(cpu.enhance(image), default.enhance(image))


def test_model_load_checks_device_and_precision_before_loading(tmp_path, without_gpu):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(ValueError, match="'tf32' needs the GPU"):
        Model.load(missing, device="cpu", precision="tf32")
    with pytest.raises(RuntimeError, match="device 'cuda' requested"):
        Model.load(missing, device="cuda")
    with pytest.raises(FileNotFoundError):
        Model.load(missing, device="cpu")


def test_training_runs_on_the_models_backend_and_stays_there(monkeypatch, rng):
    """The trainer comes from the model's own extension module (a stand-in that records its use
    here), and the trained network replaces the model's on the same device and precision."""
    model = Model.load(device="cpu")
    made = []

    class RecordingCore:
        @staticmethod
        def Trainer(network, **options):  # noqa: N802 - the extension module's name
            made.append(network)
            return _core.Trainer(network, **options)

    monkeypatch.setattr(model, "_core", RecordingCore)
    image, spots = simulate_image(rng, "hybrid", size=64)
    model.fit([image], [spots], epochs=1, batch_size=1, validation_split=0.0, patch_size=64)
    assert len(made) == 1
    assert (model.device, model.precision) == ("cpu", "float32")
    assert isinstance(model._network, _core.Network)


def test_cached_models_load_with_the_device_and_precision(without_gpu):
    assert Model.cached(None, device="cpu", precision="float32").device == "cpu"
    with pytest.raises(ValueError, match="'tf32' needs the GPU"):
        Model.cached(None, device="cpu", precision="tf32")


def test_file_jobs_and_blocks_carry_the_precision_to_the_worker_model(tmp_path, without_gpu):
    """A job or block without a live model loads one with its own device and precision (here a
    combination that cannot run, so that the error shows they arrived)."""
    import tifffile
    from deepspot_napari.large import BlockSpec, FileJob, block_task, process_file
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, np.arange(256, dtype=np.uint16).reshape(16, 16))
    job = FileJob(path=str(path), targets={"enhanced": str(tmp_path / "image.enhanced.tif")}, detect=False,
                  device="cpu", precision="tf32")
    with pytest.raises(ValueError, match="'tf32' needs the GPU"):
        process_file(job)
    with pytest.raises(ValueError, match="'tf32' needs the GPU"):
        block_task(BlockSpec(source=str(path), device="cpu", precision="tf32"), (0, 16, 0, 16))


class StandInGPU:
    """A stand-in for _core_cuda: the CPU module's network, its output shifted by `offset` (or failing)."""
    BACKEND = "cuda"

    def __init__(self, offset=0.0, fail=None):
        offset_, fail_ = offset, fail

        class Network:
            def __init__(self, weights):
                self.cpu = _core.Network(weights)

            def forward(self, x, *args):
                if fail_ is not None:
                    raise RuntimeError(fail_)
                return self.cpu.forward(x, *args) + np.float32(offset_)
        self.Network = Network

    @staticmethod
    def probe():
        return FAKE_GPU


@pytest.mark.parametrize("offset, fail, works, reason", [
    (0.0, None, True, FAKE_GPU),
    (1e-6, None, True, FAKE_GPU),                     # float32 noise passes
    (1e-2, None, False, "differs from the CPU's by 0.01"),
    (0.0, "cuDNN: CUDNN_STATUS_NOT_SUPPORTED", False, "self-test: cuDNN: CUDNN_STATUS_NOT_SUPPORTED"),
])
def test_a_gpu_is_used_only_if_it_passes_the_self_test(monkeypatch, offset, fail, works, reason):
    stand_in = StandInGPU(offset, fail)
    real_core_module = devices.core_module
    monkeypatch.setattr(devices, "core_module", lambda d: stand_in if d == "cuda" else real_core_module(d))
    ok, said = devices.probe("cuda")
    assert ok == works and reason in said, said
    assert devices.resolve_device("auto") == ("cuda" if works else "cpu")


def test_the_cli_says_why_a_present_gpu_is_not_used(monkeypatch, tmp_path, capsys):
    from deepspot_napari import cli
    real_core_module = devices.core_module
    monkeypatch.setattr(devices, "core_module", lambda d: StandInGPU(offset=0.5) if d == "cuda" else real_core_module(d))
    import tifffile
    tifffile.imwrite(tmp_path / "image.tif", np.random.default_rng(0).random((64, 64), dtype=np.float32))
    assert cli.main(["enhance", str(tmp_path / "image.tif"), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "device: cpu" in err and "a GPU is present but not used" in err and devices.SELF_TEST_FAILED in err


def test_without_a_gpu_the_reason_says_so():
    """Where no NVIDIA driver is installed (as on CI), the CUDA module says exactly that, not the
    runtime's "driver version is insufficient"."""
    import shutil
    from pathlib import Path
    if shutil.which("nvidia-smi") or Path("/proc/driver/nvidia").exists():
        pytest.skip("an NVIDIA driver is installed here: the no-driver message cannot be produced")
    try:
        module = devices.core_module("cuda")
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"the CUDA module is not built here: {exc}")
    with pytest.raises(RuntimeError, match="no NVIDIA GPU or driver found"):
        module.probe()
