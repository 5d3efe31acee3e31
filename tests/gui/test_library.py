"""The run library: the runs folder read tolerantly, listed, overlaid, renamed, deleted, revealed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from tunedeck.engine.protocol import (
    ChangeEvent,
    EndEvent,
    EvalEvent,
    StartEvent,
    StepEvent,
)
from tunedeck.gui import run_library
from tunedeck.gui.widgets import library as library_mod
from tunedeck.gui.widgets.theme import OVERLAY_COLORS


def write_run(
    root: Path,
    name: str,
    *,
    steps: int,
    started: float,
    status: str | None = "completed",
    evals: dict[int, float] | None = None,
    model: str = "builtin:tiny",
    dataset: str = "builtin:demo",
    torn: bool = False,
    unknown: bool = False,
) -> Path:
    """A run folder as the engine writes it (config.yaml, metrics.jsonl), optionally with a torn
    last line (a crash mid-write) and an event type from a newer version."""
    run = root / name
    run.mkdir(parents=True)
    config = {"model": {"name_or_path": model}, "data": {"path": dataset}, "lora": {"enabled": True}}
    (run / "config.yaml").write_text(f"model: {{name_or_path: '{model}'}}\ndata: {{path: '{dataset}'}}\n")
    events = [
        StartEvent(run_id=name, config=config, total_steps=steps, run_dir=str(run), time=started),
    ]
    for s in range(1, steps + 1):
        events.append(
            StepEvent(
                step=s,
                loss=1 + 2 * math.exp(-s / 10),
                learning_rate=1e-4,
                tokens=50,
                tokens_per_s=100.0,
                mem_peak_mb=500.0 + s,
                elapsed_s=s * 0.5,
                total_steps=steps,
                time=started + s * 0.5,
            )
        )
        if evals and s in evals:
            events.append(EvalEvent(step=s, eval_loss=evals[s], perplexity=math.exp(evals[s])))
        if s == steps // 2:
            events.append(ChangeEvent(step=s, changes={"learning_rate": [1e-4, 5e-5]}))
    if status:
        events.append(
            EndEvent(status=status, step=steps, output=str(run / "final"), time=started + steps * 0.5 + 1)
        )
        (run / "final").mkdir()
    lines = [json.dumps(e.to_dict()) for e in events]
    if unknown:
        lines.insert(3, json.dumps({"type": "hologram", "time": started, "shape": "cube"}))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"type": "step", "step": 999, "loss": 0.'
    (run / "metrics.jsonl").write_text(text)
    return run


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    write_run(root, "alpha", steps=20, started=1_700_000_000, evals={10: 1.9, 20: 1.5})
    write_run(root, "beta", steps=30, started=1_700_000_100, evals={15: 1.4, 30: 1.6}, unknown=True)
    write_run(
        root, "gamma", steps=12, started=1_700_000_200, status=None, torn=True, model="Qwen/Qwen2.5-0.5B"
    )
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "notes.txt").write_text("hello")
    return root


# ---------------------------------------------------------------------- the model (no Qt)


def test_the_runs_folder_is_summed_up_tolerantly(runs):
    listed = run_library.list_runs(runs)
    assert [s.name for s in listed] == ["gamma", "beta", "alpha"]  # newest first; not-a-run left out
    gamma, beta, alpha = listed
    assert alpha.status == "completed" and alpha.steps == 20 and alpha.total_steps == 20
    assert alpha.final_loss == pytest.approx(1 + 2 * math.exp(-2))
    assert alpha.best_eval == (20, 1.5) and beta.best_eval == (15, 1.4)
    assert alpha.duration_s == pytest.approx(11.0) and alpha.tokens == 1000
    assert alpha.tokens_per_s == pytest.approx(100.0) and alpha.peak_mem_mb == 520.0
    assert alpha.model == "builtin:tiny" and alpha.dataset == "builtin:demo"
    assert alpha.output == str(runs / "alpha" / "final")
    assert beta.steps == 30  # the unknown event type was skipped, the rest read
    # no end event, a torn last line: what was written is read, the torn line is not a step
    assert gamma.status in ("running", "unfinished") and gamma.steps == 12 and gamma.best_eval is None
    assert gamma.model == "Qwen/Qwen2.5-0.5B" and gamma.output is None
    assert run_library.is_runs_folder(runs) and not run_library.is_runs_folder(runs / "alpha")


def test_summaries_are_cached_until_the_run_changes(runs):
    first = run_library.read_run(runs / "alpha")
    assert run_library.read_run(runs / "alpha") is first
    with (runs / "alpha" / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(StepEvent(step=21, loss=0.5, total_steps=21).to_dict()) + "\n")
    again = run_library.read_run(runs / "alpha")
    assert again is not first and again.steps == 21 and again.final_loss == 0.5


def test_rename_and_delete_refuse_what_they_must(runs):
    with pytest.raises(ValueError, match="already exists"):
        run_library.rename_run(runs / "alpha", "beta")
    with pytest.raises(ValueError, match="cannot name a folder"):
        run_library.rename_run(runs / "alpha", "a/b")
    with pytest.raises(ValueError, match="not a run folder"):
        run_library.delete_run(runs / "not-a-run")
    assert (runs / "not-a-run" / "notes.txt").is_file()
    new = run_library.rename_run(runs / "alpha", "alpha-lr1e-4")
    assert new == runs / "alpha-lr1e-4" and (new / "metrics.jsonl").is_file()
    assert run_library.read_run(new).name == "alpha-lr1e-4"  # the folder's name, not the old run id
    run_library.delete_run(new)
    assert not new.exists()


def test_where_the_window_puts_runs():
    r = run_library.resolve_output_dir
    assert r("runs", "/data/tunedeck/runs") == "/data/tunedeck/runs"
    assert r("experiments/a", "/data/tunedeck/runs") == "/data/tunedeck/runs/experiments/a"
    assert r("/abs/out", "/data/tunedeck/runs") == "/abs/out"


# ---------------------------------------------------------------------- the window


def test_the_library_lists_overlays_renames_deletes_and_reveals(make_window, runs, monkeypatch, qtbot):
    win = make_window()
    win.set_runs_folder(runs)
    lib = win.library
    t = lib.table
    assert t.topLevelItemCount() == 3
    cols = [t.headerItem().text(c) for c in range(t.columnCount())]
    assert cols == [
        "name",
        "date",
        "status",
        "steps",
        "final loss",
        "best eval",
        "duration",
        "model",
        "dataset",
    ]
    item = lib.item_of(str(runs / "alpha"))
    cells = [item.text(c) for c in range(t.columnCount())]
    assert cells[0] == "alpha" and cells[2] == "completed" and cells[3] == "20"
    assert cells[5] == "1.5 @ 20" and cells[6] == "0:11" and cells[7] == "builtin:tiny"
    # select several: overlaid in distinct colours, with their names and change markers
    lib.select([str(runs / "alpha"), str(runs / "beta"), str(runs / "gamma")])
    ov = win.plots.overlays
    assert [o.hist.label() for o in ov] == ["gamma", "beta", "alpha"]  # the table's order
    assert [o.color for o in ov] == OVERLAY_COLORS[:3]
    assert all(len(o.markers) == 1 for o in ov)
    for o in ov:
        item = lib.item_of(o.hist.run_dir)
        assert item.data(0, library_mod.COLOR) == o.color and not item.icon(0).isNull()
        assert item.text(0) == o.hist.label()
    title = win.plots.loss_plot.titleLabel.text
    assert all(n in title for n in ("alpha", "beta", "gamma"))
    # rename
    assert lib.rename(str(runs / "alpha"), "alpha-2") == str(runs / "alpha-2")
    assert lib.item_of(str(runs / "alpha-2")) is not None and "renamed run alpha to alpha-2" in win.log.text()
    # delete asks first; "no" keeps it
    monkeypatch.setattr(lib, "ask_delete", lambda paths: False)
    assert lib.delete([str(runs / "beta")]) == 0 and (runs / "beta").is_dir()
    asked = []
    monkeypatch.setattr(lib, "ask_delete", lambda paths: asked.append(paths) or True)
    assert lib.delete([str(runs / "beta")]) == 1 and not (runs / "beta").exists()
    assert asked == [[str(runs / "beta")]] and t.topLevelItemCount() == 2
    # reveal opens the folder in the file manager
    opened = []
    monkeypatch.setattr(
        library_mod.QDesktopServices, "openUrl", lambda url: opened.append(url.toLocalFile()) or True
    )
    lib.reveal(str(runs / "gamma"))
    assert opened == [str(runs / "gamma")]


def test_the_run_going_cannot_be_renamed_or_deleted(make_window, make_config, qtbot, monkeypatch, tmp_path):
    from tests.gui.fake_session import factory

    win = make_window(factory=factory(steps=100_000, delay=0.01))
    win.set_config(make_config())
    win.set_runs_folder(tmp_path / "runs")
    win.start_run()
    qtbot.waitUntil(lambda: len(win.history) > 2, timeout=10_000)
    win.library.refresh()
    live = win.history.run_dir
    assert win.library.item_of(live) is not None
    win.library.select([live])
    assert not win.library.rename_button.isEnabled() and not win.library.delete_button.isEnabled()
    monkeypatch.setattr(win.library, "ask_delete", lambda paths: True)
    assert win.library.delete([live]) == 0 and Path(live).is_dir()
    assert win.library.rename(live, "other") is None
    assert "the run going now cannot be deleted" in win.log.text()


def test_opening_the_runs_folder_itself_lists_it(make_window, runs):
    win = make_window()
    assert win.open_run(runs) is None
    assert win.library.folder == str(runs) and win.library.table.topLevelItemCount() == 3
    assert win.runs_folder == str(runs) and not win.banner.isVisible()
    hist = win.open_run(runs / "beta")
    assert hist is not None and len(hist) == 30 and win.summary.summary.name == "beta"


@pytest.mark.slow
def test_branches_and_resumed_runs_read_as_a_tree(make_window, tmp_path, qtbot):
    """Real run folders: a rollback leaves a branch; runs resumed into new folders sit under the run
    (and the branch) they came from."""
    from tests.engine.helpers import make_cfg, run
    from tunedeck.engine.protocol import Rollback

    cfg = make_cfg(
        tmp_path,
        train__max_steps=6,
        train__save_steps=2,
        train__run_name="trunk",
        train__per_device_train_batch_size=2,
        data__max_length=48,
    )
    first, trainer = run(cfg, at={5: [Rollback("step-000002")]}, metrics=True)  # steps 3-5: branch 1
    trunk = trainer.run_dir
    branch_loss = [e.loss for e in first if e.type == "step"][4]  # step 5, the branch's last
    # From the branch's step-4 checkpoint, and from the trunk's older step 2: each a new folder.
    run(None, resume_from=trunk / "branches" / "1" / "checkpoints" / "step-000004", metrics=True)
    run(None, resume_from=trunk / "checkpoints" / "step-000002", metrics=True)
    runs = trunk.parent
    assert sorted(p.name for p in runs.iterdir()) == ["trunk", "trunk-2", "trunk-3"]

    listed = {s.name: s for s in run_library.list_runs(runs)}
    (b,) = listed["trunk"].branches
    assert (b.number, b.from_step, b.to_step, b.checkpoint) == (1, 5, 2, "step-000002")
    assert b.kept == ("checkpoints/step-000004",) and b.final_loss == branch_loss
    assert listed["trunk-2"].parent.branch == 1 and listed["trunk-2"].parent.step == 4
    assert listed["trunk-3"].parent.branch is None and listed["trunk-3"].parent.step == 2
    tree = run_library.family(list(listed.values()))
    assert [s.name for _, s in tree[None]] == ["trunk"]
    assert {s.name: br for br, s in tree[str(trunk)]} == {"trunk-2": 1, "trunk-3": None}

    win = make_window()
    win.set_runs_folder(runs)
    lib = win.library
    t = lib.table
    assert t.topLevelItemCount() == 1
    top = t.topLevelItem(0)
    assert top.text(0) == "trunk" and top.isExpanded()
    kids = {top.child(k).text(0): top.child(k) for k in range(top.childCount())}
    assert sorted(kids) == ["branch 1", "trunk-3"]
    br = kids["branch 1"]
    assert [br.text(c) for c in (2, 3)] == ["rolled back", "3–5"]
    assert float(br.text(4)) == pytest.approx(branch_loss, rel=1e-3)
    assert "left behind by a rollback to step-000002" in br.toolTip(0)
    assert "kept in branches/1/: checkpoints/step-000004" in br.toolTip(0)
    assert br.childCount() == 1 and br.child(0).text(0) == "trunk-2" and br.isExpanded()
    assert "resumed from branch 1 of trunk at step 4" in br.child(0).toolTip(0)
    assert "resumed from trunk at step 2" in kids["trunk-3"].toolTip(0)
    # A branch is not a run to overlay; double-clicking it opens its run, the branch drawn faded.
    assert not br.flags() & Qt.ItemFlag.ItemIsSelectable
    lib.select([str(runs / "trunk-2"), str(trunk)])
    assert lib.selected() == [str(trunk), str(runs / "trunk-2")]  # the tree's order
    lib.table.itemDoubleClicked.emit(br, 0)
    assert win.history.run_dir == str(trunk) and len(win.history.branches) == 1
    # Sorting orders each level; children stay under their parent.
    t.sortByColumn(3, Qt.SortOrder.AscendingOrder)
    assert t.topLevelItemCount() == 1 and top.childCount() == 2 and br.child(0).text(0) == "trunk-2"
    # A refresh keeps a run the user folded, folded.
    top.setExpanded(False)
    br.setExpanded(False)
    lib.refresh()
    top = t.topLevelItem(0)
    assert not top.isExpanded() and not lib.branch_items(str(trunk))[0].isExpanded()
