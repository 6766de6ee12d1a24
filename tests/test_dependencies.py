"""The package declares version ranges (it installs beside other software) and requirements.lock pins what CI
tests inside them; the built wheel installs next to an environment that holds other versions of numpy, pyarrow and
torch without replacing them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCK = (ROOT / "requirements.lock").read_text()
PINS = {canonicalize_name(name): version for name, version in re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)", LOCK, re.M)}


def _requirements(*, extras: bool = True) -> list[Requirement]:
    found = [Requirement(text) for text in PROJECT["dependencies"]]
    if extras:
        found += [Requirement(text) for group in PROJECT["optional-dependencies"].values() for text in group]
    return [requirement for requirement in found if canonicalize_name(requirement.name) != "catalog-embed"]


def test_every_dependency_is_a_range_with_a_lower_bound():
    for requirement in _requirements():
        operators = {spec.operator for spec in requirement.specifier}
        assert "==" not in operators and "===" not in operators, f"{requirement} is pinned: pin in requirements.lock"
        assert ">=" in operators, f"{requirement} needs the tested version as its lower bound"


def test_the_lock_pins_every_dependency_inside_its_range():
    assert len(PINS) > 100 and PINS["torch"] == PINS["torchaudio"]  # torchaudio requires its own torch release
    for requirement in _requirements():
        version = PINS.get(canonicalize_name(requirement.name))
        assert version, f"{requirement.name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement} excludes the lock's {version}"


def test_the_lock_is_hash_checked_and_has_one_pin_per_line():
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK)
    pinned = [entry for entry in entries if re.match(r"[A-Za-z0-9][\w.-]*==", entry)]
    assert len(pinned) == len(PINS)
    for entry in pinned:
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), entry.splitlines()[0]
    header = LOCK.split("\n\n")[0]
    assert "make lock" in header and "uv pip compile pyproject.toml" in header


def test_requires_python_declares_exactly_the_pythons_ci_runs():
    """The full suite on the Makefile's Python (`make test`), a smoke leg (.ci/smoke) on each other one."""
    requires = SpecifierSet(PROJECT["requires-python"])
    declared = {f"3.{minor}" for minor in range(8, 20) if requires.contains(f"3.{minor}.0")}
    full = re.search(r"^PYTHON \?= python(3\.\d+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    smoke = re.search(r"^for version in ([\d. ]+); do\n  \.ci/smoke \"\$version\"$", ci, re.M).group(1).split()
    assert declared == {full, *smoke} and full not in smoke


# Installing the wheel beside an unrelated environment. The environment is a fresh venv in which numpy, pyarrow and
# torch are "installed" as bare metadata (all pip reads of an installed distribution): numpy 2.5.0 (the next minor,
# not yet released), pyarrow 26.0.1 (a major past the tested 25) and torch 2.10.0 (a minor past the tested 2.9).

ELSEWHERE = {"numpy": "2.5.0", "pyarrow": "26.0.1", "torch": "2.10.0"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(folder),
                            str(ROOT)], capture_output=True, text=True, timeout=600, check=False)
    assert build.returncode == 0, build.stderr
    (built,) = folder.glob("catalog_embed-*.whl")
    return built


def _environment(folder: Path, installed: dict[str, str]) -> Path:
    """A venv without pip holding `installed` (name -> version) as metadata only; returns its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    for name, version in installed.items():
        info = Path(purelib) / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("test\n")
        (info / "RECORD").write_text("")
    return python


def _dry_run(python: Path, wheel: Path, tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    """What `pip install <wheel>` into that environment would install (pip of this environment, --dry-run)."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet", "--report",
         str(report), *options, str(wheel)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    planned = {}
    if result.returncode == 0:
        planned = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                   for item in json.loads(report.read_text())["install"]}
    return result, planned


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("CATALOG_EMBED_OFFLINE")), reason="resolves against the package index")
def test_the_wheel_installs_beside_other_numpy_pyarrow_and_torch_without_downgrading_them(wheel, tmp_path):
    python = _environment(tmp_path / "env", ELSEWHERE)
    # Pinned, as an environment that keeps its versions installs (its own pins as constraints): the ranges admit
    # them all, the rest resolves around them (torchaudio to the installed torch's release) and none is touched.
    pins = tmp_path / "environment-pins.txt"
    pins.write_text("".join(f"{name}=={version}\n" for name, version in ELSEWHERE.items()))
    result, planned = _dry_run(python, wheel, tmp_path, "--constraint", str(pins))
    assert result.returncode == 0, result.stderr
    assert "catalog-embed" in planned and not set(planned) & set(ELSEWHERE), planned
    assert planned["torchaudio"] == ELSEWHERE["torch"]
    assert {"av", "soxr", "deltalake", "duckdb", "safetensors", "rich"} <= set(planned)
    # Unpinned, pip keeps numpy and pyarrow and downgrades nothing; torch may move up with the newest torchaudio
    # (each torchaudio release requires its own torch).
    result, planned = _dry_run(python, wheel, tmp_path)
    assert result.returncode == 0, result.stderr
    assert not {"numpy", "pyarrow"} & set(planned), planned
    for name, version in ELSEWHERE.items():
        assert Version(planned.get(name, version)) >= Version(version), f"{name} downgraded to {planned[name]}"


def _base_pins(**overrides: str) -> dict[str, str]:
    """Every base dependency at the lock's version, with `overrides`."""
    return {canonicalize_name(r.name): PINS[canonicalize_name(r.name)] for r in _requirements(extras=False)} | overrides


@pytest.mark.slow
def test_offline_the_wheel_accepts_an_environment_inside_its_ranges_and_refuses_one_outside(wheel, tmp_path):
    """The same with no index at all: every dependency already installed. Inside the ranges pip installs only the
    package; one dependency below its range (numpy 2.3, older than the tested 2.4.6) makes pip refuse."""
    inside = _environment(tmp_path / "inside", _base_pins(**ELSEWHERE, torchaudio=ELSEWHERE["torch"]))
    result, planned = _dry_run(inside, wheel, tmp_path, "--no-index")
    assert result.returncode == 0, result.stderr
    assert set(planned) == {"catalog-embed"}

    below = _environment(tmp_path / "below", _base_pins(numpy="2.3.5"))
    result, _ = _dry_run(below, wheel, tmp_path, "--no-index")
    assert result.returncode != 0 and "numpy" in result.stderr, result.stderr
