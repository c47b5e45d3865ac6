"""The one options type of a prediction, for one raster and for an area of interest alike.

Every setting is validated once, here, when the options are made: a bad value raises
:class:`canopy.errors.OptionError` naming the field (``stride``, ``batch_size``), which the CLI
shows as its flag (``--stride``) and an API as the field. What can only be checked against a
model (the stride against its tile size) is checked by :meth:`PredictOptions.check_for`, before
any imagery is read. The options are frozen and small: the state-scale engine pickles them into
every cell task, and they are part of a run's identity (``run.json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from canopy.errors import OptionError
from canopy.model.height_model import INFERENCE_PRECISIONS

DTYPES = ("float32", "uint8")


@dataclass(frozen=True)
class PredictOptions:
    """How to predict. Defaults are what ``canopy predict`` does without flags."""

    device: str = "auto"                 # auto (a GPU if there is one), cpu, cuda or cuda:N
    precision: str = "auto"              # auto (canopy.model.auto), fp32, bf16 or int8 (CPU)
    batch_size: int | None = None        # model tiles per forward pass (None: by device, auto.py)
    dtype: str = "float32"               # float32 metres (NaN nodata) or uint8 whole metres (255)
    uncertainty: bool = False            # add the spread band (std of the bin distribution, m)
    ood_band: bool = False               # add the out-of-distribution score band
    stride: int | None = None            # model-tile stride in px (None: 3/4 of the tile)
    lanes: int | None = None             # CPU batches run at once (blend.lane_plan; None: auto)
    gedi_correction: str | None = None   # folder of a fitted GEDI correction model
    torch_threads: int | None = None     # torch threads per worker (None: torch's / the engine's)
    # reading the input (one raster only; a state run needs uint8 RGB scenes with a CRS)
    bands: tuple[int, ...] | None = None  # 1-based bands used as R, G, B (and NIR)
    crs: str | None = None               # CRS of an input that carries none
    scale: tuple[float, float] | None = None   # MIN MAX mapped linearly to 0..255

    def __post_init__(self) -> None:
        dev = self.device
        if not isinstance(dev, str) or not (dev in ("auto", "cpu", "cuda") or _is_cuda_index(dev)):
            raise OptionError("device", f"must be auto, cpu, cuda or cuda:N, got '{dev}'")
        if self.precision not in ("auto", *INFERENCE_PRECISIONS):
            raise OptionError("precision", f"must be auto or one of "
                                           f"{', '.join(INFERENCE_PRECISIONS)}, got '{self.precision}'")
        if self.precision == "int8" and dev.startswith("cuda"):
            raise OptionError("precision", "int8 runs on the CPU only; use bf16 on a GPU")
        if self.dtype not in DTYPES:
            raise OptionError("dtype", f"must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        for name in ("batch_size", "stride", "lanes", "torch_threads"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if self.bands is not None:
            object.__setattr__(self, "bands", parse_bands(self.bands))
        if self.scale is not None:
            try:
                lo, hi = (float(v) for v in self.scale)
            except (TypeError, ValueError):
                raise OptionError("scale", f"needs two numbers MIN MAX, got {self.scale!r}") from None
            if not hi > lo:
                raise OptionError("scale", f"needs MIN < MAX, got {lo:g} {hi:g}")
            object.__setattr__(self, "scale", (lo, hi))
        if self.crs is not None:
            object.__setattr__(self, "crs", parse_crs(self.crs))
        if self.gedi_correction is not None:
            object.__setattr__(self, "gedi_correction", str(self.gedi_correction))

    def check_for(self, tile_size: int) -> None:
        """What only the model can tell: the stride must fit its tile."""
        if self.stride is not None and self.stride > tile_size:
            raise OptionError("stride", f"must be between 1 and the model tile size {tile_size}, "
                                        f"got {self.stride}")

    def replace(self, **changes) -> "PredictOptions":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("bands", "scale"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


def _positive(opts: PredictOptions, name: str) -> None:
    value = getattr(opts, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(name, f"must be a whole number ≥ 1, got {value!r}")


def _is_cuda_index(device: str) -> bool:
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()


def parse_bands(bands) -> tuple[int, ...]:
    """``"1,2,3"`` or a sequence of three 1-based band numbers (R, G, B), or four (R, G, B,
    near-infrared, for a model that takes 4 bands) → a tuple (their range is checked against the
    raster when it is read, their count against the model)."""
    what = "three band numbers (R,G,B) or four (R,G,B,NIR) like 1,2,3"
    if isinstance(bands, str):
        try:
            bands = tuple(int(b) for b in bands.split(","))
        except ValueError:
            raise OptionError("bands", f"must be {what}, got '{bands}'") from None
    try:
        bands = tuple(int(b) for b in bands)
    except (TypeError, ValueError):
        raise OptionError("bands", f"must be {what}, got {bands!r}") from None
    if len(bands) not in (3, 4) or min(bands) < 1:
        raise OptionError("bands", f"must be {what}, each ≥ 1; got {','.join(map(str, bands))}")
    return bands


def parse_crs(text: str) -> str:
    """A CRS GDAL/PROJ knows, returned as given; an unknown one is an error naming it."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        CRS.from_user_input(text)
    except (CRSError, ValueError, TypeError):
        raise OptionError("crs", f"'{text}' is not a coordinate reference system GDAL knows "
                                 "(e.g. EPSG:32617)") from None
    return str(text)
