"""Before Qt starts, the app names the system libraries its xcb plugin lacks, with the install line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunedeck.gui import system_libs

NEEDS_CC = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build a fake plugin")


def test_package_names_follow_debian_rules():
    assert system_libs.deb_package("libxcb-cursor.so.0") == "libxcb-cursor0"
    assert system_libs.deb_package("libxcb-icccm.so.4") == "libxcb-icccm4"
    assert system_libs.deb_package("libxcb-keysyms.so.1") == "libxcb-keysyms1"
    assert system_libs.deb_package("libxkbcommon-x11.so.0") == "libxkbcommon-x11-0"
    assert system_libs.deb_package("libxcb-render-util.so.0") == "libxcb-render-util0"
    assert system_libs.deb_package("libdbus-1.so.3") == "libdbus-1-3"
    assert system_libs.deb_package("libX11-xcb.so.1") == "libx11-xcb1"
    assert system_libs.deb_package("libglib-2.0.so.0") == "libglib2.0-0"
    assert system_libs.deb_package("libEGL.so.1") == "libegl1"


def fake_plugin(tmp_path: Path, libs: list[str]) -> Path:
    """A platforms/libqxcb.so linked against ``libs``, which are then removed: ldd finds none of them."""
    src = tmp_path / "empty.c"
    src.write_text("int tunedeck_fake(void) { return 0; }\n")
    libdir = tmp_path / "libs"
    libdir.mkdir()
    for soname in libs:
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-o", libdir / soname, f"-Wl,-soname,{soname}", src], check=True
        )
    plugin = tmp_path / "plugins" / "platforms" / "libqxcb.so"
    plugin.parent.mkdir(parents=True)
    subprocess.run(
        [
            "cc",
            "-shared",
            "-fPIC",
            "-o",
            plugin,
            src,
            f"-L{libdir}",
            "-Wl,--no-as-needed",
            *[f"-l:{s}" for s in libs],
        ],
        check=True,
    )
    shutil.rmtree(libdir)
    return plugin


@NEEDS_CC
def test_the_missing_libraries_of_a_plugin_are_named_with_the_install_command(tmp_path):
    plugin = fake_plugin(tmp_path, ["libxcb-tunedeck-test.so.3", "libtunedeck-x11.so.0"])
    assert system_libs.missing_libraries(plugin) == ["libxcb-tunedeck-test.so.3", "libtunedeck-x11.so.0"]
    line = system_libs.check(plugin, env={"DISPLAY": ":0"})
    sudo = "" if os.geteuid() == 0 else "sudo "
    assert line is not None and "\n" not in line
    assert line.endswith(
        f"install them with: {sudo}apt-get install -y libxcb-tunedeck-test3 libtunedeck-x11-0"
    )
    assert "(libxcb-tunedeck-test.so.3, libtunedeck-x11.so.0)" in line


@NEEDS_CC
def test_the_app_prints_one_line_and_exits_2_instead_of_qts_abort(tmp_path):
    """The real entry point, in a process of its own, with Qt's plugin path leading to a plugin that
    lacks a library: one line on stderr, exit status 2, and Qt never got to abort."""
    fake_plugin(tmp_path, ["libxcb-tunedeck-test.so.3"])
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY", "XDG_SESSION_TYPE")
    }
    env |= {"QT_PLUGIN_PATH": str(tmp_path / "plugins"), "DISPLAY": ":0", "QT_QPA_PLATFORM": "xcb"}
    out = subprocess.run(
        [sys.executable, "-m", "tunedeck.gui.app"], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "apt-get install -y libxcb-tunedeck-test3" in lines[0]
    assert "qt.qpa" not in out.stderr and out.stdout == ""


def test_no_display_is_one_line_too(tmp_path):
    plugin = Path(sys.executable)  # any file whose libraries are all there
    line = system_libs.check(plugin, env={})
    assert line is not None and "DISPLAY is not set" in line and "xvfb-run" in line


def test_only_the_xcb_platform_is_checked():
    assert system_libs.uses_xcb({"DISPLAY": ":0"})
    assert system_libs.uses_xcb({"QT_QPA_PLATFORM": "xcb"})
    assert not system_libs.uses_xcb({"QT_QPA_PLATFORM": "offscreen"})
    assert not system_libs.uses_xcb({"QT_QPA_PLATFORM": "wayland;xcb"})
    assert not system_libs.uses_xcb({"XDG_SESSION_TYPE": "wayland", "WAYLAND_DISPLAY": "wayland-0"})
