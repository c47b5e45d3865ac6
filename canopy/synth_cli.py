"""The ``synth`` command. Thin: it parses options and calls :func:`canopy.synth.synth_scene`;
user errors (canopy.errors) propagate to the main CLI, which prints one line and exits 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def synth_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the scene into.")],
    area_km2: Annotated[float, typer.Option(help="Scene area (square), km².")] = 4.0,
    gsd: Annotated[float, typer.Option(help="Ground sample distance, m.")] = 0.6,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same scene).")] = 0,
    sun_elevation: Annotated[float, typer.Option(help="Sun elevation, degrees (5–90).")] = 45.0,
    sun_azimuth: Annotated[float, typer.Option(
        help="Sun azimuth, degrees clockwise from north.")] = 135.0,
    crs: Annotated[str, typer.Option(help="Projected CRS of the scene.")] = "EPSG:32617",
    origin: Annotated[Optional[tuple[float, float]], typer.Option(
        help="Top-left corner X Y in the CRS (default 500000 4000000).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace files in a non-empty folder.")] = False,
) -> None:
    """Write a procedural scene with exact ground truth (SYNTHETIC: never real data)."""
    import time

    from canopy.synth import synth_scene

    from canopy.console import ProgressBars

    t0 = time.perf_counter()
    with ProgressBars("synth") as bars:
        paths = synth_scene(out, area_km2=area_km2, gsd=gsd, seed=seed,
                            sun_elevation=sun_elevation, sun_azimuth=sun_azimuth, crs=crs,
                            origin=origin, overwrite=overwrite, progress=bars)
    for name in ("rgb", "chm", "gedi", "readme"):
        typer.echo(f"{name}: {paths[name]}")
    typer.echo(f"synthetic scene written in {time.perf_counter() - t0:.1f} s")


def register(app: typer.Typer) -> None:
    """Add the ``synth`` command to ``app``."""
    app.command("synth")(synth_command)
