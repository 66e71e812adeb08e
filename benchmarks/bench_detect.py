"""Milliseconds per 2048x2048 plane for each spot detector, against a NumPy/SciPy version of the
same wavelet detector run in this script.

    python benchmarks/bench_detect.py [--size 2048] [--repeat 15] [--spots 3000]

The image imitates an enhanced image: a smooth background up to 0.3, noise, and 3x3 spot stamps
near 1. Each time is the median of --repeat runs after a warm-up, through detect_spots() (the
Python API, input checks and conversion included). Prints a Markdown table. The C core is
single-threaded per plane, so times are comparable with the single-threaded NumPy reference.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from checkout import import_package  # noqa: E402  (benchmarks/ is the script's directory)

import_package()
from deepspot_napari.detect import DEFAULT_DETECTION, detect_spots  # noqa: E402

B3 = np.array([1, 4, 6, 4, 1], np.float32) / 16
STAMP = np.array([[200, 230, 200], [230, 255, 230], [200, 230, 200]], np.float32) / 255


def enhanced_like_image(rng, size, n_spots):
    yy, xx = np.mgrid[:size, :size] / size
    background = 0.15 * (1 + np.sin(6 * yy) * np.cos(4 * xx))
    image = (background + rng.normal(0, 0.02, (size, size))).astype(np.float32)
    for y, x in rng.integers(2, size - 2, (n_spots, 2)):
        image[y - 1:y + 2, x - 1:x + 2] = STAMP
    return image


def wavelet_reference(image, scales, sensitivities):
    """Icy's wavelet detector in NumPy/SciPy; SciPy's mode 'reflect' is the edge-repeating mirror."""
    approx = image
    keep = np.ones(image.shape, bool)
    for scale in range(1, max(scales) + 1):
        kernel = np.zeros(4 * 2 ** (scale - 1) + 1, np.float32)
        kernel[:: 2 ** (scale - 1)] = B3
        smoothed = ndimage.correlate1d(ndimage.correlate1d(approx, kernel, axis=0, mode="reflect"),
                                       kernel, axis=1, mode="reflect")
        if scale in scales:
            detail = approx - smoothed
            sensitivity = sensitivities[scales.index(scale)]
            threshold = (np.sqrt(2 * np.log(image.size / 4.0**scale)) * np.mean(np.abs(detail - detail.mean()))
                         * 100 / sensitivity)
            keep &= (detail >= threshold) & (detail > 0)
        approx = smoothed
    labels, count = ndimage.label(keep, structure=np.ones((3, 3)))
    return np.array(ndimage.center_of_mass(keep, labels, range(1, count + 1)))


def median_ms(run, repeat):
    run()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--spots", type=int, default=3000)
    args = ap.parse_args(argv)
    image = enhanced_like_image(np.random.default_rng(0), args.size, args.spots)
    print(f"# python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cpus, "
          f"{platform.processor() or platform.machine()}; {args.size}x{args.size} float32, "
          f"{args.spots} stamps, median of {args.repeat}\n")
    print("| detector | spots | C core ms | NumPy/SciPy ms | speed-up |")
    print("|---|---:|---:|---:|---:|")
    cases = [
        ("peak, DEFAULT_DETECTION", dict(method="peak"), None),
        ("peak, subpixel gaussian", dict(method="peak", subpixel="gaussian"), None),
        ("wavelet scale 2, subpixel none", dict(method="wavelet", scales=(2,), sensitivities=(100,),
                                                subpixel="none"), ((2,), (100,))),
        ("wavelet scales 1-3, subpixel none", dict(method="wavelet", scales=(1, 2, 3), sensitivities=(100,) * 3,
                                                   subpixel="none"), ((1, 2, 3), (100,) * 3)),
        ("wavelet scale 5, subpixel none", dict(method="wavelet", scales=(5,), sensitivities=(100,),
                                                subpixel="none"), ((5,), (100,))),
    ]
    for name, options, reference in cases:
        ms, spots = median_ms(lambda: detect_spots(image, params=DEFAULT_DETECTION, **options), args.repeat)
        if reference is None:
            print(f"| {name} | {len(spots)} | {ms:.1f} | | |")
            continue
        ref_ms, ref_centroids = median_ms(lambda: wavelet_reference(image, *map(list, reference)),
                                          max(3, args.repeat // 5))
        agree = "" if len(ref_centroids) == len(spots) else f" (reference: {len(ref_centroids)})"
        print(f"| {name} | {len(spots)}{agree} | {ms:.1f} | {ref_ms:.1f} | {ref_ms / ms:.1f}x |")


if __name__ == "__main__":
    main()
