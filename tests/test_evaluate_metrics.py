"""Evaluation metrics against values computed by hand on small arrays."""

import math

import numpy as np
import pytest

from canopy.evaluate import metrics as M

NAN = np.nan


# Four valid pairs (p, y): (1, 0), (2, 2), (6, 3), (6, 7). Two more pixels are nodata on one
# side only (pred NaN where ref is 5, ref NaN where pred is 4): reading them as 0 would change
# every number below.
PRED = np.array([[1.0, 2.0, NAN], [4.0, 6.0, 6.0]])
REF = np.array([[0.0, 2.0, 5.0], [NAN, 3.0, 7.0]])
# errors e = 1, 0, 3, −1


def test_pixel_metrics_by_hand_and_nodata_is_not_zero():
    assert M.mae(PRED, REF) == pytest.approx(5 / 4)
    assert M.rmse(PRED, REF) == pytest.approx(math.sqrt(11 / 4))
    assert M.bias(PRED, REF) == pytest.approx(3 / 4)
    # ȳ = 3, SS_tot = 9 + 1 + 0 + 16 = 26, SS_res = 11
    assert M.r2(PRED, REF) == pytest.approx(1 - 11 / 26)
    # |e| / (1 + |y|) = 1/1, 0/3, 3/4, 1/8
    assert M.nmae(PRED, REF) == pytest.approx((1 + 0 + 0.75 + 0.125) / 4)
    # With the nodata read as 0 m the MAE would be (5 + 5 + 4) / 6, not 5/4.
    assert M.mae(np.nan_to_num(PRED), np.nan_to_num(REF)) != pytest.approx(5 / 4)


def test_r2_undefined_cases_are_nan():
    assert math.isnan(M.r2(np.array([1.0, 2.0]), np.array([3.0, 3.0])))  # constant reference
    assert math.isnan(M.r2(np.array([NAN, 1.0]), np.array([1.0, NAN])))  # no valid pair
    assert math.isnan(M.mae(np.array([NAN]), np.array([1.0])))


def test_tree_cover_iou_by_hand():
    pred = np.array([0.0, 3.0, 3.0, 1.0, NAN, 5.0])
    ref = np.array([0.0, 2.5, 1.0, 3.0, 9.0, NAN])
    # Valid pairs 0..3: P = {1, 2}, R = {1, 3}: |P∩R| = 1, |P∪R| = 3.
    assert M.tree_cover_iou(pred, ref) == pytest.approx(1 / 3)
    # Counting the NaN prediction as 0 m would add pixel 4 to R: 1/4.
    assert M.tree_cover_iou(np.nan_to_num(pred), ref) == pytest.approx(1 / 4)
    # Threshold is inclusive (≥ 2 m).
    assert M.tree_cover_iou(np.array([2.0]), np.array([2.0])) == 1.0
    assert math.isnan(M.tree_cover_iou(np.array([0.5]), np.array([1.0])))


def test_height_bins_split_by_reference_height():
    ref = np.array([1.0, 3.0, 12.0, 25.0, 45.0, 70.0, -0.5])
    err = np.array([1.0, -1.0, 2.0, 0.0, 3.0, -2.0, 0.5])
    out = M.summarize(ref + err, ref)
    bins = out["by_height_bin"]
    assert list(bins) == ["0-2", "2-5", "5-10", "10-15", "15-20", "20-30", "30-60"]
    # 0–2 m holds 1.0 and the slightly negative −0.5; 30–60 m holds 45 and 70 (≥ 60 m).
    assert bins["0-2"]["n"] == 2 and bins["0-2"]["mae"] == pytest.approx(0.75)
    assert bins["0-2"]["bias"] == pytest.approx(0.75)
    assert bins["2-5"]["n"] == 1 and bins["2-5"]["bias"] == pytest.approx(-1.0)
    assert bins["10-15"]["mae"] == pytest.approx(2.0)
    assert bins["30-60"]["n"] == 2 and bins["30-60"]["mae"] == pytest.approx(2.5)
    assert bins["30-60"]["bias"] == pytest.approx(0.5)
    assert bins["5-10"]["n"] == 0 and math.isnan(bins["5-10"]["mae"])
    assert sum(b["n"] for b in bins.values()) == out["overall"]["n"] == 7
    assert out["overall"]["mae"] == pytest.approx(np.abs(err).mean())


def test_height_bin_index_edges_are_half_open():
    idx = M.height_bin_index(np.array([0.0, 1.999, 2.0, 5.0, 59.9, 60.0, NAN]))
    assert idx.tolist() == [0, 0, 1, 2, 6, 6, -1]


def test_sums_match_the_direct_functions_and_pool_exactly():
    rng = np.random.default_rng(3)
    ref = rng.gamma(2.0, 5.0, (120, 130))
    pred = ref + rng.normal(0.5, 2.0, ref.shape)
    pred[rng.random(ref.shape) < 0.1] = NAN
    ref[rng.random(ref.shape) < 0.1] = NAN
    o = M.summarize(pred, ref)["overall"]
    assert o["mae"] == pytest.approx(M.mae(pred, ref), rel=1e-12)
    assert o["rmse"] == pytest.approx(M.rmse(pred, ref), rel=1e-12)
    assert o["bias"] == pytest.approx(M.bias(pred, ref), rel=1e-12)
    assert o["r2"] == pytest.approx(M.r2(pred, ref), rel=1e-9)
    assert o["nmae"] == pytest.approx(M.nmae(pred, ref), rel=1e-12)
    assert o["tree_cover_iou"] == pytest.approx(M.tree_cover_iou(pred, ref), rel=1e-12)
    # Pooling sums of two halves gives the metrics of the whole.
    a = M.EvaluationSums.from_arrays(pred[:60], ref[:60])
    b = M.EvaluationSums.from_arrays(pred[60:], ref[60:])
    pooled = (a + b).metrics()["overall"]
    whole = M.summarize(pred, ref)["overall"]
    for key in ("n", "mae", "rmse", "bias", "r2", "nmae", "tree_cover_iou"):
        assert pooled[key] == pytest.approx(whole[key], rel=1e-9)


def _checkerboard(shape, amplitude):
    r, c = np.indices(shape)
    return np.where((r + c) % 2 == 0, amplitude, -amplitude)


def test_block_r2_over_50px_block_means():
    # 120×120: four full 50×50 blocks; the 20-px remainder (filled with garbage) is dropped.
    ref = np.full((120, 120), 99.0)
    pred = np.full((120, 120), -50.0)
    means_ref = [[1.0, 2.0], [3.0, 4.0]]
    means_pred = [[1.0, 2.0], [3.0, 5.0]]
    for i in range(2):
        for j in range(2):
            blk = (slice(50 * i, 50 * i + 50), slice(50 * j, 50 * j + 50))
            ref[blk] = means_ref[i][j]
            # Pixel noise that cancels within each block: block means are unchanged.
            pred[blk] = means_pred[i][j] + _checkerboard((50, 50), 3.0)
    # SS_tot of (1, 2, 3, 4) = 5, SS_res = 1.
    assert M.block_r2(pred, ref) == pytest.approx(1 - 1 / 5)
    assert M.r2(pred[:100, :100], ref[:100, :100]) < 0  # the pixel R² is much worse

    # 10% nodata (5 full rows) in block 4: valid share 0.9 ≥ 0.8, mean over valid pixels kept.
    p2 = pred.copy()
    p2[50:55, 50:100] = NAN
    assert M.block_r2(p2, ref) == pytest.approx(0.8)
    # 30% nodata: block 4 no longer counts; the remaining three blocks agree exactly.
    p3 = pred.copy()
    p3[50:65, 50:100] = NAN
    assert M.block_r2(p3, ref) == pytest.approx(1.0)
    pm, rm = M.block_mean_pairs(p3, ref)
    assert pm.size == 3
    # With every block required fully valid, the 10%-nodata block is dropped too.
    assert M.block_r2(p2, ref, min_valid_share=1.0) == pytest.approx(1.0)


def test_block_r2_hrch_reference_definition():
    # One 256×256 crop: rows/cols 0–2 dropped, then 5×5 blocks of 50 px (rows 3..252).
    ref = np.full((1, 256, 256), -7.0)  # the dropped rim and remainder; clamped ≥ 0 anyway
    for i in range(5):
        for j in range(5):
            ref[0, 3 + 50 * i:53 + 50 * i, 3 + 50 * j:53 + 50 * j] = 5 * i + j
    pred = ref.copy()
    pred[0, 3:53, 3:53] += 1.0  # block (0, 0) one metre too tall
    pred[0, :3, :] = 1000.0     # garbage in the dropped rows must not matter
    # Block means 0..24: SS_tot = Σ(k − 12)² = 1300, SS_res = 1.
    assert M.block_r2_hrch(pred, ref) == pytest.approx(1 - 1 / 1300)


def test_edge_error_known_jump_at_tile_border():
    # 8×8 raster, tiles of 4 px (stride 4): one vertical border at column 4, one horizontal at row 4.
    c = np.arange(8)[None, :].repeat(8, axis=0).astype(float)
    pred = 0.1 * c + np.where(c >= 4, 1.0, 0.0)
    # Horizontal pairs: 8 across the border with |Δ| = 1.1, 48 inside with 0.1.
    # Vertical pairs: all |Δ| = 0 (8 across the row-4 border, 48 inside).
    # border mean = 8.8 / 16 = 0.55; inside mean = 4.8 / 96 = 0.05; ratio = 11.
    out = M.edge_error(pred, size=4, stride=4)
    assert out["n_border_pairs"] == 16 and out["n_inside_pairs"] == 96
    assert out["border_mean_abs_jump"] == pytest.approx(0.55)
    assert out["inside_mean_abs_jump"] == pytest.approx(0.05)
    assert out["edge_error"] == pytest.approx(11.0)

    # A nodata pixel next to the border removes its pairs instead of acting as a 0 m pixel:
    # pred[0, 4] takes out one border pair (1.1) and two inside pairs (0.1 and 0).
    p2 = pred.copy()
    p2[0, 4] = NAN
    out2 = M.edge_error(p2, size=4, stride=4)
    assert out2["n_border_pairs"] == 15 and out2["n_inside_pairs"] == 94
    assert out2["edge_error"] == pytest.approx((7.7 / 15) / (4.7 / 94))

    # A smooth ramp has no seams: ratio 1.
    assert M.edge_error(0.1 * c, size=4, stride=4)["edge_error"] == pytest.approx(1.0)


def test_tile_border_positions_with_overlap_and_origin():
    # Tiles of 6 px every 4 px through −1: starts …, −5, −1, 3, 7, 11; ends 1, 5, 9, 13, 17.
    # The tile starting at −5 overlaps the raster, so its end at 1 is a border.
    assert M.tile_border_positions(12, 6, 4, -1).tolist() == [1, 3, 5, 7, 9, 11]
    # The same lattice given by another of its points (3 = −1 + 4) has the same borders.
    assert M.tile_border_positions(12, 6, 4, 3).tolist() == [1, 3, 5, 7, 9, 11]
    # The engine writes the lattice phase (offset % stride): 2 for tiles at −2, 2, 6, …
    assert M.tile_border_positions(10, 4, 4, 2).tolist() == [2, 6]
    assert M.tile_border_positions(8, 4, 4, 0).tolist() == [4]
    assert M.tile_border_positions(3, 4, 4, 0).tolist() == []  # one tile covers everything


def test_tile_border_positions_match_the_engine_tiles():
    # Borders from the tiles the state-scale engine actually runs (all lattice tiles overlapping
    # a cell, as grid.tile_window computes them), for many cell offsets.
    for size, stride in ((8, 8), (8, 6), (7, 3)):
        for start in range(-20, 20):
            length = 23
            first = (math.floor((start - size) / stride) + 1) * stride
            last = math.floor((start + length - 1) / stride) * stride
            tiles = [s - start for s in range(first, last + 1, stride)]
            expected = sorted({e for s in tiles for e in (s, s + size) if 0 < e < length})
            got = M.tile_border_positions(length, size, stride, (first - start) % stride)
            assert got.tolist() == expected, (size, stride, start)


def test_edge_sums_in_strips_equal_the_whole():
    rng = np.random.default_rng(1)
    pred = rng.normal(10, 2, (37, 23))
    pred[5, 7] = NAN
    lattice = M.TileLattice(size=10, stride=8, origin_col=-2, origin_row=-1)
    whole = M.edge_sums(pred, lattice)
    total = M.EdgeSums()
    for r in range(0, 37, 9):  # strips of 9 rows read with one extra row
        n = min(9, 37 - r)
        extra = 1 if r + n < 37 else 0
        total += M.edge_sums(pred[r:r + n + extra], lattice, row_off=r, raster_shape=pred.shape,
                             pair_rows=n if extra else None)
    assert total.border_n == whole.border_n and total.inside_n == whole.inside_n
    assert total.border_sum == pytest.approx(whole.border_sum)
    assert total.inside_sum == pytest.approx(whole.inside_sum)


def test_calibration_shares_by_hand_overall_and_per_bin():
    pred = np.array([0.0, 0.0, 0.0, 0.0, 0.0, NAN])
    std = np.array([1.0, 1.0, 1.0, 2.0, NAN, 1.0])
    ref = np.array([0.5, 1.0, 1.5, 3.0, 0.2, 0.0])
    # Usable: first four. |e| = 0.5, 1, 1.5, 3 against σ = 1, 1, 1, 2.
    shares = M.calibration_shares(pred, std, ref)
    assert shares["n"] == 4
    assert shares["within_1sigma"] == pytest.approx(0.5)   # 0.5 ≤ 1 and 1 ≤ 1
    assert shares["within_2sigma"] == pytest.approx(1.0)
    out = M.summarize(pred, ref, std)
    assert out["overall"]["within_1sigma"] == pytest.approx(0.5)
    assert out["overall"]["n_calibration"] == 4
    assert out["by_height_bin"]["0-2"]["within_1sigma"] == pytest.approx(2 / 3)
    assert out["by_height_bin"]["2-5"]["within_1sigma"] == 0.0
    assert out["by_height_bin"]["2-5"]["within_2sigma"] == 1.0


def test_calibrated_gaussian_reaches_the_gaussian_shares():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 30, 200_000)
    sigma = rng.uniform(0.5, 3.0, ref.size)
    pred = ref + rng.normal(0, 1, ref.size) * sigma
    shares = M.calibration_shares(pred, sigma, ref)
    assert shares["within_1sigma"] == pytest.approx(M.GAUSSIAN_WITHIN_1SIGMA, abs=0.005)
    assert shares["within_2sigma"] == pytest.approx(M.GAUSSIAN_WITHIN_2SIGMA, abs=0.003)


def test_regression_scores_for_gedi_series():
    s = M.regression_scores(np.array([10.0, 20.0, NAN]), np.array([12.0, 19.0, 5.0]))
    assert s["n"] == 2
    assert s["mae"] == pytest.approx(1.5)
    assert s["bias"] == pytest.approx(-0.5)
    assert s["rmse"] == pytest.approx(math.sqrt(2.5))
