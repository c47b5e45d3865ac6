"""Training losses and augmentation against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from canopy.train.augment import NO_AUGMENT, AugmentConfig, augment, dihedral, dihedral_points
from canopy.train.cosub import mutual_distillation
from canopy.train.losses import (
    LossConfig, dense_loss, downsample_target, gedi_loss, gedi_shot_losses, l1_loss,
    pool_to_target, shift_offsets, silog_loss, train_bin_probabilities)

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------ SiLog


def test_silog_hand_computed():
    # g = log(p) − log(t) = [0, ln2, ln2]; mean(g²) = ⅔ln²2, mean(g) = ⅔ln2
    # loss = sqrt(⅔ln²2 − 0.85·(⅔ln2)²) = ln2·sqrt(⅔ − 0.85·4/9) = ln2·sqrt(0.288889) = 0.372556
    pred = torch.tensor([1.0, 2.0, 4.0])
    target = torch.tensor([1.0, 1.0, 2.0])
    loss = silog_loss(pred, target, eps=0.0)
    assert float(loss) == pytest.approx(0.372556, abs=1e-5)
    assert float(loss) == pytest.approx(LN2 * math.sqrt(2 / 3 - 0.85 * 4 / 9), rel=1e-6)
    # λ = 0 is the RMS of g; λ = 1 is the standard deviation of g (scale-invariant)
    assert float(silog_loss(pred, target, lam=0.0, eps=0.0)) == pytest.approx(LN2 * math.sqrt(2 / 3), rel=1e-6)
    assert float(silog_loss(pred, target, lam=1.0, eps=0.0)) == pytest.approx(LN2 * math.sqrt(2 / 9), rel=1e-5)


def test_silog_is_scale_invariant_only_in_its_variance_part():
    target = torch.tensor([1.0, 3.0, 7.0])
    doubled = silog_loss(2 * target, target, eps=0.0)  # g = ln2 everywhere: var 0, mean ln2
    assert float(doubled) == pytest.approx(math.sqrt(0.15) * LN2, rel=1e-5)


def test_silog_epsilon_and_masks():
    pred = torch.tensor([[0.5, 9.0], [3.0, 100.0]])
    target = torch.tensor([[0.0, 9.0], [float("nan"), 1.0]])
    valid = torch.tensor([[True, True], [True, False]])
    # counted: (0.5 vs 0) and (9 vs 9); the NaN label and the invalid pixel are ignored
    g = np.array([math.log(0.5 + 1e-3) - math.log(1e-3), 0.0])
    expected = math.sqrt((g ** 2).mean() - 0.85 * g.mean() ** 2)
    assert float(silog_loss(pred, target, valid, eps=1e-3)) == pytest.approx(expected, rel=1e-5)
    # nothing valid: zero, still a tensor attached to the graph
    p = torch.ones(2, requires_grad=True)
    out = silog_loss(p, torch.full((2,), float("nan")))
    assert float(out.detach()) == 0.0 and out.requires_grad


def test_l1_hand_computed_with_nodata_and_negative_lidar():
    pred = torch.tensor([1.0, 5.0, 2.0, 8.0])
    target = torch.tensor([2.0, 4.0, float("nan"), -0.2])  # −0.2 m lidar noise counts as 0
    assert float(l1_loss(pred, target)) == pytest.approx((1 + 1 + 8) / 3)


# ----------------------------------------------------------------- coarse lidar resolution


def test_prediction_is_averaged_onto_a_coarser_target():
    pred = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    valid = torch.ones(4, 4, dtype=torch.bool)
    pooled, ok = pool_to_target(pred, valid, (2, 2))
    # 2×2 block means: (0+1+4+5)/4 = 2.5, (2+3+6+7)/4 = 4.5, 10.5, 12.5
    assert pooled.tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert ok.all()
    # invalid pixels are left out of the mean; a cell under half covered does not count
    valid[0, 0] = valid[0, 1] = valid[1, 0] = False
    valid[0, 2] = False
    pooled, ok = pool_to_target(pred, valid, (2, 2))
    assert float(pooled[0, 1]) == pytest.approx((3 + 6 + 7) / 3)
    assert ok.tolist() == [[False, True], [True, True]]


def test_target_is_never_upsampled():
    with pytest.raises(ValueError, match="never upsample"):
        pool_to_target(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), (4, 4))


def test_finer_target_is_averaged_down_ignoring_nodata():
    t = torch.tensor([[1.0, 3.0, 5.0, float("nan")],
                      [1.0, 3.0, float("nan"), float("nan")]])
    out = downsample_target(t, (1, 2))
    assert float(out[0, 0]) == pytest.approx(2.0)
    assert math.isnan(float(out[0, 1]))  # only ¼ of that cell labelled (< ½)


def test_dense_loss_compares_each_sample_at_its_own_resolution():
    pred = torch.tensor([[[1.0, 1.0, 3.0, 3.0],
                          [1.0, 1.0, 3.0, 3.0],
                          [2.0, 2.0, 4.0, 4.0],
                          [2.0, 2.0, 4.0, 4.0]]])
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    coarse = torch.tensor([[2.0, 3.0], [2.0, 2.0]])  # 2× coarser lidar
    cfg = LossConfig(silog_weight=0.5, l1_weight=2.0, silog_eps=0.0)
    terms = dense_loss(pred, valid, [coarse], cfg)
    # pooled prediction [[1,3],[2,4]] vs [[2,3],[2,2]]: |e| = 1,0,0,2 → L1 0.75
    assert float(terms["l1"]) == pytest.approx(0.75)
    g = np.log([1 / 2, 1.0, 1.0, 2.0])
    silog = math.sqrt((g ** 2).mean() - 0.85 * g.mean() ** 2)
    assert float(terms["silog"]) == pytest.approx(silog, rel=1e-5)
    assert float(terms["total"]) == pytest.approx(0.5 * silog + 2.0 * 0.75, rel=1e-5)
    assert int(terms["n_pixels"]) == 4


# --------------------------------------------------------------------------------- GEDI


def test_shift_lattice():
    offs = shift_offsets(2.0, 2)  # steps of 1 px within a 2-px disc
    assert offs[0].tolist() == [0.0, 0.0]
    assert len(offs) == 13  # 1 + 4 (dist 1) + 4 (dist √2) + 4 (dist 2)
    assert float((offs ** 2).sum(1).max()) == pytest.approx(4.0)
    assert shift_offsets(0.0, 2).tolist() == [[0.0, 0.0]]


def test_footprint_disc_uses_pixel_centres():
    from affine import Affine

    from data_catalog.gedi import footprint_members

    # centre of pixel (2, 2), radius 1.5 px (1 m pixels)
    rr, cc, m = footprint_members([2.5], [2.5], Affine(1, 0, 0, 0, -1, 0), 1.5)
    picked = {(int(r), int(c)) for r, c in zip(rr[m], cc[m])}
    # (±1, ±1) is √2 < 1.5 away; (0, ±2) is not
    assert picked == {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)}


def test_footprint_percentile_loss_by_hand():
    pred = torch.zeros(7, 7)
    pred[2:5, 2:5] = torch.arange(1.0, 10.0).reshape(3, 3)  # 1..9 in the 3×3 disc
    valid = torch.ones(7, 7, dtype=torch.bool)
    # gsd 1 m, 3 m footprint: radius 1.5 px; no shifts; the median of 1..9 is 5
    cfg = LossConfig(footprint_diameter_m=3.0, gedi_percentile=50.0, gedi_max_shift_m=0.0,
                     gedi_huber_delta=1.0, gedi_min_coverage=0.5)
    shots = torch.tensor([[3.5, 3.5, 5.0], [3.5, 3.5, 5.5], [3.5, 3.5, 8.0]])
    losses, chosen = gedi_shot_losses(pred, valid, shots, gsd=1.0, cfg=cfg)
    # Huber(δ=1): 0 for an exact match, ½·0.5² = 0.125 inside δ, |3| − ½ = 2.5 beyond it
    assert losses.tolist() == pytest.approx([0.0, 0.125, 2.5])
    assert chosen.tolist() == [0, 0, 0]
    # the 90th percentile of 1..9 (numpy 'linear'): 1 + 0.9·8 = 8.2
    cfg90 = LossConfig(footprint_diameter_m=3.0, gedi_percentile=90.0, gedi_max_shift_m=0.0)
    losses, _ = gedi_shot_losses(pred, valid, torch.tensor([[3.5, 3.5, 8.2]]), 1.0, cfg90)
    assert float(losses[0]) == pytest.approx(0.0, abs=1e-6)


def test_geolocation_error_is_forgiven_within_one_radius():
    pred = torch.zeros(12, 12)
    pred[6:9, 6:9] = 10.0  # a 3×3 crown of 10 m centred on pixel (7, 7)
    valid = torch.ones(12, 12, dtype=torch.bool)
    shot = torch.tensor([[6.5, 6.5, 10.0]])  # reported one pixel up-left of the crown's centre
    exact = LossConfig(footprint_diameter_m=3.0, gedi_percentile=50.0, gedi_max_shift_m=0.0)
    tolerant = LossConfig(footprint_diameter_m=3.0, gedi_percentile=50.0, gedi_shift_steps=1)
    assert float(gedi_shot_losses(pred, valid, shot, 1.0, exact)[0][0]) > 1.0
    losses, chosen = gedi_shot_losses(pred, valid, shot, 1.0, tolerant)
    assert float(losses[0]) == pytest.approx(0.0)
    offs = shift_offsets(1.5, 1)  # (0, 0) and the four 1.5-px moves
    best = offs[int(chosen[0])]
    assert int(chosen[0]) != 0 and float(best.norm()) <= 1.5 + 1e-6
    assert float(best.sum()) > 0  # moved towards the crown (down or right)
    # the chosen candidate is the minimum: the gradient reaches only that footprint's pixels
    p = pred.clone().requires_grad_(True)
    loss, n = gedi_loss(p[None], valid[None], [shot + torch.tensor([[0.0, 0.0, 1.0]])], 1.0, tolerant)
    loss.backward()
    assert n == 1 and p.grad[7, 7] != 0 and p.grad[0, 0] == 0


def test_partial_footprints_count_as_in_evaluation():
    """The loss counts a footprint exactly when data_catalog.gedi.footprint_percentiles (what
    `canopy evaluate` reports) does: valid pixels ≥ the share of the footprint's 9 pixel centres
    (not of the disc's area, 7.07 px², which would let 4 valid pixels of 9 count at 0.5)."""
    from affine import Affine

    from data_catalog.gedi import footprint_percentiles

    cfg = LossConfig(footprint_diameter_m=3.0, gedi_percentile=50.0, gedi_max_shift_m=0.0,
                     gedi_min_coverage=0.5)
    pred = torch.arange(49, dtype=torch.float32).reshape(7, 7)
    order = [(2, 2), (2, 3), (2, 4), (3, 2), (3, 3), (3, 4), (4, 2), (4, 3), (4, 4)]
    for k in range(10):  # k of the footprint's 9 pixels valid
        valid = torch.zeros(7, 7, dtype=torch.bool)
        for r, c in order[:k]:
            valid[r, c] = True
        heights = np.where(valid.numpy(), pred.numpy(), np.nan)
        expected = footprint_percentiles(heights, Affine(1, 0, 0, 0, -1, 7), [3.5], [3.5], 50,
                                         diameter_m=3.0, min_valid_share=0.5)[0]
        rh = float(expected) if np.isfinite(expected) else 0.0
        losses, _ = gedi_shot_losses(pred, valid, torch.tensor([[3.5, 3.5, rh]]), 1.0, cfg)
        assert (losses.numel() == 1) == np.isfinite(expected) == (k >= 5), k
        if losses.numel():
            assert float(losses[0]) == pytest.approx(0.0, abs=1e-9)


def test_footprint_mostly_off_the_chip_is_skipped():
    pred = torch.ones(6, 6)
    valid = torch.ones(6, 6, dtype=torch.bool)
    cfg = LossConfig(footprint_diameter_m=6.0, gedi_max_shift_m=0.0, gedi_min_coverage=0.5)
    losses, _ = gedi_shot_losses(pred, valid, torch.tensor([[0.2, 0.2, 1.0]]), 1.0, cfg)
    assert losses.numel() == 0  # a quarter disc at the corner is not judged
    loss, n = gedi_loss(pred[None], valid[None], [torch.tensor([[0.2, 0.2, 1.0]])], 1.0, cfg)
    assert n == 0 and float(loss) == 0.0


# ---------------------------------------------------------------------- bins and cosub


def test_training_bin_probabilities_match_inference_and_keep_dead_bins_alive():
    from canopy.model.bins import bin_probabilities

    logits = torch.tensor([[-3.0, 2.0, 0.5]]).view(1, 3, 1, 1).requires_grad_(True)
    p = train_bin_probabilities(logits, leak=0.1)
    assert torch.equal(p, bin_probabilities(logits.detach()))
    # a loss that wants the dead bin's mass up reaches its logit (plain relu: exactly 0) ...
    (-p[0, 0]).sum().backward()
    assert float(logits.grad[0, 0]) < 0.0
    # ... but one that wants it further down does not: the leak only ever revives
    logits.grad = None
    p = train_bin_probabilities(logits, leak=0.1)
    p[0, 0].sum().backward()
    assert float(logits.grad[0, 0]) == 0.0 and float(logits.grad[0, 1]) != 0.0


def test_cosub_mutual_distillation_by_hand():
    a = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1).requires_grad_(True)
    b = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1).requires_grad_(True)
    # KL(b‖a) = .25 ln(.25/.5) + .75 ln(.75/.5); KL(a‖b) = .5 ln(.5/.25) + .5 ln(.5/.75)
    kl_ba = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl_ab = 0.5 * math.log(2.0) + 0.5 * math.log(2 / 3)
    loss = mutual_distillation([a, b])
    assert float(loss.detach()) == pytest.approx(0.5 * (kl_ba + kl_ab), rel=1e-5)
    assert float(mutual_distillation([a, a]).detach()) == pytest.approx(0.0, abs=1e-7)
    # each side is a student only: a's gradient is that of KL(sg(b) ‖ a) = −b/a per bin (× ½)
    loss.backward()
    assert a.grad.view(-1).tolist() == pytest.approx([-0.5 * 0.25 / 0.5, -0.5 * 0.75 / 0.5], rel=1e-5)


# ------------------------------------------------------------------------------ augment


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_dihedral_moves_points_with_the_pixels(k, flip):
    h, w = 6, 9
    img = torch.zeros(h, w)
    img[1, 7] = 1.0
    out = dihedral(img, k, flip)
    r, c = (int(v) for v in torch.nonzero(out)[0])
    moved = dihedral_points(torch.tensor([[1.5, 7.5]]), k, flip, h, w)  # the pixel's centre
    assert moved[0].tolist() == pytest.approx([r + 0.5, c + 0.5])


def test_augment_keeps_image_labels_and_shots_together():
    gen = torch.Generator().manual_seed(3)
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[:, 2, 5] = 200
    target = torch.zeros(4, 4)  # coarser lidar: 2×2 image pixels per cell
    target[1, 2] = 15.0
    valid = torch.zeros(8, 8, dtype=torch.bool)
    valid[2, 5] = True
    shots = torch.tensor([[2.5, 5.5, 15.0]])
    seen = set()
    for _ in range(12):
        im, va, tg, sh = augment(image, valid, target, shots, gen, AugmentConfig(p_photometric=0.0))
        r, c = (int(v) for v in torch.nonzero(im[0])[0])
        assert bool(va[r, c]) and float(tg[r // 2, c // 2]) == 15.0
        assert sh[0].tolist() == pytest.approx([r + 0.5, c + 0.5, 15.0])
        seen.add((r, c))
    assert len(seen) > 3  # several of the eight views were drawn


def test_photometric_jitter_touches_the_image_only_and_is_reproducible():
    image = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    target = torch.arange(16.0).reshape(4, 4)
    cfg = AugmentConfig(dihedral=False, p_photometric=1.0, brightness=0.2)
    a = augment(image, torch.ones(4, 4, dtype=torch.bool), target, None,
                torch.Generator().manual_seed(1), cfg)
    b = augment(image, torch.ones(4, 4, dtype=torch.bool), target, None,
                torch.Generator().manual_seed(1), cfg)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], image.float())
    assert torch.equal(a[2], target)
    same = augment(image, torch.ones(4, 4, dtype=torch.bool), target, None,
                   torch.Generator().manual_seed(1), NO_AUGMENT)
    assert torch.equal(same[0], image.float())


def test_appearance_augmentations_mimic_coarser_hazier_other_sensor_imagery():
    """On a real NEON plot at 0.5 m: the coarser-GSD step removes fine detail (lower gradient
    energy) without moving the footprint; haze lowers contrast and raises the dark end; the
    sensor step keeps a grey pixel grey; labels and the valid mask never change; the same
    generator seed gives the same view; off by default (older recipes' views unchanged)."""
    from canopy.train.augment import appearance
    from data_catalog.raster import read_rgb_on_grid
    from tests.conftest import shared

    g = read_rgb_on_grid(shared("rgb_chm_pairs", "neon_teak", "neon_TEAK_043.tif"), 0.5)
    image = torch.from_numpy(g.rgb).float()

    def energy(x):
        return float((x[:, 1:, :] - x[:, :-1, :]).abs().mean() + (x[:, :, 1:] - x[:, :, :-1]).abs().mean())

    def one(cfg, seed):
        return appearance(image, torch.Generator().manual_seed(seed), cfg)

    coarse = AugmentConfig(gsd_coarsen=1.0)
    views = [one(coarse, s) for s in range(8)]
    blurred = [v for v in views if not torch.equal(v, image)]
    assert blurred and all(energy(v) < 0.9 * energy(image) for v in blurred)
    assert all(abs(float(v.mean()) - float(image.mean())) < 1.0 for v in views)  # same scene
    hazy = [one(AugmentConfig(haze=0.4), s) for s in range(12)]
    touched = [v for v in hazy if not torch.equal(v, image)]
    assert touched and all(float(v.std()) < float(image.std()) and float(v.min()) > float(image.min())
                           for v in touched)
    grey = torch.full((3, 8, 8), 120.0)
    for s in range(5):
        out = appearance(grey, torch.Generator().manual_seed(s), AugmentConfig(sensor=0.2))
        assert float(out.max() - out.min()) < 1e-3  # one value: grey stays grey
    assert torch.equal(one(AugmentConfig(gsd_coarsen=1.0, sensor=0.1, haze=0.3), 5),
                       one(AugmentConfig(gsd_coarsen=1.0, sensor=0.1, haze=0.3), 5))
    target, valid = torch.arange(16.0).reshape(4, 4), torch.ones(g.valid.shape, dtype=torch.bool)
    cfg = AugmentConfig(dihedral=False, p_photometric=0.0, gsd_coarsen=1.0, sensor=0.1, haze=0.3)
    _, va, tg, _ = augment(image, valid, target, None, torch.Generator().manual_seed(2), cfg)
    assert torch.equal(tg, target) and torch.equal(va, valid)
    plain = augment(image, valid, target, None, torch.Generator().manual_seed(2), AugmentConfig())
    before = augment(image, valid, target, None, torch.Generator().manual_seed(2),
                     AugmentConfig(gsd_coarsen=0.0, sensor=0.0, haze=0.0))
    assert torch.equal(plain[0], before[0])
