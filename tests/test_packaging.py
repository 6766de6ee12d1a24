"""The distribution installs one import package, `catalog_embed`, mapped onto the repository's top-level folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
FOLDERS = ("pipelines", "workers", "schemas")


def test_every_package_folder_is_listed_under_the_namespace():
    found = {
        "catalog_embed." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert set(SETUPTOOLS["packages"]) == found
    assert SETUPTOOLS["package-dir"] == {f"catalog_embed.{folder}": folder for folder in FOLDERS}


@pytest.mark.slow
def test_the_wheel_installs_only_catalog_embed(tmp_path):
    # Built from a copy: setuptools reuses an in-tree build/ folder, where a module deleted since would linger.
    source = tmp_path / "source"
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("catalog_embed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"catalog_embed"}
    modules = {name for name in names if name.endswith(".py")}
    expected = {
        "catalog_embed/" + path.relative_to(ROOT).as_posix()
        for folder in FOLDERS
        for path in (ROOT / folder).rglob("*.py")
    }
    assert modules == expected
    (entry_points,) = [name for name in names if name.endswith("entry_points.txt")]
    assert "catalog-embed = catalog_embed.pipelines.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
