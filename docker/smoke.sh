#!/usr/bin/env bash
# Smoke test of the images and docker/compose.yaml, for a machine with Docker Engine, the compose
# v2 plugin, curl and python3, that can pull the base images and reach PyPI (the development
# machines of this project cannot: see docker/README.md).
#
#   docker/smoke.sh            # build both images, run the CPU stack, one job, one tile, tear down
#   docker/smoke.sh --gpu      # the same with the `gpu` profile (a GPU worker, no CPU workers);
#                              # needs an NVIDIA GPU and the NVIDIA container toolkit
#   docker/smoke.sh --keep     # leave the stack running (and print how to remove it)
#
# It uses its own compose project and image tag (canopy-height:smoke, canopy-height:smoke-cuda),
# a temporary imagery folder holding the bundled NEON scene (canopy/data/sample_osbs_029.tif),
# a temporary server config with a random API key, and its own outputs volume, removed at the
# end. Exit status 0 only when every step passed.
set -euo pipefail

GPU=0
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    --keep) KEEP=1 ;;
    *) echo "usage: $0 [--gpu] [--keep]" >&2; exit 2 ;;
  esac
done
for tool in docker curl python3; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed" >&2; exit 2; }
done
docker compose version >/dev/null || { echo "error: the docker compose v2 plugin is needed" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
chmod 755 "$TMP"   # the containers' user (uid 10001) reads imagery and config from here
KEY=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
AOI="-81.9900,29.6924,-81.9897,29.69265"   # inside the bundled OSBS_029 scene
export COMPOSE_PROJECT_NAME="canopy-smoke"
export CANOPY_TAG=smoke
export CANOPY_PORT="${CANOPY_PORT:-18000}"
export CANOPY_IMAGERY="$TMP/imagery"
export CANOPY_MODELS="$TMP/models"
export CANOPY_SERVE_CONFIG_FILE="$TMP/serve.yaml"
export CANOPY_WORKERS=1
PROFILE=()
if [ "$GPU" = 1 ]; then
  export CANOPY_WORKERS=0
  PROFILE=(--profile gpu)
fi
API="http://127.0.0.1:$CANOPY_PORT"

compose() { docker compose -f "$ROOT/docker/compose.yaml" ${PROFILE[@]+"${PROFILE[@]}"} "$@"; }
step() { printf '\n== %s\n' "$*"; }
cleanup() {
  status=$?
  if [ "$KEEP" = 1 ]; then
    echo "stack left running: docker compose -p $COMPOSE_PROJECT_NAME -f docker/compose.yaml down -v"
  else
    [ "$status" = 0 ] || compose logs --tail 60 || true
    compose down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  rm -rf "$TMP"
  [ "$status" = 0 ] && echo "smoke: all steps passed" || echo "smoke: FAILED (status $status)"
}
trap cleanup EXIT

mkdir -p "$CANOPY_IMAGERY" "$CANOPY_MODELS"
cp "$ROOT/canopy/data/sample_osbs_029.tif" "$CANOPY_IMAGERY/"
chmod 755 "$CANOPY_IMAGERY" "$CANOPY_MODELS"
chmod 644 "$CANOPY_IMAGERY/sample_osbs_029.tif"
printf 'api_keys: [%s]\nmodels:\n  default: default\n' "$KEY" > "$CANOPY_SERVE_CONFIG_FILE"
chmod 644 "$CANOPY_SERVE_CONFIG_FILE"

step "build docker/Dockerfile and docker/Dockerfile.cuda"
docker build -f "$ROOT/docker/Dockerfile" -t "canopy-height:$CANOPY_TAG" \
  --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" "$ROOT"
docker build -f "$ROOT/docker/Dockerfile.cuda" -t "canopy-height:$CANOPY_TAG-cuda" "$ROOT"
docker image ls canopy-height

step "the images' entry points"
docker run --rm "canopy-height:$CANOPY_TAG" canopy --help >/dev/null
docker run --rm "canopy-height:$CANOPY_TAG" dask worker --help >/dev/null
test "$(docker run --rm "canopy-height:$CANOPY_TAG" id -u)" = 10001
docker run --rm "canopy-height:$CANOPY_TAG" python -c \
  "import dask, distributed; assert dask.config.get('distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_') is None"

step "compose up, wait for the health checks"
compose up -d --no-build --wait --wait-timeout 300
compose ps

step "workers: no MALLOC_TRIM_THRESHOLD_, torch threads = OMP_NUM_THREADS"
compose exec -T api python - <<'EOF'
import os
from distributed import Client

def probe():
    import torch
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

with Client("tcp://scheduler:8786", timeout="30s") as client:
    client.wait_for_workers(1, timeout=120)
    for address, (trim, omp, threads) in client.run(probe).items():
        print(address, "MALLOC_TRIM_THRESHOLD_ =", trim, "OMP_NUM_THREADS =", omp, "torch threads =", threads)
        assert trim is None and omp is not None, "worker environment is wrong"
        assert threads == min(int(omp), os.cpu_count()), "torch threads do not follow OMP_NUM_THREADS"
EOF

step "submit a job"
curl -fsS "$API/healthz"; echo
BODY="{\"aoi\": \"$AOI\", \"imagery\": \"imagery\", \"model\": \"default\", \"precision\": \"fp32\", \"cell_size\": 64}"
JOB=$(curl -fsS -X POST "$API/jobs" -H "X-API-Key: $KEY" -H 'Content-Type: application/json' -d "$BODY" |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
echo "job $JOB"
json_field() { python3 -c "import json, sys; print(json.load(sys.stdin).get('$1') or '')"; }
for _ in $(seq 1 300); do
  STATE=$(curl -fsS "$API/jobs/$JOB" | json_field state)
  case "$STATE" in done|failed|cancelled) break ;; esac
  sleep 2
done
curl -fsS "$API/jobs/$JOB"; echo
test "$STATE" = "done"
LAYER=$(curl -fsS "$API/jobs/$JOB" | json_field layer_id)

step "fetch layer $LAYER and a tile"
TILE=$(curl -fsS "$API/layers/$LAYER" | python3 -c '
import json, math, sys
w, s, e, n = json.load(sys.stdin)["bounds"]
lon, lat, z = (w + e) / 2, (s + n) / 2, 18
x = int((lon + 180) / 360 * 2**z)
y = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * 2**z)
print(f"{z}/{x}/{y}")')
curl -fsS -o "$TMP/tile.png" "$API/layers/$LAYER/tiles/$TILE.png"
python3 -c "import sys; d = open(sys.argv[1], 'rb').read(); assert d[:8] == b'\x89PNG\r\n\x1a\n', 'not a PNG'; print('tile', sys.argv[2], len(d), 'bytes')" "$TMP/tile.png" "$TILE"
