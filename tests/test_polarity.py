"""The polarity analysis (deepspot_napari/polarity.py, csrc/polarity.c): the C histograms against a
float64 NumPy reference, DypFISH's index on its test vector, known enrichment recovered, uniform spots
giving no polarity, and every kind of bad input answered with a message while the other cells count."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from deepspot_napari import _core
from deepspot_napari import polarity as P
from deepspot_napari.cli import main as cli_main


def reference_histograms(cell_of_pixel, centroids, origins, bins, spots):
    """The per-cell angular histograms in float64 NumPy, written from the definition (polarity.h)."""
    n = len(origins)
    area, count = np.zeros((n, bins), np.int64), np.zeros((n, bins), np.int64)
    bin_map = np.full(cell_of_pixel.shape, -1)

    def bin_of(y, x, c):
        rel = (math.atan2(centroids[c, 0] - y, x - centroids[c, 1]) - origins[c]) % (2 * math.pi)
        return min(int(rel * bins / (2 * math.pi)), bins - 1)

    for (y, x), c in np.ndenumerate(cell_of_pixel):
        if c >= 0:
            bin_map[y, x] = bin_of(y, x, c)
            area[c, bin_map[y, x]] += 1
    cell_of_spot = np.full(len(spots), -1)
    for s, (y, x) in enumerate(spots):
        r, k = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
        if 0 <= r < cell_of_pixel.shape[0] and 0 <= k < cell_of_pixel.shape[1] and cell_of_pixel[r, k] >= 0:
            c = cell_of_pixel[r, k]
            cell_of_spot[s] = c
            count[c, bin_of(y, x, c)] += 1
    return area, count, cell_of_spot, bin_map


@pytest.mark.parametrize("bins", [3, 4, 360])
def test_histograms_match_numpy_reference(bins):
    rng = np.random.default_rng()  # fresh inputs every run
    h, w, n = 37, 53, 4
    cell_of_pixel = rng.integers(-1, n, (h, w)).astype(np.int32)
    centroids = rng.uniform(0, [h, w], (n, 2))
    origins = rng.uniform(-7, 7, n)
    spots = rng.uniform(-3, [h + 3, w + 3], (300, 2))  # some outside the image
    got = _core.polarity_histograms(cell_of_pixel, centroids, origins, bins, spots, True)
    want = reference_histograms(cell_of_pixel, centroids, origins, bins, spots)
    for g, r, name in zip(got, want, ("area", "spot count", "cell of spot", "bin map")):
        np.testing.assert_array_equal(g, r, err_msg=name)


def test_histograms_reject_bad_arguments():
    cells = np.zeros((4, 4), np.int32)
    with pytest.raises(ValueError, match="names cell 5"):
        _core.polarity_histograms(cells + 5, np.zeros((1, 2)), np.zeros(1), 3, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="centroids"):
        _core.polarity_histograms(cells, np.zeros((2, 2)), np.zeros(1), 3, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        _core.polarity_histograms(cells, np.full((1, 2), np.nan), np.zeros(1), 3, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="bins"):
        _core.polarity_histograms(cells, np.zeros((1, 2)), np.zeros(1), 0, np.zeros((0, 2)))
    with pytest.raises(TypeError, match="cell_of_pixel must be an int32 numpy array with 2 dimensions"):
        _core.polarity_histograms(cells.astype(float), np.zeros((1, 2)), np.zeros(1), 3, np.zeros((0, 2)))


def test_dypfish_test_vector():
    result = P.polarity_index([1] * 7, [7] * 7)
    assert result.index == -1.0 and result.error == 0.0 and result.n_cells == 7 and result.interval == (-1.0, -1.0)
    assert P.polarity_index([7] * 7, [1] * 7).index == 1.0


def test_bootstrap_draws_two_thirds_of_small_pools():
    # with 6 pooled values, each replicate compares with the median of 4 draws: some replicates differ
    m, nq = [2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 3.0, 3.0, 3.0]
    r = P.polarity_index(m, nq, bootstrap=200, seed=3)
    assert r.index == -1.0  # 2 is not above median(Nq) = 2
    with pytest.raises(ValueError, match="same number of values"):
        P.polarity_index(m, nq[:-1])
    assert len(set(r.replicates.tolist())) > 1 and r.error > 0


def _field(seed, enrichment, direction=90.0):
    return P.simulated_field(seed, shape=(256, 384), direction=direction, enrichment=enrichment)


def _tables(seeds, enrichment, direction=90.0, **kwargs):
    tables = []
    for s in seeds:
        f = _field(s, enrichment, direction)
        tables.append(P.measure_cells(f["spots"], f["cells"], f["nuclei"], **kwargs))
    return tables


def test_enriched_cells_give_positive_index():
    tables = _tables(range(3), 0.7, angle=90)
    group = P.group_polarity("enriched", tables)
    assert group.polarity.n_cells == 36
    assert group.polarity.index > 0.8 and group.polarity.pvalue < 0.01
    assert group.section_median[0] > 1.2 > max(group.section_median[1:])


def test_rotation_recovers_the_enrichment_direction():
    # the wound is given 40 degrees off the true enrichment direction (135); the rotation turns each cell's
    # reference section toward the densest direction within +-60 degrees of it
    tables = _tables(range(3), 0.9, direction=135.0, angle=95, rotate=True)
    directions = np.radians(np.concatenate([t.directions for t in tables]))
    mean = math.degrees(math.atan2(np.sin(directions).mean(), np.cos(directions).mean()))
    assert abs(mean - 135.0) < 15, mean
    assert np.all(np.abs((np.degrees(directions) - 95 + 180) % 360 - 180) <= 60 + 1e-9)
    group = P.group_polarity("rotated", tables)
    assert group.polarity.index > 0.8 and group.polarity.pvalue < 0.01
    fixed = P.group_polarity("fixed", _tables(range(3), 0.9, direction=135.0, angle=95))
    assert group.section_median[0] > fixed.section_median[0]  # the rotation found a denser reference section


def test_uniform_spots_give_no_polarity():
    # 95 % intervals: over 20 fields of 12 cells with uniform spots, nearly all cover 0 ...
    uniform = [P.group_polarity("uniform", _tables([s], 0.0, angle=90)).polarity for s in range(20)]
    covered = [p.interval[0] <= 0 <= p.interval[1] for p in uniform]
    assert sum(covered) >= 16, [p.interval for p in uniform]
    assert abs(np.mean([p.index for p in uniform])) < 0.15
    # ... and with enrichment none does
    enriched = [P.group_polarity("enriched", _tables([s], 0.7, angle=90)).polarity for s in range(5)]
    assert all(p.interval[0] > 0 for p in enriched), [p.interval for p in enriched]


def test_directions_point_line_and_angle_agree():
    f = _field(0, 0.5)
    h, w = f["cells"].shape
    by_angle = P.measure_cells(f["spots"], f["cells"], f["nuclei"], angle=90)
    # a wound line along the top edge: every cell looks straight up
    by_line = P.measure_cells(f["spots"], f["cells"], f["nuclei"], wound=[[-1.0, 0.0], [-1.0, w - 1.0]])
    np.testing.assert_allclose(by_line.directions, 90.0)
    np.testing.assert_array_equal(by_line.counts, by_angle.counts)
    np.testing.assert_array_equal(by_line.areas, by_angle.areas)
    # a point: each cell's own direction to it
    towards = P.measure_cells(f["spots"], f["cells"], f["nuclei"], towards=(h / 2, w + 100.0))
    c = towards.centroids
    np.testing.assert_allclose(towards.directions, np.degrees(np.arctan2(c[:, 0] - h / 2, w + 100.0 - c[:, 1])) % 360)


def test_relative_densities_and_section_map():
    f = _field(1, 0.5)
    t = P.measure_cells(f["spots"], f["cells"], f["nuclei"], angle=0, section_map=True)
    cytoplasm = (f["cells"] > 0) & (f["nuclei"] == 0)
    assert t.areas.sum() == cytoplasm.sum()
    assert set(np.unique(t.section_map[cytoplasm])) == {1, 2, 3} and (t.section_map[~cytoplasm] == 0).all()
    for i, label in enumerate(t.labels):
        mine = f["cells"] == label
        np.testing.assert_array_equal([(t.section_map[mine] == s + 1).sum() for s in range(3)], t.areas[i])
    d = t.relative_density
    np.testing.assert_allclose((d * t.areas).sum(1) / t.areas.sum(1), 1.0)  # area-weighted mean is 1


def test_cytoplasm_compartments_equal_whole_cells():
    f = _field(2, 0.5)
    whole = P.measure_cells(f["spots"], f["cells"], f["nuclei"], angle=45)
    cytoplasm = np.where(f["nuclei"] > 0, 0, f["cells"])
    split = P.measure_cells(f["spots"], cytoplasm, f["nuclei"], angle=45, compartments="cytoplasm")
    np.testing.assert_array_equal(split.counts, whole.counts)
    np.testing.assert_array_equal(split.areas, whole.areas)


def test_any_integer_labels_give_the_same_result():
    f = _field(6, 0.5)
    small = P.measure_cells(f["spots"], f["cells"], f["nuclei"], angle=30)
    big = 1_000_003  # beyond the bincount relabelling: the sorting path
    large = P.measure_cells(f["spots"], np.where(f["cells"] > 0, f["cells"] * big, 0),
                            np.where(f["nuclei"] > 0, 7 * f["nuclei"].astype(np.uint64) + 2**40, 0).astype(np.uint64), angle=30)
    np.testing.assert_array_equal(large.labels, small.labels * big)
    np.testing.assert_array_equal(large.nuclei, 7 * small.nuclei + 2**40)
    np.testing.assert_array_equal(large.counts, small.counts)
    np.testing.assert_array_equal(large.areas, small.areas)
    np.testing.assert_allclose(large.centroids, small.centroids)


def test_bad_cells_are_reported_and_the_others_counted():
    f = _field(3, 0.5)
    cells, nuclei = f["cells"].copy(), f["nuclei"].copy()
    nuclei[nuclei == 1] = 0                           # cell 1: no nucleus
    yy, xx = np.nonzero(nuclei == 2)
    nuclei[yy[:5], xx[:5]] = 99                       # cell 2: two nuclei
    nuclei[:3, :3] = 77                               # a nucleus outside every cell
    cells[f["cells"] == 3] = 0
    cells[np.isin(nuclei, [3])] = 3                   # cell 3: only its nucleus, no cytoplasm
    spots = np.concatenate([f["spots"], [[0.0, 0.0], [-50.0, 10.0]]])  # one in the background, one outside
    iy, ix = np.rint(spots).astype(int).T.clip(0, np.array(cells.shape)[:, None] - 1)
    spots = spots[cells[iy, ix] != 4]                 # cell 4: no spots
    t = P.measure_cells(spots, cells, nuclei, angle=90, section_map=True)
    reasons = dict(t.skipped)
    assert reasons[1] == "no nucleus"
    assert reasons[2].startswith("2 nuclei")
    assert "no cytoplasm" in reasons[3] or "no spots" in reasons[3]
    assert any("nucleus 77" in n for n in t.notes)
    assert reasons[4].startswith("no spots")
    assert set(t.labels) == set(range(5, 13))
    assert not t.section_map[np.isin(cells, [1, 2, 3, 4])].any() and t.section_map[cells == 5].any()
    assert t.spots_outside >= 2 and any("lie in no measured cytoplasm" in m for m in t.messages)
    rows = t.rows(group="g", field="f")
    assert len(rows) == 8 + 4 and rows[-1]["status"].startswith("skipped")


def test_bad_input_raises_with_the_reason():
    f = _field(4, 0.5)
    s, c, n = f["spots"], f["cells"], f["nuclei"]
    with pytest.raises(ValueError, match="same shape"):
        P.measure_cells(s, c, n[:-1], angle=0)
    with pytest.raises(ValueError, match="exactly one reference direction"):
        P.measure_cells(s, c, n, angle=0, towards=(0, 0))
    with pytest.raises(ValueError, match="exactly one reference direction"):
        P.measure_cells(s, c, n)
    with pytest.raises(ValueError, match="integer labels"):
        P.measure_cells(s, c + 0.5, n, angle=0)
    with pytest.raises(ValueError, match="2D label image"):
        P.measure_cells(s, c[None], n[None], angle=0)
    with pytest.raises(ValueError, match="NaN"):
        P.measure_cells(np.full((3, 2), np.nan), c, n, angle=0)
    with pytest.raises(ValueError, match="divide 360"):
        P.measure_cells(s, c, n, angle=0, sections=7, rotate=True)
    with pytest.raises(ValueError, match="no measured cells"):
        P.group_polarity("empty", [P.measure_cells(np.zeros((0, 2)), c, n, angle=0)])
    with pytest.raises(ValueError, match="needs cells"):
        P.polarity_index([], [1.0])


def _write_field(tmp_path, name, seed, enrichment):
    import tifffile
    f = _field(seed, enrichment)
    tifffile.imwrite(tmp_path / f"{name}.tif", f["image"])
    tifffile.imwrite(tmp_path / f"{name}_cells.tif", f["cells"])
    tifffile.imwrite(tmp_path / f"{name}_nuclei.tif", f["nuclei"])
    with open(tmp_path / f"{name}.csv", "w") as out:
        out.write("y,x\n" + "".join(f"{y},{x}\n" for y, x in f["spots"]))
    return [str(tmp_path / f"{name}{suffix}") for suffix in (".csv", "_cells.tif", "_nuclei.tif", ".tif")]


def test_cli_groups_csvs_and_figure(tmp_path, capsys):
    a = _write_field(tmp_path, "a", 0, 0.8)
    b = _write_field(tmp_path, "b", 1, 0.0)
    (tmp_path / "wound.csv").write_text("y,x\n-1,0\n-1,383\n")
    out = tmp_path / "out"
    rc = cli_main(["polarity", f"migrating={a[0]},{a[1]},{a[2]}", f"control={b[0]},{b[1]},{b[2]},{tmp_path / 'wound.csv'}",
                   "-o", str(out), "--angle", "90", "-q"])
    assert rc == 0
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["group"] for r in summary] == ["migrating", "control"]
    assert float(summary[0]["polarity_index"]) > 0.8 and float(summary[0]["pvalue"]) < 0.01
    cells = list(csv.DictReader(open(out / "cells.csv")))
    assert len(cells) == 24 and {r["field"] for r in cells} == {"a", "b"}
    assert (out / "polarity.png").stat().st_size > 1000
    assert "migrating" in capsys.readouterr().out
    # no silent overwrite
    assert cli_main(["polarity", f"{a[0]},{a[1]},{a[2]}", "-o", str(out), "--angle", "90", "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_detects_spots_in_images_and_reports_bad_fields(tmp_path, capsys):
    a = _write_field(tmp_path, "a", 0, 0.8)
    out = tmp_path / "out"
    (tmp_path / "wound.csv").write_text("y,x\n-1,0\n-1,383\n")
    rc = cli_main(["polarity", f"{a[3]},{a[1]},{a[2]}", f"{a[3]},{a[1]},{tmp_path / 'missing.tif'}",
                   "-o", str(out), "--wound", str(tmp_path / "wound.csv"), "-q"])
    assert rc == 1  # one field failed, the other was measured
    err = capsys.readouterr().err
    assert "missing.tif" in err
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert summary[0]["cells"] == "12" and float(summary[0]["polarity_index"]) > 0.5
    # no direction at all
    assert cli_main(["polarity", f"{a[0]},{a[1]},{a[2]}", "-o", str(tmp_path / "o2"), "-q"]) == 2
    assert "give the wound's direction" in capsys.readouterr().err


def test_segment_nuclei_finds_the_simulated_nuclei():
    pytest.importorskip("skimage", reason="segment_nuclei needs scikit-image (the napari extra)")
    f = _field(5, 0.5)
    found = P.segment_nuclei(f["dapi"])
    assert found.max() == f["nuclei"].max() == 12
    for label in range(1, 13):
        truth = f["nuclei"] == label
        best = np.bincount(found[truth]).argmax()
        overlap = (found == best) & truth
        assert best > 0 and overlap.sum() / ((found == best) | truth).sum() > 0.8
    # the segmented nuclei work as the analysis's nuclei
    t = P.measure_cells(f["spots"], f["cells"], found, angle=90)
    assert len(t.labels) == 12
    with pytest.raises(ValueError, match="constant"):
        P.segment_nuclei(np.ones((20, 20)))
