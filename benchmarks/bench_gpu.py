#!/usr/bin/env python3
"""GPU speed of our C core's CUDA backend (deepspot_napari._core_cuda, cuDNN) against PyTorch eager +
cuDNN on the same architecture (benchmarks/torch_deepspot.py), in one process on one GPU:

* inference images/s on 256x256 patches at batch 1, 32 and 128, and on one whole 2048x2048 image;
* training images/s at batch 32 on 256x256 (ours: Trainer.step; PyTorch: forward in training mode,
  BCE-with-logits + (max p - max t)^2, backward, Adam) - dropout 0.2 in both;
* float32 with TF32 off (torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 =
  False), plus TF32 rows (ours: Network(math="tf32"); PyTorch: allow_tf32 on);
* the GPU's measured FP32 peak (an 8192^3 float32 matmul and a large 3x3 convolution, TF32 off) and the
  fraction of it each row reaches, from the model's FLOPs (counted from the architecture: 2 k^2 Cin
  Cout Hout Wout per convolution, transposed ones by their input side; training = 3x inference);
* peak GPU memory: PyTorch's torch.cuda.max_memory_allocated; ours (which does not allocate through
  PyTorch) as the largest drop in free device memory (torch.cuda.mem_get_info, sampled every 2 ms)
  from before its Network or Trainer is made until its timed runs end (buffers, cuDNN workspace;
  not the CUDA context, which both share).

Timing: warm-up runs, then the median of --repeats timed runs, each between torch.cuda.synchronize()
calls. Ours and "PyTorch (numpy in/out)" go from a host numpy batch to a host numpy result (our API
has no other form); "PyTorch (device tensors)" keeps input and output on the GPU. PyTorch runs with
torch.backends.cudnn.benchmark = True (its best algorithms) in NCHW.

The PyTorch model is first checked against our CPU core on a random 128x128 image (max abs diff of
the sigmoid map <= 1e-4); the run stops if it differs. Without a GPU (or without PyTorch) the script
says so and exits 0; with PyTorch but no GPU it still runs that check on the CPU.

    python benchmarks/bench_gpu.py [--quick] [--repeats 10] [--out benchmarks/results/bench_gpu.md]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from checkout import import_package  # noqa: E402

import_package()

PATCH = 256
WHOLE_IMAGE = 2048
INFERENCE_BATCHES = (1, 32, 128)
TRAIN_BATCH = 32
TRAIN_FLOP_FACTOR = 3
LEARNING_RATE = 1e-4


# ---------------------------------------------------------------------------------------------- timing

def median_seconds(run, repeats: int, warmup: int) -> float:
    import torch
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def set_tf32(enabled: bool) -> None:
    import torch
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def _matmul_tflops(n: int, repeats: int) -> float:
    import torch
    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
    return 2 * n ** 3 / median_seconds(lambda: a @ b, repeats, 2) / 1e12


def _conv3x3_tflops(batch: int, channels: int, size: int, repeats: int) -> float:
    import torch
    import torch.nn.functional as F
    x = torch.randn(batch, channels, size, size, device="cuda")
    w = torch.randn(channels, channels, 3, 3, device="cuda")
    flop = 2 * 9 * channels * channels * size * size * batch
    return flop / median_seconds(lambda: F.conv2d(x, w, padding=1), repeats, 2) / 1e12


def measure_peak(repeats: int) -> dict:
    """FP32 TFLOP/s (TF32 off) of an 8192^3 matmul and of a 3x3 256->256 convolution on 32 x 128x128."""
    import torch
    set_tf32(False)
    matmul = _matmul_tflops(8192, repeats)
    conv = _conv3x3_tflops(32, 256, 128, repeats)
    torch.cuda.empty_cache()
    return {"matmul_tflops": matmul, "conv3x3_tflops": conv, "peak_tflops": max(matmul, conv)}


# ---------------------------------------------------------------------------------------------- data

def images(batch: int, size: int, seed: int = 1234) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, size, size), dtype=np.float32)


def targets(batch: int, size: int) -> np.ndarray:
    t = images(batch, size, seed=99)
    return t / t.reshape(batch, -1).max(axis=1)[:, None, None]


# ---------------------------------------------------------------------------------------------- ours

class DevicePeakMemory:
    """The largest drop in free device memory (torch.cuda.mem_get_info, sampled every 2 ms by a
    thread) while the block runs: what our core allocates, which PyTorch's allocator does not see.
    PyTorch must not allocate meanwhile; the CUDA context already exists, so it is not counted."""

    def __enter__(self):
        import torch
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.free_before = self.min_free = torch.cuda.mem_get_info()[0]
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self):
        import torch
        while True:
            self.min_free = min(self.min_free, torch.cuda.mem_get_info()[0])
            if self._stop.wait(0.002):
                return

    def __exit__(self, *exc):
        import torch
        torch.cuda.synchronize()
        self._stop.set()
        self._sampler.join()
        self.min_free = min(self.min_free, torch.cuda.mem_get_info()[0])
        self.peak = self.free_before - self.min_free


def ours_inference(cuda_core, weights: str, math: str, batch: int, size: int, repeats: int) -> dict:
    x = images(batch, size)[..., None]
    with DevicePeakMemory() as memory:
        network = cuda_core.Network(weights, math=math)
        seconds = median_seconds(lambda: network.forward(x), repeats, warmup=2)
    return {"seconds": seconds, "memory_bytes": memory.peak}


def ours_training(cuda_core, weights: str, math: str, batch: int, repeats: int) -> dict:
    x, t = images(batch, PATCH), targets(batch, PATCH)
    with DevicePeakMemory() as memory:
        trainer = cuda_core.Trainer(cuda_core.Network(weights, math=math), learning_rate=LEARNING_RATE, dropout=0.2)
        seconds = median_seconds(lambda: trainer.step(x, t), repeats, warmup=2)
    return {"seconds": seconds, "memory_bytes": memory.peak}


# ---------------------------------------------------------------------------------------------- PyTorch

def torch_inference(model, batch: int, size: int, repeats: int, host: bool) -> dict:
    import torch
    x_host = images(batch, size)[:, None]
    x = torch.from_numpy(x_host).cuda()
    model.eval()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        if host:
            def run():
                return model(torch.from_numpy(x_host).cuda()).cpu().numpy()
        else:
            def run():
                return model(x)
        seconds = median_seconds(run, repeats, warmup=2)
    return {"seconds": seconds, "memory_bytes": torch.cuda.max_memory_allocated()}


def torch_training(model, batch: int, repeats: int) -> dict:
    """One step on device tensors: BCE on logits (the mean over all pixels) + (max p - max t)^2 over the
    batch, as our Trainer's defaults (bce='logits', max_term='batch'); Adam as Keras (eps 1e-7)."""
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(images(batch, PATCH)[:, None]).cuda()
    t = torch.from_numpy(targets(batch, PATCH)[:, None]).cuda()
    published = copy.deepcopy(model.state_dict())
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-7)

    def step():
        optimizer.zero_grad(set_to_none=True)
        z = model.logits(x)
        loss = F.binary_cross_entropy_with_logits(z, t) + (torch.sigmoid(z).max() - t.max()) ** 2
        loss.backward()
        optimizer.step()

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, repeats, warmup=2)
    model.load_state_dict(published)
    model.eval()
    return {"seconds": seconds, "memory_bytes": torch.cuda.max_memory_allocated()}


# ---------------------------------------------------------------------------------------------- run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per row (the median is reported)")
    ap.add_argument("--quick", action="store_true", help="3 timed runs per row, no batch 128, no TF32 training rows")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_gpu.md", help="Markdown table")
    ap.add_argument("--json", type=Path, default=None, help="raw results (default: --out with .json)")
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    json_path = args.json or args.out.with_suffix(".json")

    try:
        import torch
    except ImportError as exc:
        print(f"bench_gpu: PyTorch is not installed ({exc}); nothing measured.")
        return 0
    import torch_deepspot as td
    from deepspot_napari import bundled_weights_path
    from deepspot_napari.devices import core_module, probe

    weights = str(bundled_weights_path())
    model = td.DeepSpotTorch.from_safetensors(weights)
    if not torch.cuda.is_available():
        diff = td.verify_against_core(model, weights, device="cpu")
        print(f"bench_gpu: no GPU visible to PyTorch; nothing measured. (The PyTorch model matches "
              f"_core.Network on the CPU: max abs diff {diff:.1e} on a 128x128 image.)")
        return 0

    flops = {"patch": model.flops(PATCH, PATCH), "whole": model.flops(WHOLE_IMAGE, WHOLE_IMAGE)}
    set_tf32(False)
    torch.backends.cudnn.benchmark = True
    model = model.cuda()
    diff = td.verify_against_core(model, weights, device="cuda")
    print(f"PyTorch model on the GPU vs _core.Network (CPU): max abs diff {diff:.1e}", flush=True)
    gpu_works, gpu_reason = probe("cuda")
    cuda_core = core_module("cuda") if gpu_works else None
    peak = measure_peak(repeats)
    print(f"FP32 peak (TF32 off): matmul {peak['matmul_tflops']:.1f} TFLOP/s, 3x3 conv "
          f"{peak['conv3x3_tflops']:.1f} TFLOP/s", flush=True)

    batches = [b for b in INFERENCE_BATCHES if not (args.quick and b > 32)]
    cases = ([("inference", batch, PATCH, "float32") for batch in batches]  # (kind, batch, size, math)
             + [("inference", 1, WHOLE_IMAGE, "float32"), ("training", TRAIN_BATCH, PATCH, "float32"),
                ("inference", 32, PATCH, "tf32")]
             + ([] if args.quick else [("training", TRAIN_BATCH, PATCH, "tf32")]))

    rows = []
    for kind, batch, size, math in cases:
        flop = flops["whole" if size == WHOLE_IMAGE else "patch"] * (TRAIN_FLOP_FACTOR if kind == "training" else 1)
        case = f"{kind}, {batch} x {size}x{size}"
        runners = []
        if cuda_core is not None and kind == "training":
            runners.append((f"ours (CUDA core, {math})", lambda: ours_training(cuda_core, weights, math, batch, repeats)))
        elif cuda_core is not None:
            runners.append((f"ours (CUDA core, {math})",
                            lambda: ours_inference(cuda_core, weights, math, batch, size, repeats)))
        else:
            rows.append({"case": case, "implementation": f"ours (CUDA core, {math})", "error": gpu_reason})
        torch_math = "TF32" if math == "tf32" else "float32"
        if kind == "training":
            runners.append((f"PyTorch eager ({torch_math})", lambda: torch_training(model, batch, repeats)))
        else:
            runners.append((f"PyTorch eager ({torch_math}, numpy in/out)",
                            lambda: torch_inference(model, batch, size, repeats, host=True)))
            runners.append((f"PyTorch eager ({torch_math}, device tensors)",
                            lambda: torch_inference(model, batch, size, repeats, host=False)))
        for name, runner in runners:
            set_tf32(math == "tf32")
            try:
                result = runner()
            except Exception as exc:  # a failed row is reported, the others still run
                result = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                set_tf32(False)
                gc.collect()
                torch.cuda.empty_cache()
            row = {"case": case, "kind": kind, "batch": batch, "size": size, "math": math, "implementation": name,
                   **result}
            if "seconds" in result:
                row["images_per_s"] = batch / result["seconds"]
                row["tflops"] = flop * batch / result["seconds"] / 1e12
                row["fraction_of_peak"] = row["tflops"] / peak["peak_tflops"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
            "our_backend": cuda_core.probe() if cuda_core is not None else f"unavailable: {gpu_reason}",
            "python": platform.python_version(), "repeats": repeats, "gflop_per_patch": flops["patch"] / 1e9,
            "gflop_per_whole_image": flops["whole"] / 1e9, "torch_vs_core_max_abs_diff": diff, **peak}
    table = markdown(rows, info)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"written: {args.out}, {json_path}")
    return 0


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"GPU: {info['gpu']}; ours: {info['our_backend']}; PyTorch {info['torch']} (cuDNN {info['cudnn']}, "
        f"eager, NCHW, cudnn.benchmark on). Median of {info['repeats']} timed runs after warm-up.",
        f"Measured FP32 peak (TF32 off): matmul 8192^3 {info['matmul_tflops']:.1f} TFLOP/s, 3x3 conv "
        f"{info['conv3x3_tflops']:.1f} TFLOP/s; fractions below are of {info['peak_tflops']:.1f}. Model: "
        f"{info['gflop_per_patch']:.2f} GFLOP per {PATCH}x{PATCH} forward, {info['gflop_per_whole_image']:.0f} per "
        f"{WHOLE_IMAGE}x{WHOLE_IMAGE}; training = {TRAIN_FLOP_FACTOR}x. The PyTorch model matches our CPU core to {info['torch_vs_core_max_abs_diff']:.1e}.",
        "Memory: PyTorch rows torch.cuda.max_memory_allocated; ours the largest drop in free device memory "
        "(torch.cuda.mem_get_info, sampled every 2 ms) while its Network/Trainer is made and runs; CUDA context "
        "excluded.",
        "",
        "| case | implementation | images/s | ms / batch | TFLOP/s | of FP32 peak | GPU memory (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['implementation']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['implementation']} | {r['images_per_s']:.1f} | {r['seconds'] * 1e3:.1f} | "
                     f"{r['tflops']:.1f} | {r['fraction_of_peak']:.0%} | {r['memory_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
