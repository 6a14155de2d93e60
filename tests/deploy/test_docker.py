"""Static checks of the Dockerfiles (CI has no Docker engine), plus a wheel
build from exactly the files the builder stage copies."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from orchestrator_service.__main__ import DEFAULT_PORT, parse_args
from orchestrator_service._metrics import DEFAULT_METRICS_PORT as ORCHESTRATOR_METRICS_PORT
from orchestrator_service._security import (
    InsecureListenError,
    check_listen,
    security_from_args,
)
from worker_service._probe import DEFAULT_METRICS_PORT as WORKER_METRICS_PORT

from .support import DOCKERFILES, REPO, Stage, dockerfile_stages, exec_form, rel, run

ENTRY_POINTS = {"orchestrator": "squire-orchestrator", "worker": "squire-worker"}
PORTS = {
    "orchestrator": {DEFAULT_PORT, ORCHESTRATOR_METRICS_PORT},
    "worker": {WORKER_METRICS_PORT},
}
# A base image with a full version, e.g. python:3.11.9-slim-bookworm, optionally
# @sha256:...; not `latest`, not a floating 3.11-slim.
PINNED = re.compile(
    r"^[a-z0-9./-]+:(?P<tag>\d+\.\d+\.\d+[a-z0-9.-]*)(@sha256:[0-9a-f]{64})?$"
)
TOOLCHAIN = re.compile(
    r"\b(build-essential|gcc(-\d+)?|g\+\+|clang|make|cmake|cargo|rustc|python3?-dev|"
    r"libc6?-dev|linux-libc-dev)\b"
)
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

ids = list(DOCKERFILES)


def final(name: str) -> Stage:
    return dockerfile_stages(DOCKERFILES[name])[-1]


def test_the_dockerfiles_exist() -> None:
    for path in DOCKERFILES.values():
        assert path.is_file(), rel(path)


@pytest.mark.parametrize("name", ids)
def test_multi_stage_with_pinned_bases(name: str) -> None:
    stages = dockerfile_stages(DOCKERFILES[name])
    assert len(stages) >= 2, "build in a builder stage, ship a clean final stage"
    aliases = {s.alias for s in stages if s.alias}
    for stage in stages:
        if stage.image in aliases:
            continue  # FROM an earlier stage
        assert PINNED.match(stage.image), (
            f"{stage.image}: pin the base image to a full version tag "
            "(e.g. python:3.11.9-slim-bookworm), not latest or a floating tag"
        )
        if stage.image.startswith("python:"):
            version = tuple(int(p) for p in PINNED.match(stage.image)["tag"].split(".")[:2])
            floor = PYPROJECT["project"]["requires-python"].removeprefix(">=")
            assert version >= tuple(int(p) for p in floor.split(".")[:2]), stage.image
    builder = stages[0]
    assert any("pip wheel" in args for args in builder.all("RUN")), "the builder builds wheels"
    # Same base in both stages, so the virtualenv copied across finds its python.
    assert stages[-1].image == builder.image


@pytest.mark.parametrize("name", ids)
def test_final_stage_has_no_toolchain(name: str) -> None:
    stage = final(name)
    for args in stage.all("RUN"):
        assert not TOOLCHAIN.search(args), f"compiler in the final stage: {args}"
    # what it copies comes from the builder, not the source tree
    for args in stage.all("COPY"):
        assert "--from=" in args, f"final stage copies from the build context: {args}"


@pytest.mark.parametrize("name", ids)
def test_runs_as_non_root(name: str) -> None:
    stage = final(name)
    users = stage.all("USER")
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    if user.isdigit():
        assert int(user) > 0
    else:
        assert user != "root"
        created = " ".join(stage.all("RUN"))
        assert re.search(rf"\buseradd\b.*\b{re.escape(user)}\b", created), (
            f"USER {user} is never created in the final stage"
        )


@pytest.mark.parametrize("name", ids)
def test_entry_point_is_a_project_script(name: str) -> None:
    stage = final(name)
    entry = stage.all("ENTRYPOINT") or stage.all("CMD")
    assert entry, "no ENTRYPOINT or CMD"
    argv = exec_form(entry[-1])  # exec form: the service is PID 1 and gets SIGTERM
    assert argv[0] == ENTRY_POINTS[name]
    assert argv[0] in PYPROJECT["project"]["scripts"]


@pytest.mark.parametrize("name", ids)
def test_exposes_the_default_ports(name: str) -> None:
    exposed = {int(p.split("/")[0]) for args in final(name).all("EXPOSE") for p in args.split()}
    assert exposed == PORTS[name]


def test_orchestrator_listens_on_all_interfaces() -> None:
    # The CLI defaults to 127.0.0.1, unreachable from outside the container.
    assert final("orchestrator").env().get("SQUIRE_HOST") == "0.0.0.0"


def test_orchestrator_image_needs_tls_or_insecure(monkeypatch: pytest.MonkeyPatch) -> None:
    # What deploy/docker/README.md says: the image alone (SQUIRE_HOST=0.0.0.0,
    # no TLS) is refused at start-up, with SQUIRE_INSECURE=1 it starts.
    for key in [k for k in os.environ if k.startswith("SQUIRE_")]:
        monkeypatch.delenv(key)
    for key, value in final("orchestrator").env().items():
        if key.startswith("SQUIRE_"):
            monkeypatch.setenv(key, value)
    args = parse_args([])
    with pytest.raises(InsecureListenError):
        check_listen(args.host, security_from_args(args, environ={}))
    monkeypatch.setenv("SQUIRE_INSECURE", "1")
    args = parse_args([])
    check_listen(args.host, security_from_args(args, environ={}))


def test_worker_names_an_ops_module_that_exists() -> None:
    ops = final("worker").env()["SQUIRE_OPS"]
    assert importlib.util.find_spec(ops) is not None, ops


def builder_sources(name: str) -> list[str]:
    """Build-context paths the builder stage copies (COPY without --from),
    each to the same relative path under WORKDIR, so the tree pip builds from
    is the repository's layout (pyproject's package-dir relies on it)."""
    sources = []
    for args in dockerfile_stages(DOCKERFILES[name])[0].all("COPY"):
        words = [w for w in args.split() if not w.startswith("--")]
        assert "--from" not in args
        *srcs, dest = words
        for src in srcs:
            same_place = (dest == "./" and "/" not in src) or dest == f"./{src}"
            assert same_place, f"COPY {src} {dest}: keep the repository layout"
        sources.extend(srcs)
    return sources


@pytest.mark.parametrize("name", ids)
def test_dockerignore_lets_the_copied_sources_through(name: str) -> None:
    ignore = DOCKERFILES[name].with_name(DOCKERFILES[name].name + ".dockerignore")
    allowed = {line[1:].strip() for line in ignore.read_text().splitlines()
               if line.startswith("!")}
    for source in builder_sources(name):
        path = source.rstrip("/").rstrip("*")
        assert any(path == a or path.startswith(a + "/") for a in allowed), (
            f"{rel(ignore)} hides {source}, which the Dockerfile copies"
        )


@pytest.mark.parametrize("name", ids)
def test_builder_context_builds_a_wheel_with_the_entry_point(
    name: str, tmp_path: Path
) -> None:
    """`docker build` cannot run here; what it would copy can still be built."""
    context = tmp_path / "context"
    for source in builder_sources(name):
        matches = sorted(REPO.glob(source))
        if not matches and "*" in source:
            continue  # a wildcard may match nothing (README.md*)
        assert matches, f"COPY {source}: no such path in the repository"
        for path in matches:
            target = context / path.relative_to(REPO)
            if path.is_dir():
                shutil.copytree(path, target,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
            "--wheel-dir", str(tmp_path / "wheels"), str(context)]
    if _setuptools_is_recent():
        argv.insert(4, "--no-build-isolation")  # no download when the venv has it
    result = run(argv)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("squire-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        text = archive.read(entry_points).decode()
        assert f"{ENTRY_POINTS[name]} = " in text
        packages = {n.split("/")[0] for n in archive.namelist()}
    assert {"squire", "squire_examples", "squire_kernel", "orchestrator_service",
            "worker_service"} <= packages


def _setuptools_is_recent() -> bool:
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    required = next(r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    return major >= int(re.sub(r"\D", "", required.split(">=")[1].split(".")[0]))
