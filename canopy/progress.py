"""Progress of long library calls, reported through a callback instead of printed.

A library function that runs for a while takes ``progress: ProgressCallback | None`` and calls it
with :class:`Progress` events: counts of the units it works through (``tiles``, ``cells``,
``steps``) and, now and then, a line meant for the user (``message``, e.g. the Dask dashboard's
address). The library never prints or draws a bar; the CLI renders events with tqdm
(``canopy.cli``), the server keeps the latest event of each job. ``None`` means nobody listens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of ``unit`` finished (``total`` None when unknown), or a
    ``message`` for the user (then the counts repeat the last known ones)."""

    unit: str
    done: int = 0
    total: int | None = None
    message: str | None = None


ProgressCallback = Callable[[Progress], None]


def report(progress: ProgressCallback | None, unit: str, done: int, total: int | None = None,
           message: str | None = None) -> None:
    """Call ``progress`` if someone listens (the one-liner library code uses)."""
    if progress is not None:
        progress(Progress(unit, done, total, message))
