"""``canopy catalog …``: a thin Typer app over data_catalog.catalog and data_catalog.stac.

Every command is one library call plus printing. A CatalogError prints ``error: <message>`` on
stderr and exits with code 2; since the catalog is saved only after the call succeeds, the file
is unchanged. ``check`` exits with 1 when it finds problems.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, List, Optional

import geopandas as gpd
import pandas as pd
import typer

from data_catalog.errors import CatalogError

app = typer.Typer(
    name="catalog",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Where is what: imagery, lidar CHMs, point clouds and GEDI shots in one GeoParquet catalog.",
)

CATALOG_OPTION = typer.Option(..., "--catalog", "-c", envvar="CANOPY_CATALOG", help="Catalog GeoParquet file.")


class Kind(str, Enum):
    imagery = "imagery"
    chm = "chm"
    lidar = "lidar"
    gedi = "gedi"


@contextmanager
def _user_errors() -> Iterator[None]:
    """Print CatalogErrors as one line (exit 2) and library warnings as 'warning: …' lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except CatalogError as exc:
            _print_warnings(caught)
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    _print_warnings(caught)


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    seen = set()
    for warning in caught:
        if issubclass(warning.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue  # library housekeeping, not something the user can act on
        message = str(warning.message)
        if message not in seen:
            seen.add(message)
            typer.echo(f"warning: {message}", err=True)


@app.command("add")
def add_command(
    kind: Kind = typer.Argument(..., help="imagery | chm | lidar | gedi"),
    paths: List[str] = typer.Argument(..., help="Files, directories (their files of this kind) or glob patterns."),
    catalog: Path = CATALOG_OPTION,
    crs: Optional[str] = typer.Option(None, "--crs", help="CRS for files that have none, e.g. EPSG:32617."),
    chm_resolution: float = typer.Option(1.0, "--chm-resolution", help="lidar: CHM cell size in CRS units."),
    chm_dir: Optional[Path] = typer.Option(None, "--chm-dir", help="lidar: where derived CHMs go [default: derived_chm/ next to the catalog]."),
    gedi_dir: Optional[Path] = typer.Option(None, "--gedi-dir", help="gedi: where shot partitions go [default: gedi/ next to the catalog]."),
    min_sensitivity: Optional[float] = typer.Option(None, "--min-sensitivity", help="gedi: keep sensitivity >= this [0.9]; 0 turns the filter off. 0.95 is stricter, 0.98 suits the tropics."),
    max_elev_dem_diff: Optional[float] = typer.Option(None, "--max-elev-dem-diff", help="gedi: keep |elev_lowestmode - DEM| < this many metres [150]; 0 turns it off."),
    quality_flag: bool = typer.Option(True, "--quality-flag/--no-quality-flag", help="gedi: keep quality_flag == 1."),
    degrade_flag: bool = typer.Option(True, "--degrade-flag/--no-degrade-flag", help="gedi: keep degrade_flag == 0."),
    surface_flag: bool = typer.Option(True, "--surface-flag/--no-surface-flag", help="gedi: keep surface_flag == 1."),
    power_beams_only: bool = typer.Option(False, "--power-beams-only", help="gedi: keep full-power beams only."),
    night_only: bool = typer.Option(False, "--night-only", help="gedi: keep shots with solar elevation < 0."),
) -> None:
    """Add files to the catalog (or refresh their rows if they changed); re-adding is a no-op."""
    from data_catalog.catalog import Catalog

    with _user_errors():
        cat = Catalog.open(catalog)
        before = set(cat.frame["asset_id"])
        filters = None
        if kind is Kind.gedi:
            filters = _gedi_filters(
                min_sensitivity=min_sensitivity,
                max_elev_dem_diff_m=max_elev_dem_diff,
                quality_flag=quality_flag,
                degrade_flag=degrade_flag,
                surface_flag=surface_flag,
                power_beams_only=power_beams_only,
                night_only=night_only,
            )
        written = cat.add(
            kind.value, paths, crs=crs, chm_resolution=chm_resolution, chm_dir=chm_dir, gedi_dir=gedi_dir, gedi_filters=filters
        )
        cat.save()
    added = sum(record.asset_id not in before for record in written)
    typer.echo(f"added {added}, updated {len(written) - added}; {cat.path} holds {len(cat)} assets")


def _gedi_filters(**given: Any) -> Any:
    """A gedi.GediFilters with the options that differ from its defaults; None when all are default."""
    from data_catalog.gedi import GediFilters

    defaults = GediFilters()
    overrides = {}
    for name, value in given.items():
        if name in ("min_sensitivity", "max_elev_dem_diff_m"):
            if value is None:
                continue
            if value < 0:
                raise CatalogError(f"--{name.replace('_m', '').replace('_', '-')} {value}: must be >= 0")
            value = value or None  # 0 switches the filter off
        if getattr(defaults, name) != value:
            overrides[name] = value
    return GediFilters(**overrides) if overrides else None


@app.command("query")
def query_command(
    catalog: Path = CATALOG_OPTION,
    aoi: Optional[str] = typer.Option(None, "--aoi", help="Area of interest: a vector file, WKT, bbox or place name (e.g. california)."),
    bbox: Optional[str] = typer.Option(None, "--bbox", help="minx,miny,maxx,maxy in lon/lat (EPSG:4326)."),
    kind: Optional[List[Kind]] = typer.Option(None, "--kind", "-k", help="Only this kind (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print a GeoJSON FeatureCollection instead of a table."),
) -> None:
    """List the assets whose footprint intersects the AOI and/or bbox."""
    from data_catalog.catalog import Catalog

    with _user_errors():
        cat = Catalog.open(catalog, must_exist=True)
        geometry = None
        if aoi is not None:
            from data_catalog.aoi import resolve_aoi

            geometry = resolve_aoi(aoi).geometry
        kinds = [k.value for k in kind] if kind else None
        result = cat.query(geometry=geometry, bbox=_parse_bbox(bbox) if bbox else None, kinds=kinds)
    if as_json:
        typer.echo(json.dumps(frame_to_geojson(result)))
    elif result.empty:
        typer.echo("no assets match", err=True)
    else:
        typer.echo(format_table(result))


def _parse_bbox(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise CatalogError(f"--bbox {text!r}: expected four numbers minx,miny,maxx,maxy") from None
    if len(values) != 4:
        raise CatalogError(f"--bbox {text!r}: expected four numbers minx,miny,maxx,maxy")
    return values


def format_table(frame: gpd.GeoDataFrame) -> str:
    """A plain fixed-width table: one asset per line, path last so long paths do not misalign."""
    header = ("asset_id", "kind", "date", "res", "crs", "size", "path")
    rows = [header]
    for row in frame.itertuples(index=False):
        size = "-" if pd.isna(row.width) else f"{row.width}x{row.height}"
        res = "-" if pd.isna(row.res_x) else f"{row.res_x:.3g}"
        rows.append(
            (row.asset_id, row.kind, _text(row.datetime)[:10], res, _short_crs(row.crs), size, row.path)
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r[:-1], widths)) + "  " + str(r[-1]) for r in rows)


def _text(value: Any) -> str:
    return "-" if value is None or pd.isna(value) else str(value)


def _short_crs(crs: Any) -> str:
    if not isinstance(crs, str):
        return "-"
    return crs if crs.startswith("EPSG:") else "WKT"


def frame_to_geojson(frame: gpd.GeoDataFrame) -> dict[str, Any]:
    """Rows as GeoJSON features; JSON-text columns become objects, numbers stay numbers."""
    out = frame.copy()
    out["native_bounds"] = [list(map(float, b)) for b in out["native_bounds"]]
    out["added"] = out["added"].map(lambda t: t.isoformat())
    out["band_info"] = out["band_info"].map(json.loads)
    out["extra"] = out["extra"].map(json.loads)
    for name in ("width", "height", "bands", "size", "mtime_ns", "schema_version"):
        out[name] = out[name].astype(object).where(out[name].notna(), None)
    return json.loads(json.dumps(out.to_geo_dict(drop_id=True), default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


@app.command("check")
def check_command(
    catalog: Path = CATALOG_OPTION,
    full: bool = typer.Option(False, "--full", help="Re-hash every file, not only those whose size or mtime changed."),
    prune: bool = typer.Option(False, "--prune", help="Remove the rows of missing files from the catalog."),
) -> None:
    """Report moved, deleted or changed files; exits 1 when there are any."""
    from data_catalog.catalog import Catalog

    with _user_errors():
        cat = Catalog.open(catalog, must_exist=True)
        problems = cat.check(full=full)
        if prune:
            removed = cat.remove(p.asset_id for p in problems if p.problem == "missing")
            if removed:
                cat.save()
                typer.echo(f"removed {removed} rows of missing files", err=True)
    for problem in problems:
        typer.echo(str(problem))
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: {len(cat)} assets checked")


@app.command("export-stac")
def export_stac_command(
    catalog: Path = typer.Argument(..., help="Catalog GeoParquet file."),
    out_dir: Path = typer.Argument(..., help="Folder for collection.json and the Items."),
) -> None:
    """Write a STAC Collection with one Item per asset."""
    from data_catalog.catalog import Catalog
    from data_catalog.stac import export_stac

    with _user_errors():
        collection = export_stac(Catalog.open(catalog, must_exist=True), out_dir)
    typer.echo(str(collection))


@app.command("import-stac")
def import_stac_command(
    stac_json: str = typer.Argument(..., help="STAC Catalog, Collection, ItemCollection or Item JSON, "
                                               "or a STAC API search 'stac+https://host/api?collections=naip&bbox=W,S,E,N'."),
    catalog: Path = CATALOG_OPTION,
) -> None:
    """Add the imagery of a STAC JSON (relative asset hrefs resolve against the JSON's folder) or
    of a STAC API search (remote assets are catalogued from the items' metadata)."""
    from data_catalog.catalog import Catalog
    from data_catalog.stac import import_stac
    from data_catalog.stac_remote import import_search, is_stac_search

    with _user_errors():
        cat = Catalog.open(catalog)
        before = set(cat.frame["asset_id"])
        written = (import_search(stac_json, cat) if is_stac_search(stac_json)
                   else import_stac(Path(stac_json), cat))
        cat.save()
    added = sum(record.asset_id not in before for record in written)
    typer.echo(f"added {added}, updated {len(written) - added}; {cat.path} holds {len(cat)} assets")


def main() -> None:  # ``python -m data_catalog.cli``
    app()


if __name__ == "__main__":
    main()
