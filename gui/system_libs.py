"""Before Qt starts: the system libraries its xcb platform plugin lacks, and the line that installs them.

On a fresh Debian or Ubuntu machine Qt's xcb plugin often lacks a few X libraries
(``libxcb-cursor0``, ``libxcb-icccm4``, ``libxcb-keysyms1`` ...). Qt then aborts with a message that
names the wrong one. :func:`check` asks ``ldd`` what the plugin (and what it loads) cannot find and
returns one line with the exact ``apt-get install`` command, so the app can print it and exit 2
before creating the QApplication. No Qt here: it runs before Qt may be loaded.

    python -m tunedeck.gui.system_libs     # prints the line and exits 2 when something is missing
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PLUGIN = Path("platforms") / "libqxcb.so"

# Debian/Ubuntu packages whose name does not follow from the library's soname (see deb_package).
DEB_PACKAGES = {
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgthread-2.0.so.0": "libglib2.0-0",
    "libgobject-2.0.so.0": "libglib2.0-0",
    "libX11.so.6": "libx11-6",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libGL.so.1": "libgl1",
    "libEGL.so.1": "libegl1",
    "libGLX.so.0": "libglx0",
    "libOpenGL.so.0": "libopengl0",
    "libSM.so.6": "libsm6",
    "libICE.so.6": "libice6",
    "libpng16.so.16": "libpng16-16",
    "libz.so.1": "zlib1g",
}
NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found", re.MULTILINE)


def deb_package(soname: str) -> str:
    """The Debian/Ubuntu package that ships ``soname``: libxcb-icccm.so.4 -> libxcb-icccm4.

    Debian names a library package after its soname: the name, then the major version, with a
    hyphen between them when the name ends in a digit (libxkbcommon-x11.so.0 -> libxkbcommon-x11-0).
    """
    if soname in DEB_PACKAGES:
        return DEB_PACKAGES[soname]
    m = re.fullmatch(r"(lib.+?)\.so\.(\d+)(?:\..*)?", soname)
    if not m:
        return soname
    name, major = m.group(1).lower(), m.group(2)
    return f"{name}-{major}" if name[-1].isdigit() else f"{name}{major}"


def plugin_dirs() -> list[Path]:
    """Where Qt looks for platform plugins, in its order: QT_QPA_PLATFORM_PLUGIN_PATH,
    QT_PLUGIN_PATH, then PySide6's own plugins (found without importing Qt)."""
    dirs: list[Path] = []
    if os.environ.get("QT_QPA_PLATFORM_PLUGIN_PATH"):
        dirs.append(Path(os.environ["QT_QPA_PLATFORM_PLUGIN_PATH"]).parent)
    dirs += [Path(p) for p in os.environ.get("QT_PLUGIN_PATH", "").split(os.pathsep) if p]
    try:
        import importlib.util

        spec = importlib.util.find_spec("PySide6")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).parent / "Qt" / "plugins")
    return dirs


def xcb_plugin() -> Path | None:
    override = os.environ.get("QT_QPA_PLATFORM_PLUGIN_PATH")
    if override and (Path(override) / "libqxcb.so").is_file():
        return Path(override) / "libqxcb.so"
    for d in plugin_dirs():
        if (d / PLUGIN).is_file():
            return d / PLUGIN
    return None


def missing_libraries(plugin: str | Path) -> list[str]:
    """Sonames the dynamic linker cannot find for ``plugin`` or anything it loads, in ldd's order."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []  # no way to tell; Qt will say what it says
    try:
        out = subprocess.run([ldd, str(plugin)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    seen: list[str] = []
    for name in NOT_FOUND.findall(out):
        if name not in seen:
            seen.append(name)
    return seen


def install_command(missing: list[str]) -> str:
    pkgs: list[str] = []
    for soname in missing:
        pkg = deb_package(soname)
        if pkg not in pkgs:
            pkgs.append(pkg)
    sudo = "" if hasattr(os, "geteuid") and os.geteuid() == 0 else "sudo "
    return f"{sudo}apt-get install -y {' '.join(pkgs)}"


def uses_xcb(env: dict[str, str] | None = None) -> bool:
    """Whether Qt will pick its xcb plugin: Linux, and QT_QPA_PLATFORM unset or naming xcb first."""
    env = dict(os.environ) if env is None else env
    if not sys.platform.startswith("linux"):
        return False
    chosen = env.get("QT_QPA_PLATFORM", "").strip()
    if chosen:
        return chosen.split(";")[0].split(":")[0] == "xcb"
    # A Wayland session: Qt takes its wayland plugin first.
    return not (env.get("XDG_SESSION_TYPE") == "wayland" and env.get("WAYLAND_DISPLAY"))


def check(plugin: str | Path | None = None, env: dict[str, str] | None = None) -> str | None:
    """One line saying what to install (or that there is no display), or None when Qt can start."""
    if plugin is None:
        if not uses_xcb(env):
            return None
        plugin = xcb_plugin()
        if plugin is None:
            return None
    missing = missing_libraries(plugin)
    if missing:
        return (
            f"tunedeck: the window cannot start: Qt's xcb platform plugin needs system libraries that are "
            f"missing ({', '.join(missing)}); install them with: {install_command(missing)}"
        )
    env = dict(os.environ) if env is None else env
    if not env.get("DISPLAY"):
        return (
            "tunedeck: the window cannot start: no X display (DISPLAY is not set); run it in a desktop "
            "session, or under `xvfb-run -a tunedeck`; tunedeck-train trains without a window"
        )
    return None


def main() -> int:
    line = check()
    if line:
        print(line, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
