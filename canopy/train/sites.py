"""The real data the default model is trained and judged on, site by site, with its licences.

Invariant: a file whose licence does not allow shipping trained weights (GPL/AGPL, unknown,
"not stated", "presumed") is never returned by :func:`shippable_pairs` or
:func:`pretraining_images`; it can only appear in :func:`evaluation_only_pairs`. The licence is
read from ``../shared/data/SOURCES.tsv`` for every file, never assumed from a folder name, so a
file added later with a restrictive licence stays out of the weights without a code change.

A *site* is a landscape (NEON TEAK, OSBS, BART; Kootenay): leave-one-site-out folds hold a whole
site out, every plot of it, so that a fold measures a landscape the model never saw.

CHMs of the NEON plots are derived from their point clouds with the project's one LAS/LAZ → CHM
path (:func:`data_catalog.lidar.chm_from_las`); the TEAK clouds are not height-normalised and
carry no CRS (EPSG:32611 is given), and the OSBS clouds carry none either (EPSG:32617).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = (ROOT / ".." / "shared" / "data").resolve()

# words in SOURCES.tsv's licence column that keep a file out of shipped weights
_RESTRICTIVE = ("gpl", "unknown", "not stated", "presumed", "likely")
_OPEN = ("cc0", "cc by", "public domain", "licence ouverte")


@dataclass(frozen=True)
class Pair:
    """One real RGB image with its canopy height (a CHM raster, or a point cloud to derive one)."""

    site: str          # landscape: TEAK, OSBS, BART, Kootenay
    name: str          # plot or scene name, unique
    imagery: str
    chm: str | None    # a CHM raster, or None when it is derived from ``las``
    las: str | None
    crs: str | None    # CRS of the CHM/cloud when the file has none
    licence: str


def licences(data: Path = DATA) -> dict[str, str]:
    """SOURCES.tsv's licence column by path relative to ``data``."""
    with open(data / "SOURCES.tsv", newline="") as f:
        return {row["local_path"]: row["license"] for row in csv.DictReader(f, delimiter="\t")}


def is_open(licence: str) -> bool:
    """May weights trained on a file with this licence be shipped (module docstring)?"""
    text = licence.lower()
    # conservative: a copyleft word anywhere (even "repo AGPL-3.0; imagery CC BY 4.0", where the
    # copy we hold came through an AGPL repository) or an unstated data licence keeps it out
    if any(word in text for word in _RESTRICTIVE):
        return False
    return any(word in text for word in _OPEN)


def _pairs(data: Path = DATA) -> list[Pair]:
    lic = licences(data)
    pairs_dir = data / "rgb_chm_pairs"

    def licence_of(*paths: Path) -> str:
        # a pair is as open as its least open file
        texts = [lic.get(str(p.relative_to(data)), "UNKNOWN (not in SOURCES.tsv)") for p in paths]
        closed = [t for t in texts if not is_open(t)]
        return closed[0] if closed else texts[0]

    out: list[Pair] = []
    teak = pairs_dir / "neon_teak"
    for rgb in sorted(teak.glob("neon_TEAK_*.tif")):
        las = rgb.with_suffix(".laz")
        if las.exists():
            out.append(Pair("TEAK", rgb.stem.replace("neon_", ""), str(rgb), None, str(las),
                            "EPSG:32611", licence_of(rgb, las)))
    for rgb in sorted((pairs_dir / "neon_osbs_plots").glob("*.tif")):
        las = rgb.with_suffix(".laz")
        if las.exists():
            out.append(Pair("OSBS", rgb.stem.replace("neon_", ""), str(rgb), None, str(las),
                            "EPSG:32617", licence_of(rgb, las)))
    osbs = pairs_dir / "neon_osbs_029"
    if osbs.exists():
        out.append(Pair("OSBS", "OSBS_029", str(osbs / "OSBS_029.tif"), None,
                        str(osbs / "OSBS_029.laz"), "EPSG:32617",
                        licence_of(osbs / "OSBS_029.tif", osbs / "OSBS_029.laz")))
    bart = pairs_dir / "neon_bart_041"
    if bart.exists():
        out.append(Pair("BART", "BART_041", str(bart / "BART_041.tif"), None,
                        str(bart / "BART_041.laz"), None,
                        licence_of(bart / "BART_041.tif", bart / "BART_041.laz")))
    koot = pairs_dir / "kootenay_bc_drone"
    if koot.exists():
        out.append(Pair("Kootenay", "kootenay", str(koot / "kootenayOrtho_from_rda.tif"),
                        str(koot / "kootenayCHM.tif"), None, None,
                        licence_of(koot / "kootenayOrtho_from_rda.tif", koot / "kootenayCHM.tif")))
    return out


def shippable_pairs(data: Path = DATA) -> list[Pair]:
    """Every real pair whose licence allows shipping weights trained on it."""
    return [p for p in _pairs(data) if is_open(p.licence)]


def evaluation_only_pairs(data: Path = DATA) -> list[Pair]:
    """Real pairs usable only to judge a model (GPL, unknown licence)."""
    return [p for p in _pairs(data) if not is_open(p.licence)]


def pretraining_images(exclude_sites: tuple[str, ...] = (), data: Path = DATA) -> list[str]:
    """Open-licence files of ``overhead_rgb/`` (plus nothing else), minus those whose name
    mentions one of ``exclude_sites`` (a held-out site must not be pretrained on)."""
    lic = licences(data)
    out = []
    for rel, text in sorted(lic.items()):
        if not rel.startswith("overhead_rgb/") or not is_open(text):
            continue
        if Path(rel).suffix.lower() not in (".tif", ".tiff", ".jpg", ".png"):
            continue
        if any(s.lower() in Path(rel).name.lower() for s in exclude_sites):
            continue
        out.append(str(data / rel))
    return out


def derive_chm(pair: Pair, work: Path, resolution: float) -> str:
    """The pair's CHM raster: its own, or derived once from its cloud at ``resolution``
    (cached in ``work``)."""
    if pair.chm:
        return pair.chm
    from data_catalog import lidar

    out = work / f"{pair.name}_chm_{resolution:g}m.tif"
    if not out.exists():
        lidar.derive_chm(pair.las, out, resolution=resolution, crs=pair.crs)
    return str(out)


def coregistration(imagery: str, chm: str, chm_crs: str | None = None,
                   max_shift_m: float = 6.0) -> dict:
    """Where the CHM best matches the image's brightness: the offset (metres east, north) of
    the CHM from the image at the peak of their cross-correlation within ``max_shift_m``, on
    the CHM's grid.

    Both are smoothed (σ one cell) and compared where both are known. Canopy over bright ground is
    dark, so the correlation's sign is taken from the larger extreme. Sun shadows displace the
    peak from zero by a few metres, the same way for every plot of one flight: a single plot is
    therefore judged against its site's other plots (:func:`check_sites`), not against zero.
    """
    from scipy import ndimage

    from data_catalog.chm import read_chm
    from data_catalog.raster import open_raster, warp_average

    c = read_chm(chm, crs=chm_crs)
    with open_raster(imagery, "imagery") as src:
        bright = warp_average(src.read([1, 2, 3]).astype(np.float32).mean(0), src.transform,
                              src.crs, c.array.shape, c.transform, c.crs or src.crs)
    res = abs(c.transform.a)
    n = max(1, int(round(max_shift_m / res)))
    # compare only where both are known and a shifted copy stays inside
    inside = ndimage.binary_erosion(np.isfinite(bright) & np.isfinite(c.array), iterations=n + 1)
    if inside.sum() < 50:
        raise ValueError(f"{imagery}: under 50 CHM cells inside the image to compare")
    hs = ndimage.gaussian_filter(np.nan_to_num(c.array), 1.0)
    bs = ndimage.gaussian_filter(np.nan_to_num(bright, nan=float(np.nanmean(bright))), 1.0)
    corr = np.zeros((2 * n + 1, 2 * n + 1))
    for dy in range(-n, n + 1):
        for dx in range(-n, n + 1):
            corr[dy + n, dx + n] = np.corrcoef(hs[inside],
                                               np.roll(bs, (dy, dx), (0, 1))[inside])[0, 1]
    if abs(corr.min()) > abs(corr.max()):
        corr = -corr
    dy, dx = (int(v) - n for v in np.unravel_index(corr.argmax(), corr.shape))
    # the peak at an image rolled by (dx, dy) cells east/south: the CHM's features sit that far
    # east/south of the image's (a CHM moved 4 m west moves the offset 4 m west: tested)
    return {"shift_east_m": dx * res, "shift_north_m": -dy * res,
            "r_at_zero": round(float(corr[n, n]), 3), "r_peak": round(float(corr.max()), 3)}


def check_sites(results: dict[str, dict], sites: dict[str, str], tolerance_m: float = 2.0) -> dict:
    """Accept a plot when its correlation peak (:func:`coregistration`) lies within
    ``tolerance_m`` of its site's median peak; a site with one plot is accepted as it is."""
    out = {}
    for name, r in results.items():
        peers = [results[k] for k, s in sites.items() if s == sites[name]]
        e = float(np.median([p["shift_east_m"] for p in peers]))
        nn = float(np.median([p["shift_north_m"] for p in peers]))
        off = float(np.hypot(r["shift_east_m"] - e, r["shift_north_m"] - nn))
        out[name] = {**r, "site_median_shift_m": [e, nn], "off_site_median_m": round(off, 2),
                     "accepted": len(peers) < 2 or off <= tolerance_m}
    return out
