"""A built wheel carries resources/ (presets, the demo dataset, icons, the desktop entry), and the
engine finds them there when no checkout sits beside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (found,) = out.glob("tunedeck-*.whl")
    return found


def test_the_wheel_holds_every_resource(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ROOT.joinpath("resources").rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts:
            assert f"tunedeck_resources/{f.relative_to(ROOT / 'resources').as_posix()}" in names, f


def test_an_installed_wheel_finds_its_resources(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # -S: no site-packages, so the editable install of this checkout cannot answer instead.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from engine import builtin; "
            "print(builtin.RESOURCES); print(builtin.DEMO_FILE.is_file())")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(site)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    where, demo = out.stdout.split()
    assert Path(where) == site / "tunedeck_resources" and demo == "True"
