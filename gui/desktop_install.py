"""Install (or remove) Tunedeck's desktop entry and icon for the current user.

    python -m tunedeck.gui.desktop_install [--uninstall] [--data-home DIR]

Writes ``$XDG_DATA_HOME/applications/tunedeck.desktop`` (default ``~/.local/share``) with ``Exec``
pointing at this environment's ``tunedeck`` (so it works from a virtual environment that is not on
PATH), and the icon as ``icons/hicolor/scalable/apps/tunedeck.svg`` and ``256x256/apps/tunedeck.png``.
Desktop caches are refreshed when their tools are installed; nothing needs root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tunedeck.engine import builtin

RESOURCES = builtin.RESOURCES
DESKTOP = RESOURCES / "tunedeck.desktop"
ICON_SVG = RESOURCES / "icons" / "tunedeck.svg"
ICON_PNG = RESOURCES / "icons" / "tunedeck.png"


def data_home(override: str | None = None) -> Path:
    return Path(override or os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def launcher() -> str:
    """The command that opens the window from this environment."""
    script = Path(sys.executable).parent / "tunedeck"
    if script.is_file() and os.access(script, os.X_OK):
        return _quote(str(script))
    found = shutil.which("tunedeck")
    if found:
        return _quote(found)
    return f"{_quote(sys.executable)} -m tunedeck.gui.app"


def _quote(arg: str) -> str:
    """Quote an Exec argument as the desktop entry spec asks, when it needs it."""
    if not any(c in arg for c in " \t\n\"'\\><~|&;$*?#()`"):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`").replace("$", "\\$")
    return f'"{escaped}"'


def targets(home: Path) -> dict[str, Path]:
    return {
        "desktop": home / "applications" / "tunedeck.desktop",
        "svg": home / "icons" / "hicolor" / "scalable" / "apps" / "tunedeck.svg",
        "png": home / "icons" / "hicolor" / "256x256" / "apps" / "tunedeck.png",
    }


def desktop_entry(command: str) -> str:
    lines = []
    for line in DESKTOP.read_text(encoding="utf-8").splitlines():
        if line.startswith("Exec="):
            line = f"Exec={command} %f"
        elif line.startswith("TryExec="):
            if command.startswith('"') or " " in command:
                continue  # TryExec takes a bare path; the quoted or -m form goes without
            line = f"TryExec={command}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _refresh(home: Path) -> None:
    for cmd in (
        ["update-desktop-database", str(home / "applications")],
        ["gtk-update-icon-cache", "-q", "-t", "-f", str(home / "icons" / "hicolor")],
    ):
        if shutil.which(cmd[0]):
            subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def install(home: Path) -> dict[str, Path]:
    t = targets(home)
    for p in t.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    t["desktop"].write_text(desktop_entry(launcher()), encoding="utf-8")
    t["desktop"].chmod(0o755)
    shutil.copyfile(ICON_SVG, t["svg"])
    if ICON_PNG.is_file():
        shutil.copyfile(ICON_PNG, t["png"])
    else:
        del t["png"]
    _refresh(home)
    return t


def uninstall(home: Path) -> list[Path]:
    removed = []
    for p in targets(home).values():
        if p.exists():
            p.unlink()
            removed.append(p)
    _refresh(home)
    return removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tunedeck.gui.desktop_install", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--uninstall", action="store_true", help="remove the entry and the icons")
    ap.add_argument("--data-home", help="instead of $XDG_DATA_HOME or ~/.local/share")
    args = ap.parse_args(argv)
    home = data_home(args.data_home)
    if args.uninstall:
        for p in uninstall(home):
            print(f"removed {p}")
        return 0
    for p in install(home).values():
        print(f"installed {p}")
    print("Tunedeck is in your applications menu (log out and in if it does not show up yet).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
