"""The ``evaluate`` command. Thin: it parses options and calls one library function; user
errors (canopy.errors) propagate to the main CLI, which prints one line and exits 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def evaluate_command(
    paths: Annotated[list[Path], typer.Argument(
        help="The prediction (COG or VRT), optionally followed by more reference CHMs "
             "(so `--reference /data/*.tif` works with a shell glob).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder to write.")],
    reference: Annotated[Optional[list[Path]], typer.Option(
        "--reference", "-r", help="Reference CHM raster; repeat or list several.")] = None,
    gedi: Annotated[Optional[Path], typer.Option(
        help="GEDI shots (GeoParquet or GeoJSON points with an rh95 or rh98 column).")] = None,
    gedi_rh: Annotated[Optional[str], typer.Option(
        "--gedi-rh", help="RH column to compare with (default rh95 if present, else rh98).")] = None,
    gedi_percentile: Annotated[Optional[float], typer.Option(
        help="Percentile of predicted heights in each footprint (default: the RH column's).")] = None,
    reference_crs: Annotated[Optional[str], typer.Option(
        help="CRS of reference rasters that carry none, e.g. EPSG:32617.")] = None,
    band: Annotated[Optional[int], typer.Option(
        "--band", help="The prediction's band of heights, when it has several and none is "
                       "described canopy_height (or one band of bytes).")] = None,
    reference_band: Annotated[Optional[int], typer.Option(
        help="The references' band of heights, when they have several (or one band of bytes, "
             "e.g. whole-metre maps).")] = None,
    compare: Annotated[Optional[list[Path]], typer.Option(
        "--compare", help="Another map (e.g. another model's) to score against the same "
                          "references in the same report; repeat for more.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
) -> None:
    """Score a canopy-height map against lidar CHMs (and GEDI): metrics.json and PNG figures."""
    from canopy.errors import InputError
    from canopy.evaluate.report import EvaluationConfig, evaluate

    if not paths:
        raise InputError("give the prediction raster to evaluate")
    prediction, extra = paths[0], paths[1:]
    refs = list(reference or []) + list(extra)
    config = EvaluationConfig(gedi_rh_column=gedi_rh, gedi_percentile=gedi_percentile,
                              prediction_band=band, reference_band=reference_band)
    result = evaluate(prediction, refs, out, gedi=gedi, reference_crs=reference_crs,
                      overwrite=overwrite, config=config, compare=list(compare or []))
    o = result["pooled"]["overall"]

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    typer.echo(f"{len(result['references'])} reference(s), {o['n']:,} pixels: MAE {f(o['mae'])} m, "
               f"RMSE {f(o['rmse'])} m, bias {f(o['bias'])} m, R² {f(o['r2'])}, "
               f"block-R² {f(o['block_r2'])}")
    edge = result["edge_error"]
    if "edge_error" in edge:
        typer.echo(f"edge error {f(edge['edge_error'])} (1.0 = invisible tile seams)")
    if result["gedi"]:
        g = result["gedi"]
        typer.echo(f"GEDI: {g['n']} shots, MAE {f(g['mae'])} m, bias {f(g['bias'])} m")
    if result.get("ood"):
        d = result["ood"]
        share = "n/a" if d["flagged_share"] is None else f"{d['flagged_share']:.0%}"
        typer.echo(f"out-of-distribution score: AUROC {f(d['auroc_large_error'])} for |error| > "
                   f"{d['large_error_m']:g} m; {share} of pixels flagged (MAE there "
                   f"{f(d['mae_flagged'])} m, elsewhere {f(d['mae_not_flagged'])} m)")
    if "comparison" in result:
        for row in result["comparison"]["maps"]:
            c = row["common_pixels"]
            common = (f"; on common pixels ({c['n']:,}): MAE {f(c['mae'])} m, bias {f(c['bias'])} m"
                      if c else "")
            typer.echo(f"{row['model']} ({Path(row['path']).name}): MAE {f(row['mae'])} m, "
                       f"bias {f(row['bias'])} m, R² {f(row['r2'])}{common}")
    typer.echo(f"report: {out}/metrics.json")


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app``."""
    app.command("evaluate")(evaluate_command)
