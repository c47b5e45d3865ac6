"""What the command line shows of library calls: progress events as bars or log lines, and the
flags that options fields are typed as. The library reports through callbacks and names fields
(canopy.progress, canopy.errors.OptionError); this module is the CLI's side of both, imported by
``canopy.cli`` and by the subcommand modules it registers (so they need not import it back).
"""

from __future__ import annotations

import sys

# options whose flag is not the field name with dashes
FLAG_NAMES = {"backbone_path": "--backbone", "max_height_m": "--max-height",
              "block_size_m": "--block-size", "cell_px": "--cell-size", "out_dir": "--out",
              "rh_metric": "--rh", "prediction_band": "--band"}


def flag_for(field: str) -> str:
    """The command-line flag of an options field (``batch_size`` → ``--batch-size``)."""
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


class ProgressBars:
    """Renders a library call's :class:`canopy.progress.Progress` events on stderr: one tqdm bar
    per unit counted when stderr is a terminal, messages as lines above them. When it is not (a
    log file, a batch job, nohup), a plain line every ``log_every_s`` seconds and at the end
    (``cells 120/2,466 (4.9 %), 3.1/s``), so a long run still shows it is alive."""

    def __init__(self, desc: str | None = None, enabled: bool = True, log_every_s: float = 60.0,
                 stream=None):
        self.desc, self.enabled, self.bars = desc, enabled, {}
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every_s = log_every_s
        self._last: dict[str, tuple[float, int, int | None]] = {}  # unit → (time, done, total)
        self._logged: dict[str, float] = {}
        self._start: dict[str, tuple[float, int]] = {}

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        if event.message:
            if self.tty:
                from tqdm import tqdm

                tqdm.write(event.message, file=self.stream)
            else:
                print(event.message, file=self.stream, flush=True)
            return
        if not self.tty:
            return self._log(event)
        from tqdm import tqdm

        bar = self.bars.get(event.unit)
        if bar is None:
            bar = self.bars[event.unit] = tqdm(total=event.total, initial=event.done,
                                               unit=event.unit.rstrip("s"), desc=self.desc,
                                               file=self.stream, leave=False)
        bar.total = event.total
        bar.update(event.done - bar.n)

    def _log(self, event) -> None:
        import time

        now = time.monotonic()
        self._start.setdefault(event.unit, (now, event.done))
        self._last[event.unit] = (now, event.done, event.total)
        if now - self._logged.setdefault(event.unit, now) >= self.log_every_s:
            self._logged[event.unit] = now
            self._line(event.unit)

    def _line(self, unit: str) -> None:
        now, done, total = self._last[unit]
        t0, done0 = self._start[unit]
        rate = (done - done0) / (now - t0) if now > t0 else 0.0
        share = f" ({100 * done / total:.1f} %)" if total else ""
        of = f"/{total:,}" if total else ""
        print(f"{self.desc + ': ' if self.desc else ''}{unit} {done:,}{of}{share}, "
              f"{rate:.3g}/s", file=self.stream, flush=True)

    def __enter__(self) -> "ProgressBars":
        return self

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()
        for unit in self._last:  # the last count, once, for logs
            self._line(unit)
