"""Run manifest: what a run is (``run.json``) and which cells are done (``manifest.jsonl``).

One writer (the driver) appends one JSON line per finished cell and fsyncs it, so a killed run
loses at most the cells in flight. Resume trusts a 'done' line only if its file is there with the
recorded size, and with the recorded modification time — or, when that changed, the recorded
sha256: a truncated or altered cell is redone, not trusted. Hashing every cell of a state
(~10⁵ files, terabytes) on each resume would take hours, so the full hash is only recomputed for
files whose size or mtime moved, or for all of them with ``verify=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from canopy.errors import OutputExistsError

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.jsonl"
RUN_FORMAT = 1
# fields that change the output bytes: a run that differs in any of them is another run
IDENTITY_KEYS = ("format", "software", "aoi_sha256", "model", "model_sha256", "gsd", "cell_px",
                 "stride", "dtype", "precision", "uncertainty", "imagery_sha256",
                 "gedi_correction_sha256", "batch_size", "device", "ood_band")
# what a run leaves besides its cells: removed when --overwrite starts another run in the folder
DERIVED = ("mosaic.vrt", "mosaic.qml", "mosaic.gti.gpkg", "mosaic.gti.qml", "overview.tif",
           "overview.qml", "summary.json")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_or_write_run(out_dir: Path, run: dict, overwrite: bool) -> bool:
    """Write ``run.json``; refuse a folder holding another run's manifest unless ``overwrite``.
    Returns True when this is a resume of the same run."""
    path = out_dir / RUN_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        same = all(old.get(k) == run.get(k) for k in IDENTITY_KEYS)
        if same:
            run["created"] = old.get("created", run.get("created"))  # the run began then
            return True
        if not overwrite:
            diff = [k for k in IDENTITY_KEYS if old.get(k) != run.get(k)]
            raise OutputExistsError(
                f"'{out_dir}' holds a different run (differs in: {', '.join(diff)}); "
                "replace it or choose another output folder")
        remove_run_outputs(out_dir)
    elif out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"'{out_dir}' is not empty and holds no canopy run; replace it or "
                                "choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return False


def remove_run_outputs(out_dir: Path) -> None:
    """Remove a previous run's manifest, cells and derived files (nothing that looks finished
    may survive from another run)."""
    import shutil

    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for name in DERIVED:
        (out_dir / name).unlink(missing_ok=True)
    for p in out_dir.glob("mosaic_*"):
        p.unlink(missing_ok=True)
    for sub in ("cells", "stac"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)


@dataclass
class Manifest:
    out_dir: Path
    records: dict[str, dict] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_FILE

    @classmethod
    def load(cls, out_dir: Path) -> "Manifest":
        m = cls(out_dir)
        if m.path.exists():
            for line in m.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: that cell is simply redone
                m.records[rec["id"]] = rec
        return m

    def append(self, record: dict) -> None:
        self.records[record["id"]] = record
        with open(self.path, "a+b") as f:
            # a kill can cut the last line mid-way: start a fresh line rather than glue onto it
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(record, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def is_finished(self, cell_id: str, verify: bool = False) -> bool:
        """Done and its file intact, or known to be empty (no imagery / outside the AOI)."""
        rec = self.records.get(cell_id)
        if rec is None:
            return False
        if rec.get("status") == "empty":
            return True
        if rec.get("status") != "done":
            return False
        path = self.out_dir / rec["path"]
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_size != rec["bytes"]:
            return False
        if not verify and rec.get("mtime_ns") == st.st_mtime_ns:
            return True
        return sha256_file(path) == rec["sha256"]


def ood_unlike_share(records) -> float | None:
    """Share of the mapped pixels of the finished cells among ``records`` that their tiles'
    out-of-distribution score calls unlike the model's training data (a cell's ``ood_unlike``
    is [pixels above the threshold, pixels scored]); None when no cell was scored."""
    counts = [r["ood_unlike"] for r in records if r.get("status") == "done" and r.get("ood_unlike")]
    scored = sum(c[1] for c in counts)
    return sum(c[0] for c in counts) / scored if scored else None
