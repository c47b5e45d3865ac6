"""A STAC API and a range-capable file server on 127.0.0.1, for tests without the internet.

Run by tests/test_stac_remote.py as ``uvicorn tests.stac_fixture_server:app``. Environment:
``STAC_FIXTURE_DIR`` (COGs and ``items.json``: a list of STAC Items whose asset hrefs name
``{base}/files/<file>``, ``{base}`` filled in with the server's own address) and
``STAC_FIXTURE_BASE``. Fault injection at run time: ``POST /admin/faults`` with
``{"rate": 0.3, "drop": 0.1, "slow": 0.1, "seed": 1}`` answers those shares of file requests
with a 503, a body cut off after a few bytes (the connection dropped mid-transfer) and a 2 s
stall (seeded); ``GET /admin/stats`` counts requests, faults and the bytes of file bodies sent.
"""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from shapely.geometry import box, shape

def start(data: Path, port: int, log=None):
    """This server as a uvicorn process on 127.0.0.1:``port`` serving ``data``, once it answers;
    returns the process (terminate it when done)."""
    import subprocess
    import sys
    import time

    import httpx

    base = f"http://127.0.0.1:{port}"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.stac_fixture_server:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"], cwd=root, stdout=log,
        stderr=subprocess.STDOUT if log else None,
        env={**os.environ, "STAC_FIXTURE_DIR": str(data), "STAC_FIXTURE_BASE": base})
    for _ in range(100):
        try:
            if httpx.get(base + "/", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the STAC fixture server did not start")


DATA = Path(os.environ.get("STAC_FIXTURE_DIR", "."))
BASE = os.environ.get("STAC_FIXTURE_BASE", "http://127.0.0.1")
app = FastAPI()
_state = {"rate": 0.0, "drop": 0.0, "slow": 0.0, "ranges_off": False, "rng": random.Random(0), "requests": 0,
          "faults": 0, "drops": 0, "stalls": 0, "bytes": 0, "ranges": 0}
_lock = threading.Lock()


def _items() -> list[dict]:
    text = (DATA / "items.json").read_text().replace("{base}", BASE)
    return json.loads(text)


@app.get("/")
def landing():
    return {"type": "Catalog", "id": "fixture", "stac_version": "1.0.0",
            "description": "test STAC API",
            "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                           "https://api.stacspec.org/v1.0.0/item-search"],
            "links": [{"rel": "self", "href": BASE + "/", "type": "application/json"},
                      {"rel": "root", "href": BASE + "/", "type": "application/json"},
                      {"rel": "search", "href": BASE + "/search", "type": "application/geo+json",
                       "method": "GET"},
                      {"rel": "search", "href": BASE + "/search", "type": "application/geo+json",
                       "method": "POST"}]}


@app.get("/conformance")
def conformance():
    return {"conformsTo": landing()["conformsTo"]}


def _search(bbox=None, collections=None, ids=None, **_):
    out = []
    for item in _items():
        if collections and item.get("collection") not in collections:
            continue
        if ids and item["id"] not in ids:
            continue
        if bbox and not shape(item["geometry"]).intersects(box(*[float(v) for v in bbox])):
            continue
        out.append(item)
    return JSONResponse({"type": "FeatureCollection", "features": out, "links": [],
                         "numberReturned": len(out)}, media_type="application/geo+json")


@app.get("/search")
def search_get(request: Request):
    q = request.query_params
    return _search(bbox=q["bbox"].split(",") if "bbox" in q else None,
                   collections=q["collections"].split(",") if "collections" in q else None,
                   ids=q["ids"].split(",") if "ids" in q else None)


@app.post("/search")
async def search_post(request: Request):
    return _search(**(await request.json()))


@app.post("/admin/faults")
async def faults(request: Request):
    body = await request.json()
    with _lock:
        for key in ("rate", "drop", "slow"):
            _state[key] = float(body.get(key, 0))
        _state["ranges_off"] = bool(body.get("ranges_off", False))
        _state["rng"] = random.Random(int(body.get("seed", 0)))
    return {k: _state[k] for k in ("rate", "drop", "slow")}


@app.get("/admin/stats")
def stats():
    return {k: v for k, v in _state.items() if k != "rng"}


@app.api_route("/files/{name}", methods=["GET", "HEAD"])
def files(name: str, request: Request):
    import time

    from fastapi.responses import StreamingResponse

    path = DATA / Path(name).name
    with _lock:
        _state["requests"] += 1
        u = _state["rng"].random()
        fault = u < _state["rate"]
        drop = not fault and u < _state["rate"] + _state["drop"] and request.method == "GET"
        slow = not fault and not drop and u < _state["rate"] + _state["drop"] + _state["slow"]
        _state["faults"] += fault
        _state["drops"] += drop
        _state["stalls"] += slow
    if fault:
        return Response(status_code=503)
    if slow:
        time.sleep(2.0)
    if drop and path.is_file():
        # the right status and headers for what was asked, then the body stops short
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = request.headers.get("range")
        if rng:
            first, _, last = rng.split("=")[1].split(",")[0].partition("-")
            start, end, status = int(first or 0), min(int(last or size - 1), size - 1), 206
        headers = {"content-length": str(end - start + 1), "accept-ranges": "bytes"}
        if status == 206:
            headers["content-range"] = f"bytes {start}-{end}/{size}"

        def cut():
            with open(path, "rb") as f:
                f.seek(start)
                yield f.read(min(7, end - start + 1))
            raise ConnectionAbortedError("fault injection: the connection is dropped mid-body")

        return StreamingResponse(cut(), status_code=status, headers=headers)
    if not path.is_file():
        return Response(status_code=404)
    if _state["ranges_off"]:  # a server that only sends whole files
        body = b"" if request.method == "HEAD" else path.read_bytes()
        return Response(body, media_type="image/tiff",
                        headers={"content-length": str(path.stat().st_size)})
    resp = FileResponse(path)
    if request.method == "GET":
        rng = request.headers.get("range")
        with _lock:
            if rng:
                _state["ranges"] += 1
                start, _, end = rng.split("=")[1].split(",")[0].partition("-")
                size = path.stat().st_size
                end = int(end) if end else size - 1
                _state["bytes"] += min(end, size - 1) - int(start or 0) + 1
            else:
                _state["bytes"] += path.stat().st_size
    return resp
