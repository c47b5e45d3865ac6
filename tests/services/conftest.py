"""The server under test: real layers made by canopy's own commands, served by a real uvicorn
process on 127.0.0.1 (one per test worker process, for the session).

Layers:
* ``osbs`` — ``canopy predict`` with the bundled default model on the real NEON OSBS_029 RGB
  (Florida, EPSG:32617);
* ``zones`` — a ``predict --aoi`` run over two UTM zones (22S/23S, the 48° W meridian): real NEON
  RGB pixels (OSBS_029) placed on each side of the zone boundary as two scenes, predicted with
  the seeded ``micro`` model (plumbing: its heights are not a claim about canopy).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import rasterio
from affine import Affine

from tests.conftest import ROOT, shared

API_KEY = "test-key-0123"
OSBS_RGB = ("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.tif")
ZONE_LON, ZONE_LAT = -48.0, -23.6  # the UTM 22S / 23S boundary, São Paulo state
ZONES_AOI = "-48.0012,-23.6012,-47.9988,-23.5992"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zone_scenes(folder: Path) -> Path:
    """Two real RGB scenes (OSBS_029 pixels at 0.5 m), one in each zone, overlapping 48° W."""
    from pyproj import Transformer

    folder.mkdir(parents=True, exist_ok=True)
    with rasterio.open(shared(*OSBS_RGB)) as src:
        rgb = src.read([1, 2, 3])
    for epsg, dx in ((32722, -180.0), (32723, -20.0)):
        x, y = Transformer.from_crs(4326, epsg, always_xy=True).transform(ZONE_LON, ZONE_LAT)
        t = Affine(0.5, 0, x + dx, 0, -0.5, y + 100)
        with rasterio.open(folder / f"scene_{epsg}.tif", "w", driver="GTiff", width=400,
                           height=400, count=3, dtype="uint8", crs=f"EPSG:{epsg}",
                           transform=t) as ds:
            ds.write(rgb)
    return folder


@pytest.fixture(scope="session")
def layers_dir(tmp_path_factory) -> Path:
    from canopy.predict.engine import local_cluster, predict_aoi
    from canopy.predict.options import PredictOptions

    root = tmp_path_factory.mktemp("layers")
    subprocess.run([sys.executable, "-m", "canopy.cli", "predict", str(shared(*OSBS_RGB)),
                    "-o", str(root / "osbs.tif"), "--precision", "fp32"], check=True,
                   capture_output=True)
    imagery = zone_scenes(root.parent / f"{root.name}-imagery")
    from distributed import Client

    with local_cluster(1) as cluster, Client(cluster) as client:
        predict_aoi(ZONES_AOI, imagery, root / "zones", "micro",
                    PredictOptions(precision="fp32", batch_size=4), cell_px=128, client=client)
    return root


@dataclass
class Server:
    url: str
    layers_dir: Path
    process: subprocess.Popen
    key: str = API_KEY
    log: Path | None = None

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)


def start_server(layers: Path, *extra: str, port: int | None = None, log: Path | None = None,
                 env: dict | None = None) -> Server:
    port = port or free_port()
    log = log or layers.parent / f"server-{port}.log"
    cmd = [sys.executable, "-m", "services", "--layers", str(layers), "--port", str(port),
           "--api-key", API_KEY, "--log-level", "warning", *extra]
    out = open(log, "ab")
    # its own process group: killing the server takes its job's Dask workers with it, as a
    # container's end would
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return Server(url, layers, proc, log=log)
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")


def stop_server(server: Server, sig=signal.SIGTERM) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, sig)
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(10)
    try:  # whatever the group started (job workers) goes too
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def live_server(layers_dir) -> Server:
    server = start_server(layers_dir)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def http(live_server) -> httpx.Client:
    with live_server.client() as c:
        yield c


@pytest.fixture(scope="session")
def artifacts() -> Path:
    folder = Path(os.environ.get("CANOPY_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def geo_polygon(west, south, east, north) -> dict:
    return {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north],
                                                [west, north], [west, south]]]}


def copy_layer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return dst
