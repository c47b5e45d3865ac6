"""Where the time of one whole `canopy predict` command goes, stage by stage (issue #21, item 2).

Each variant runs the real command (``canopy.cli.main``) in a fresh process on the same scene
as benchmarks/engine_vs_reference.py (the real NEON sample mirrored to size², 0.6 m) with the
seeded ViT-L in the released v1 layout, and times each stage by wrapping the function that does
it: process start and imports (a separate ``python -c 'import canopy.cli'``), model load,
precision choice (the cached probe) and weight preparation (int8 quantisation), reading and
warping imagery (in the read-ahead thread, so overlapped with the model), the backbone, the
head (DPT + bins → metres), the blending around them, and the COG write (GDAL's COG copy).
Model stages are summed over the threads that run them (``lanes``), so they can add up to more
than the wall time; "other" is the wall time not in any named main-thread stage.

    python benchmarks/predict_profile.py --size 2048 --out benchmarks/results/predict_profile.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TIMES: dict[str, float] = defaultdict(float)
INTERVALS: dict[str, list] = defaultdict(list)  # (start, end) of each outermost call
_LOCK = threading.Lock()
_ACTIVE = threading.local()  # stages open in this thread: a nested call is not counted twice


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        depth = getattr(_ACTIVE, name, 0)
        setattr(_ACTIVE, name, depth + 1)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(_ACTIVE, name, depth)
            if depth == 0:
                t1 = time.perf_counter()
                with _LOCK:
                    TIMES[name] += t1 - t0
                    INTERVALS[name].append((t0, t1))
    return wrapper


def instrument() -> None:
    import rasterio.shutil

    import canopy.model.checkpoints as checkpoints
    import canopy.predict.blend as blend
    import canopy.predict.raster as raster
    from canopy.model.height_model import HeightModel
    from data_catalog.raster import LatticeReader
    from ssl_backbone.tokens import TokenAPI

    checkpoints.load_model = timed("load", checkpoints.load_model)
    raster.choose_precision = timed("precision choice", raster.choose_precision)
    HeightModel.prepare_for_inference = timed("weights prepared", HeightModel.prepare_for_inference)
    LatticeReader.read = timed("read + warp (read-ahead thread)", LatticeReader.read)
    TokenAPI.forward_taps = timed("backbone", TokenAPI.forward_taps)
    HeightModel.heights_from_taps = timed("head", HeightModel.heights_from_taps)
    HeightModel.predict_tensor = timed("model", HeightModel.predict_tensor)
    raster.predict_array = timed("predict_array", blend.predict_array)
    rasterio.shutil.copy = timed("COG write (GDAL COG copy)", rasterio.shutil.copy)


def variant(scene: str, checkpoint: str, precision: str | None, out: str) -> dict:
    instrument()
    from canopy import cli

    argv = ["canopy", "predict", scene, "-o", out, "-c", checkpoint, "--overwrite", "-q"]
    if precision:
        argv += ["--precision", precision]
    sys.argv = argv
    t0 = time.perf_counter()
    try:
        cli.main()
    except SystemExit as exc:
        if exc.code:
            raise
    wall = time.perf_counter() - t0
    t = dict(TIMES)
    model_wall = union(INTERVALS["model"])  # lanes run the model in several threads at once
    stages = {
        "load": t.get("load", 0.0),
        "precision choice (auto's probe; cached per machine and model)": t.get("precision choice", 0.0),
        "weights prepared (int8 quantisation)": t.get("weights prepared", 0.0),
        "model, wall (backbone + head, lanes overlapped)": model_wall,
        "blend around the model (tiles, weights, sums), wall": t.get("predict_array", 0.0) - model_wall,
        "COG write (GDAL COG copy)": t.get("COG write (GDAL COG copy)", 0.0),
    }
    stages["other (main thread: CLI, checks, window writes)"] = wall - sum(stages.values())
    threads = {"backbone, summed over lanes": t.get("backbone", 0.0),
               "head, summed over lanes": t.get("head", 0.0),
               "read + warp, read-ahead thread (overlapped)": t.get("read + warp (read-ahead thread)", 0.0)}
    return {"wall_s": round(wall, 3), "stages_s": {k: round(v, 3) for k, v in stages.items()},
            "thread_time_s": {k: round(v, 3) for k, v in threads.items()}}


def union(intervals: list) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--checkpoint", default="hrch_v1_large_random")
    ap.add_argument("--precisions", nargs="+", default=["auto", "bf16"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--variant", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        scene, ckpt, precision, out = args.variant
        print(json.dumps(variant(scene, ckpt, None if precision == "auto" else precision, out)))
        return
    from engine_vs_reference import make_scene, released_layout_file

    from canopy.model.auto import cpu_name

    tmp = Path(tempfile.mkdtemp(prefix="predict_profile_"))
    scene = str(make_scene(tmp / "scene.tif", args.size, 4096))
    ckpt = released_layout_file(args.checkpoint, tmp)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import canopy.cli"], check=True, cwd=ROOT)
    imports = time.perf_counter() - t0
    results = {}
    for p in args.precisions:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--variant", scene, ckpt, p,
                            str(tmp / f"out_{p}.tif")], capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["process_s"] = round(time.perf_counter() - t0, 3)
        res["px_per_s"] = round(args.size ** 2 / res["process_s"])
        results[p] = res
        print(p, json.dumps(res), flush=True)
    out = {"command": "python benchmarks/predict_profile.py " + " ".join(sys.argv[1:]),
           "cpu": cpu_name(), "size": args.size, "checkpoint": args.checkpoint,
           "python_start_and_import_canopy_cli_s": round(imports, 3), "variants": results}
    text = json.dumps(out, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
