"""Requirement lines for the images' dependency layer, read from pyproject.toml alone.

The Dockerfiles install the dependencies before they copy the code, so that an edit to the code
rebuilds one small layer; this script is what lets them do that with only pyproject.toml in the
build context of that layer. Standard library only (``tomllib``, Python >= 3.11).

    python requirements.py pyproject.toml torch          # torch, torchvision (their own index)
    python requirements.py pyproject.toml rest serve     # everything else, with the [serve] extra
                                                         # and the build backend (setuptools, wheel)
"""

from __future__ import annotations

import re
import sys
import tomllib

#: installed from the index the image's TORCH_INDEX_URL build argument names
TORCH_PACKAGES = {"torch", "torchvision"}


def name_of(requirement: str) -> str:
    """The normalised project name at the start of a PEP 508 requirement."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: dict, group: str, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        try:
            wanted += project["optional-dependencies"][extra]
        except KeyError:
            raise SystemExit(f"error: pyproject.toml has no extra '{extra}'") from None
    if group == "torch":
        return [r for r in wanted if name_of(r) in TORCH_PACKAGES]
    if group == "rest":
        build = pyproject.get("build-system", {}).get("requires", [])
        return [r for r in wanted + build if name_of(r) not in TORCH_PACKAGES]
    raise SystemExit(f"error: group must be 'torch' or 'rest', got '{group}'")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    with open(argv[0], "rb") as f:
        pyproject = tomllib.load(f)
    print("\n".join(requirements(pyproject, argv[1], argv[2:])))


if __name__ == "__main__":
    main(sys.argv[1:])
