"""Prediction jobs: ``canopy predict --aoi`` runs submitted over HTTP, kept in SQLite, run by the
server's worker processes on a Dask cluster, and served as a layer when done.

Invariant: a job that was accepted is never lost. Its row is committed before the 201 goes out;
a running job's owner writes a heartbeat every few seconds; any server process (the same one
restarted, or another worker) takes over a ``running`` job whose heartbeat is older than
``job_stale_s`` and runs it again, and the engine's manifest makes that a resume, not a rerun
(finished cells are kept). Claiming is one ``UPDATE`` inside an immediate transaction, so two
processes never run the same job. Cancelling sets a flag the job's progress callback reads;
the engine then stops between cells and the job ends ``cancelled``.

States: ``queued`` → ``running`` → ``done`` | ``failed`` | ``cancelled``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import shapely

from services.config import ServiceConfig
from services.errors import BadRequest, TooLarge, TooMany

log = logging.getLogger("canopy.services.jobs")

DB_NAME = "jobs.sqlite"
ACTIVE = ("queued", "running")
MAX_ATTEMPTS = 3
PRECISIONS = ("auto", "fp32", "bf16", "int8")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    heartbeat REAL, owner TEXT, attempts INTEGER NOT NULL DEFAULT 0, cancel INTEGER NOT NULL DEFAULT 0,
    request TEXT NOT NULL, progress TEXT, error TEXT, out_dir TEXT NOT NULL, layer_id TEXT
)
"""


class JobCancelled(Exception):
    pass


class JobStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / DB_NAME
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def insert(self, request: dict, out_dir: Path, job_id: str, max_active: int) -> dict:
        """Queue a job unless ``max_active`` are queued or running (counted and inserted in one
        immediate transaction: concurrent requests, in any worker process, cannot both pass)."""
        now = time.time()
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            active = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')"
                                ).fetchone()[0]
            if active >= max_active:
                db.execute("ROLLBACK")
                raise TooMany(f"{max_active} jobs are queued or running; try again when one has "
                              "finished")
            db.execute("INSERT INTO jobs (id, state, created, updated, request, out_dir) "
                       "VALUES (?, 'queued', ?, ?, ?, ?)",
                       (job_id, now, now, json.dumps(request), str(out_dir)))
            db.execute("COMMIT")
        except sqlite3.Error:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()
        return self.get(job_id)

    def get(self, job_id: str) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _public(row) if row else None

    def all(self) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created").fetchall()
        return [_public(r) for r in rows]

    def claim(self, owner: str, stale_s: float) -> dict | None:
        """Take the oldest queued job, or a running one whose owner stopped beating."""
        now = time.time()
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            # a dead owner's job that was being cancelled is cancelled now
            db.execute("UPDATE jobs SET state='cancelled', updated=? WHERE state='running' AND "
                       "cancel=1 AND heartbeat < ?", (now, now - stale_s))
            # a job that took its server down this many times is not tried again
            db.execute("UPDATE jobs SET state='failed', updated=?, error=? WHERE state='running' "
                       "AND heartbeat < ? AND attempts >= ?",
                       (now, f"stopped {MAX_ATTEMPTS} times without finishing (the server or its "
                             "workers died each time); see the server log", now - stale_s,
                        MAX_ATTEMPTS))
            row = db.execute(
                "SELECT id FROM jobs WHERE state='queued' OR (state='running' AND heartbeat < ?) "
                "ORDER BY created LIMIT 1", (now - stale_s,)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute("UPDATE jobs SET state='running', owner=?, heartbeat=?, updated=?, "
                       "attempts=attempts+1 WHERE id=?", (owner, now, now, row["id"]))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()
        return self.get_raw(row["id"])

    def get_raw(self, job_id: str) -> dict:
        with self._db() as db:
            return dict(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def beat(self, job_id: str, owner: str, progress: dict | None = None) -> bool:
        """Heartbeat (and progress); returns whether the job should stop: a cancel was asked, or
        another process has taken the job over (this owner's heartbeat was missed)."""
        now = time.time()
        with self._db() as db:
            if progress is None:
                cur = db.execute("UPDATE jobs SET heartbeat=? WHERE id=? AND owner=? AND "
                                 "state='running'", (now, job_id, owner))
            else:
                cur = db.execute("UPDATE jobs SET heartbeat=?, updated=?, progress=? WHERE id=? "
                                 "AND owner=? AND state='running'",
                                 (now, now, json.dumps(progress), job_id, owner))
            if cur.rowcount == 0:
                return True
            row = db.execute("SELECT cancel FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row["cancel"])

    def finish(self, job_id: str, owner: str, state: str, error: str | None = None,
               layer_id: str | None = None) -> None:
        with self._db() as db:
            db.execute("UPDATE jobs SET state=?, error=?, layer_id=?, updated=? WHERE id=? AND owner=?",
                       (state, error, layer_id, time.time(), job_id, owner))

    def cancel(self, job_id: str) -> dict | None:
        now = time.time()
        with self._db() as db:
            db.execute("UPDATE jobs SET cancel=1, updated=? WHERE id=?", (now, job_id))
            db.execute("UPDATE jobs SET state='cancelled' WHERE id=? AND state='queued'", (job_id,))
        return self.get(job_id)


def _public(row: sqlite3.Row) -> dict:
    request = json.loads(row["request"])
    request.pop("aoi_wkt", None)
    return {"id": row["id"], "state": row["state"], "created": row["created"],
            "updated": row["updated"], "attempts": row["attempts"],
            "cancel_requested": bool(row["cancel"]), "request": request,
            "progress": json.loads(row["progress"]) if row["progress"] else None,
            "error": row["error"], "layer_id": row["layer_id"]}


# ---------------------------------------------------------------------------------- submitting


def prepare(config: ServiceConfig, body: dict, store: JobStore) -> tuple[dict, str]:
    """Check a job request against the allow-lists and limits; (request, job id) to store."""
    from data_catalog.aoi import resolve_aoi
    from services.geojson import parse_polygons

    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with 'aoi' and 'imagery'", field="body")
    unknown = sorted(set(body) - {"aoi", "imagery", "model", "precision", "cell_size", "name"})
    if unknown:
        raise BadRequest(f"unknown job fields: {unknown}", field=unknown[0])
    imagery = body.get("imagery")
    if imagery not in config.imagery:
        raise BadRequest(f"imagery must be one of {sorted(config.imagery)} (the server's "
                         f"allow-list), got {imagery!r}", field="imagery")
    model = body.get("model", "default")
    if model not in config.models:
        raise BadRequest(f"model must be one of {sorted(config.models)}, got {model!r}",
                         field="model")
    precision = body.get("precision", "auto")
    if precision not in PRECISIONS:
        raise BadRequest(f"precision must be one of {list(PRECISIONS)}", field="precision")
    cell_size = body.get("cell_size", 4096)
    if not isinstance(cell_size, int) or isinstance(cell_size, bool) or not 64 <= cell_size <= 16384:
        raise BadRequest("cell_size must be an integer from 64 to 16384 px", field="cell_size")
    aoi = body.get("aoi")
    if isinstance(aoi, str):
        # a place name, WKT or bbox; never a path (files=False): clients do not name files
        area = resolve_aoi(aoi, files=False)
        geom, area_km2 = area.geometry, area.area_km2()
    elif isinstance(aoi, dict):
        feats = parse_polygons(aoi, config.limits)
        geom = shapely.union_all([f.geometry for f in feats])
        area_km2 = sum(f.area_km2 for f in feats)
    else:
        raise BadRequest("aoi must be a GeoJSON polygon/feature or a place name", field="aoi")
    if area_km2 > config.limits.max_job_km2:
        raise TooLarge(f"the AOI covers {area_km2:,.0f} km²; at most "
                       f"{config.limits.max_job_km2:,.0f} km² per job", field="aoi")
    _check_imagery(config.imagery[imagery], geom, imagery)
    job_id = uuid.uuid4().hex[:16]
    request = {"aoi": aoi if isinstance(aoi, str) else "geojson", "aoi_wkt": geom.wkt,
               "area_km2": round(area_km2, 6), "imagery": imagery, "model": model,
               "precision": precision, "cell_size": cell_size, "name": body.get("name")}
    return request, job_id


_FOOTPRINTS: dict = {}


def _check_imagery(path: str, geom, name: str) -> None:
    """422 now, not a failed job later: the AOI must meet the imagery."""
    from canopy.predict.sources import index_imagery
    from data_catalog.stac_remote import is_stac_search

    if is_stac_search(path):  # a search answers for this AOI only: no cache
        scenes, _ = index_imagery(path, skip_bad=True, aoi=geom)
        return
    key = (path, os.stat(path).st_mtime if os.path.exists(path) else None)
    if key not in _FOOTPRINTS:
        scenes, _ = index_imagery(path, skip_bad=True)
        _FOOTPRINTS[key] = shapely.union_all([s.footprint for s in scenes]) if scenes else None
    cover = _FOOTPRINTS[key]
    if cover is None or not geom.intersects(cover):
        raise BadRequest(f"the AOI does not meet any scene of imagery '{name}'", field="aoi")


# ---------------------------------------------------------------------------------- running


class JobRunner:
    """One thread per server process that claims and runs jobs one at a time."""

    def __init__(self, config: ServiceConfig, store: JobStore, on_done=None):
        self.config = config
        self.store = store
        self.on_done = on_done
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="canopy-jobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        poll = min(1.0, self.config.job_stale_s / 4)
        while not self._stop.is_set():
            try:
                job = self.store.claim(self.owner, self.config.job_stale_s)
            except sqlite3.Error:
                log.exception("claiming a job failed")
                job = None
            if job is None:
                self._stop.wait(poll)
                continue
            self._run(job)

    def _run(self, job: dict) -> None:
        from canopy.errors import USER_ERRORS
        from canopy.predict.engine import predict_aoi
        from canopy.predict.options import PredictOptions

        job_id, req = job["id"], json.loads(job["request"])
        stop_beat = threading.Event()
        interval = max(0.2, self.config.job_stale_s / 4)

        def beat():
            while not stop_beat.wait(interval):
                try:
                    self.store.beat(job_id, self.owner)
                except sqlite3.Error:  # a busy or briefly unreadable database: try next time
                    log.warning("job %s: heartbeat not written", job_id, exc_info=True)

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        last = [0.0]

        def progress(event):
            now = time.time()
            if now - last[0] < 0.5 and event.message is None and event.done != event.total:
                return
            last[0] = now
            info = {"unit": event.unit, "done": event.done, "total": event.total}
            if event.message:
                info["message"] = event.message
            if self.store.beat(job_id, self.owner, info):
                raise JobCancelled()

        try:
            if self.store.beat(job_id, self.owner):
                raise JobCancelled()
            opts = PredictOptions(precision=req["precision"])
            summary = predict_aoi(
                shapely.from_wkt(req["aoi_wkt"]), self.config.imagery[req["imagery"]],
                job["out_dir"], self.config.models[req["model"]], opts,
                cell_px=req["cell_size"], scheduler=self.config.scheduler,
                workers=self.config.job_workers, progress=progress)
            layer_id = self.on_done(Path(job["out_dir"])) if self.on_done else None
            self.store.finish(job_id, self.owner, "done", layer_id=layer_id,
                              error=None if summary.mosaic else "no cell had imagery")
        except JobCancelled:
            self.store.finish(job_id, self.owner, "cancelled")
        except USER_ERRORS as exc:
            self.store.finish(job_id, self.owner, "failed", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a job must end in a state, whatever broke
            log.exception("job %s failed", job_id)
            self.store.finish(job_id, self.owner, "failed",
                              error=f"internal error ({type(exc).__name__}); see the server log")
        finally:
            stop_beat.set()
