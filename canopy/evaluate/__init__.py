"""Evaluation of canopy-height maps against reference CHMs and GEDI shots.

``metrics`` holds the numbers (plain numpy, no I/O); ``report`` reads rasters, aligns grids and
writes the report folder; ``cli`` adds the ``evaluate`` and ``synth`` commands to a Typer app.
"""

from canopy.evaluate.metrics import (
    HEIGHT_BIN_EDGES, TileLattice, bias, block_r2, edge_error, mae, nmae, r2, rmse, summarize,
    tree_cover_iou)
from canopy.evaluate.report import EvaluationConfig, evaluate

__all__ = [
    "HEIGHT_BIN_EDGES", "EvaluationConfig", "TileLattice", "bias", "block_r2", "edge_error",
    "evaluate", "mae", "nmae", "r2", "rmse", "summarize", "tree_cover_iou",
]
