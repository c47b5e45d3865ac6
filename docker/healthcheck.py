#!/usr/bin/env python3
"""Container health check: exit 0 when an HTTP health endpoint answers 200 within the timeout.

Installed in the images as ``canopy-healthcheck`` (the Dockerfiles' HEALTHCHECK). Without an
argument it asks the API (``canopy serve``) at ``$CANOPY_HEALTHCHECK_URL``, default
``http://127.0.0.1:8000/healthz``; compose and Kubernetes name Dask's own endpoint for the
scheduler and the workers (``http://127.0.0.1:8787/health``). Standard library only, so it
runs with whatever ``python3`` the image has, and needs no curl in the image.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/healthz"


def main(argv: list[str]) -> int:
    url = argv[0] if argv else os.environ.get("CANOPY_HEALTHCHECK_URL", DEFAULT_URL)
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status = response.status
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
