"""Prediction jobs: submitted over HTTP, run on a Dask cluster by the server, never lost — a
server killed (SIGKILL, its whole process group) mid-job and started again finds the job, resumes
it, and serves its map as a layer."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from tests.conftest import shared
from tests.services.conftest import API_KEY, free_port, start_server, stop_server

OSBS_AOI = "-81.9900,29.6924,-81.9897,29.69265"


@pytest.fixture
def job_server_args(tmp_path):
    imagery = tmp_path / "imagery"
    imagery.mkdir()
    shutil.copy(shared("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.tif"), imagery)
    layers = tmp_path / "layers"
    layers.mkdir()
    (tmp_path / "serve.yaml").write_text(
        "job_stale_s: 3\nlimits:\n  max_concurrent_jobs: 1\n"
        f"imagery:\n  osbs: {imagery}\nmodels:\n  micro: micro\n")
    return layers, ["--config", str(tmp_path / "serve.yaml")]


def _wait(c, job_id, states, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.get(f"/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}")


def test_a_job_survives_a_killed_server_and_becomes_a_layer(job_server_args):
    layers, args = job_server_args
    port = free_port()
    server = start_server(layers, *args, port=port)
    key = {"X-API-Key": API_KEY}
    try:
        with server.client() as c:
            body = {"aoi": OSBS_AOI, "imagery": "osbs", "model": "micro", "precision": "fp32",
                    "cell_size": 64, "name": "osbs plot"}
            assert c.post("/jobs", json=body).status_code == 401
            r = c.post("/jobs", json=body, headers=key)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            assert r.json()["state"] == "queued"
            # one job at a time on this server: the next one waits its turn with a 429
            busy = c.post("/jobs", json=body, headers=key)
            assert busy.status_code == 429 and "jobs" in busy.json()["error"]
            _wait(c, job_id, ("running", "done"), timeout=60)
    finally:
        stop_server(server, signal.SIGKILL)  # no shutdown hook runs: the job stays "running"
    assert server.process.returncode == -signal.SIGKILL

    server = start_server(layers, *args, port=port)
    try:
        with server.client() as c:
            job = _wait(c, job_id, ("done", "failed", "cancelled"))
            assert job["state"] == "done", job
            assert job["attempts"] >= 2  # taken over after the kill, not started anew by hand
            assert job["progress"]["unit"] == "cells"
            layer = c.get(f"/layers/{job['layer_id']}").json()
            assert layer["kind"] == "run" and layer["model"]["name"] == "micro"
            w, s, e, n = layer["bounds"]
            p = c.get(f"/layers/{job['layer_id']}/point", params={"lon": (w + e) / 2, "lat": (s + n) / 2})
            assert p.status_code == 200 and p.json()["height"] is not None
            assert [j["id"] for j in c.get("/jobs").json()["jobs"]] == [job_id]
    finally:
        stop_server(server)


def test_job_requests_are_checked_before_they_are_queued(job_server_args):
    layers, args = job_server_args
    server = start_server(layers, *args)
    key = {"X-API-Key": API_KEY}
    try:
        with server.client() as c:
            def post(**fields):
                body = {"aoi": OSBS_AOI, "imagery": "osbs", "model": "micro", **fields}
                return c.post("/jobs", json={k: v for k, v in body.items() if v is not None},
                              headers=key)

            r = post(aoi="10,10,10.001,10.001")
            assert r.status_code == 422 and "does not meet any scene" in r.json()["error"]
            r = post(imagery="/etc")
            assert r.status_code == 422 and r.json()["field"] == "imagery"
            r = post(model="../../weights.pth")
            assert r.status_code == 422 and r.json()["field"] == "model"
            for path in ("/etc/passwd", "~/.bashrc", "../secret.geojson", "aoi.gpkg"):
                r = post(aoi=path)  # a client never makes the server open a file
                assert r.status_code == 422 and "files cannot be named" in r.json()["error"], path
            r = post(aoi="Atlantis")
            assert r.status_code == 422 and "Atlantis" in r.json()["error"]
            r = post(aoi="California")
            assert r.status_code == 422  # no OSBS imagery there
            r = post(cell_size=10)
            assert r.status_code == 422 and r.json()["field"] == "cell_size"
            r = post(url="http://example.org")
            assert r.status_code == 422 and r.json()["field"] == "url"
            assert c.get("/jobs").json()["jobs"] == []  # nothing half-queued
            assert c.get("/jobs/0123456789abcdef").status_code == 404
            assert c.delete("/jobs/0123456789abcdef", headers=key).status_code == 404
    finally:
        stop_server(server)


def test_a_cancelled_job_stops(job_server_args):
    layers, args = job_server_args
    server = start_server(layers, *args)
    key = {"X-API-Key": API_KEY}
    try:
        with server.client() as c:
            r = c.post("/jobs", json={"aoi": OSBS_AOI, "imagery": "osbs", "model": "micro",
                                      "precision": "fp32", "cell_size": 64}, headers=key)
            job_id = r.json()["id"]
            assert c.delete(f"/jobs/{job_id}").status_code == 401
            d = c.delete(f"/jobs/{job_id}", headers=key)
            assert d.status_code == 200 and d.json()["cancel_requested"]
            job = _wait(c, job_id, ("done", "failed", "cancelled"), timeout=120)
            assert job["state"] == "cancelled", job
            assert job["layer_id"] is None
    finally:
        stop_server(server)
    assert not os.path.exists(layers / "jobs" / job_id / "summary.json")


def test_a_job_over_imagery_from_a_stac_api(tmp_path):
    """The server's imagery allow-list may name a STAC search: a job maps from COGs read over
    HTTP, and its map is served."""
    import json

    from tests.stac_fixture_server import start
    from tests.test_stac_remote import _cogs, _item

    data = tmp_path / "served"
    cogs = _cogs(data)
    (data / "items.json").write_text(json.dumps([_item(p) for p in cogs]))
    stac_port = free_port()
    stac = start(data, stac_port)
    layers = tmp_path / "layers"
    layers.mkdir()
    (tmp_path / "serve.yaml").write_text(
        f"imagery:\n  osbs: 'stac+http://127.0.0.1:{stac_port}/?collections=osbs'\n"
        "models:\n  micro: micro\n")
    server = start_server(layers, "--config", str(tmp_path / "serve.yaml"))
    try:
        with server.client() as c:
            r = c.post("/jobs", json={"aoi": OSBS_AOI, "imagery": "osbs", "model": "micro",
                                      "precision": "fp32", "cell_size": 64},
                       headers={"X-API-Key": API_KEY})
            assert r.status_code == 201, r.text
            job = _wait(c, r.json()["id"], ("done", "failed", "cancelled"))
            assert job["state"] == "done", job
            layer = c.get(f"/layers/{job['layer_id']}").json()
            assert layer["kind"] == "run"
            records = [json.loads(line) for line in
                       (layers / "jobs" / job["id"] / "manifest.jsonl").read_text().splitlines()]
            used = {i for r in records for i in r.get("items", [])}
            assert used and used <= {"osbs_west", "osbs_east"}  # made from the STAC items
            far = c.post("/jobs", json={"aoi": "10,10,10.001,10.001", "imagery": "osbs",
                                        "model": "micro"}, headers={"X-API-Key": API_KEY})
            assert far.status_code == 422 and "no items" in far.json()["error"]
    finally:
        stop_server(server)
        stac.terminate()
        stac.wait(10)
