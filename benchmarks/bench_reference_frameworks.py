#!/usr/bin/env python3
"""Inference timings of the ORIGINAL DeepSpot model (napari-deepspot 0.0.7, MHybrid) in TensorFlow and
ONNX Runtime on CPU -- the baselines our C/oneDNN core is compared with.

API (imported by ``benchmarks/bench_inference.py``; keep it stable)::

    time_tensorflow(batch, size, repeats) -> float   # median milliseconds per forward call
    time_onnxruntime(batch, size, repeats) -> float  # median milliseconds per forward call

A "forward call" runs ``batch`` images of ``size`` x ``size`` at once (divide by ``batch`` for per-image
time).  Inputs are random float32 in [0, 1) (already max-scaled), NHWC (batch, size, size, 1).  Each
function loads the model once per process (cached), does 2 untimed warm-up calls, then ``repeats``
timed calls, and returns the median.  Both use the machine's 2 cores: intra-op threads 2, inter-op 1.

* TensorFlow: size 256 runs the SavedModel's serving signature as is; other sizes (multiples of 8) run
  the SavedModel's own graph re-bound to that size (``OriginalGraph`` in
  ``tools/convert_reference_weights.py``).  TF's oneDNN rewrites stay at TF's default (on for x86
  Linux) unless ``TF_ENABLE_ONEDNN_OPTS`` is set in the environment; what was used is printed.
  Thread settings only take effect if TensorFlow has not run anything yet in this process.
* ONNX Runtime: the tf2onnx export from ``tools/export_onnx.py`` (made and verified on first use, in
  ``~/.cache/deepspot-napari/onnx``), CPU provider, all graph optimisations; size 256 uses the fixed
  256x256 export, other sizes the dynamic-H/W export.

Run ``python benchmarks/bench_reference_frameworks.py`` for a small table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
import convert_reference_weights as crw  # noqa: E402

THREADS = 2
WARMUP = 2

__all__ = ["time_tensorflow", "time_onnxruntime", "THREADS"]

_tf_cache: dict = {}
_ort_cache: dict = {}


def _check_args(batch: int, size: int, repeats: int) -> None:
    if batch < 1 or repeats < 1:
        raise ValueError("batch and repeats must be >= 1")
    if size < 8 or size % 8:
        raise ValueError(f"size must be a positive multiple of 8, got {size}")


def _inputs(batch: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(1234)
    return rng.random((batch, size, size, 1), dtype=np.float32)


def _median_ms(call, repeats: int) -> float:
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _tensorflow():
    if "tf" not in _tf_cache:
        tf = crw.quiet_tensorflow()
        try:
            tf.config.threading.set_intra_op_parallelism_threads(THREADS)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError as exc:  # TF already initialised by the caller
            print(f"warning: TensorFlow thread settings not applied ({exc})", file=sys.stderr)
        _tf_cache["tf"] = tf
        _tf_cache["model"] = crw.load_savedmodel(crw.reference_savedmodel_dir())
    return _tf_cache["tf"], _tf_cache["model"]


def time_tensorflow(batch: int, size: int, repeats: int) -> float:
    """Median ms per forward call of the original SavedModel in TensorFlow (batch x size x size)."""
    _check_args(batch, size, repeats)
    tf, model = _tensorflow()
    x = tf.constant(_inputs(batch, size))
    if size == 256:
        fn = model.signatures["serving_default"]

        def call():
            return fn(input_1=x)["conv2d"].numpy()
    else:
        if "graph" not in _tf_cache:
            _tf_cache["graph"] = crw.OriginalGraph(model)
        fn = _tf_cache["graph"].function

        def call():
            return fn(x)[0].numpy()
    return _median_ms(call, repeats)


def _onnx_session(dynamic_hw: bool):
    if dynamic_hw not in _ort_cache:
        import onnxruntime as ort

        sys.path.insert(0, str(REPO_ROOT / "tools"))
        import export_onnx

        path = export_onnx.ensure_onnx(dynamic_hw=dynamic_hw)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        _ort_cache[dynamic_hw] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return _ort_cache[dynamic_hw]


def time_onnxruntime(batch: int, size: int, repeats: int) -> float:
    """Median ms per forward call of the tf2onnx export of the original model in ONNX Runtime."""
    _check_args(batch, size, repeats)
    sess = _onnx_session(dynamic_hw=size != 256)
    x = _inputs(batch, size)

    def call():
        return sess.run(None, {"input": x})[0]

    return _median_ms(call, repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Time the original DeepSpot model in TensorFlow and ONNX Runtime.")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--frameworks", nargs="+", default=["tensorflow", "onnxruntime"],
                    choices=["tensorflow", "onnxruntime"])
    args = ap.parse_args(argv)

    timers = {"tensorflow": time_tensorflow, "onnxruntime": time_onnxruntime}
    rows = []
    for fw in args.frameworks:
        for size in args.sizes:
            for batch in args.batches:
                ms = timers[fw](batch, size, args.repeats)
                rows.append((fw, batch, size, ms))
                print(f"  {fw} batch {batch} size {size}: {ms:.1f} ms", file=sys.stderr, flush=True)

    versions = []
    if "tensorflow" in args.frameworks:
        tf = _tf_cache["tf"]
        versions.append(f"TensorFlow {tf.__version__} (TF_ENABLE_ONEDNN_OPTS="
                        f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset: default on')})")
    if "onnxruntime" in args.frameworks:
        import onnxruntime as ort

        versions.append(f"ONNX Runtime {ort.__version__} (CPUExecutionProvider)")
    print(f"# original DeepSpot MHybrid, CPU, {THREADS} intra-op threads, median of {args.repeats} "
          f"after {WARMUP} warm-up; {os.cpu_count()} CPUs visible")
    print("# " + "; ".join(versions))
    print(f"{'framework':<12} {'batch':>5} {'size':>5} {'ms/forward':>11} {'ms/image':>9} {'Mpix/s':>7}")
    for fw, batch, size, ms in rows:
        print(f"{fw:<12} {batch:>5} {size:>5} {ms:>11.1f} {ms / batch:>9.1f} "
              f"{batch * size * size / (ms * 1e3):>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
