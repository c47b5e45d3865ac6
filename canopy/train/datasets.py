"""Training data: chips from the catalog's sampler and/or in-memory synthetic scenes.

Everything becomes a list of :class:`ChipRecord` held in memory (uint8 image, float target, GEDI
shots); the :class:`ChipDataset` over it is a plain map-style torch Dataset whose item ``i`` in
epoch ``e`` is a pure function of (seed, e, i). The training loop walks a seeded permutation per
epoch, so "where am I in the data" is two integers (epoch, step) and resume is exact.

Why in memory: chips are read once (warping imagery and lidar is the slow part) and every epoch
reuses them; a 128-px chip costs ≈ 115 kB, so 10,000 chips fit in ~1.2 GB. Larger catalogs
should be split by AOI into several runs (``--aoi``) or given a coarser ``--stride``.

Targets keep the lidar's own resolution when it is coarser than the model grid (the loss then
averages the prediction onto it); a finer CHM is averaged down to the model grid here. A target
is never upsampled.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from canopy.errors import InputError, OptionError
from canopy.train.augment import NO_AUGMENT, AugmentConfig, augment
from canopy.train.losses import downsample_target


@dataclass
class ChipRecord:
    """One training sample before augmentation."""

    image: np.ndarray        # (3, H, W) uint8
    valid: np.ndarray        # (H, W) bool: the image has data
    target: np.ndarray       # (h, w) float32 metres, NaN = no label; h ≤ H (coarser lidar)
    shots: np.ndarray        # (n, 3) float32: px_row, px_col, RH (image pixels); n may be 0
    source: str              # chip id or synthetic scene name
    origin: str = ""         # the imagery file (or "synthetic")
    bounds: tuple | None = None  # (left, bottom, right, top) in the chip's CRS, real chips only

    @property
    def n_labelled(self) -> int:
        return int(np.isfinite(self.target).sum())


@dataclass
class DataReport:
    """What building the data found: counts a user should see before hours of training."""

    chips: int = 0
    chips_without_labels: int = 0
    chips_date_masked: int = 0
    shots: int = 0
    sources: dict = field(default_factory=dict)
    labelled_pairs: set = field(default_factory=set)  # (imagery, chm) with ≥ 1 labelled chip

    def add(self, other: "DataReport") -> "DataReport":
        merged = dict(self.sources)
        for k, v in other.sources.items():
            merged[k] = merged.get(k, 0) + v
        return DataReport(self.chips + other.chips,
                          self.chips_without_labels + other.chips_without_labels,
                          self.chips_date_masked + other.chips_date_masked,
                          self.shots + other.shots, merged,
                          self.labelled_pairs | other.labelled_pairs)


def _seed_for(*parts) -> int:
    """A 63-bit seed from any hashable parts (stable across runs and Python versions)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# ---------------------------------------------------------------------------------- dataset


class ChipDataset(torch.utils.data.Dataset):
    """Augmented samples over in-memory chips; ``sample(i, epoch)`` is deterministic."""

    def __init__(self, records: Sequence[ChipRecord], augment_cfg: AugmentConfig = NO_AUGMENT,
                 seed: int = 0):
        self.records = list(records)
        self.augment_cfg = augment_cfg
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        return self.sample(index, self.epoch)

    def sample(self, index: int, epoch: int) -> dict:
        rec = self.records[index]
        gen = torch.Generator().manual_seed(_seed_for("augment", self.seed, epoch, index))
        shots = torch.from_numpy(rec.shots).float() if len(rec.shots) else None
        image, valid, target, shots = augment(
            torch.from_numpy(rec.image), torch.from_numpy(rec.valid), torch.from_numpy(rec.target),
            shots, gen, self.augment_cfg)
        return {"image": image, "valid": valid, "target": target,
                "shots": shots if shots is not None else torch.zeros(0, 3), "index": index}


def collate(samples: Sequence[dict]) -> dict:
    """Stack images and masks; targets (their size may differ per source) and shots stay lists."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "valid": torch.stack([s["valid"] for s in samples]),
        "targets": [s["target"] for s in samples],
        "shots": [s["shots"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples]),
    }


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation seeded by (seed, epoch) alone."""
    gen = torch.Generator().manual_seed(_seed_for("order", seed, epoch))
    return torch.randperm(n, generator=gen)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, step_in_epoch: int,
                  rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's share of global batch ``step_in_epoch`` of ``epoch``.

    The global batch is the same whatever the world size; rank r takes every world_size-th of
    it, so DDP trains on the same samples as one process (DistributedSampler without padding).
    """
    order = epoch_order(n, seed, epoch)
    batch = order[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]
    return batch[rank::world_size].tolist()


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped so every step has the same size)."""
    return max(1, n // batch_size)


# ---------------------------------------------------------------------------- from a sampler


def _target_on_model_grid(chm: np.ndarray, size: int, min_coverage: float) -> np.ndarray:
    """A CHM at its native resolution → the training target (finer: averaged to the model grid)."""
    if chm.shape[0] <= size and chm.shape[1] <= size:
        return chm.astype(np.float32, copy=False)  # same or coarser: keep (the loss pools pred)
    t = downsample_target(torch.from_numpy(chm.astype(np.float32)), (size, size), min_coverage)
    return t.numpy()


def _shots_array(gedi, rh_column: str) -> np.ndarray:
    if gedi is None or len(gedi) == 0:
        return np.zeros((0, 3), np.float32)
    if rh_column not in gedi.columns:
        raise InputError(f"GEDI shots have no '{rh_column}' column (have: "
                         f"{', '.join(c for c in gedi.columns if c.startswith('rh'))})")
    from data_catalog.gedi import flagged_usable

    gedi = gedi.loc[flagged_usable(gedi)]  # the rule evaluation and the correction use
    arr = np.stack([gedi["px_row"].to_numpy(float), gedi["px_col"].to_numpy(float),
                    gedi[rh_column].to_numpy(float)], axis=1).astype(np.float32)
    return arr[np.isfinite(arr).all(axis=1)]


def parse_date(value) -> datetime | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def date_gap_days(imagery_date, chm_date) -> float | None:
    """|imagery − lidar| in days, or None when either date is unknown."""
    a, b = parse_date(imagery_date), parse_date(chm_date)
    if a is None or b is None:
        return None
    if (a.tzinfo is None) != (b.tzinfo is None):
        a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
    return abs((a - b).total_seconds()) / 86400.0


def records_from_sampler(sampler, split: str | None, *, rh_column: str = "rh95",
                         pair_dates: dict | None = None, max_date_gap_days: float | None = None,
                         min_coverage: float = 0.5) -> tuple[list[ChipRecord], DataReport]:
    """Read every chip of ``split`` into memory as training records.

    The sampler must use ``chm_mode='native'`` so coarse lidar is not resampled onto the model
    grid. ``pair_dates`` maps (imagery path, chm path) → (imagery date, lidar date); chips of a
    pair whose dates differ by more than ``max_date_gap_days`` lose their labels (the canopy may
    have changed between the flights), as do chips without any labelled pixel.
    """
    if sampler.chm_mode != "native":
        raise ValueError("records_from_sampler needs a ChipSampler with chm_mode='native'")
    out: list[ChipRecord] = []
    report = DataReport()
    masked_pairs: set = set()
    for chip in sampler.chips(split):
        key = (chip.imagery_path, chip.chm_path)
        if pair_dates and max_date_gap_days is not None and key in pair_dates:
            gap = date_gap_days(*pair_dates[key])
            if gap is not None and gap > max_date_gap_days:
                report.chips_date_masked += 1
                if key not in masked_pairs:
                    masked_pairs.add(key)
                    warnings.warn(f"{chip.imagery_path} and {chip.chm_path} were acquired "
                                  f"{gap:.0f} days apart (> {max_date_gap_days:g}); their chips "
                                  "are not used as labels")
                continue
        target = _target_on_model_grid(chip.chm, chip.image.shape[-1], min_coverage)
        target = np.where(np.isfinite(target), target, np.nan).astype(np.float32)
        rec = ChipRecord(chip.image, chip.valid.astype(bool), target,
                         _shots_array(chip.gedi, rh_column), chip.chip_id, chip.imagery_path,
                         chip.bounds)
        if rec.n_labelled == 0 or not rec.valid.any():
            report.chips_without_labels += 1
            continue
        out.append(rec)
        report.shots += len(rec.shots)
        report.sources[chip.imagery_path] = report.sources.get(chip.imagery_path, 0) + 1
        report.labelled_pairs.add(key)
    report.chips = len(out)
    return out, report


# --------------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticSpec:
    """In-memory procedural scenes (canopy.synth): never real data, but exact labels."""

    n_scenes: int
    scene_px: int = 384
    gsd: float = 0.25
    seed: int = 0
    with_gedi: bool = False
    rh_column: str = "rh95"


def synthetic_scene(spec: SyntheticSpec, i: int):
    """Scene ``i`` of the spec: its own layout seed and a random sun (elevation 25–75°)."""
    from canopy.synth import make_scene

    rng = np.random.default_rng(_seed_for("synthetic", spec.seed, i) % (2**32))
    elevation = float(rng.uniform(25.0, 75.0))
    azimuth = float(rng.uniform(0.0, 360.0))
    scene_seed = int(rng.integers(0, 2**31 - 1))
    scene = make_scene(spec.scene_px, spec.scene_px, spec.gsd, seed=scene_seed,
                       sun_elevation=elevation, sun_azimuth=azimuth, layers=())
    return scene, scene_seed


def cut_chips(rgb: np.ndarray, chm: np.ndarray, chip_px: int, stride: int, source: str,
              shots: np.ndarray | None = None) -> list[ChipRecord]:
    """Cut a fully valid scene into chips on a ``stride`` lattice (shots move with their chip)."""
    h, w = chm.shape
    out = []
    for r in range(0, h - chip_px + 1, stride):
        for c in range(0, w - chip_px + 1, stride):
            sub = np.zeros((0, 3), np.float32)
            if shots is not None and len(shots):
                inside = ((shots[:, 0] >= r) & (shots[:, 0] < r + chip_px)
                          & (shots[:, 1] >= c) & (shots[:, 1] < c + chip_px))
                sub = (shots[inside] - np.array([r, c, 0], np.float32)).astype(np.float32)
            out.append(ChipRecord(
                np.ascontiguousarray(rgb[:, r:r + chip_px, c:c + chip_px]),
                np.ones((chip_px, chip_px), bool),
                np.ascontiguousarray(chm[r:r + chip_px, c:c + chip_px]).astype(np.float32),
                sub, f"{source}_r{r}_c{c}", "synthetic"))
    return out


def synthetic_records(spec: SyntheticSpec, chip_px: int, stride: int | None = None
                      ) -> tuple[list[ChipRecord], DataReport]:
    """Render ``spec.n_scenes`` scenes and cut them into chips (GEDI-like shots if asked)."""
    from canopy.synth import gedi_like_shots

    if chip_px > spec.scene_px:
        raise InputError(f"synthetic scenes of {spec.scene_px} px cannot hold {chip_px}-px chips")
    stride = stride or chip_px
    records: list[ChipRecord] = []
    n_shots = 0
    for i in range(spec.n_scenes):
        scene, scene_seed = synthetic_scene(spec, i)
        shots = None
        if spec.with_gedi:
            s = gedi_like_shots(scene.chm, spec.gsd, scene_seed)
            # reported (mis-located) positions: the loss must cope with geolocation error
            shots = np.stack([s["y"] / spec.gsd, s["x"] / spec.gsd, s[spec.rh_column]],
                             axis=1).astype(np.float32)
            n_shots += len(shots)
        records += cut_chips(scene.rgb, scene.chm, chip_px, stride, f"synthetic{spec.seed}_{i}",
                             shots)
    return records, DataReport(chips=len(records), shots=n_shots,
                               sources={f"synthetic (seed {spec.seed})": len(records)})


def label_heights(records: Iterable[ChipRecord], max_values: int = 200_000, seed: int = 0) -> np.ndarray:
    """A sample of labelled heights (m) from the records: the prior for the head's bias."""
    vals = [r.target[np.isfinite(r.target)].ravel() for r in records]
    allv = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    if allv.size > max_values:
        allv = np.random.default_rng(seed).choice(allv, max_values, replace=False)
    return np.clip(allv, 0.0, None)


def label_mean(records: Iterable[ChipRecord]) -> float:
    """Pixel-weighted mean height of the labels (the mean-height baseline's constant)."""
    total, n = 0.0, 0
    for r in records:
        t = r.target[np.isfinite(r.target)]
        total += float(np.clip(t, 0, None).sum())
        n += t.size
    return total / n if n else float("nan")


# ------------------------------------------------------------------------------- whole job


@dataclass(frozen=True)
class DataSpec:
    """Where a training run's chips come from (catalog, explicit pairs, synthetic scenes)."""

    catalog: str | None = None
    aoi: str | None = None
    pairs: tuple[str, ...] = ()          # "IMAGE:CHM" or "IMAGE:CHM:CHM_CRS" (CHM may be LAS/LAZ)
    synthetic: int = 0                   # training scenes; validation gets synthetic_val more
    synthetic_val: int | None = None     # default: max(1, synthetic // 4) when synthetic > 0
    synthetic_scene_px: int = 384
    gedi: str | None = None              # GEDI shots (GeoParquet/ingest folder); None: catalog's
    use_gedi: bool = False
    rh_column: str = "rh95"
    gsd: float = 0.25
    chip_size: int = 128
    stride: int | None = None            # default: half a chip (overlapping chips)
    block_size_m: float = 1000.0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    max_date_gap_days: float | None = 730.0
    lidar_resolution: float = 1.0        # CHM cell for LAS/LAZ given as a pair's CHM
    chm_crs: str | None = None           # for CHMs without a CRS tag
    bands: tuple[int, ...] | None = None  # imagery bands read as R,G,B(,NIR); None: RGB
    work_dir: str | None = None          # where CHMs derived from LAS/LAZ are written


def parse_pair(text: str, default_chm_crs: str | None = None) -> tuple[str, str, str | None]:
    """'IMG.tif:CHM.tif[:EPSG:32617]' → (imagery, chm, chm_crs)."""
    parts = text.split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise OptionError("pairs", f"{text!r}: expected IMAGE.tif:CHM.tif (optionally :EPSG:NNNN "
                                   "for a CHM without a CRS)")
    crs = ":".join(parts[2:]) or default_chm_crs
    return parts[0], parts[1], crs


def _derive_chm(path: str, resolution: float, crs: str | None, work_dir: str | None) -> str:
    """A LAS/LAZ given as a CHM: rasterise it once (first returns, pit-filled) into work_dir."""
    from data_catalog.lidar import chm_from_las, write_chm_geotiff

    out_dir = Path(work_dir or ".") / "derived_chm"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{Path(path).stem}_chm_{resolution:g}m.tif"
    if not out.exists():
        chm, transform, chm_crs = chm_from_las(path, resolution=resolution, crs=crs)
        write_chm_geotiff(out, chm, transform, chm_crs)
    return str(out)


def _catalog_source(spec: DataSpec):
    """The catalog, checked for what training needs; returns (catalog, dates by path, gedi paths)."""
    from data_catalog.catalog import Catalog
    from data_catalog.errors import CatalogError

    try:
        cat = Catalog.open(spec.catalog, must_exist=True)
    except CatalogError as exc:
        raise OptionError("catalog", f"{{catalog}}: {exc}") from None
    frame = cat.frame
    kinds = set(frame["kind"]) if len(frame) else set()
    if "chm" not in kinds:
        raise OptionError("catalog", f"{spec.catalog}: holds no CHM (canopy height) rows to train "
                                     "on; add some with `canopy catalog add chm FILES` or `... add "
                                     "lidar LAS/LAZ`")
    if "imagery" not in kinds:
        raise OptionError("catalog", f"{spec.catalog}: holds no imagery rows; add RGB rasters "
                                     "with `canopy catalog add imagery FILES`")
    dated = frame[frame["kind"].isin(["imagery", "chm"])]
    dates = dict(zip(dated["path"].astype(str), dated["datetime"]))  # path → acquisition date
    gedi = [str(p) for p in frame[frame["kind"] == "gedi"]["path"]]
    return cat, dates, gedi


def _read_gedi(spec: DataSpec, catalog_gedi: list[str]):
    """The shots the chip sampler cuts per chip: an ingest folder stays a path (the sampler reads
    only the cells under each pair), a file is read once."""
    if not spec.use_gedi:
        return None
    if spec.gedi:
        from data_catalog.gedi import read_shots

        return str(spec.gedi) if Path(spec.gedi).is_dir() else read_shots(spec.gedi)
    if catalog_gedi:
        return catalog_gedi
    raise OptionError("gedi_weight", "{gedi_weight} > 0 needs GEDI shots: give {gedi} FILE or a "
                                     "catalog with GEDI rows")


def build_data(spec: DataSpec) -> tuple[list[ChipRecord], list[ChipRecord], dict]:
    """Training and validation records for a run, after the checks a user needs to see early.

    Real chips are split by spatial block (the sampler's seeded hash); synthetic validation
    scenes are separate scenes, never crops of training scenes.
    """
    from data_catalog.chips import ChipSampler
    from data_catalog.errors import CatalogError

    if not spec.catalog and not spec.pairs and spec.synthetic <= 0:
        raise OptionError("pairs", "no training data: give {catalog}, {pairs} IMAGE:CHM or "
                                   "{synthetic} N")
    train: list[ChipRecord] = []
    val: list[ChipRecord] = []
    summary: dict = {}
    stride = spec.stride or max(1, spec.chip_size // 2)
    sources = []
    if spec.catalog:
        cat, dates, catalog_gedi = _catalog_source(spec)
        sources.append(("catalog", cat, dates, catalog_gedi))
    if spec.pairs:
        pairs = []
        for text in spec.pairs:
            img, chm, crs = parse_pair(text, spec.chm_crs)
            for path, what in ((img, "imagery"), (chm, "CHM")):
                if not os.path.exists(path):
                    raise OptionError("pairs", f"{{pairs}}: {what} file {path} not found")
            if chm.lower().endswith((".las", ".laz")):
                chm = _derive_chm(chm, spec.lidar_resolution, crs, spec.work_dir)
            else:
                from data_catalog.chm import describe_chm

                # an RGB image given as the CHM: say so, not "every chip fell in validation"
                describe_chm(chm, crs)
            pairs.append((img, chm, crs) if crs else (img, chm))
        sources.append(("pairs", pairs, {}, []))
    for kind, source, dates, catalog_gedi in sources:
        gedi = _read_gedi(spec, catalog_gedi)
        try:
            sampler = ChipSampler(source, aoi=spec.aoi, chip_size=spec.chip_size, gsd=spec.gsd,
                                  bands=spec.bands,
                                  stride=stride, split_fractions=spec.split_fractions,
                                  block_size_m=spec.block_size_m, seed=spec.seed,
                                  chm_mode="native", gedi=gedi)
            if not sampler.pairs:
                where = f"--catalog {spec.catalog}" if kind == "catalog" else "--pairs"
                raise InputError(f"{where}: no imagery overlaps a CHM"
                                 + (" inside the AOI" if spec.aoi else ""))
            windows = sampler.windows()
            pair_dates = {(p.imagery, p.chm): (dates.get(p.imagery), dates.get(p.chm))
                          for p in sampler.pairs} if dates else {}
            info = sampler.summary()
            for img in info["pairs_without_overlap"]:
                chm = next(p.chm for p in sampler.pairs if p.imagery == img)
                if kind == "pairs":
                    raise InputError(f"imagery {img} and CHM {chm} do not overlap"
                                     + (" inside the AOI" if spec.aoi else ""))
                warnings.warn(f"imagery {img} and CHM {chm} do not overlap; skipped")
            if not windows:
                raise InputError(f"no {spec.chip_size}-px chips fit where imagery and CHM overlap "
                                 f"({kind}); try a smaller --chip-size or a finer --gsd")
            tr, tr_rep = records_from_sampler(sampler, "train", rh_column=spec.rh_column,
                                              pair_dates=pair_dates,
                                              max_date_gap_days=spec.max_date_gap_days)
            va, va_rep = records_from_sampler(sampler, "val", rh_column=spec.rh_column,
                                              pair_dates=pair_dates,
                                              max_date_gap_days=spec.max_date_gap_days)
        except CatalogError as exc:
            raise InputError(str(exc)) from None
        _check_labels(sampler, tr + va, tr_rep.add(va_rep), kind)
        if gedi is not None and tr_rep.shots + va_rep.shots == 0:
            raise InputError(f"none of the GEDI shots{' in ' + spec.gedi if spec.gedi else ''} fall "
                             "inside the training chips (they are outside the imagery/CHM area)")
        train += tr
        val += va
        summary[kind] = {"pairs": len(sampler.pairs), "train_chips": len(tr), "val_chips": len(va),
                         "chips_without_labels": tr_rep.chips_without_labels + va_rep.chips_without_labels,
                         "chips_date_masked": tr_rep.chips_date_masked + va_rep.chips_date_masked,
                         "gedi_shots": tr_rep.shots + va_rep.shots,
                         "test_chips_reserved": info["chips_by_split"]["test"]}
    if spec.synthetic > 0:
        n_val = spec.synthetic_val if spec.synthetic_val is not None else max(1, spec.synthetic // 4)
        common = dict(scene_px=spec.synthetic_scene_px, gsd=spec.gsd, with_gedi=spec.use_gedi,
                      rh_column=spec.rh_column)
        tr, _ = synthetic_records(SyntheticSpec(spec.synthetic, seed=spec.seed, **common),
                                  spec.chip_size, stride)
        va, _ = synthetic_records(SyntheticSpec(n_val, seed=spec.seed + 1_000_003, **common),
                                  spec.chip_size, spec.chip_size)
        train += tr
        val += va
        summary["synthetic"] = {"train_scenes": spec.synthetic, "val_scenes": n_val,
                                "train_chips": len(tr), "val_chips": len(va),
                                "scene_px": spec.synthetic_scene_px}
    if not train:
        raise InputError("no training chips: every chip fell in the validation/test blocks; "
                         "use a smaller --block-size or other --split-fractions")
    return train, val, summary


def _check_labels(sampler, records: list[ChipRecord], report: DataReport, kind: str) -> None:
    """A CHM that is all nodata over its imagery is an error for an explicit pair (and for a
    catalog with nothing else), a warning for one pair among many in a catalog."""
    read = {(w.pair.imagery, w.pair.chm) for w in sampler.windows() if w.split in ("train", "val")}
    for imagery, chm in sorted(read - report.labelled_pairs):
        dated = report.chips_date_masked > 0
        msg = (f"CHM {chm} has no valid heights where it overlaps {imagery} (all nodata"
               + (", or acquired too long before/after the imagery)" if dated else ")"))
        if kind == "pairs" or not records:
            raise InputError(msg)
        warnings.warn(msg + "; skipped")
