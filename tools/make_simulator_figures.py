"""docs/simulator_montage.png and docs/simulator_snr.png: realistic-recipe images beside real ones at
the same contrast (each stretched between its 0.5th and 99.8th percentiles), and the SNR histogram
of each (realistic.measured_snr; real spots: the expert's points on the annotated image, Big-FISH's
automatic detections on the unannotated ones; simulated spots: their ground truth); and prints the
noise-correlation table of docs/simulator.md (realistic.noise_correlation).

    python3 tools/make_simulator_figures.py [--realdata DIR]   (default $DEEPSPOT_REALDATA, ../shared/realdata)
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepspot_napari.io import read_image  # noqa: E402
from deepspot_napari.overlay import contrast_stretch  # noqa: E402
from deepspot_napari.realistic import (_camera, background_sources, measured_snr, noise_correlation,  # noqa: E402
                                      realistic_image)
from deepspot_napari.realistic_eval import REAL_BACKGROUND_FILES, default_realdata  # noqa: E402
from deepspot_napari.simulate import read_spots_csv  # noqa: E402

CROP = 192
ANNOTATED = "annotated/insta_smfish_293t_tfrc"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--realdata", type=Path, default=default_realdata())
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args()
    import bigfish.detection as bf
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reals = {}
    image = np.asarray(read_image(args.realdata / ANNOTATED / "image.tif")).astype(float)
    reals["insta 293T (expert points)"] = (image, read_spots_csv(args.realdata / ANNOTATED / "spots.csv"))
    raw = {}
    for name in REAL_BACKGROUND_FILES:
        img = np.asarray(read_image(args.realdata / name))
        raw[name] = img
        spots = np.asarray(bf.detect_spots(img, threshold=None, voxel_size=100.0, spot_radius=150.0), float)
        reals[Path(name).stem.replace("spotiflow_img_", "") + " (Big-FISH)"] = (img.astype(float), spots.reshape(-1, 2))
    sources = background_sources(list(raw.values()), "train")
    sims = [realistic_image(np.random.default_rng(np.random.SeedSequence([7, k])), 256, sources=sources)
            for k in range(60)]

    fig, axes = plt.subplots(2, 4, figsize=(12, 6.4))
    for ax, (name, (img, _)) in zip(axes[0], reals.items()):
        ax.imshow(contrast_stretch(img[:CROP, :CROP]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"real: {name}", fontsize=8)
    shown = [s for s in sims if len(s.spots)][:4]
    for ax, sim in zip(axes[1], shown):
        ax.imshow(contrast_stretch(sim.image[:CROP, :CROP]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"simulated: {sim.params['kind']}, {sim.params['bits']} bit\n{', '.join(sim.params['extras'])}",
                     fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out / "simulator_montage.png", dpi=90)

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.logspace(np.log10(0.5), np.log10(200), 40)
    for name, (img, spots) in reals.items():
        snr = measured_snr(img, spots)
        ax.hist(snr[np.isfinite(snr)], bins=bins, histtype="step", density=True, label=f"real: {name}")
    snr = np.concatenate([measured_snr(s.image, s.spots) for s in sims])
    ax.hist(snr[np.isfinite(snr)], bins=bins, histtype="stepfilled", alpha=0.3, density=True, color="k",
            label="simulated (realistic recipe), measured")
    ax.set_xscale("log")
    ax.set_xlabel("spot SNR as measured (peak over annulus median, / annulus std)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "simulator_snr.png", dpi=90)
    print(f"wrote {args.out / 'simulator_montage.png'}, {args.out / 'simulator_snr.png'}")
    print("| image | lag-1 noise correlation |\n|---|---|")
    for name, (img, _) in reals.items():
        print(f"| real: {name} | {noise_correlation(img):.2f} |")
    flat = np.full((256, 256), 50.0)
    for sigma in (0.0, 0.4, 0.7, 1.0):
        sim = _camera(np.random.default_rng(0), flat, 2.0, 100.0, 2.0, 16, sigma)
        print(f"| simulated, camera noise blurred by {sigma} px | {noise_correlation(sim):.2f} |")


if __name__ == "__main__":
    main()
