"""``canopy pretrain``: self-supervised pretraining of a backbone (``ssl_backbone``) on overhead
imagery, and ``canopy pretrain export``.

This module is the bridge between the two packages: ``ssl_backbone`` trains on any source of
uint8 windows and imports nothing from ``canopy``; :class:`RasterWindows` reads those windows
from georeferenced rasters, plain JPEG/PNG or a catalog through ``data_catalog``'s one raster
reader, optionally resampled to a GSD.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

from canopy.errors import ConfigError, OptionError

PRETRAIN_SUFFIXES = {".tif", ".tiff", ".vrt", ".jp2", ".jpg", ".jpeg", ".png"}


class RasterWindows:
    """Random ``window_px`` windows of RGB imagery (the first three bands, or those of
    ``bands``), from a folder (searched recursively), files, or a catalog GeoParquet's imagery.

    With ``gsd`` (metres), a georeferenced file finer than it is read averaged down to it; files
    without a metric CRS are read as they are. A file gives ⌊area / window_px²⌋ windows per
    epoch (at least one); files smaller than a window, unreadable or not 8-bit RGB are left out
    and listed in ``skipped``. A window that is mostly nodata is drawn again (up to 8 times)."""

    def __init__(self, spec: str | Path, window_px: int = 256, gsd: float | None = None,
                 bands: tuple[int, ...] = (1, 2, 3)):
        from data_catalog.errors import CatalogError

        self.window_px, self.gsd, self.bands = window_px, gsd, tuple(bands)
        self.files: list[tuple[str, int, int, float]] = []  # path, width, height, scale
        self.skipped: list[str] = []
        for path in _list_files(spec):
            try:
                with _open_quietly(path) as ds:
                    if ds.count < max(self.bands) or ds.dtypes[0] != "uint8":
                        self.skipped.append(f"{path}: {ds.count} band(s) of {ds.dtypes[0]}, not "
                                            f"8-bit with bands {','.join(map(str, self.bands))}")
                        continue
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
            raise OptionError("imagery", f"'{spec}' holds no readable 8-bit RGB image of at least "
                                         f"{window_px}×{window_px} px"
                              + (f" ({len(self.skipped)} left out)" if self.skipped else ""))
        counts = [max(1, w * h // window_px ** 2) for _, w, h, _ in self.files]
        self.starts = torch.tensor([0] + counts).cumsum(0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, index: int, gen: torch.Generator) -> torch.Tensor:
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        i = int(torch.searchsorted(self.starts, torch.tensor(index), right=True)) - 1
        path, w, h, scale = self.files[i]
        s = self.window_px
        with _open_quietly(path) as ds:
            for _ in range(8):
                col = int(torch.randint(w - s + 1, (), generator=gen))
                row = int(torch.randint(h - s + 1, (), generator=gen))
                win = Window(col * scale, row * scale, s * scale, s * scale)
                rgb = ds.read(list(self.bands), window=win, out_shape=(len(self.bands), s, s),
                              resampling=Resampling.average if scale > 1 else Resampling.nearest)
                valid = ds.read_masks(1, window=win, out_shape=(s, s)) > 0
                if valid.mean() >= 0.5:
                    break
        return torch.from_numpy(np.ascontiguousarray(rgb[:3]))


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


def _list_files(spec: str | Path) -> list[str]:
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


@pretrain_app.callback(invoke_without_command=True)
def run_command(
    ctx: typer.Context,
    imagery: Annotated[Optional[Path], typer.Option(
        help="Folder of rasters (GeoTIFF/COG/VRT/JPEG/PNG), one file, or a catalog GeoParquet.")] = None,
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
    window: Annotated[int, typer.Option(help="Window read from the imagery, px.")] = 256,
    gsd: Annotated[Optional[float], typer.Option(
        help="Read georeferenced imagery averaged to this GSD, m (default: as stored).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        help="Stop after this many steps in this sitting (continue with --resume).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16.")] = "auto",
    workers: Annotated[int, typer.Option(help="Data loader worker processes.")] = 0,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of weights, order and crops.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    """Pretrain a ViT backbone on overhead imagery with DINOv2, I-JEPA, MSN or PMSN (one CPU, a
    GPU, or torchrun); `canopy pretrain export RUN -o FILE` writes its backbone."""
    if ctx.invoked_subcommand is not None:
        return
    from canopy.model.auto import training_precision
    from canopy.model.device import resolve_device
    from ssl_backbone.methods import config_for, method_named
    from ssl_backbone.pretrain import pretrain

    if imagery is None or out is None:
        raise OptionError("imagery", "{imagery} and --out are required to pretrain")
    try:
        terms = method_named(method).log_terms
    except ConfigError:
        raise OptionError("method", f"{{method}} {method!r} is not one of dinov2, ijepa, msn, "
                                    "pmsn") from None
    if prior_power is not None and method != "pmsn":
        raise OptionError("prior_power", "{prior_power} is a setting of --method pmsn")
    fields = _read_config(config) if config else {}
    overrides = {"arch": arch, "init": str(init) if init else None, "epochs": epochs,
                 "batch_size": batch_size, "seed": seed, "prior_power": prior_power}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    cfg = config_for(method, fields)
    dev = resolve_device(device)
    prec = training_precision(dev, precision)
    if threads:
        torch.set_num_threads(threads)
    source = RasterWindows(imagery, window_px=window, gsd=gsd)
    for line in source.skipped:
        typer.echo(f"left out {line}", err=True)

    def show(row: dict) -> None:
        if not quiet:
            bad = f"  COLLAPSE? {row['collapsed']}" if row["collapsed"] else ""
            parts = ", ".join(f"{t} {row[t]:.3f}" for t in terms if t in row)
            typer.echo(f"step {row['step']} (epoch {row['epoch']:.2f}): loss {row['total']:.3f} "
                       f"({parts}); RankMe {row['rankme']:.1f}{bad}", err=True)

    result = pretrain(cfg, source, out, device=str(dev), precision=prec, resume=resume,
                      max_steps=max_steps, num_workers=workers, progress=show)
    verdict = (f"; collapse monitors out of band: {', '.join(result.collapsed)}"
               if result.collapsed else "; monitors healthy")
    if result.backbone_path:
        typer.echo(f"pretrained {result.total_steps} steps{verdict}; backbone: "
                   f"{result.backbone_path}")
    else:
        typer.echo(f"stopped at step {result.steps_done}/{result.total_steps}{verdict}; "
                   f"continue with --resume")


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
