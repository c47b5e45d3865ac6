"""The server's one typed configuration: what it serves, who may write, and every limit.

Read by the project's strict reader (:func:`ssl_backbone.config.from_dict`): an unknown key or a
wrong type is refused naming the field, and ``format_version`` guards against a file written by
a newer server. ``canopy serve`` builds it from a YAML/JSON file and its flags, then hands it to
each worker process as JSON in ``CANOPY_SERVE_CONFIG`` (uvicorn starts workers by import string,
so a config object cannot be passed to them directly).

Clients never name a path or a URL: layers are found under ``layers_dir`` and named by id,
imagery and models for jobs come from the allow-lists ``imagery`` and ``models`` (name → path).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ssl_backbone.config import from_dict, to_dict

ENV_VAR = "CANOPY_SERVE_CONFIG"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Limits:
    """Request limits; each breach is a 413 (sizes) or a 429 (concurrent jobs) with a JSON error."""

    max_body_bytes: int = 2_000_000
    max_vertices: int = 20_000
    max_features: int = 100
    max_statistics_km2: float = 200.0  # per request; ≈ 0.56 Gpx at 0.6 m, some seconds
    max_export_pixels: int = 64_000_000  # 8000 × 8000
    max_concurrent_jobs: int = 2
    max_job_km2: float = 500_000.0


@dataclass(frozen=True)
class ServiceConfig:
    layers_dir: str = "."
    #: keys accepted in the ``X-API-Key`` header; writes (jobs, cancel, export) need one
    api_keys: tuple[str, ...] = ()
    #: read endpoints (layers, tiles, point, statistics) without a key
    public_read: bool = True
    cors_origins: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    #: rendered tiles kept in memory per worker process (bounded LRU)
    tile_cache_mb: int = 256
    #: GDAL's block cache per worker process (GDAL's own default is 5 % of the machine's memory
    #: per process, which N workers multiply)
    gdal_cache_mb: int = 64
    #: threads per worker process that serve requests (reads, rendering, statistics): each
    #: keeps its own open datasets, so more threads mean more memory and more GIL contention
    #: for CPU-bound tiles (anyio's default is 40)
    threads: int = 8
    #: job inputs: imagery name → folder/raster/catalog, model name → checkpoint or model name
    imagery: dict = field(default_factory=dict)
    models: dict = field(default_factory=lambda: {"default": "default"})
    #: dask scheduler for jobs (``tcp://host:8786``); none: a local cluster per job
    scheduler: str | None = None
    job_workers: int = 1
    #: where jobs write their runs (default ``layers_dir/jobs``) and the job database
    jobs_dir: str | None = None
    #: a running job's heartbeat older than this is a dead server's job: it is taken over
    job_stale_s: float = 30.0
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict) -> "ServiceConfig":
        return from_dict(cls, d, what="server config")

    def to_dict(self) -> dict:
        return to_dict(self)

    @property
    def jobs_path(self) -> Path:
        return Path(self.jobs_dir) if self.jobs_dir else Path(self.layers_dir) / "jobs"

    def with_changes(self, **changes) -> "ServiceConfig":
        return replace(self, **changes)


def load_config_file(path: str | os.PathLike) -> dict:
    """The mapping in a YAML or JSON file (the reader of :class:`ServiceConfig` checks it)."""
    import yaml

    text = Path(path).read_text()
    data = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else json.loads(text)
    return data or {}


def from_environment() -> ServiceConfig:
    text = os.environ.get(ENV_VAR)
    return ServiceConfig.from_dict(json.loads(text)) if text else ServiceConfig()
