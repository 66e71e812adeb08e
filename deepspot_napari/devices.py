"""Where the network runs: the one place that chooses between the C core's two builds.

The same C sources are compiled into two extension modules with the same Python API:
`deepspot_napari._core` (CPU, oneDNN; always installed) and `deepspot_napari._core_cuda` (NVIDIA
GPUs, cuDNN; built only where the CUDA toolkit was present). The GPU module may be missing, may fail
to import (no CUDA libraries here) or may import on a machine without a usable GPU: `probe` says
which, once per process, and `resolve_device("auto")` then falls back to the CPU. A GPU that is
present must also pass a self-test before it is used: the bundled network on a small fixed input must
give the CPU's answer (SELF_TEST_TOLERANCE), so that a driver, library or backend fault shows as "the
GPU is not used, because ..." rather than as wrong spots.

Precision: "float32" everywhere, "tf32" (TF32 tensor-core convolutions with float32 weights and
activations) on the GPU only, "bf16" (most convolutions on bf16 inputs with float32 accumulation) on
CPUs with bf16 instructions only, or "auto": bf16 where the network runs on such a CPU, else float32
(resolve_precision)."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

DEVICES = ("auto", "cpu", "cuda")
SELF_TEST_TOLERANCE = 1e-4  # max |GPU - CPU| of the sigmoid map, float32 math on both
SELF_TEST_FAILED = "failed its self-test"  # in probe's reason when a GPU is present but not trusted
PRECISIONS = ("auto", "float32", "tf32", "bf16")
_CORE_MODULES = {"cpu": "deepspot_napari._core", "cuda": "deepspot_napari._core_cuda"}


def _check_choice(what: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def core_module(device: str) -> ModuleType:
    """The extension module of a concrete device ("cpu" or "cuda"). Raises RuntimeError when the
    CUDA module is not built or not installed, or cannot be loaded here (the reason is in the message)."""
    _check_choice("device", device, tuple(_CORE_MODULES))
    try:
        return importlib.import_module(_CORE_MODULES[device])
    except ImportError as exc:
        if device == "cpu":
            raise
        raise RuntimeError("the CUDA backend is not available: deepspot_napari._core_cuda is not built or not "
                           f"installed, or its CUDA libraries cannot be loaded ({exc}); it is built only where "
                           "the CUDA toolkit is present") from exc


@functools.lru_cache(maxsize=None)
def probe(device: str) -> tuple[bool, str]:
    """(True, a one-line description of the device) when `device` ("cpu" or "cuda") can run here,
    else (False, why not). Never raises for a valid device name; the answer is cached (probe.cache_clear
    forgets it)."""
    _check_choice("device", device, tuple(_CORE_MODULES))
    try:
        description = core_module(device).probe()
        if device != "cpu":
            _self_test(core_module(device))
        return True, description
    except RuntimeError as exc:
        return False, str(exc)


def _self_test(module: ModuleType) -> None:
    """Raises RuntimeError unless `module` computes what the CPU module computes on a small fixed input."""
    import numpy as np
    from .bundled import bundled_weights_path
    weights = str(bundled_weights_path())
    x = np.random.default_rng(20221111).random((1, 64, 64, 1), dtype=np.float32)
    try:
        got = module.Network(weights).forward(x)
    except (RuntimeError, ValueError, MemoryError) as exc:
        raise RuntimeError(f"the {module.BACKEND} backend {SELF_TEST_FAILED}: {exc}") from exc
    error = float(np.max(np.abs(got - core_module("cpu").Network(weights).forward(x))))
    if not error <= SELF_TEST_TOLERANCE:
        raise RuntimeError(f"the {module.BACKEND} backend {SELF_TEST_FAILED}: its output differs from the CPU's "
                           f"by {error:.2g} (at most {SELF_TEST_TOLERANCE:g} expected)")


def available_devices() -> list[tuple[str, str]]:
    """(name, description) of every device that works here: "cpu" always, "cuda" when a GPU does."""
    found = [("cpu", probe("cpu")[1])]
    works, description = probe("cuda")
    if works:
        found.append(("cuda", description))
    return found


def cpu_has_bf16() -> bool:
    """Whether precision "bf16" can run here (a CPU with AVX512-BF16 or AMX instructions)."""
    return bool(core_module("cpu").cpu_has_bf16())


def resolve_precision(precision: str, device: str) -> str:
    """The concrete precision on a concrete device: "auto" is "bf16" on a CPU with bf16 instructions, else
    "float32"; the others are returned as they are (resolve_device checks them)."""
    _check_choice("precision", precision, PRECISIONS)
    if precision != "auto":
        return precision
    return "bf16" if device == "cpu" and cpu_has_bf16() else "float32"


def precision_choices(device: str) -> list[str]:
    """The precisions that can run on a concrete device here ("auto" first)."""
    return ["auto", "float32"] + (["bf16"] if device == "cpu" and cpu_has_bf16() else []) + (
        ["tf32"] if device == "cuda" else [])


def resolve_device(device: str = "auto", precision: str = "float32") -> str:
    """The concrete device ("cpu" or "cuda") for a requested one: "auto" is the GPU when it works,
    else the CPU. Raises ValueError for an unknown device or precision, or for "tf32" without the GPU,
    and RuntimeError when "cuda" is asked for but cannot run here."""
    _check_choice("device", device, DEVICES)
    _check_choice("precision", precision, PRECISIONS)
    if device == "cpu":
        resolved = "cpu"
    else:
        gpu_works, reason = probe("cuda")
        if device == "cuda" and not gpu_works:
            raise RuntimeError(f"device 'cuda' requested but it cannot run here: {reason}; "
                               "use device='cpu' or 'auto'")
        resolved = "cuda" if gpu_works else "cpu"
    if precision == "bf16" and resolved == "cpu" and not cpu_has_bf16():
        raise ValueError("precision 'bf16' needs a CPU with AVX512-BF16 (or AMX) instructions; this one has none: "
                         "use precision='float32' (or 'auto', which picks bf16 only where it runs)")
    if precision == "bf16" and resolved != "cpu":
        raise ValueError("precision 'bf16' is the CPU backend's (bf16 convolutions on CPUs with bf16 instructions), "
                         "but the network would run on the GPU; use device='cpu', or precision 'float32' or 'tf32'")
    if precision == "tf32" and resolved != "cuda":
        why = "" if device == "cpu" else f" (no usable GPU here: {probe('cuda')[1]})"
        raise ValueError(f"precision 'tf32' needs the GPU backend (device 'cuda'), but the network would run on "
                         f"the CPU{why}; use precision='float32'")
    return resolved


def gpu_not_trusted() -> str | None:
    """Why a GPU that is present here is not used (it failed the self-test), or None."""
    works, reason = probe("cuda")
    return reason if not works and SELF_TEST_FAILED in reason else None
