"""Rebuild ``brazil_states.geojson`` from the 27 per-state files of geodata-br-states.

    python data_catalog/boundaries/build_brazil_states.py ../shared/data/vectors/brazil_states

The source files (MIT, giuliano-macedo/geodata-br-states, from LAGEAMB-UFPR) total 5.5 MB, most of
it São Paulo's and Paraná's coastlines. To keep the package small the boundaries are simplified with
a 0.0002° (~20 m) tolerance and coordinates rounded to 1e-5° (~1 m). That changes no state's area by
more than 0.05 % (checked by the script; measured worst: see its output). Only ``SIGLA`` and ``Estado`` are kept. The one invalid
source geometry (Pernambuco, a self-intersecting ring) is repaired with ``make_valid`` first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import geopandas as gpd
import pandas as pd
import shapely

TOLERANCE_DEG = 0.0002
DECIMALS = 5


def build(src_dir: Path, out_path: Path) -> None:
    frames = [gpd.read_file(p) for p in sorted(src_dir.glob("br_*.json"))]
    states = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs="EPSG:4326")[["SIGLA", "Estado", "geometry"]]
    if len(states) != 27:
        raise SystemExit(f"expected 27 states in {src_dir}, found {len(states)}")
    compact = states.copy()
    compact["geometry"] = shapely.set_precision(
        shapely.simplify(shapely.make_valid(states.geometry.values), TOLERANCE_DEG, preserve_topology=True),
        10.0**-DECIMALS,
    )
    before = states.assign(geometry=shapely.make_valid(states.geometry.values)).to_crs(6933).area.to_numpy()
    after = compact.to_crs(6933).area.to_numpy()
    worst = float(abs(after / before - 1).max())
    if worst > 5e-4:
        raise SystemExit(f"simplification changed an area by {worst:.2%}")
    features = [
        {"type": "Feature", "properties": {"SIGLA": r.SIGLA, "Estado": r.Estado}, "geometry": shapely.geometry.mapping(r.geometry)}
        for r in compact.itertuples()
    ]
    text = json.dumps({"type": "FeatureCollection", "features": features}, ensure_ascii=False, separators=(",", ":"))
    out_path.write_text(text, encoding="utf-8")
    print(f"{out_path}: {len(text) / 1e6:.2f} MB, worst area change {worst:.4%}")


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(__file__).with_name("brazil_states.geojson"))
