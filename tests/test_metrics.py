"""deepspot_napari.metrics on small crafted cases whose counts are worked out by hand."""
import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from deepspot_napari.metrics import (MatchCounts, evaluate, f1_integral, match_hungarian, match_nearest,
                                     summarize)

# A0 and A1 both have D0 (1 px) as nearest; A2 has D1 at 2.5 px; A3 has nothing within 3 px;
# D2 is matched by no annotation.
ANNOTATIONS = [(0, 0), (0, 2), (10, 10), (30, 30)]
DETECTIONS = [(0, 1), (10, 12.5), (50, 50)]


def test_paper_protocol_counts_ambiguous_matches():
    counts = match_nearest(ANNOTATIONS, DETECTIONS)
    assert counts == MatchCounts(tp=2, fp=1, fn=1, ambiguous=1)
    assert counts.n_annotations == 4 and counts.n_detections == 3
    assert counts.precision == pytest.approx(2 / 3)
    assert counts.recall == pytest.approx(2 / 4)  # the ambiguous annotation counts as not found
    assert counts.f1 == pytest.approx(2 * 2 / (4 + 3))


def test_three_annotations_on_one_detection_are_two_ambiguous():
    counts = match_nearest([(0, 0), (0, 1), (1, 0)], [(0.4, 0.4)])
    assert counts == MatchCounts(tp=1, fp=0, fn=0, ambiguous=2)
    assert counts.precision == 1 and counts.recall == pytest.approx(1 / 3)


def test_hungarian_is_one_to_one():
    counts = match_hungarian(ANNOTATIONS, DETECTIONS)
    assert counts == MatchCounts(tp=2, fp=1, fn=2, ambiguous=0)
    assert counts.f1 == pytest.approx(4 / 7)


def test_hungarian_maximises_the_number_of_pairs():
    # nearest-first would pair A0-D0 (1 px) and leave A1 (4.5 px from D1) alone; A0-D1 (2 px) and
    # A1-D0 (1.5 px) are both within 3 px
    annotations, detections = [(0, 0), (0, 2.5)], [(0, 1), (0, -2)]
    assert match_hungarian(annotations, detections) == MatchCounts(tp=2, fp=0, fn=0)
    assert match_nearest(annotations, detections) == MatchCounts(tp=1, fp=1, fn=0, ambiguous=1)


def test_hungarian_pairs_as_many_as_a_maximum_bipartite_matching(rng):
    annotations = rng.uniform(0, 40, (80, 2))
    detections = rng.uniform(0, 40, (70, 2))
    within = np.linalg.norm(annotations[:, None] - detections[None], axis=2) <= 3
    expected = np.count_nonzero(maximum_bipartite_matching(csr_matrix(within), perm_type="column") >= 0)
    assert match_hungarian(annotations, detections).tp == expected


def test_cutoff_is_inclusive_and_works_in_3d():
    assert match_nearest([(0, 0, 0)], [(0, 0, 3)]).tp == 1
    assert match_nearest([(0, 0, 0)], [(0, 0, 3.001)]).tp == 0
    assert match_hungarian([(0, 0, 0)], [(0, 0, 3)]).tp == 1
    assert match_hungarian([(1, 1)], [(1, 1)], cutoff=0).tp == 1


@pytest.mark.parametrize("match", [match_nearest, match_hungarian])
def test_empty_sets(match):
    both = match(np.empty((0, 2)), [])
    assert (both.f1, both.precision, both.recall) == (1, 1, 1)
    no_detections = match([(1, 1), (2, 2)], [])
    assert no_detections == MatchCounts(tp=0, fp=0, fn=2)
    assert (no_detections.f1, no_detections.precision, no_detections.recall) == (0, 0, 0)
    no_annotations = match([], [(1, 1)])
    assert no_annotations == MatchCounts(tp=0, fp=1, fn=0)
    assert (no_annotations.f1, no_annotations.precision, no_annotations.recall) == (0, 0, 0)


def test_f1_integral_by_hand():
    # one pair 1 px apart: F1 = 1 at the cutoffs 3k/49 >= 1, i.e. k = 17..49 (33 of 50), else 0
    assert f1_integral([(0, 0)], [(0, 1)], rule="mean") == pytest.approx(33 / 50)
    # trapezoid: full area from 3*17/49 to 3, half an interval (3/49) from the 0 -> 1 step; / 3
    assert f1_integral([(0, 0)], [(0, 1)]) == pytest.approx((3 - 51 / 49 + 1.5 / 49) / 3)
    # plus an unmatched detection: F1 = 2/3 where the pair counts
    assert f1_integral([(0, 0)], [(0, 1), (9, 9)], rule="mean") == pytest.approx(33 / 50 * 2 / 3)
    assert f1_integral([(2, 2)], [(2, 2)]) == pytest.approx(1)
    assert f1_integral([], []) == 1 and f1_integral([(1, 1)], []) == 0
    with pytest.raises(ValueError):
        f1_integral([(0, 0)], [(0, 1)], rule="simpson")


def test_confidence_interval_on_known_numbers():
    s = summarize([1, 2, 3, 4, 5])
    half = 2.7764451051977987 * np.sqrt(2.5) / np.sqrt(5)  # t(0.975, 4) * sd / sqrt(n)
    assert (s.mean, s.n) == (3, 5)
    assert s.low == pytest.approx(3 - half) and s.high == pytest.approx(3 + half)
    assert s.half_width == pytest.approx(half)
    flat = summarize([2, 2, 2])
    assert flat.low == flat.high == 2
    single = summarize([0.7])
    assert single.mean == 0.7 and np.isnan(single.low) and np.isnan(single.high)
    with pytest.raises(ValueError):
        summarize([])


def test_evaluate_aggregates_per_image():
    images = [(ANNOTATIONS, DETECTIONS), ([(5, 5)], [(5, 6)])]
    result = evaluate(images)
    assert result["f1"].mean == pytest.approx((4 / 7 + 1) / 2)
    assert result["ambiguous"].mean == pytest.approx(0.5)
    assert result["precision"].n == 2
    hungarian = evaluate(images, protocol="hungarian")
    assert hungarian["ambiguous"].mean == 0
    with pytest.raises(ValueError):
        evaluate(images, protocol="greedy")


def test_bad_coordinates_raise():
    with pytest.raises(ValueError, match="dimensions"):
        match_nearest([(0, 0)], [(0, 0, 0)])
    with pytest.raises(ValueError, match="NaN"):
        match_hungarian([(0, np.nan)], [(0, 0)])
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        match_nearest([0, 0], [(0, 0)])
