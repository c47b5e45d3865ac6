"""The one strict config reader: what a config file may say, and what reading it back gives."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from ssl_backbone.config import from_dict, to_dict
from ssl_backbone.errors import ConfigError
from ssl_backbone.vit import VARIANTS, ViTConfig


@dataclass(frozen=True)
class Schedule:
    warmup: int = 10
    factors: tuple[float, ...] = (1.0, 0.5)


@dataclass
class Job:
    name: str = "job"
    backbone: ViTConfig = field(default_factory=ViTConfig)
    schedule: Schedule = field(default_factory=Schedule)
    size: tuple[int, int] = (64, 64)
    gsd: float = 0.5
    threads: int | None = None
    format_version: int = 2


def test_json_roundtrip_is_exact():
    job = Job(name="a", backbone=VARIANTS["vit_micro"], schedule=Schedule(3, (1.0, 0.1, 0.01)),
              size=(32, 48), threads=4)
    text = json.dumps(to_dict(job), sort_keys=True)
    back = from_dict(Job, json.loads(text), what="job config")
    assert back == job and isinstance(back.size, tuple) and isinstance(back.schedule, Schedule)
    assert json.dumps(to_dict(back), sort_keys=True) == text
    # missing keys take the defaults, nested ones included
    assert from_dict(Job, {"backbone": {"depth": 2}}, what="job config").backbone == ViTConfig(depth=2)


def test_integers_in_float_fields_read_as_floats():
    """A hand-written ``"gsd": 1`` gives the config Python would build, and writes ``1.0`` back."""
    job = from_dict(Job, {"gsd": 1, "schedule": {"factors": [1, 0]}}, what="job config")
    assert isinstance(job.gsd, float) and job.schedule.factors == (1.0, 0.0)
    assert json.dumps(to_dict(job)) == json.dumps(to_dict(Job(gsd=1.0, schedule=Schedule(10, (1.0, 0.0)))))


def test_unknown_keys_are_named_with_their_path():
    with pytest.raises(ConfigError, match=r"unknown job config keys: \['colour', 'zoom'\]") as err:
        from_dict(Job, {"zoom": 2, "colour": "blue"}, what="job config")
    assert err.value.field == "colour"
    with pytest.raises(ConfigError, match=r"unknown backbone config keys: \['heads'\]") as err:
        from_dict(Job, {"backbone": {"heads": 2}}, what="job config")
    assert err.value.field == "backbone.heads"
    assert isinstance(err.value, ValueError)  # callers that caught ValueError still do


def test_newer_format_versions_are_refused():
    # an older file is read; in memory (and when written again) it is the current format
    assert from_dict(Job, {"format_version": 1}, what="job config").format_version == \
        Job().format_version > 1
    with pytest.raises(ConfigError, match="job config format 3 is newer than this version") as err:
        from_dict(Job, {"format_version": 3}, what="job config")
    assert err.value.field == "format_version"


@pytest.mark.parametrize("d, path", [
    ({"size": [1, 2, 3]}, "size"),                 # a fixed-length tuple
    ({"gsd": "0.5"}, "gsd"),
    ({"threads": 2.5}, "threads"),
    ({"backbone": {"depth": True}}, "backbone.depth"),
    ({"backbone": {"out_indices": 3}}, "backbone.out_indices"),
    ({"schedule": {"factors": [1.0, "x"]}}, "schedule.factors[1]"),
    ({"schedule": [1, 2]}, "schedule"),
    ({"name": None}, "name"),
])
def test_wrong_types_name_the_field(d, path):
    with pytest.raises(ConfigError) as err:
        from_dict(Job, d, what="job config")
    assert err.value.field == path and path in str(err.value)


def test_vit_config_reads_through_the_same_reader():
    cfg = ViTConfig.from_dict(VARIANTS["vit_small"].to_dict())
    assert cfg == VARIANTS["vit_small"] and isinstance(cfg.out_indices, tuple)
    with pytest.raises(ConfigError, match="unknown backbone config keys"):
        ViTConfig.from_dict({"registers": 4})
