"""``python -m services`` (what ``canopy serve`` runs): parse flags, build the server config,
start uvicorn with that many worker processes. Errors in flags or config: one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _pairs(values: list[str], flag: str) -> dict:
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: {flag} takes NAME=PATH, got '{v}'")
        out[name] = path
    return out


def parse(argv: list[str]):
    p = argparse.ArgumentParser(
        prog="canopy serve",
        description="Serve canopy-height maps: every COG and --aoi run folder under --layers "
                    "becomes a layer (tiles, WMTS, point, statistics, export, jobs, web map).")
    p.add_argument("--layers", type=Path, default=None,
                   help="folder of outputs of canopy predict (default: the config's layers_dir, or .)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="worker processes (tile rendering is CPU-bound: one per core)")
    p.add_argument("--config", type=Path, help="YAML/JSON server config (docs in README: keys, limits, CORS, jobs)")
    p.add_argument("--api-key", action="append", default=[], help="an accepted X-API-Key (repeat); also $CANOPY_API_KEYS, comma-separated")
    p.add_argument("--private", action="store_true", help="read endpoints need an API key too")
    p.add_argument("--cors", action="append", default=[], help="an allowed CORS origin (repeat)")
    p.add_argument("--imagery", action="append", default=[], metavar="NAME=PATH", help="imagery jobs may use (repeat)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT", help="models jobs may use (repeat; default: default=default)")
    p.add_argument("--scheduler", help="dask scheduler address for jobs (default: a local cluster per job)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def build_config(args):
    from services.config import ServiceConfig, load_config_file

    data = load_config_file(args.config) if args.config else {}
    cfg = ServiceConfig.from_dict(data)
    changes = {}
    if args.layers is not None:
        changes["layers_dir"] = str(args.layers)
    keys = list(cfg.api_keys) + args.api_key + [k for k in os.environ.get("CANOPY_API_KEYS", "").split(",") if k]
    changes["api_keys"] = tuple(dict.fromkeys(keys))
    if args.private:
        changes["public_read"] = False
    if args.cors:
        changes["cors_origins"] = tuple(args.cors)
    if args.imagery:
        changes["imagery"] = {**cfg.imagery, **_pairs(args.imagery, "--imagery")}
    if args.model:
        changes["models"] = {**cfg.models, **_pairs(args.model, "--model")}
    if args.scheduler:
        changes["scheduler"] = args.scheduler
    cfg = cfg.with_changes(**changes)
    root = Path(cfg.layers_dir).resolve()
    if not root.is_dir():
        raise SystemExit(f"error: --layers '{cfg.layers_dir}' is not a folder")
    jobs = cfg.jobs_path.resolve()
    if not jobs.is_relative_to(root):
        raise SystemExit(f"error: jobs_dir '{cfg.jobs_dir}' must be inside the layers folder, "
                         "or finished jobs could not be served")
    for name, path in cfg.imagery.items():
        if not str(path).startswith("stac+") and not Path(path).exists():
            raise SystemExit(f"error: imagery '{name}': '{path}' does not exist")
    return cfg.with_changes(layers_dir=str(root), jobs_dir=str(jobs), imagery={
        k: v if str(v).startswith("stac+") else str(Path(v).resolve())
        for k, v in cfg.imagery.items()})


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        cfg = build_config(args)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    except Exception as exc:  # ConfigError from the strict reader: names the field
        from canopy.errors import USER_ERRORS

        if isinstance(exc, USER_ERRORS):
            raise SystemExit(f"error: {exc}") from None
        raise
    import uvicorn

    from services.config import ENV_VAR

    os.environ[ENV_VAR] = json.dumps(cfg.to_dict())
    uvicorn.run("services.app:app_from_environment", factory=True, host=args.host,
                port=args.port, workers=args.workers, log_level=args.log_level)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            sys.exit(2)
        raise
