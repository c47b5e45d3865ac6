"""Which torch device a model runs on: one resolver for prediction, training and evaluation.

Names are ``auto`` (the first GPU when there is one, else the CPU), ``cpu``, ``cuda`` or
``cuda:N``. A name this machine cannot honour is an
:class:`canopy.errors.OptionError` on the ``device`` field, raised before any model is loaded,
so a missing GPU is one line at the start, not a traceback after minutes of reading.
"""

from __future__ import annotations

import torch

from canopy.errors import OptionError


def resolve_device(device: str | torch.device) -> torch.device:
    """The ``torch.device`` for ``device``, checked against this machine."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    head, _, index = str(device).partition(":")
    if head not in ("cpu", "cuda") or (index and (head != "cuda" or not index.isdigit())):
        raise OptionError("device", f"must be auto, cpu, cuda or cuda:N, got '{device}'")
    if head == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("device", f"{device}: no CUDA device is available on this machine")
        if index and int(index) >= torch.cuda.device_count():
            raise OptionError("device", f"{device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(device)
