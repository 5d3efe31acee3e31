"""At least 20 SIGKILLs at random moments of checkpoint writes (new ones, and existing folders
written again), after which every surviving checkpoint is complete and resumes exactly.

The trials run in ``tests/engine/kill_harness.py`` (see its docstring), in a process of its own:
it forks the killed writers from an interpreter that has loaded torch once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_leaves_only_complete_checkpoints(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tests.engine.kill_harness", str(tmp_path), "--kills", "24", "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    print(summary)  # the figures, for the record
    assert summary["problems"] == []
    assert summary["kills"] == 24 and summary["fresh"] == 12 and summary["resave"] == 12
    assert summary["kills_in_write"] >= 12  # most kills landed while a checkpoint was being written
    # Re-saved runs keep every folder of the reference run: 5 checkpoints each, whatever the kill hit.
    assert summary["checkpoints_surviving"] >= 12 * 5
    assert summary["final_folders_complete"] >= 12
    # Each distinct checkpoint content (one per step) resumed to the reference's losses, bit for bit.
    assert summary["distinct_checkpoints"] == 5 and summary["resumed_exactly"] == 5
