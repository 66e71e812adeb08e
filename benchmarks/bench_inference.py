#!/usr/bin/env python3
"""Inference speed of our C core (oneDNN) against the original model in TensorFlow and in ONNX
Runtime, in one run on the same machine: ms per 256x256 patch at batch 1 and 8, and per
2048x2048 image, with the achieved GFLOP/s (float32, and bf16 where the CPU has bf16 instructions) (23.2 GFLOP per 256x256 forward, docs/reference_model.md section 1.6).

Each framework is measured in its own child process, one after the other, so that their thread
pools never compete for the cores. Needs TensorFlow, tf2onnx and onnxruntime (benchmark-only
dependencies; see benchmarks/bench_reference_frameworks.py).

    python benchmarks/bench_inference.py [--repeats 5] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

GFLOP_PER_256 = 23.2
HERE = Path(__file__).resolve().parent


def _median_ms(call, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_ours(repeats: int, precision: str = "float32") -> dict:
    import numpy as np
    sys.path.insert(0, str(HERE))
    from checkout import import_package
    import_package()
    from deepspot_napari import Model
    model = Model.load(device="cpu", precision=precision)
    rng = np.random.default_rng(1234)
    results = {}
    for batch in (1, 8):
        x = rng.random((batch, 256, 256, 1), dtype=np.float32)
        results[f"patch_b{batch}"] = _median_ms(lambda: model.forward(x), repeats) / batch
    image = rng.random((2048, 2048), dtype=np.float32)
    results["image_2048"] = _median_ms(lambda: model.enhance(image), max(2, repeats // 2), warmup=1)
    results["image_2048_whole"] = _median_ms(lambda: model.enhance(image, tile_size=None), max(2, repeats // 2),
                                             warmup=1)
    return results


def measure_reference(framework: str, repeats: int) -> dict:
    sys.path.insert(0, str(HERE))
    import bench_reference_frameworks as ref
    timer = ref.time_tensorflow if framework == "tensorflow" else ref.time_onnxruntime
    results = {f"patch_b{b}": timer(b, 256, repeats) / b for b in (1, 8)}
    results["image_2048"] = timer(1, 2048, max(2, repeats // 2))
    return results


def _child(target, args, queue):
    try:
        queue.put(target(*args))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_isolated(target, *args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(target, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    runs = {"ours (C core, oneDNN)": run_isolated(measure_ours, args.repeats),
            "ours, bf16 (`--precision bf16`)": run_isolated(measure_ours, args.repeats, "bf16"),
            "TensorFlow (original SavedModel)": run_isolated(measure_reference, "tensorflow", args.repeats),
            "ONNX Runtime (same graph)": run_isolated(measure_reference, "onnxruntime", args.repeats)}
    rows = [("256x256 patch, batch 1", "patch_b1", 1.0), ("256x256 patch, batch 8", "patch_b8", 1.0),
            ("2048x2048 image", "image_2048", 64.0), ("2048x2048 image, one whole pass", "image_2048_whole", 64.0)]
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"load average at start {os.getloadavg()[0]:.1f}. Median of {args.repeats} runs; ms per image "
             "(GFLOP/s achieved).", "",
             "| case | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    for label, key, patches in rows:
        cells = []
        for result in runs.values():
            if "error" in result:
                cells.append(result["error"][:60])
            elif key in result:
                ms = result[key]
                cells.append(f"{ms:,.1f} ({GFLOP_PER_256 * patches / ms * 1e3:,.0f})")
            else:
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ours = {name: result for name, result in runs.items() if name.startswith("ours")}
    for name, result in runs.items():
        for mine, mine_result in ours.items():
            if name == mine or (name.startswith("ours") and mine == "ours (C core, oneDNN)"):
                continue
            if "error" not in result and "error" not in mine_result:
                ratios = ", ".join(f"{key}: {result[key] / mine_result[key]:.2f}x" for _, key, _ in rows
                                   if key in result and key in mine_result)
                lines.append(f"\nSpeed-up of {mine} over {name}: {ratios}")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
