#!/usr/bin/env bash
# The checks of one GPU session, in the order that tells the most soonest, sized for a short lease:
# what the machine has, a build of both modules, tests/test_cuda.py (GPU against CPU), then
# benchmarks/bench_gpu.py --quick. Everything is logged under $OUT (default benchmarks/results/gpu),
# so a run that is cut off still leaves what it found. Needs: a CUDA toolkit with cuDNN 9, CMake,
# Python with numpy, pytest, scipy, tifffile, pillow, safetensors and the oneDNN wheels
# (onednn-devel-cpu-gomp==2023.2.0), and PyTorch with CUDA for the benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
{
  nvidia-smi || echo "nvidia-smi: not found"
  command -v nvcc cmake python3 || true
  python3 -c "import numpy, torch; print('numpy', numpy.__version__, 'torch', torch.__version__, torch.cuda.is_available())" \
    || echo "python: numpy or torch missing"
} > "$out/machine.txt" 2>&1

CMAKE_ARGS=-DDEEPSPOT_CUDA=ON tools/dev_build.sh > "$out/build.log" 2>&1 || { echo "build failed: $out/build.log"; exit 1; }
python3 -c "from deepspot_napari import devices; print(devices.available_devices())" > "$out/devices.txt" 2>&1

# -x: the first disagreement is the one to read; the seed is printed for a replay.
timeout 600 python3 -m pytest tests/test_cuda.py -x -q -rs > "$out/test_cuda.log" 2>&1
echo "test_cuda: exit $? ($out/test_cuda.log)"
timeout 600 python3 benchmarks/bench_gpu.py --quick --out "$out/bench_gpu.md" > "$out/bench_gpu.log" 2>&1
echo "bench_gpu: exit $? ($out/bench_gpu.md)"
