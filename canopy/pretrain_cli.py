"""``canopy pretrain``: self-supervised pretraining of a backbone (``ssl_backbone``) on overhead
imagery, and ``canopy pretrain distill``, ``curate`` and ``export``.

This module is the bridge between the two packages: ``ssl_backbone`` trains on any source of
uint8 windows and imports nothing from ``canopy``; :class:`RasterWindows` reads those windows
from georeferenced rasters, plain JPEG/PNG or a catalog through ``data_catalog``'s one raster
reader, optionally resampled to a GSD.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

from canopy.errors import ConfigError, OptionError

PRETRAIN_SUFFIXES = {".tif", ".tiff", ".vrt", ".jp2", ".jpg", ".jpeg", ".png"}
CURATION_KEY = "canopy_curation"  # parquet metadata of a `canopy pretrain curate` table


class RasterWindows:
    """Random ``window_px`` windows of RGB imagery (the first three bands, or those of
    ``bands``: four for RGB + near-infrared, ``channels`` of them), from a folder (searched
    recursively), one file, a list of files, or a catalog GeoParquet's imagery.

    With ``gsd`` (metres), a georeferenced file finer than it is read averaged down to it; files
    without a metric CRS are read as they are. A file gives ⌊area / window_px²⌋ windows per
    epoch (at least one); files smaller than a window, unreadable, not 8-bit RGB or with a chosen
    band tagged alpha are left out and listed in ``skipped``. A window that is mostly nodata is
    drawn again (up to 8 times)."""

    def __init__(self, spec: str | Path | list, window_px: int = 256, gsd: float | None = None,
                 bands: tuple[int, ...] = (1, 2, 3)):
        from data_catalog.errors import CatalogError
        from data_catalog.raster import rgb_bands

        self.window_px, self.gsd, self.bands = window_px, gsd, tuple(bands)
        self.channels = len(self.bands)
        self.files: list[tuple[str, int, int, float]] = []  # path, width, height, scale
        self.skipped: list[str] = []
        for path in _list_files(spec):
            try:
                with _open_quietly(path) as ds:
                    if ds.count < max(self.bands) or ds.dtypes[0] != "uint8":
                        self.skipped.append(f"{path}: {ds.count} band(s) of {ds.dtypes[0]}, not "
                                            f"8-bit with bands {','.join(map(str, self.bands))}")
                        continue
                    # the same check as training and prediction: a band tagged alpha is a mask
                    rgb_bands(ds, path, self.bands, count=self.channels)
                    scale = 1.0
                    if gsd and ds.crs is not None and ds.crs.is_projected:
                        res = abs(ds.transform.a) * ds.crs.linear_units_factor[1]
                        scale = max(1.0, gsd / res)
                    w, h = int(ds.width / scale), int(ds.height / scale)
            except CatalogError as exc:
                self.skipped.append(f"{path}: {exc}")
                continue
            if min(w, h) < window_px:
                self.skipped.append(f"{path}: {w}×{h} px{' at the GSD' if scale > 1 else ''}, "
                                    f"smaller than a {window_px}-px window")
                continue
            self.files.append((path, w, h, scale))
        if not self.files:
            raise OptionError("imagery", f"'{spec}' holds no readable 8-bit "
                                         f"{'RGB' if self.channels == 3 else 'RGB+NIR'} image of at least "
                                         f"{window_px}×{window_px} px"
                              + (f" ({len(self.skipped)} left out; the first: {self.skipped[0]})"
                                 if self.skipped else ""))
        counts = [max(1, w * h // window_px ** 2) for _, w, h, _ in self.files]
        self.starts = torch.tensor([0] + counts).cumsum(0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, index: int, gen: torch.Generator) -> torch.Tensor:
        i = int(torch.searchsorted(self.starts, torch.tensor(index), right=True)) - 1
        path, w, h, scale = self.files[i]
        s = self.window_px
        with _open_quietly(path) as ds:
            for _ in range(8):
                col = int(torch.randint(w - s + 1, (), generator=gen))
                row = int(torch.randint(h - s + 1, (), generator=gen))
                rgb, valid = _read_window(ds, col, row, s, scale, self.bands)
                if valid.mean() >= 0.5:
                    break
        return rgb


class CuratedWindows:
    """The windows a ``canopy pretrain curate`` table lists (each read as it was embedded:
    ``window_px`` px, averaged by ``scale``), one per index: curation chose them, so they are
    not drawn at random (the method's crops and augmentations still are)."""

    def __init__(self, table: str | Path):
        import pyarrow.parquet as pq

        t = pq.read_table(table)
        meta = json.loads((t.schema.metadata or {}).get(CURATION_KEY.encode(), b"{}"))
        if not meta:
            raise OptionError("imagery", f"'{table}' is not a table of curated windows")
        self.window_px, self.bands, self.meta = int(meta["window_px"]), tuple(meta["bands"]), meta
        self.channels = len(self.bands)
        self.rows = t.select(["path", "col", "row", "scale"]).to_pylist()
        self.skipped: list[str] = []
        if not self.rows:
            raise OptionError("imagery", f"'{table}' lists no windows")

    def __len__(self) -> int:
        return len(self.rows)

    def window(self, index: int, gen: torch.Generator | None = None) -> torch.Tensor:
        r = self.rows[index]
        return _window_of(r["path"], r["col"], r["row"], self.window_px, r["scale"], self.bands)


def _read_window(ds, col, row, size, scale, bands) -> tuple[torch.Tensor, np.ndarray]:
    """One ``size``-px window at (col, row) of the grid ``scale`` times coarser than the open
    dataset ``ds``: its ``bands`` [C,S,S] uint8, and where it holds imagery (the first band's
    mask)."""
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    win = Window(col * scale, row * scale, size * scale, size * scale)
    rgb = ds.read(list(bands), window=win, out_shape=(len(bands), size, size),
                  resampling=Resampling.average if scale > 1 else Resampling.nearest)
    valid = ds.read_masks(1, window=win, out_shape=(size, size)) > 0
    return torch.from_numpy(np.ascontiguousarray(rgb)), valid


def _window_of(path, col, row, size, scale, bands) -> torch.Tensor:
    with _open_quietly(path) as ds:
        return _read_window(ds, col, row, size, scale, bands)[0]


def is_curated_table(path) -> bool:
    if Path(path).suffix.lower() != ".parquet" or not Path(path).is_file():
        return False
    import pyarrow.parquet as pq

    return CURATION_KEY.encode() in (pq.read_schema(path).metadata or {})


@contextlib.contextmanager
def _open_quietly(path: str):
    """The one raster reader, without the warning plain JPEG/PNG (no georeferencing, which
    pretraining does not need) would raise on every read."""
    from rasterio.errors import NotGeoreferencedWarning

    from data_catalog.raster import open_raster

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with open_raster(path, "imagery") as ds:
            yield ds


def _list_files(spec: str | Path | list) -> list[str]:
    if isinstance(spec, (list, tuple)):  # files named one by one (in the order given)
        return [str(p) for p in spec]
    path = Path(spec)
    if not path.exists():
        raise OptionError("imagery", f"'{spec}' does not exist")
    if path.is_dir():
        return [str(p) for p in sorted(path.rglob("*"))
                if p.suffix.lower() in PRETRAIN_SUFFIXES and not p.name.startswith(".")]
    if path.suffix.lower() == ".parquet":
        from data_catalog.catalog import Catalog

        return [str(r.path) for r in Catalog.open(path).query(kinds=["imagery"]).itertuples()]
    return [str(path)]


pretrain_app = typer.Typer(no_args_is_help=True)


# options `canopy pretrain` and `canopy pretrain distill` share (declared once)
WindowOpt = Annotated[int, typer.Option("--window", help="Window read from the imagery, px.")]
GsdOpt = Annotated[Optional[float], typer.Option(
    "--gsd", help="Read georeferenced imagery averaged to this GSD, m (default: as stored).")]
BandsOpt = Annotated[Optional[str], typer.Option(
    "--bands", help="Bands read as R,G,B or R,G,B,NIR, e.g. 1,2,3,4 (a 4-band backbone; an RGB "
                    "--init grows a near-infrared input; distillation: the teacher's bands).")]
MaxStepsOpt = Annotated[Optional[int], typer.Option(
    "--max-steps", help="Stop after this many steps in this sitting (continue with --resume).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto, fp32 or bf16.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Data loader worker processes.")]
FsdpOpt = Annotated[bool, typer.Option(
    "--fsdp", help="Under torchrun: shard parameters, gradients and optimizer state over the "
                   "processes (FSDP) instead of a whole copy on each; same checkpoints.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed of weights, order and crops.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")]


@pretrain_app.callback(invoke_without_command=True)
def run_command(
    ctx: typer.Context,
    imagery: Annotated[Optional[Path], typer.Option(
        help="Folder of rasters (GeoTIFF/COG/VRT/JPEG/PNG), one file, a catalog GeoParquet, "
             "or a table of curated windows (canopy pretrain curate).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder.")] = None,
    method: Annotated[str, typer.Option(help="Pretraining method: dinov2, ijepa, msn or pmsn.")] = "dinov2",
    config: Annotated[Optional[Path], typer.Option(
        help="YAML or JSON of the method's config fields (ssl_backbone.dinov2.DINOv2Config, "
             "ijepa.IJEPAConfig, msn.MSNConfig; unknown keys are refused); flags override.")] = None,
    prior_power: Annotated[Optional[float], typer.Option(
        help="pmsn: exponent of the power-law prior over prototypes (default 0.25).")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Backbone variant from scratch, e.g. vit_small.")] = None,
    init: Annotated[Optional[Path], typer.Option(
        help="Continue from this backbone (HRCH v1 .pth, DINOv2/DINOv3 weights, an export).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs (one = every window once).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step and process.")] = None,
    window: WindowOpt = 256,
    gsd: GsdOpt = None,
    bands: BandsOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: WorkersOpt = 0,
    fsdp: FsdpOpt = False,
    threads: ThreadsOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain a ViT backbone on overhead imagery with DINOv2, I-JEPA, MSN or PMSN (one CPU, a
    GPU, or torchrun); `canopy pretrain export RUN -o FILE` writes its backbone."""
    if ctx.invoked_subcommand is not None:
        return
    from ssl_backbone.methods import config_for, method_named

    if imagery is None or out is None:
        raise OptionError("imagery", "{imagery} and --out are required to pretrain")
    try:
        method_named(method)
    except ConfigError:
        raise OptionError("method", f"{{method}} {method!r} is not one of dinov2, ijepa, msn, "
                                    "pmsn") from None
    if prior_power is not None and method != "pmsn":
        raise OptionError("prior_power", "{prior_power} is a setting of --method pmsn")
    fields = _read_config(config) if config else {}
    overrides = {"arch": arch, "init": str(init) if init else None, "epochs": epochs,
                 "batch_size": batch_size, "seed": seed, "prior_power": prior_power}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    _run(config_for(method, fields), imagery, out, window=window, gsd=gsd, bands=bands,
         max_steps=max_steps, resume=resume, device=device, precision=precision,
         workers=workers, threads=threads, quiet=quiet, fsdp=fsdp)


def _run(cfg, imagery: Path, out: Path, *, window: int, gsd: float | None, bands: str | None,
         max_steps: int | None, resume: bool, device: str, precision: str, workers: int,
         threads: int | None, quiet: bool, fsdp: bool = False) -> None:
    """One pretraining run of the method ``cfg`` belongs to, with progress lines and the exit
    summary (shared by `canopy pretrain` and `canopy pretrain distill`)."""
    from canopy.model.auto import training_precision
    from canopy.model.device import resolve_device
    from ssl_backbone.methods import method_of
    from ssl_backbone.pretrain import pretrain

    terms = method_of(cfg).log_terms
    dev = resolve_device(device)
    prec = training_precision(dev, precision)
    if threads:
        torch.set_num_threads(threads)
    from canopy.predict.options import parse_bands

    band_list = parse_bands(bands) if bands else (1, 2, 3)
    if is_curated_table(imagery):
        source = CuratedWindows(imagery)
        if bands and source.bands != band_list:
            raise OptionError("bands", f"the curated table lists windows of bands "
                                       f"{','.join(map(str, source.bands))}")
    else:
        source = RasterWindows(imagery, window_px=window, gsd=gsd, bands=band_list)
    for line in source.skipped:
        typer.echo(f"left out {line}", err=True)

    def show(row: dict) -> None:
        if not quiet:
            bad = f"  COLLAPSE? {row['collapsed']}" if row["collapsed"] else ""
            parts = ", ".join(f"{t} {row[t]:.3f}" for t in terms if t in row)
            typer.echo(f"step {row['step']} (epoch {row['epoch']:.2f}): loss {row['total']:.3f} "
                       f"({parts}); RankMe {row['rankme']:.1f}{bad}", err=True)

    result = pretrain(cfg, source, out, device=str(dev), precision=prec, resume=resume,
                      max_steps=max_steps, num_workers=workers, progress=show, fsdp=fsdp)
    verdict = (f"; collapse monitors out of band: {', '.join(result.collapsed)}"
               if result.collapsed else "; monitors healthy")
    if result.backbone_path:
        typer.echo(f"pretrained {result.total_steps} steps{verdict}; backbone: "
                   f"{result.backbone_path}")
    else:
        typer.echo(f"stopped at step {result.steps_done}/{result.total_steps}{verdict}; "
                   f"continue with --resume")


@pretrain_app.command("distill")
def distill_command(
    teacher: Annotated[Path, typer.Option(
        help="The frozen teacher: a DINOv2 pretraining run folder (or its checkpoint.pt).")],
    imagery: Annotated[Path, typer.Option(
        help="Folder of rasters, one file, a catalog GeoParquet or a curated table.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")],
    arch: Annotated[Optional[str], typer.Option(help="Student variant, e.g. vit_small.")] = None,
    init: Annotated[Optional[Path], typer.Option(help="Start the student from this backbone.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="YAML or JSON of ssl_backbone.distill.DistillConfig fields; flags override.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs (default 20).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step and process.")] = None,
    window: WindowOpt = 256,
    gsd: GsdOpt = None,
    bands: BandsOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: WorkersOpt = 0,
    fsdp: FsdpOpt = False,
    threads: ThreadsOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Distil a DINOv2 run into a smaller student (DINOv2 §5): the DINOv2 step against the
    frozen teacher's targets, no masking or drop path; the backbone written is the student's
    EMA. --bands defaults to the bands the teacher run read (a curated table's are its own).
    Export and --resume work as for `canopy pretrain`."""
    from ssl_backbone.distill import teacher_run
    from ssl_backbone.methods import config_for

    if bands is None and not is_curated_table(imagery):  # the student reads what its teacher
        run = teacher_run(teacher)                          # read (a table names its own bands)
        n = int(run["backbone"].get("in_chans", 3))
        taught = run["bands"] or list(range(1, n + 1))
        bands = ",".join(map(str, taught)) if list(taught) != [1, 2, 3] else None
    fields = _read_config(config) if config else {}
    overrides = {"teacher": str(teacher), "arch": arch, "init": str(init) if init else None,
                 "epochs": epochs, "batch_size": batch_size, "seed": seed}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    _run(config_for("distill", fields), imagery, out, window=window, gsd=gsd, bands=bands,
         max_steps=max_steps, resume=resume, device=device, precision=precision,
         workers=workers, threads=threads, quiet=quiet, fsdp=fsdp)


def _read_config(path: Path) -> dict:
    import json

    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise OptionError("config", f"{{config}} '{path}' cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise OptionError("config", f"{{config}} '{path}' is not a mapping of settings")
    return data


@pretrain_app.command("curate")
def curate_command(
    imagery: Annotated[Path, typer.Option(help="Folder of rasters, one file or a catalog GeoParquet.")],
    embedder: Annotated[Path, typer.Option(
        help="The backbone that embeds the candidates: a pretraining run folder, its export or "
             "any backbone file --init takes.")],
    target_size: Annotated[int, typer.Option(help="Windows to keep.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .parquet table to write.")],
    window: Annotated[int, typer.Option(help="Window px (candidates tile each image).")] = 256,
    gsd: Annotated[Optional[float], typer.Option(help="Read averaged to this GSD, m.")] = None,
    bands: BandsOpt = None,
    clusters: Annotated[str, typer.Option(
        help="k-means clusters per level, finest first, e.g. 1000,100.")] = "64,8",
    dedup: Annotated[float, typer.Option(help="Cosine similarity at which a window is a "
                                              "near-duplicate of one kept before it.")] = 0.95,
    uncurated: Annotated[bool, typer.Option(
        "--uncurated", help="A uniform random sample of the same size instead (the comparison "
                            "setting: random tiles, as SEER).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of k-means and sampling.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
) -> None:
    """Choose pretraining windows after DINOv2's curation: embed the candidate windows of the
    imagery with a backbone, drop near-duplicates, cluster hierarchically and sample evenly
    across clusters. Pretrain on the result with `canopy pretrain --imagery TABLE`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from canopy.io.cog import check_output_path
    from ssl_backbone.curation import balanced_sample, deduplicate, embed_batches, hierarchical_kmeans

    try:
        levels = tuple(int(v) for v in clusters.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise OptionError("clusters", f"{{clusters}} needs positive integers, e.g. 1000,100; got {clusters!r}")
    if target_size < 1:
        raise OptionError("target_size", "{target_size} must be at least 1")
    if not 0 < dedup <= 1.0:
        raise OptionError("dedup", f"{{dedup}} is a cosine similarity in (0, 1], got {dedup}")
    check_output_path(out, overwrite)
    from canopy.predict.options import parse_bands

    backbone = _embedder(embedder)
    band_list = parse_bands(bands) if bands else tuple(range(1, backbone.cfg.in_chans + 1))
    if len(band_list) != backbone.cfg.in_chans:
        raise OptionError("bands", f"gives {len(band_list)} bands; the embedder reads "
                                   f"{backbone.cfg.in_chans}")
    source = RasterWindows(imagery, window_px=window, gsd=gsd, bands=band_list)
    cands = [(path, c, r, scale) for path, w, h, scale in source.files
             for r in range(0, h - window + 1, window) for c in range(0, w - window + 1, window)]
    emb = embed_batches(backbone, (_window_of(p, c, r, window, sc, source.bands)
                                   for p, c, r, sc in cands))
    kept = deduplicate(emb, dedup)
    gen = torch.Generator().manual_seed(seed)
    if uncurated:
        pick = kept[torch.randperm(len(kept), generator=gen)[:target_size]].sort().values
        tiers = [torch.full((len(pick),), -1)] * len(levels)
    else:
        assign = hierarchical_kmeans(emb[kept], levels, seed=seed)
        chosen = balanced_sample(assign, target_size, seed=seed)
        pick, tiers = kept[chosen], [a[chosen] for a in assign]
    rows = [cands[i] for i in pick.tolist()]
    meta = {"window_px": window, "gsd": gsd, "bands": list(source.bands), "embedder": str(embedder),
            "clusters": list(levels), "dedup": dedup, "seed": seed, "uncurated": uncurated,
            "candidates": len(cands), "after_dedup": len(kept), "format_version": 1}
    table = pa.table({"path": [r[0] for r in rows], "col": [r[1] for r in rows],
                      "row": [r[2] for r in rows], "scale": [float(r[3]) for r in rows],
                      **{f"cluster_l{i}": t.tolist() for i, t in enumerate(tiers)}})
    table = table.replace_schema_metadata({CURATION_KEY: json.dumps(meta)})
    tmp = out.with_name(f".{out.name}.partial")
    pq.write_table(table, tmp)
    tmp.replace(out)
    typer.echo(f"{len(cands)} candidate windows, {len(kept)} after removing near-duplicates, "
               f"{len(rows)} kept ({'random' if uncurated else 'balanced over clusters'}): {out}")


def _embedder(path: Path):
    """The backbone of a run folder (its teacher), an export, or any backbone file."""
    from ssl_backbone.checkpoints import load_backbone

    if path.is_dir():
        exported = path / "backbone.safetensors"
        if exported.exists():
            path = exported
        elif (path / "checkpoint.pt").exists():
            import tempfile

            from ssl_backbone.pretrain import export_backbone

            path = export_backbone(path, Path(tempfile.mkdtemp()) / "backbone.safetensors")
        else:
            raise OptionError("embedder", f"{{embedder}} '{path}' holds no backbone")
    if not path.exists():
        raise OptionError("embedder", f"{{embedder}} '{path}' does not exist")
    vit, _ = load_backbone(path)
    return vit.eval()


@pretrain_app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(help="A pretraining run folder (or its checkpoint.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .safetensors file to write.")],
    student: Annotated[bool, typer.Option("--student", help="The student's backbone (default: "
                                                            "the teacher's).")] = False,
) -> None:
    """Write a run's backbone as a file `canopy train --backbone` and `--init` take."""
    from ssl_backbone.pretrain import export_backbone

    path = export_backbone(run, out, which="student" if student else "teacher")
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(pretrain_app, name="pretrain")
