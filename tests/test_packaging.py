"""The built wheel installs cli/ and schemas/ inside the nestprune namespace, never as top-level packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import nestprune

ROOT = Path(nestprune.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("nestprune", "cli", "schemas"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.build_wheel(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, check=True, capture_output=True)
    (whl,) = out.glob("*.whl")
    return whl


def test_wheel_has_no_top_level_cli_or_schemas(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"nestprune"}, f"the wheel ships top-level {sorted(top - {'nestprune'})}"
    assert "nestprune/cli/main.py" in names
    assert "nestprune/schemas/artifact.py" in names
    assert "nestprune/schemas/artifact.schema.json" in names
    assert "nestprune/data/sample.txt.xz" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    assert "nestprune = nestprune.cli.main:main" in zipfile.ZipFile(wheel).read(ep).decode()


def test_every_subpackage_is_in_the_wheel(wheel):
    """A new folder under nestprune/ must be listed in pyproject's packages, or it is silently left out."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in (ROOT / "nestprune").rglob("__init__.py"):
        rel = "nestprune/" + init.relative_to(ROOT / "nestprune").as_posix()
        assert rel in names, f"{rel} is not in the wheel: add its package to pyproject.toml"


def test_python_dash_m_nestprune_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "nestprune", "--help"], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert "materialize" in r.stdout
