#!/usr/bin/env python3
"""Training speed of our C core (csrc/train.c on oneDNN) against TensorFlow/Keras on the same
architecture, in one run on the same machine: images/s of full training steps (forward in training
mode, loss, backward, Adam, BN moving statistics; spatial dropout 0.2) on 256x256 patches at batch 8
and 32, with the achieved GFLOP/s (about 3 x 23.2 GFLOP per 256x256 image and step).

Each measurement runs in its own child process, one after the other, so that thread pools never
compete for the cores and each process's peak memory is its own. On a shared machine other jobs
steal cores: with --rounds R the frameworks alternate R times and the fastest step seen is kept
(the load average before and after is printed); CPU seconds per image are reported as well. TensorFlow runs as installed (its
oneDNN optimisations on, Keras 3 `train_on_batch`, graph mode) with the model built by
tools/make_train_golden.py from the published weights. TensorFlow is a benchmark-only dependency.

    python benchmarks/bench_training.py [--steps 3] [--rounds 2] [--batches 8 32] [--skip-tensorflow]
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GFLOP_PER_IMAGE_STEP = 3 * 23.2
SIZE = 256


def _batch(batch: int):
    import numpy as np
    rng = np.random.default_rng(1234)
    x = rng.random((batch, SIZE, SIZE), dtype=np.float32)
    t = rng.random((batch, SIZE, SIZE), dtype=np.float32)
    return x, t / t.reshape(batch, -1).max(axis=1)[:, None, None]


def _time_steps(step, steps: int) -> tuple[float, float]:
    """(fastest wall seconds, CPU seconds of that step) over `steps` steps after a warm-up."""
    step()  # warm-up: primitives / graph built here
    best = (math.inf, math.inf)
    for _ in range(steps):
        cpu = time.process_time()
        start = time.perf_counter()
        step()
        best = min(best, (time.perf_counter() - start, time.process_time() - cpu))
    return best


def measure_ours(batch: int, steps: int) -> dict:
    from checkout import import_package
    import_package()
    from deepspot_napari import _core, bundled_weights_path
    trainer = _core.Trainer(_core.Network(str(bundled_weights_path())), dropout=0.2)
    x, t = _batch(batch)
    seconds, cpu = _time_steps(lambda: trainer.step(x, t), steps)
    return {"seconds": seconds, "cpu": cpu, "arena_gib": trainer.arena_bytes / 2**30}


def measure_tensorflow(batch: int, steps: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT))
    import keras
    import tensorflow as tf
    import make_train_golden as golden
    params = golden.load_safetensors_np(ROOT / "weights" / "deepspot_hybrid.safetensors")
    model, names = golden.build_keras_model(SIZE, dropout_rate=0.2)
    golden.set_weights(model, names, params)
    bce = keras.losses.BinaryCrossentropy()

    def custom_loss(y_true, y_pred):  # deepspot/train.py
        return bce(y_true, y_pred) + (tf.reduce_max(y_pred) - tf.reduce_max(y_true)) ** 2

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-4, epsilon=1e-7), loss=custom_loss)
    x, t = _batch(batch)
    x, t = x[..., None], t[..., None]
    seconds, cpu = _time_steps(lambda: model.train_on_batch(x, t), steps)
    return {"seconds": seconds, "cpu": cpu, "tensorflow": tf.__version__}


def _child(framework: str, batch: int, steps: int, queue) -> None:
    try:
        result = (measure_ours if framework == "ours" else measure_tensorflow)(batch, steps)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        queue.put(result)
    except Exception as e:  # reported in the table
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run_isolated(framework: str, batch: int, steps: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(framework, batch, steps, queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"error": f"child exited with {proc.exitcode}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (the fastest is kept)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the frameworks this many times")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--skip-tensorflow", action="store_true")
    args = ap.parse_args(argv)
    frameworks = ["ours"] + ([] if args.skip_tensorflow else ["tensorflow"])
    load_before = os.getloadavg()
    best: dict[tuple[str, int], dict] = {}
    for _ in range(args.rounds):
        for batch in args.batches:
            for framework in frameworks:
                r = run_isolated(framework, batch, args.steps)
                print(f"{framework} batch {batch}: {r}", file=sys.stderr, flush=True)
                key = (framework, batch)
                if key not in best or "error" in best[key] or r.get("seconds", math.inf) < best[key]["seconds"]:
                    best[key] = r
    load_after = os.getloadavg()
    print(f"\nTraining speed, {SIZE}x{SIZE} patches, one Adam step per batch (fastest of {args.steps} steps after a "
          f"warm-up, over {args.rounds} round(s)); {platform.machine()}, {os.cpu_count()} CPUs; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    print("| framework | batch | s / step | images / s | GFLOP/s | CPU s / image | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        for framework in frameworks:
            r = best[(framework, batch)]
            name = "C core (oneDNN)" if framework == "ours" else f"TensorFlow {r.get('tensorflow', '')} / Keras"
            if "error" in r:
                print(f"| {name} | {batch} | failed: {r['error']} | | | | |")
                continue
            ips = batch / r["seconds"]
            print(f"| {name} | {batch} | {r['seconds']:.2f} | {ips:.2f} | {ips * GFLOP_PER_IMAGE_STEP:.0f} | "
                  f"{r['cpu'] / batch:.2f} | {r['peak_rss_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
