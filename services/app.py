"""The FastAPI application: layers, tiles, WMTS, point and zonal statistics, exports, jobs, the
web map, health and metrics. :func:`create_app` builds it from a :class:`ServiceConfig`;
``canopy serve`` runs it under uvicorn (``python -m services``).

One handler turns every error into ``{"error": ..., "field": ...}`` with a 4xx status: the
server's own (:mod:`services.errors`), request validation, and canopy's/data_catalog's user
errors; anything else is a 500 whose body says only "internal error" (the trace goes to the log).
"""

from __future__ import annotations

import contextlib

import logging
import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

import canopy
from services import tiles as tiles_mod
from services.config import ServiceConfig
from services.errors import BadRequest, Forbidden, NotFound, ServiceError
from services.layers import ID_PATTERN, Layer, LayerRegistry

log = logging.getLogger("canopy.services")
STATIC = Path(__file__).with_name("static")
API_KEY_HEADER = "X-API-Key"
CACHE_CONTROL = "public, max-age=3600"


class ImageFormat(str, Enum):
    png = "png"
    webp = "webp"


class ExportFormat(str, Enum):
    zip = "zip"
    tif = "tif"


LayerId = Annotated[str, PathParam(pattern=f"^{ID_PATTERN}$", description="a layer id from GET /layers")]
Zoom = Annotated[int, PathParam(ge=0, le=tiles_mod.MAX_ZOOM)]
TileIndex = Annotated[int, PathParam(ge=0, le=(1 << tiles_mod.MAX_ZOOM) - 1)]
ColormapQ = Annotated[str, Query(max_length=64, description="colormap: canopy (default) or a "
                                 "matplotlib name (viridis, greens, …)")]
RescaleQ = Annotated[str | None, Query(max_length=64, description="min,max in metres (default 0,40)")]
GeoJSONBody = Annotated[dict[str, Any], Body(description="GeoJSON Polygon, MultiPolygon, Feature or FeatureCollection (lon/lat)")]


class ErrorBody(BaseModel):
    """Every error: what is wrong, and the input at fault when there is one."""

    error: str
    field: str | None = None


ERROR_RESPONSES = {code: {"model": ErrorBody, "description": what} for code, what in (
    (400, "malformed request"), (401, "an API key is required"), (403, "not allowed here"),
    (404, "no such layer, job or route"), (405, "method not allowed"),
    (413, "over a size limit (body, vertices, area, export)"),
    (422, "a parameter or body the server cannot use"), (429, "too many jobs at once"),
    (500, "internal error (no details are given)"))}


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


def create_app(config: ServiceConfig | None = None, *, run_jobs: bool = True) -> FastAPI:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    config = config or ServiceConfig()
    # before this process's first GDAL read; an operator's own setting wins
    os.environ.setdefault("GDAL_CACHEMAX", str(config.gdal_cache_mb))
    registry = LayerRegistry(config.layers_dir)
    cache = tiles_mod.TileCache(config.tile_cache_mb * 1024 * 1024)
    metrics = CollectorRegistry()
    requests_total = Counter("canopy_http_requests_total", "HTTP requests", ["route", "status"],
                             registry=metrics)
    latency = Histogram("canopy_http_request_seconds", "request latency", ["route"],
                        registry=metrics, buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10))
    tile_cache_hits = Counter("canopy_tile_cache_hits_total", "rendered tiles served from the cache",
                              registry=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        """Startup and shutdown (FastAPI's lifespan; its on_event hooks are deprecated): the
        worker-thread limit, stale export folders removed, then the job runner, stopped when
        the server stops."""
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = config.threads
        from services.stats import sweep_stale_exports

        sweep_stale_exports()  # what a killed server left between writing and sending
        if run_jobs and config.imagery:
            app.state.runner.start()
        try:
            yield
        finally:
            app.state.runner.stop()

    app = FastAPI(title="canopy-height server", version=canopy.__version__, responses=ERROR_RESPONSES,
                  lifespan=lifespan,
                  description="Canopy-height maps made by `canopy predict`: tiles, statistics, "
                              "exports and prediction jobs. Layers are named by id only.")
    app.state.config, app.state.layers, app.state.cache = config, registry, cache

    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=[API_KEY_HEADER, "Content-Type"])

    # ------------------------------------------------------------------ errors and middleware

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return _error(exc.status, str(exc), exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")]
        field = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return JSONResponse({"error": f"{field}: {msg}" if field else msg, "field": field},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    from canopy.errors import USER_ERRORS

    for err in USER_ERRORS:
        @app.exception_handler(err)
        async def _user_error(request: Request, exc: Exception):
            return _error(422, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                          getattr(exc, "field", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal error")

    @app.middleware("http")
    async def _limits_and_metrics(request: Request, call_next):
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > config.limits.max_body_bytes
            except ValueError:
                return _error(400, "bad Content-Length header")
            if too_big:
                return _error(413, f"the body is {int(length):,} bytes; at most "
                                   f"{config.limits.max_body_bytes:,}", "body")
        elif request.method in ("POST", "PUT", "PATCH"):
            # chunked: counted as it arrives, and refused at the limit, not after reading it all
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > config.limits.max_body_bytes:
                    return _error(413, f"the body is over {config.limits.max_body_bytes:,} bytes",
                                  "body")
                chunks.append(chunk)
            request._body = b"".join(chunks)  # what the endpoint reads (Starlette's body cache)
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - never a trace to a client
            log.exception("unhandled error on %s", request.url.path)
            response = _error(500, "internal error")
        route = request.scope.get("route")
        name = getattr(route, "path", "other")
        requests_total.labels(name, str(response.status_code)).inc()
        latency.labels(name).observe(time.perf_counter() - t0)
        return response

    def require_key(request: Request, *, write: bool) -> None:
        if not write and config.public_read:
            return
        if not config.api_keys:
            raise Forbidden("this server has no API keys configured; writes are disabled"
                            if write else "this server has no API keys configured")
        key = request.headers.get(API_KEY_HEADER)
        if key is None or key not in config.api_keys:
            raise ServiceError(f"a valid {API_KEY_HEADER} header is required", status=401)

    def layer_or_404(request: Request, layer_id: str) -> Layer:
        require_key(request, write=False)
        layer = registry.get(layer_id)
        if layer is None:
            raise NotFound(f"no layer '{layer_id}' (GET /layers lists them)", field="layer_id")
        return layer

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    # ------------------------------------------------------------------ layers

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        return {"status": "ok", "version": canopy.__version__}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def metrics_endpoint():
        return Response(generate_latest(metrics), media_type="text/plain; version=0.0.4")

    @app.get("/layers", tags=["layers"])
    def list_layers(request: Request) -> dict:
        require_key(request, write=False)
        return {"layers": [layer.info() for layer in registry.all()]}

    @app.get("/layers/{layer_id}", tags=["layers"])
    def get_layer(request: Request, layer_id: LayerId) -> dict:
        layer = layer_or_404(request, layer_id)
        info = layer.info()
        url = base_url(request)
        info["links"] = {"tilejson": f"{url}/layers/{layer.id}/tilejson.json",
                         "wmts": f"{url}/layers/{layer.id}/WMTSCapabilities.xml",
                         "tiles": f"{url}/layers/{layer.id}/tiles/{{z}}/{{x}}/{{y}}.png"}
        return info

    @app.get("/colormaps", tags=["tiles"])
    def list_colormaps() -> dict:
        return {"colormaps": tiles_mod.colormap_names()}

    @app.get("/colormaps/{name}", tags=["tiles"])
    def get_colormap(name: Annotated[str, PathParam(max_length=64)], rescale: RescaleQ = None) -> dict:
        lo, hi = tiles_mod.parse_rescale(rescale)
        return {"name": name, "units": "m", "stops": tiles_mod.legend(name, lo, hi)}

    # ------------------------------------------------------------------ tiles

    def tile_response(request, layer_id, z, x, y, fmt, scale, colormap, rescale):
        layer = layer_or_404(request, layer_id)
        tiles_mod.check_tile(z, x, y)
        colormap = tiles_mod.check_colormap(colormap)
        lo_hi = tiles_mod.parse_rescale(rescale)
        n_before = cache.hits
        data = tiles_mod.render(layer, z, x, y, scale=scale, fmt=fmt.value, colormap=colormap,
                                rescale=lo_hi, cache=cache)
        if cache.hits > n_before:
            tile_cache_hits.inc()
        return Response(data, media_type=f"image/{fmt.value}",
                        headers={"Cache-Control": CACHE_CONTROL})

    tile_doc = ("A 256 px Web Mercator tile (512 px with @2x). Outside the layer: a fully "
                "transparent tile (200). Nodata is transparent.")

    @app.get("/layers/{layer_id}/tiles/{z}/{x}/{y}@2x.{fmt}", tags=["tiles"], description=tile_doc,
             response_class=Response, responses={200: {"content": {"image/png": {}, "image/webp": {}}}})
    def tile_2x(request: Request, layer_id: LayerId, z: Zoom, x: TileIndex, y: TileIndex,
                fmt: ImageFormat, colormap: ColormapQ = "canopy", rescale: RescaleQ = None):
        return tile_response(request, layer_id, z, x, y, fmt, 2, colormap, rescale)

    @app.get("/layers/{layer_id}/tiles/{z}/{x}/{y}.{fmt}", tags=["tiles"], description=tile_doc,
             response_class=Response, responses={200: {"content": {"image/png": {}, "image/webp": {}}}})
    def tile(request: Request, layer_id: LayerId, z: Zoom, x: TileIndex, y: TileIndex,
             fmt: ImageFormat, colormap: ColormapQ = "canopy", rescale: RescaleQ = None):
        return tile_response(request, layer_id, z, x, y, fmt, 1, colormap, rescale)

    def _style_query(colormap: str, rescale: str | None) -> str:
        from urllib.parse import urlencode

        q = {}
        if colormap != "canopy":
            q["colormap"] = colormap
        if rescale is not None:
            q["rescale"] = rescale
        return ("?" + urlencode(q)) if q else ""

    @app.get("/layers/{layer_id}/tilejson.json", tags=["tiles"])
    def tilejson(request: Request, layer_id: LayerId, colormap: ColormapQ = "canopy",
                 rescale: RescaleQ = None, fmt: ImageFormat = ImageFormat.png) -> dict:
        layer = layer_or_404(request, layer_id)
        tiles_mod.check_colormap(colormap)
        tiles_mod.parse_rescale(rescale)
        info = layer.info()
        url = f"{base_url(request)}/layers/{layer.id}/tiles/{{z}}/{{x}}/{{y}}.{fmt.value}"
        return {"tilejson": "3.0.0", "name": layer.id, "version": "1.0.0", "scheme": "xyz",
                "tiles": [url + _style_query(colormap, rescale)],
                "minzoom": layer.minzoom, "maxzoom": layer.maxzoom,
                "bounds": info["bounds"], "center": info["center"],
                "attribution": f"canopy height (m), model {layer.tags.get('CANOPY_MODEL', 'unknown')}"}

    @app.get("/layers/{layer_id}/WMTSCapabilities.xml", tags=["tiles"], response_class=Response,
             responses={200: {"content": {"application/xml": {}}}})
    def wmts(request: Request, layer_id: LayerId, colormap: ColormapQ = "canopy",
             rescale: RescaleQ = None):
        from services.wmts import capabilities

        layer = layer_or_404(request, layer_id)
        tiles_mod.check_colormap(colormap)
        tiles_mod.parse_rescale(rescale)
        xml = capabilities(layer, base_url(request), _style_query(colormap, rescale))
        return Response(xml, media_type="application/xml")

    # ------------------------------------------------------------------ point, statistics, export

    @app.get("/layers/{layer_id}/point", tags=["analysis"])
    def point(request: Request, layer_id: LayerId,
              lon: Annotated[float, Query(ge=-180, le=180)], lat: Annotated[float, Query(ge=-90, le=90)]) -> dict:
        from services.point import height_at

        layer = layer_or_404(request, layer_id)
        return height_at(layer, lon, lat)

    @app.post("/layers/{layer_id}/statistics", tags=["analysis"])
    def statistics(request: Request, layer_id: LayerId, body: GeoJSONBody) -> dict:
        from services.geojson import parse_polygons
        from services.stats import statistics as zonal

        layer = layer_or_404(request, layer_id)
        features = parse_polygons(body, config.limits)
        return {"layer": layer.id, "units": "m", "features": zonal(layer, features, config.limits)}

    @app.post("/layers/{layer_id}/export", tags=["analysis"], response_class=Response,
              responses={200: {"content": {"application/zip": {}, "image/tiff": {}}}})
    def export(request: Request, layer_id: LayerId, body: GeoJSONBody,
               format: ExportFormat = ExportFormat.zip):
        from services.geojson import parse_polygons
        from services.stats import export as clip, remove_export

        require_key(request, write=True)
        layer = layer_or_404(request, layer_id)
        features = parse_polygons(body, config.limits)
        if len(features) != 1:
            raise BadRequest("export takes one polygon (a Polygon, MultiPolygon or one Feature)",
                             field="features")
        path, media = clip(layer, features[0], config.limits, format.value)
        return FileResponse(path, media_type=media, filename=path.name,
                            background=BackgroundTask(remove_export, path))

    # ------------------------------------------------------------------ jobs

    from services.jobs import JobRunner, JobStore, prepare

    jobs_root = config.jobs_path.resolve()
    store = JobStore(jobs_root)
    app.state.jobs = store

    def layer_for_run(folder: Path) -> str | None:
        registry.rescan(force=True)
        for layer in registry.all():
            if layer.root == folder.resolve():
                return layer.id
        return None

    runner = JobRunner(config, store, on_done=layer_for_run)
    app.state.runner = runner


    @app.post("/jobs", tags=["jobs"], status_code=201)
    def submit_job(request: Request, body: Annotated[dict[str, Any], Body(
            description='{"aoi": GeoJSON or place name, "imagery": name, "model": name, '
                        '"precision": "auto", "cell_size": 4096, "name": "..."}')]) -> dict:
        require_key(request, write=True)
        req, job_id = prepare(config, body, store)
        return store.insert(req, jobs_root / job_id, job_id, config.limits.max_concurrent_jobs)

    @app.get("/jobs", tags=["jobs"])
    def list_jobs(request: Request) -> dict:
        require_key(request, write=False)
        return {"jobs": store.all()}

    @app.get("/jobs/{job_id}", tags=["jobs"])
    def get_job(request: Request, job_id: Annotated[str, PathParam(pattern=r"^[0-9a-f]{16}$")]) -> dict:
        require_key(request, write=False)
        job = store.get(job_id)
        if job is None:
            raise NotFound(f"no job '{job_id}'", field="job_id")
        return job

    @app.delete("/jobs/{job_id}", tags=["jobs"])
    def cancel_job(request: Request, job_id: Annotated[str, PathParam(pattern=r"^[0-9a-f]{16}$")]) -> dict:
        require_key(request, write=True)
        if store.get(job_id) is None:
            raise NotFound(f"no job '{job_id}'", field="job_id")
        return store.cancel(job_id)

    # ------------------------------------------------------------------ web map

    @app.get("/", include_in_schema=False)
    def index():
        page = STATIC / "index.html"
        if not page.exists():
            raise NotFound("the web map is not installed")
        return FileResponse(page, media_type="text/html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def app_from_environment() -> FastAPI:
    """uvicorn factory (``services.app:app_from_environment``): the config in
    ``CANOPY_SERVE_CONFIG`` (what ``canopy serve`` hands its worker processes)."""
    from services.config import from_environment

    return create_app(from_environment())
