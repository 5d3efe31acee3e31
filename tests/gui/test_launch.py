"""The `tunedeck` command line and the desktop entry installer."""

from __future__ import annotations

import configparser
import subprocess
import sys

from tunedeck.gui import app, desktop_install


def test_command_line():
    a = app.parse_args(["my.yaml", "--start"])
    assert a.config == "my.yaml" and a.start
    a = app.parse_args([])
    assert a.config is None and not a.start


def test_a_missing_config_is_a_usage_error(tmp_path, capsys):
    assert app.main([str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_does_not_need_a_display():
    out = subprocess.run(
        [sys.executable, "-m", "tunedeck.gui.app", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "--start" in out.stdout


def test_desktop_install_and_uninstall(tmp_path):
    home = tmp_path / "share"
    assert desktop_install.main(["--data-home", str(home)]) == 0
    entry = home / "applications" / "tunedeck.desktop"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(entry)
    e = parser["Desktop Entry"]
    assert e["Name"] == "Tunedeck" and e["Icon"] == "tunedeck" and e["Type"] == "Application"
    assert "tunedeck" in e["Exec"] or "gui.app" in e["Exec"]
    assert (home / "icons" / "hicolor" / "scalable" / "apps" / "tunedeck.svg").is_file()
    assert (home / "icons" / "hicolor" / "256x256" / "apps" / "tunedeck.png").is_file()
    assert desktop_install.main(["--data-home", str(home), "--uninstall"]) == 0
    assert not entry.exists()
