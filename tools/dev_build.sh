#!/usr/bin/env bash
# Development build: compiles the extension and the C tests in build/dev and puts the extension
# into deepspot_napari/ so that `python -m pytest` from the repository root uses the working tree.
# (Users and CI install with `pip install .` instead.)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${DEEPSPOT_BUILD_DIR:-build/dev}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" -DPython_EXECUTABLE="$(command -v python3)" \
      -DDEEPSPOT_BUILD_C_TESTS=ON ${CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j2
# Replace by rename, never in place: running processes keep the library they mapped.
for so in "$build"/_core*.so; do
  cp "$so" "deepspot_napari/.$(basename "$so").tmp"
  mv -f "deepspot_napari/.$(basename "$so").tmp" "deepspot_napari/$(basename "$so")"
done
