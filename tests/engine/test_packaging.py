"""A built wheel installs one package, ``tunedeck``, with its resources, and runs from a fresh venv.

The wheel is built from a copy of the tracked files, so building never writes into the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tracked_copy(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know the tracked files")
    src = _tracked_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (found,) = out.glob("tunedeck-*.whl")
    return found


def test_the_wheel_holds_only_the_tunedeck_package_and_every_resource(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"tunedeck", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for part in ("engine", "gui", "gui/widgets", "resources"):
        assert f"tunedeck/{part}/__init__.py" in names
    assert {
        "tunedeck/__init__.py",
        "tunedeck/__main__.py",
        "tunedeck/engine/cli.py",
        "tunedeck/gui/app.py",
    } <= set(names)
    for f in ROOT.joinpath("resources").rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts:
            assert f"tunedeck/resources/{f.relative_to(ROOT / 'resources').as_posix()}" in names, f
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    for dep in (
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "datasets",
        "pyarrow",
        "tokenizers",
        "tqdm",
        "PySide6-Essentials",
    ):
        assert f"Requires-Dist: {dep}" in meta, dep
    assert "Provides-Extra: tensorboard" in meta


@pytest.mark.slow
def test_a_fresh_venv_with_the_wheel_runs_tunedeck_train(wheel, tmp_path):
    """Installed with pip into a new virtual environment outside the checkout; the dependencies come
    from this environment's site-packages through a .pth line (whose own .pth files, the editable
    install of this checkout among them, are not read), so nothing is downloaded."""
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    where = subprocess.run(
        [str(py), "-c", "import tunedeck.engine.builtin as b; print(b.RESOURCES)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()) == site / "tunedeck" / "resources"
    run = subprocess.run(
        [
            str(env / "bin" / "tunedeck-train"),
            "--quiet",
            "--output-dir",
            str(tmp_path / "runs"),
            "--set",
            "train.max_steps=3",
            "--set",
            "train.eval_steps=0",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TUNEDECK_CACHE": str(tmp_path / "cache")},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "completed at step 3" in run.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
