"""Load benchmark: ``canopy serve`` against TiTiler on one real canopy-height COG, in one run.

What it measures
----------------
Two tile servers, started one after the other on 127.0.0.1 with the same number of uvicorn
worker processes (``--workers``, default 2), serve the same COG:

* ours:    ``canopy serve --layers <folder> --host 127.0.0.1 --port P --workers N``,
           ``GET /layers/{id}/tiles/{z}/{x}/{y}.png?rescale=0,40`` (id = the COG's file stem);
* TiTiler: ``uvicorn titiler.application.main:app --host 127.0.0.1 --port P --workers N``,
           ``GET /cog/tiles/WebMercatorQuad/{z}/{x}/{y}.png?url=<cog>&rescale=0,40&colormap_name=viridis``.

The tiles are every Web Mercator tile that meets the raster's footprint at three zoom levels:
the native maxzoom (the one rio-tiler, hence TiTiler, reports), two and four levels up, computed
with morecantile from the COG's lon/lat footprint. For each number of concurrent clients
(``--clients``, default 1 8 32) each server is started afresh and gets

* a warm-up of a few requests at zoom maxzoom-1 and maxzoom-3 (not measured, not in the set), so
  that every worker has imported its libraries;
* a **cold** pass: each tile of the set once, in a seeded random order;
* a **warm** pass: the same tiles again, in another order, on the same connections.

Per pass: p50/p95 latency (ms, successful requests), requests/s (all requests / wall time of the
pass) and errors. Anything other than ``200``, ``image/png`` and a 256×256 PNG (read from the
PNG header) counts as an error. The client is asyncio + ``httpx.AsyncClient`` with one keep-alive
connection per client, the connections opened 10 ms apart (see STAGGER_S). Also per pass: the
CPU seconds of each server process (to see that both workers took load) and the CPU seconds
other jobs on the machine used meanwhile; a server's passes are run again (``--retries``) when
those took over 10 % of the machine, and a pass still disturbed is marked † in the report. A few
sample tiles of both servers are decoded and compared (ours in TiTiler's viridis). Then a soak: our server freshly started, ``--requests`` requests (default
10,000) at 8 clients cycling through all tiles from minzoom to maxzoom × 4 ``rescale`` values (more
distinct responses than a bounded cache should hold), with the summed RSS of its process tree
(psutil) before, every 1,000 requests and after. Two readings of "RSS flat": from the fresh
start (at most +10 %), and once warm (under +5 % over the second half: no leak).

Client and servers share the machine's cores (2 on the project's CPU box); only one server runs
at a time, and the OS page cache holds the COG for both (it is read once before the first
server starts). Absolute milliseconds drift between machines; the ratios are the result.

The COG
-------
A real canopy-height map made by ``canopy predict`` from real imagery, ≥ 4096×4096 px with
internal overviews: no single image under ../shared/data reaches 4096 px at the bundled model's
0.5 m (the largest, Autzen Stadium in Eugene, Oregon, 0.305 m aerial orthophoto of 990×1337 m,
gives 1981×2675 px), and no set of images there is contiguous. So the bundled default model is
run at 0.24 m: a copy of its weights file whose stored config says ``gsd: 0.24`` (weights
unchanged) goes to ``canopy predict -c``, which then predicts the Autzen image on a 0.24 m UTM
grid (imagery upsampled 1.27×). The heights are the demonstration model's, off the GSD it was
trained at: fine for a tile-serving benchmark (real structure, real float32 COG profile), not a
canopy-height product. The COG, the model copy and the exact command are cached under
``benchmarks/.cache/`` so reruns skip the prediction.

Run
---
    source .venv/bin/activate
    pip install titiler.application          # benchmark-only dependency
    python benchmarks/serve_vs_titiler.py    # full run, ~10 min; writes results/serve_vs_titiler.{json,md}
    python benchmarks/serve_vs_titiler.py --quick            # smoke run, < 1 min
    python benchmarks/serve_vs_titiler.py --servers titiler  # one server only
    python benchmarks/serve_vs_titiler.py --render benchmarks/results/serve_vs_titiler.json
                                             # rewrite the markdown of a results JSON

Targets (issue 15, item 5): at 8 clients on the cold pass our p50 ≤ 0.5× TiTiler's and our
requests/s ≥ 2× TiTiler's; zero errors; RSS flat over 10,000 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_vs_titiler.json"
QUICK_OUT = CACHE / "serve_vs_titiler_quick.json"

FULL_SOURCE = "overhead_rgb/autzen_eugene_oregon.jpg"  # 3248×4385 at 1 ft, georeferenced by .wld + .prj
FULL_GSD = 0.24  # metres: the smallest "round" GSD at which the Autzen image spans ≥ 4096 px each way
FULL_LAYER = "autzen_chm"
QUICK_SOURCE = "overhead_rgb/drone_pix4d_bali.tif"  # 686×758 at 0.353 m: a COG in seconds
QUICK_LAYER = "bali_chm_quick"

RESCALE = "0,40"
SOAK_RESCALES = ("0,40", "0,30", "0,50", "5,45")
TILE_PX = 256
# Clients open their connections this far apart. uvicorn's workers share one listening socket,
# and a worker's accept loop takes every connection already waiting: opened in the same instant,
# all keep-alive connections tend to land on one worker (measured here: one worker doing all the
# work in about half the 8-client passes, for either server). Staggered, each connection is a
# separate race between the workers, so the passes are comparable run to run. The per-process
# CPU seconds of each pass are reported so the spread can be checked.
STAGGER_S = 0.01
FOREIGN_LIMIT = 0.10  # share of the machine's CPU other jobs may take during a measured pass
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- the COG


def _model_copy_at(gsd: float, dest: Path) -> Path:
    """The bundled default model with its stored config's ``gsd`` rewritten (weights unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from canopy.model.checkpoints import DEFAULT_MODEL_DIR

    weights = dest / "model.safetensors"
    if weights.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    src = Path(DEFAULT_MODEL_DIR) / "model.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    old = cfg["gsd"]
    cfg["gsd"] = gsd
    cfg["name"] = f"{cfg['name']}_at_{gsd:g}m"
    cfg["source"] = (f"{cfg.get('source', '')}; weights unchanged, gsd {old:g} -> {gsd:g} m "
                     "rewritten by benchmarks/serve_vs_titiler.py (benchmark input only)")
    meta["config"] = json.dumps(cfg, indent=2, sort_keys=True)
    tmp = weights.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    (dest / "config.json").write_text(meta["config"] + "\n")
    tmp.rename(weights)
    return dest


def ensure_cog(data: Path, quick: bool) -> dict:
    """Path, provenance and command of the benchmark COG; predicts it once, then reuses it."""
    canopy_bin = str(Path(sys.executable).with_name("canopy"))
    full = CACHE / "layers" / f"{FULL_LAYER}.tif"
    if full.exists() or not quick:
        src = data / FULL_SOURCE
        prj_text = src.with_suffix(".prj").read_text().strip()
        model = CACHE / f"model_default_at_{FULL_GSD:g}m"
        cmd = [canopy_bin, "predict", str(src), "-o", str(full), "-c", str(model),
               "--crs", prj_text, "--quiet"]
        shown = (f"canopy predict {data}/{FULL_SOURCE} -o {full.relative_to(ROOT)} "
                 f"-c {model.relative_to(ROOT)} --crs \"$(cat {src.with_suffix('.prj')})\" --quiet")
        out, layer = full, FULL_LAYER
        how = (f"bundled default model run at {FULL_GSD:g} m (a copy of its weights with the stored "
               f"config's gsd rewritten 0.5 -> {FULL_GSD:g}; weights unchanged) on the Autzen "
               "Stadium (Eugene, Oregon) 0.305 m aerial orthophoto, CRS from its .prj")
        prep = lambda: _model_copy_at(FULL_GSD, model)  # noqa: E731
    else:
        src = data / QUICK_SOURCE
        out = CACHE / "quick_layers" / f"{QUICK_LAYER}.tif"
        cmd = [canopy_bin, "predict", str(src), "-o", str(out), "--quiet"]
        shown = f"canopy predict {src} -o {out.relative_to(ROOT)} --quiet"
        layer = QUICK_LAYER
        how = ("quick mode without a cached full COG: bundled default model at 0.5 m on a small "
               "real drone orthophoto (Bali); NOT the benchmark COG")
        prep = lambda: None  # noqa: E731
    cmd_file = CACHE / f"{out.stem}.command.txt"  # not in the layers folder the server scans
    if not out.exists():
        if not src.exists():
            raise SystemExit(f"imagery not found: {src} (pass --data, the shared data folder)")
        prep()
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"predicting the benchmark COG (once; cached): {shown}")
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"canopy predict failed ({res.returncode}):\n{res.stderr[-3000:]}")
        secs = time.perf_counter() - t0
        cmd_file.write_text(f"{shown}\n# {secs:.0f} s on {platform.node()}, "
                            f"{_dt.datetime.now().isoformat(timespec='seconds')}\n"
                            f"# stderr tail:\n" + "".join(f"# {ln}\n" for ln in
                                                           res.stderr.splitlines()[-6:]))
        log(f"COG written in {secs:.0f} s")
    info = describe_cog(out)
    info.update(layer_id=layer, source=str(src), how=how, command=shown,
                command_log=cmd_file.read_text() if cmd_file.exists() else None)
    return info


def describe_cog(path: Path) -> dict:
    import rasterio
    from rio_tiler.io import Reader

    with rasterio.open(path) as ds:
        info = {
            "path": str(path), "bytes": path.stat().st_size, "width": ds.width,
            "height": ds.height, "count": ds.count, "dtype": ds.dtypes[0],
            "crs": ds.crs.to_string(), "res_m": list(ds.res), "nodata": ds.nodata,
            "overviews": ds.overviews(1), "blocksize": list(ds.block_shapes[0]),
            "compress": ds.compression.name if ds.compression else None,
            "tags": {k: v for k, v in ds.tags().items() if len(v) < 200},
        }
    with Reader(str(path)) as r:
        info.update(minzoom=r.minzoom, maxzoom=r.maxzoom)
    return info


# ----------------------------------------------------------------------------------- tiles


def footprint_lonlat(path: Path):
    import rasterio
    from rasterio.warp import transform_geom
    from shapely.geometry import mapping, shape
    from shapely.geometry import box as sbox

    with rasterio.open(path) as ds:
        poly = sbox(*ds.bounds).segmentize(max(ds.bounds.right - ds.bounds.left,
                                               ds.bounds.top - ds.bounds.bottom) / 64)
        return shape(transform_geom(ds.crs, "EPSG:4326", mapping(poly)))


def tiles_at(fp, zoom: int) -> list[tuple[int, int, int]]:
    """Web Mercator tiles at ``zoom`` whose area meets the raster's footprint."""
    import morecantile
    from shapely.geometry import box as sbox

    tms = morecantile.tms.get("WebMercatorQuad")
    out = []
    for t in tms.tiles(*fp.bounds, zooms=[zoom]):
        b = tms.bounds(t)
        if sbox(b.left, b.bottom, b.right, b.top).intersection(fp).area > 0:
            out.append((t.z, t.x, t.y))
    return out


# ----------------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    cmd: list[str]
    tile_url: object  # (z, x, y, rescale) -> path with query
    ready_path: str
    ready_check: object = None  # (httpx.Response) -> error text or None
    proc: subprocess.Popen | None = None
    port: int = 0
    log_path: Path | None = None
    startup_s: float = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: Server, tag: str, timeout: float = 180.0) -> None:
    import httpx

    server.port = free_port()
    cmd = [c.replace("{PORT}", str(server.port)) for c in server.cmd]
    (CACHE / "logs").mkdir(parents=True, exist_ok=True)
    server.log_path = CACHE / "logs" / f"{server.name}_{tag}.log"
    logf = open(server.log_path, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    # own session: the server and its worker processes form one process group we can stop
    server.proc = subprocess.Popen(cmd, cwd=CACHE, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    last = "no answer yet"
    with httpx.Client(base_url=server.base, timeout=5.0, trust_env=False) as client:
        while time.perf_counter() - t0 < timeout:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited ({server.proc.returncode}) before it was "
                                   f"ready:\n{tail(server.log_path)}")
            try:
                r = client.get(server.ready_path)
                last = f"{r.status_code} {r.text[:200]}"
                if r.status_code == 200 and (server.ready_check is None
                                             or (last := server.ready_check(r) or "") == ""):
                    server.startup_s = time.perf_counter() - t0
                    return
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
    stop(server)
    raise RuntimeError(f"{server.name} not ready in {timeout:.0f} s (last: {last}):\n"
                       f"{tail(server.log_path)}")


def stop(server: Server) -> None:
    proc = server.proc
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    # a worker left behind in the group would hold the port and a core
    try:
        os.killpg(proc.pid, 0)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.proc = None


def tail(path: Path | None, n: int = 25) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def tree_rss(pid: int) -> dict:
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    per = []
    for p in procs:
        try:
            per.append({"pid": p.pid, "rss_mib": p.memory_info().rss / 2**20,
                        "cmd": " ".join(p.cmdline())[:120]})
        except psutil.Error:
            pass
    return {"total_mib": sum(p["rss_mib"] for p in per), "processes": per}


# ----------------------------------------------------------------------------------- client


def check_png(r) -> tuple[str | None, int | None]:
    """(error or None, PNG colour type) for one response."""
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:160]!r}", None
    ctype = r.headers.get("content-type", "").split(";")[0].strip()
    if ctype != "image/png":
        return f"content-type {ctype!r}", None
    body = r.content
    if len(body) < 33 or body[:8] != PNG_SIG or body[12:16] != b"IHDR":
        return "body is not a PNG", None
    w, h = struct.unpack(">II", body[16:24])
    if (w, h) != (TILE_PX, TILE_PX):
        return f"PNG is {w}x{h}, not {TILE_PX}x{TILE_PX}", body[25]
    return None, body[25]


@dataclass
class Result:
    latency: list = field(default_factory=list)  # seconds, per request in issue order
    zoom: list = field(default_factory=list)
    errors: list = field(default_factory=list)   # (index, text)
    statuses: dict = field(default_factory=dict)
    colour_types: dict = field(default_factory=dict)
    bytes: list = field(default_factory=list)
    wall: float = 0.0
    samples: dict = field(default_factory=dict)  # (z, x, y) -> PNG bytes


async def _load(client, requests: list, clients: int, keep: set, stagger: float = 0.0) -> Result:
    """Issue ``requests`` ([(url, z, key)]) with ``clients`` concurrent keep-alive clients;
    client ``k`` starts ``k * stagger`` seconds late (see STAGGER_S)."""
    import httpx

    n = len(requests)
    res = Result(latency=[0.0] * n, zoom=[r[1] for r in requests], bytes=[0] * n)
    order = iter(range(n))

    async def one_client(k):
        if stagger:
            await asyncio.sleep(k * stagger)
        for i in order:  # one shared iterator: each request is issued exactly once
            url, _, key = requests[i]
            t0 = time.perf_counter()
            try:
                r = await client.get(url)
                body = r.content
                res.latency[i] = time.perf_counter() - t0
                err, ctype = check_png(r)
                res.statuses[r.status_code] = res.statuses.get(r.status_code, 0) + 1
                if ctype is not None:
                    res.colour_types[ctype] = res.colour_types.get(ctype, 0) + 1
                res.bytes[i] = len(body)
                if key in keep and err is None:
                    res.samples[key] = body
            except httpx.HTTPError as exc:
                res.latency[i] = time.perf_counter() - t0
                err = f"{type(exc).__name__}: {exc}"
                res.statuses["exception"] = res.statuses.get("exception", 0) + 1
            if err is not None:
                res.errors.append((i, f"{url.split('?')[0]} -> {err}"))

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(clients)))
    res.wall = time.perf_counter() - t0
    return res


def new_client(server: Server, clients: int):
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients,
                          keepalive_expiry=120)
    return httpx.AsyncClient(base_url=server.base, limits=limits, timeout=httpx.Timeout(120.0),
                             trust_env=False)


async def run_pass(server: Server, tiles: list, clients: int, keep=frozenset(),
                   rescale: str = RESCALE, client=None, extra: str = "") -> Result:
    """One pass over ``tiles``; on ``client``'s open connections when given, else on new ones
    opened ``STAGGER_S`` apart."""
    reqs = [(server.tile_url(z, x, y, rescale) + extra, z, (z, x, y)) for z, x, y in tiles]
    if client is not None:
        return await _load(client, reqs, clients, set(keep))
    async with new_client(server, clients) as client:
        return await _load(client, reqs, clients, set(keep), stagger=STAGGER_S)


def tree_cpu(pid: int) -> dict:
    """CPU seconds (user + system) of each process of a server's tree, by pid."""
    import psutil

    out = {}
    try:
        root = psutil.Process(pid)
        for p in [root] + root.children(recursive=True):
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class Foreign:
    """CPU seconds spent during a pass by processes that are neither the server nor this client
    (other jobs on a shared machine): the pass's numbers are suspect when this is large."""

    def __init__(self, server_pid: int):
        self.pid = server_pid
        self.t0 = busy_cpu_s(), own_cpu_s(), sum(tree_cpu(server_pid).values())

    def seconds(self) -> float:
        b0, o0, s0 = self.t0
        return round((busy_cpu_s() - b0) - (own_cpu_s() - o0)
                     - (sum(tree_cpu(self.pid).values()) - s0), 2)


def wait_quiet(max_wait: float, threshold: float = 15.0) -> float:
    """Wait (up to ``max_wait`` s) for the machine to be under ``threshold`` % busy over 2 s;
    returns the last reading."""
    import psutil

    t0 = time.perf_counter()
    while True:
        busy = psutil.cpu_percent(interval=2.0)
        if busy < threshold or time.perf_counter() - t0 > max_wait:
            if busy >= threshold:
                log(f"  machine still {busy:.0f} % busy after {max_wait:.0f} s; going on")
            return busy
        log(f"  machine {busy:.0f} % busy (other jobs); waiting")


async def passes(server: Server, sequences: list, clients: int, keep) -> list:
    """The cold and warm passes on one set of keep-alive connections (a map client revisiting
    tiles reuses its connections), with the CPU seconds each server process spent per pass."""
    out = []
    async with new_client(server, clients) as client:
        for j, (cache, seq) in enumerate(sequences):
            reqs = [(server.tile_url(z, x, y, RESCALE), z, (z, x, y)) for z, x, y in seq]
            before = tree_cpu(server.proc.pid)
            foreign = Foreign(server.proc.pid)
            res = await _load(client, reqs, clients, set(keep), stagger=STAGGER_S if j == 0 else 0)
            after = tree_cpu(server.proc.pid)
            cpu = sorted((round(after[p] - before.get(p, 0.0), 2) for p in after), reverse=True)
            out.append((cache, res, cpu, foreign.seconds()))
    return out


def summarise(res: Result, zooms: list[int]) -> dict:
    import numpy as np

    bad = {i for i, _ in res.errors}
    ok = [i for i in range(len(res.latency)) if i not in bad]
    lat = np.array([res.latency[i] for i in ok]) * 1000.0
    n = len(res.latency)

    def pct(a, q):
        return round(float(np.percentile(a, q)), 2) if len(a) else None

    per_zoom = {}
    for z in zooms:
        a = np.array([res.latency[i] for i in ok if res.zoom[i] == z]) * 1000.0
        per_zoom[str(z)] = {"n": int(len(a)), "p50_ms": pct(a, 50), "p95_ms": pct(a, 95)}
    sizes = [res.bytes[i] for i in ok]
    return {
        "requests": n, "ok": len(ok), "errors": len(res.errors),
        "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
        "mean_ms": round(float(lat.mean()), 2) if len(lat) else None,
        "max_ms": round(float(lat.max()), 2) if len(lat) else None,
        "rps": round(n / res.wall, 1) if res.wall else None, "wall_s": round(res.wall, 2),
        "mean_png_kb": round(statistics.fmean(sizes) / 1000, 1) if sizes else None,
        "statuses": {str(k): v for k, v in res.statuses.items()},
        "png_colour_types": {str(k): v for k, v in res.colour_types.items()},
        "per_zoom": per_zoom,
        "error_examples": [t for _, t in res.errors[:5]],
    }


# ----------------------------------------------------------------------------------- runs


def make_servers(cog: dict, workers: int, which: list[str]) -> dict[str, Server]:
    bindir = Path(sys.executable).parent
    cog_path = str(Path(cog["path"]).resolve())
    layer = cog["layer_id"]
    url_q = quote(cog_path, safe="/")
    servers = {}
    if "titiler" in which:
        servers["titiler"] = Server(
            name="titiler",
            cmd=[str(bindir / "uvicorn"), "titiler.application.main:app", "--host", "127.0.0.1",
                 "--port", "{PORT}", "--workers", str(workers)],
            tile_url=lambda z, x, y, rs: (f"/cog/tiles/WebMercatorQuad/{z}/{x}/{y}.png?url={url_q}"
                                          f"&rescale={rs}&colormap_name=viridis"),
            ready_path="/healthz",
        )
    if "ours" in which:
        def layer_listed(r):
            return None if layer in r.text else f"/layers does not list '{layer}': {r.text[:300]}"

        servers["ours"] = Server(
            name="ours",
            cmd=[str(bindir / "canopy"), "serve", "--layers", str(Path(cog_path).parent),
                 "--host", "127.0.0.1", "--port", "{PORT}", "--workers", str(workers)],
            tile_url=lambda z, x, y, rs: f"/layers/{layer}/tiles/{z}/{x}/{y}.png?rescale={rs}",
            ready_path="/layers", ready_check=layer_listed,
        )
    return servers


def warm_up(server: Server, warm_tiles: list, workers: int) -> None:
    """A few unmeasured requests on tiles outside the measured set, on several connections so
    that every worker process has served at least one tile."""
    res = asyncio.run(run_pass(server, warm_tiles, clients=max(2, 2 * workers)))
    if res.errors:
        log(f"  warm-up errors on {server.name}: {res.errors[:3]}")


def soak(server: Server, pool: list, n: int, clients: int, step: int = 1000) -> dict:
    """``n`` requests cycling through ``pool`` ([(z, x, y, rescale)]); RSS every ``step``."""
    reqs = [(server.tile_url(z, x, y, rs), z, None) for z, x, y, rs in pool]
    samples = [{"after": 0, **tree_rss(server.proc.pid)}]
    errors, statuses, lat, done, wall, other = [], {}, [], 0, 0.0, 0.0

    async def go():
        nonlocal done, wall, other
        async with new_client(server, clients) as client:
            while done < n:
                k = min(step, n - done)
                chunk = [reqs[(done + j) % len(reqs)] for j in range(k)]
                foreign = Foreign(server.proc.pid)
                res = await _load(client, chunk, clients, set(), stagger=0 if done else STAGGER_S)
                other += foreign.seconds()
                errors.extend(t for _, t in res.errors)
                for s, c in res.statuses.items():
                    statuses[str(s)] = statuses.get(str(s), 0) + c
                lat.extend(res.latency)
                wall += res.wall
                done += k
                samples.append({"after": done, **tree_rss(server.proc.pid)})
                log(f"  soak {done}/{n}: RSS {samples[-1]['total_mib']:.0f} MiB, "
                    f"{k / res.wall:.0f} req/s, errors so far {len(errors)}")

    asyncio.run(go())
    import numpy as np

    first, last = samples[0]["total_mib"], samples[-1]["total_mib"]
    mid = min(samples, key=lambda s: abs(s["after"] - n / 2))["total_mib"]
    second_half = (last - mid) / mid if mid else None
    return {
        "requests": n, "clients": clients, "distinct_responses": len(pool),
        "errors": len(errors), "error_examples": errors[:5], "statuses": statuses,
        "rps": round(n / wall, 1) if wall else None, "wall_s": round(wall, 1),
        "other_cpu_s": round(other, 1),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 2) if lat else None,
        "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 2) if lat else None,
        "rss_before_mib": round(first, 1), "rss_mid_mib": round(mid, 1),
        "rss_after_mib": round(last, 1),
        "growth_total_pct": round(100 * (last - first) / first, 1) if first else None,
        "growth_second_half_pct": round(100 * second_half, 1) if second_half is not None else None,
        "plateau": second_half is not None and second_half < 0.05,
        "samples_mib": [(s["after"], round(s["total_mib"], 1)) for s in samples],
        "processes_after": samples[-1]["processes"],
    }


def compare_samples(a: dict, b: dict) -> dict:
    """How alike two servers' renderings of the same tiles are (RGBA decoded with Pillow)."""
    import io

    import numpy as np
    from PIL import Image

    out = {}
    for key in sorted(set(a) & set(b)):
        ia = np.asarray(Image.open(io.BytesIO(a[key])).convert("RGBA")).astype(np.int16)
        ib = np.asarray(Image.open(io.BytesIO(b[key])).convert("RGBA")).astype(np.int16)
        opaque = (ia[..., 3] > 0) & (ib[..., 3] > 0)
        diff = np.abs(ia[..., :3] - ib[..., :3]).max(axis=-1)[opaque]
        out["/".join(map(str, key))] = {
            "alpha_agree_pct": round(100 * float(((ia[..., 3] > 0) == (ib[..., 3] > 0)).mean()), 2),
            "opaque_px": int(opaque.sum()),
            "rgb_within_8_pct": round(100 * float((diff <= 8).mean()), 2) if diff.size else None,
            "rgb_mean_abs_diff": round(float(diff.mean()), 2) if diff.size else None,
        }
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("titiler.application", "titiler.core", "rio-tiler", "rasterio", "morecantile",
                "fastapi", "starlette", "uvicorn", "httpx", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        import rasterio

        out["gdal"] = rasterio.__gdal_version__
    except Exception:
        pass
    return out


# ----------------------------------------------------------------------------------- report


def ratios(runs: list[dict]) -> list[dict]:
    out = []
    keyed = {(r["server"], r["clients"], r["cache"]): r for r in runs}
    for (srv, c, cache), r in keyed.items():
        t = keyed.get(("titiler", c, cache))
        if srv != "ours" or t is None:
            continue
        out.append({
            "clients": c, "cache": cache,
            "p50_ratio": round(r["p50_ms"] / t["p50_ms"], 3) if r["p50_ms"] and t["p50_ms"] else None,
            "p95_ratio": round(r["p95_ms"] / t["p95_ms"], 3) if r["p95_ms"] and t["p95_ms"] else None,
            "rps_ratio": round(r["rps"] / t["rps"], 2) if r["rps"] and t["rps"] else None,
        })
    return out


def targets(runs: list[dict], rat: list[dict], soak_res: dict | None, ref_clients: int) -> dict:
    r8 = next((r for r in rat if r["clients"] == ref_clients and r["cache"] == "cold"), None)
    ours = [r for r in runs if r["server"] == "ours"]
    out = {}
    if r8:
        out["p50_le_half_titiler"] = {"measured": r8["p50_ratio"], "target": "<= 0.5",
                                      "met": r8["p50_ratio"] is not None and r8["p50_ratio"] <= 0.5,
                                      "at": f"{ref_clients} clients, cold"}
        out["rps_ge_2x_titiler"] = {"measured": r8["rps_ratio"], "target": ">= 2",
                                    "met": r8["rps_ratio"] is not None and r8["rps_ratio"] >= 2,
                                    "at": f"{ref_clients} clients, cold"}
    if ours:
        errs = sum(r["errors"] for r in ours) + (soak_res["errors"] if soak_res else 0)
        out["zero_errors"] = {"measured": errs, "target": "0", "met": errs == 0}
    if soak_res:
        total, half = soak_res["growth_total_pct"], soak_res["growth_second_half_pct"]
        out["rss_flat"] = {"measured": f"{soak_res['rss_before_mib']:.0f} -> "
                                       f"{soak_res['rss_after_mib']:.0f} MiB ({total:+.0f} %)",
                           "target": f"flat over {soak_res['requests']:,} requests from a fresh "
                                     "start (here: at most +10 %)",
                           "met": total is not None and total <= 10}
        out["rss_plateau"] = {"measured": f"{half:+.1f} % over the second half",
                              "target": "no growth once warm, i.e. no leak (here: under +5 % "
                                        "over the second half)",
                              "met": bool(soak_res.get("plateau", soak_res.get("flat")))}
    return out


def busy_share(r: dict, cpus: int) -> float:
    """Share of the machine other jobs took during pass ``r``."""
    return max(0.0, r.get("other_cpu_s") or 0.0) / max(1e-9, r["wall_s"] * (cpus or 1))


def table(runs: list[dict], cpus: int = 0) -> str:
    head = ("| server | clients | cache | requests | errors | p50 ms | p95 ms | req/s | "
            "mean PNG kB | server CPU s by process | other jobs' CPU s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {r['server']} | {r['clients']} | {r['cache']} | {r['requests']} | {r['errors']} | "
            f"{r['p50_ms']} | {r['p95_ms']} | {r['rps']} | {r['mean_png_kb']} | "
            f"{' / '.join(f'{c:g}' for c in r.get('server_cpu_s', []) if c > 0.005)} | "
            f"{r.get('other_cpu_s')}"
            + (f" ({100 * busy_share(r, cpus):.0f} % of the machine) †"
               if cpus and busy_share(r, cpus) > FOREIGN_LIMIT else "") + " |" for r in runs]
    return "\n".join([head] + rows)


def zoom_table(runs: list[dict], zooms: list[int]) -> str:
    head = ("| server | clients | cache | " + " | ".join(f"z{z} p50 / p95 ms" for z in zooms)
            + " |\n|---|---|---|" + "---|" * len(zooms))
    rows = []
    for r in runs:
        cells = [f"{r['per_zoom'][str(z)]['p50_ms']} / {r['per_zoom'][str(z)]['p95_ms']}"
                 for z in zooms]
        rows.append(f"| {r['server']} | {r['clients']} | {r['cache']} | " + " | ".join(cells) + " |")
    return "\n".join([head] + rows)


def markdown(report: dict) -> str:
    cog, meta = report["cog"], report["meta"]
    zooms = report["tiles"]["zooms"]
    lines = [
        "## Tile server against TiTiler (load benchmark)",
        "",
        f"`{meta['command']}` ({meta['date']}; {meta['cpus']} CPU cores, {meta['cpu']}; "
        f"Python {meta['versions']['python']}, titiler.application "
        f"{meta['versions']['titiler.application']}, rio-tiler {meta['versions']['rio-tiler']}, "
        f"GDAL {meta['versions'].get('gdal')}). Client and servers share the same cores; one server "
        "runs at a time; the COG is in the OS page cache for both.",
        "",
        f"**Data.** `{Path(cog['path']).name}`: {cog['width']}×{cog['height']} px "
        f"{cog['dtype']}, {cog['res_m'][0]:g} m, {cog['crs']}, overviews {cog['overviews']}, "
        f"{cog['bytes'] / 2**20:.1f} MiB, made by `canopy predict` ({cog['how']}). "
        "Heights are the bundled demonstration model's, not a canopy-height product. Command "
        f"(cached under `benchmarks/.cache/`): `{cog['command']}`.",
        "",
        f"**Load.** {meta['workers']} uvicorn worker processes for each server. "
        f"{report['tiles']['total']} distinct 256 px PNG tiles: "
        + ", ".join(f"z{z} ({n})" for z, n in report["tiles"]["per_zoom"].items())
        + f" (native maxzoom {cog['maxzoom']}, 2 and 4 levels up). Each server freshly started per "
        "client count; cold = each tile once, warm = the same tiles again on the same keep-alive "
        "connections (our tile cache is per worker process). Ours: "
        "`/layers/{id}/tiles/{z}/{x}/{y}.png?rescale=0,40`; TiTiler: "
        "`/cog/tiles/WebMercatorQuad/{z}/{x}/{y}.png?url=…&rescale=0,40&colormap_name=viridis`. "
        "p50/p95 over successful requests; req/s = requests / wall time of the pass; any answer "
        "but 200 image/png 256×256 is an error. The last column is the CPU seconds each process "
        "of the server spent in the pass (the uvicorn supervisor is ~0; two busy workers show "
        "the load was spread); \"other jobs\" is CPU time used meanwhile by processes that are "
        "neither the server nor the client (near 0 on a quiet machine).",
        "",
        table(report["runs"], meta["cpus"]),
        "",
    ]
    dirty = [r for r in report["runs"] if busy_share(r, meta["cpus"]) > FOREIGN_LIMIT]
    if dirty:
        lines += [
            f"† Other jobs on the machine took over {100 * FOREIGN_LIMIT:.0f} % of it during "
            f"this pass, and still did after {max(r.get('attempt', 1) for r in dirty) - 1} "
            "rerun(s); the row (and its ratio) is kept but is not comparable with the others.",
            "",
        ]
    lines += [
        "Ours / TiTiler:",
        "",
        "| clients | cache | p50 ratio | p95 ratio | req/s ratio |",
        "|---|---|---|---|---|",
    ]
    dirty_keys = {(r["clients"], r["cache"]) for r in dirty}
    lines += [f"| {r['clients']} | {r['cache']} | {r['p50_ratio']} | {r['p95_ratio']} | "
              f"{r['rps_ratio']}" + (" †" if (r["clients"], r["cache"]) in dirty_keys else "")
              + " |" for r in report["ratios"]]
    lines += ["", "Per zoom:", "", zoom_table(report["runs"], zooms), ""]
    s = report.get("soak")
    if s:
        lines += [
            f"**Memory.** Our server's process tree (summed RSS), freshly started: "
            f"{s['rss_before_mib']:.0f} MiB before, {s['rss_mid_mib']:.0f} MiB at "
            f"{s['requests'] // 2:,}, {s['rss_after_mib']:.0f} MiB after {s['requests']:,} requests "
            f"at {s['clients']} clients over {s['distinct_responses']:,} distinct tiles×rescale "
            f"({s['rps']} req/s, p50 {s['p50_ms']} ms, {s['errors']} errors; other jobs' CPU "
            f"{s['other_cpu_s']} s over {s['wall_s']} s). "
            f"Samples every {s['samples_mib'][1][0] if len(s['samples_mib']) > 1 else 0:,}: "
            + ", ".join(f"{m:.0f}" for _, m in s["samples_mib"]) + " MiB.",
            "",
        ]
    if report.get("render_check"):
        rc = report["render_check"]
        lines += ["**Same picture?** Sample tiles (ours fetched again with `colormap=viridis`) "
                  "decoded from both servers: alpha agreement "
                  + ", ".join(f"{v['alpha_agree_pct']} %" for v in rc.values())
                  + "; share of opaque pixels whose RGB differs by ≤ 8: "
                  + ", ".join(f"{v['rgb_within_8_pct']} %" for v in rc.values()) + ".", ""]
    lines += ["**Targets** (issue 15): ", ""]
    for name, t in report["targets"].items():
        lines.append(f"- {name}: {t['measured']} (target {t['target']}"
                     + (f", {t['at']}" if "at" in t else "") + "): "
                     + ("**met**" if t["met"] else "**not met**"))
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """The markdown section beside the JSON, and the tables on stdout."""
    runs, rat, soak_res = report["runs"], report["ratios"], report.get("soak")
    out.with_suffix(".md").write_text(markdown(report))
    print()
    print(table(runs, report["meta"]["cpus"]))
    print()
    print(zoom_table(runs, report["tiles"]["zooms"]))
    if rat:
        print("\nours / TiTiler:")
        for r in rat:
            print(f"  {r['clients']:2d} clients {r['cache']:4s}: p50 x{r['p50_ratio']}, "
                  f"p95 x{r['p95_ratio']}, req/s x{r['rps_ratio']}")
    if soak_res:
        print(f"\nRSS (ours, summed over processes): {soak_res['rss_before_mib']:.0f} MiB before, "
              f"{soak_res['rss_after_mib']:.0f} MiB after {soak_res['requests']:,} requests; "
              f"samples {[m for _, m in soak_res['samples_mib']]}")
    for name, t in report["targets"].items():
        print(f"target {name}: {t['measured']} ({t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    print(f"\nwrote {out} and {out.with_suffix('.md')} ({report['meta']['seconds']:.0f} s run)")


def render_only(path: Path) -> int:
    """Rewrite the markdown (and the ratios/targets) of an existing results JSON."""
    report = json.loads(path.read_text())
    clients = report["meta"]["clients"]
    ref = 8 if 8 in clients else clients[len(clients) // 2]
    report["ratios"] = ratios(report["runs"])
    report["targets"] = targets(report["runs"], report["ratios"], report.get("soak"), ref)
    path.write_text(json.dumps(report, indent=2) + "\n")
    write_report(report, path)
    return 0


# ----------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes per server")
    ap.add_argument("--clients", type=int, nargs="+", default=None,
                    help="concurrent clients per pass (default 1 8 32; quick: 1 8)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests in our server's RSS soak (default 10000; quick: 400; 0 skips)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; quick: "
                         f"{QUICK_OUT.relative_to(ROOT)}); the markdown goes beside it (.md)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 1 min): ≤ 12 tiles per zoom, clients 1 8, short soak")
    ap.add_argument("--servers", nargs="+", choices=["titiler", "ours"],
                    default=["titiler", "ours"])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                    help="before each server start, wait up to S s for the machine to be under "
                         "15 %% busy (other jobs skew the numbers; default 120, quick: 0 = don't)")
    ap.add_argument("--retries", type=int, default=None,
                    help="run a server's passes again (up to this many times) when other jobs "
                         f"took over {FOREIGN_LIMIT:.0%} of the machine meanwhile (default 2; quick: 0)".replace("%", "%%"))
    ap.add_argument("--prepare-only", action="store_true", help="make the COG and stop")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rewrite the markdown of an existing results JSON")
    args = ap.parse_args(argv)
    if args.render:
        return render_only(args.render)
    clients_list = args.clients or ([1, 8] if args.quick else [1, 8, 32])
    n_soak = args.requests if args.requests is not None else (400 if args.quick else 10_000)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if args.quick else 120.0
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    ref_clients = 8 if 8 in clients_list else clients_list[len(clients_list) // 2]
    t_start = time.perf_counter()

    CACHE.mkdir(parents=True, exist_ok=True)
    cog = ensure_cog(args.data, args.quick)
    log(f"COG {cog['path']}: {cog['width']}x{cog['height']} {cog['dtype']} {cog['crs']} "
        f"res {cog['res_m'][0]:g} m, overviews {cog['overviews']}, zooms "
        f"{cog['minzoom']}-{cog['maxzoom']}")
    if args.prepare_only:
        return 0

    zmax = cog["maxzoom"]
    zooms = [zmax, zmax - 2, zmax - 4]
    fp = footprint_lonlat(Path(cog["path"]))
    rng = random.Random(args.seed)
    per_zoom = {z: tiles_at(fp, z) for z in zooms}
    if args.quick:
        per_zoom = {z: rng.sample(t, min(12, len(t))) for z, t in per_zoom.items()}
    tiles = [t for z in zooms for t in per_zoom[z]]
    warm_tiles = rng.sample(tiles_at(fp, zmax - 1), min(6, len(tiles_at(fp, zmax - 1)))) + \
        tiles_at(fp, zmax - 3)[:2]
    # sample tiles for the picture check: from the middle of each zoom's list (inside the data)
    keep = {per_zoom[z][len(per_zoom[z]) // 2] for z in zooms} | \
        {per_zoom[zmax][len(per_zoom[zmax]) // 3]}
    log("tiles: " + ", ".join(f"z{z}: {len(per_zoom[z])}" for z in zooms)
        + f" ({len(tiles)} distinct); warm-up: {len(warm_tiles)} others")

    # the COG in the OS page cache before either server reads it
    with open(cog["path"], "rb") as f:
        while f.read(1 << 24):
            pass

    servers = make_servers(cog, args.workers, args.servers)
    runs, samples = [], {}
    try:
        for ci, c in enumerate(clients_list):
            order = list(servers) if ci % 2 == 0 else list(reversed(servers))
            cold_order = tiles[:]
            random.Random(args.seed * 1000 + c).shuffle(cold_order)
            warm_order = tiles[:]
            random.Random(args.seed * 1000 + c + 1).shuffle(warm_order)
            for name in order:
                srv = servers[name]
                for attempt in range(1, args.retries + 2):
                    if args.wait_quiet:
                        wait_quiet(args.wait_quiet)
                    start(srv, f"c{c}")
                    log(f"{name} ready in {srv.startup_s:.1f} s on port {srv.port} ({c} clients)")
                    try:
                        warm_up(srv, warm_tiles, args.workers)
                        done = asyncio.run(passes(srv, [("cold", cold_order),
                                                        ("warm", warm_order)],
                                                  c, keep if ci == 0 else ()))
                        if ci == 0 and name == "ours" and "titiler" in servers:
                            # the same sample tiles in TiTiler's colormap, for the picture check
                            res = asyncio.run(run_pass(srv, sorted(keep), 1, keep,
                                                       extra="&colormap=viridis"))
                            samples["ours_viridis"] = res.samples
                    finally:
                        stop(srv)
                    # share of the machine other jobs took during the passes
                    shares = [other / max(1e-9, res.wall * (os.cpu_count() or 1))
                              for _, res, _, other in done]
                    if max(shares) <= FOREIGN_LIMIT or attempt > args.retries:
                        break
                    log(f"  other jobs took {100 * max(shares):.0f} % of the machine during "
                        f"{name}'s passes: discarded, running them again")
                for cache, res, cpu, other in done:
                    if ci == 0 and cache == "cold":
                        samples[name] = res.samples
                    s = summarise(res, zooms)
                    s.update(server=name, clients=c, cache=cache, server_cpu_s=cpu,
                             other_cpu_s=other, attempt=attempt)
                    runs.append(s)
                    log(f"  {name} {cache:4s} {c:2d} clients: p50 {s['p50_ms']} ms, p95 "
                        f"{s['p95_ms']} ms, {s['rps']} req/s, {s['errors']} errors, "
                        f"server CPU s per process {cpu}, other jobs' CPU s {other}")
                    for e in s["error_examples"][:2]:
                        log(f"    error: {e}")
        soak_res = None
        if n_soak > 0 and "ours" in servers:
            pool = [(z, x, y, rs) for z in range(cog["minzoom"], zmax + 1)
                    for (z, x, y) in tiles_at(fp, z) for rs in SOAK_RESCALES]
            random.Random(args.seed + 7).shuffle(pool)
            srv = servers["ours"]
            if args.wait_quiet:
                wait_quiet(args.wait_quiet)
            start(srv, "soak")
            log(f"ours (soak) ready in {srv.startup_s:.1f} s; {n_soak} requests over "
                f"{len(pool)} distinct tile×rescale")
            try:
                warm_up(srv, warm_tiles, args.workers)
                soak_res = soak(srv, pool, n_soak, clients=8, step=max(100, n_soak // 10))
            finally:
                stop(srv)
    finally:
        for srv in servers.values():
            stop(srv)

    sample_dir = CACHE / "samples"
    sample_dir.mkdir(exist_ok=True)
    for name, d in samples.items():
        for (z, x, y), body in d.items():
            (sample_dir / f"{name}_{z}_{x}_{y}.png").write_bytes(body)
    render = compare_samples(samples["ours_viridis"], samples["titiler"]) \
        if {"ours_viridis", "titiler"} <= samples.keys() else None

    rat = ratios(runs)
    from canopy.model.auto import cpu_name

    report = {
        "meta": {
            "command": "python benchmarks/serve_vs_titiler.py "
                       + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "cpus": os.cpu_count(), "cpu": cpu_name(),
            "workers": args.workers, "clients": clients_list, "quick": args.quick,
            "versions": versions(), "seconds": round(time.perf_counter() - t_start, 1),
            "note": "client and servers share the machine's cores; one server runs at a time",
            "server_commands": {n: " ".join(s.cmd).replace("{PORT}", "P")
                                for n, s in servers.items()},
        },
        "cog": cog,
        "tiles": {"zooms": zooms, "per_zoom": {str(z): len(per_zoom[z]) for z in zooms},
                  "total": len(tiles), "warm_up": len(warm_tiles)},
        "runs": runs, "ratios": rat, "soak": soak_res, "render_check": render,
        "targets": targets(runs, rat, soak_res, ref_clients),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    write_report(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
