"""The numpy side of the plots: growable series, smoothing, level of detail, reading runs back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tunedeck.engine.protocol import ChangeEvent, EndEvent, EvalEvent, StartEvent, StepEvent, SystemEvent
from tunedeck.gui.history import Envelope, RunHistory, Series, Smoother, ema, fmt_duration, fmt_number


def naive_ema(x, a):
    out, acc, count, prev = [], 0.0, 0, np.nan
    for v in x:
        if np.isfinite(v):
            acc = a * acc + (1 - a) * v
            count += 1
            prev = acc / (1 - a**count)
        out.append(prev)
    return np.array(out)


def test_series_grows_and_views_without_copy():
    s = Series(16)
    for i in range(1000):
        s.append(i)
    s.extend(np.arange(1000, 5000))
    s.append(None)
    assert len(s) == 5001
    assert s.view[4999] == 4999 and np.isnan(s.view[-1])
    assert np.shares_memory(s.view, s._data)
    gen = s.gen
    s.clear()
    assert len(s) == 0 and s.gen == gen + 1


@pytest.mark.parametrize("a", [0.0, 0.3, 0.6, 0.95, 0.999])
def test_ema_matches_the_obvious_loop_and_extends_incrementally(a):
    rng = np.random.default_rng(0)
    x = rng.normal(size=3000) + 5
    x[[0, 17, 18, 2999]] = np.nan
    got, _ = ema(x, a)
    want = naive_ema(x, a) if a else np.where(np.isfinite(x), x, np.nan)
    np.testing.assert_allclose(got, want, rtol=1e-9, equal_nan=True)
    sm = Smoother(a)
    for n in range(0, 3000, 311):
        sm.update(x[:n])
    np.testing.assert_allclose(sm.update(x), want, rtol=1e-9, equal_nan=True)


def test_envelope_keeps_every_extreme_and_stays_small():
    rng = np.random.default_rng(1)
    y, x = Series(), Series()
    env = Envelope(y)
    vals = rng.normal(size=300_001)
    vals[123_456] = 50.0
    vals[7] = np.nan
    for chunk in np.array_split(np.arange(len(vals)), 13):  # grows while being synced
        y.extend(vals[chunk])
        x.extend(chunk + 1.0)
        env.sync()
    for i0, i1 in [(0, len(vals)), (120_000, 130_000), (299_000, 300_001), (5, 40)]:
        xs, ys = env.window(x.view, i0, i1, 800)
        assert len(xs) <= 2 * 800 + 2 * 4 * len(env.mins) + 1600
        assert np.all(np.diff(xs) >= 0)
        assert np.nanmax(ys) == np.nanmax(vals[i0:i1]) or i0 > 0  # a block may start before i0
        assert np.nanmax(ys) >= np.nanmax(vals[i0:i1]) and np.nanmin(ys) <= np.nanmin(vals[i0:i1])
    xs, ys = env.window(x.view, 0, len(vals), 1000)
    assert len(xs) < 4000 and np.nanmax(ys) == 50.0


def test_history_collects_events_and_reads_a_run_folder_back(tmp_path):
    events = [
        StartEvent(run_id="r1", total_steps=3, run_dir=str(tmp_path), config={"train": {}}),
        SystemEvent(rss_mb=100.0),
        StepEvent(step=1, loss=2.0, learning_rate=1e-4, grad_norm=None, tokens_per_s=10.0, total_steps=3),
        ChangeEvent(step=1, changes={"learning_rate": [1e-4, 2e-4]}),
        StepEvent(step=2, loss=1.5, learning_rate=2e-4, grad_norm=0.5, tokens_per_s=11.0, total_steps=3),
        EvalEvent(step=2, eval_loss=1.7, perplexity=5.5),
        EndEvent(status="stopped", step=2, output=str(tmp_path / "final")),
    ]
    lines = [json.dumps(e.to_dict()) for e in events] + ['{"type": "step", "step": 3, "lo']  # torn last line
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    h = RunHistory.load(tmp_path)
    assert h.run_id == "r1" and h.status == "stopped" and h.total_steps == 3
    assert list(h.x()) == [1, 2]
    assert list(h.y("lr")) == [1e-4, 2e-4]
    assert np.isnan(h.y("grad_norm")[0])
    assert [c.step for c in h.changes] == [1] and "learning_rate" in h.changes[0].label()
    assert list(h.eval_loss.view) == [1.7]
    assert h.value_at("loss", 1.6) == 1.5 and h.index_at(-5) == 0
    assert "rss" in h.nonzero and "mem_allocated" not in h.nonzero


def test_history_load_refuses_a_folder_without_metrics(tmp_path):
    with pytest.raises(FileNotFoundError):
        RunHistory.load(tmp_path)


def test_formatting():
    assert fmt_number(1e-4) == "1e-4" and fmt_number(0.03) == "0.03" and fmt_number(512) == "512"
    assert fmt_number(0.003) == "3e-3" and fmt_number(2.3456) == "2.346"
    assert fmt_number(2.5e-5) == "2.5e-5"
    assert fmt_duration(3725) == "1:02:05" and fmt_duration(65) == "1:05" and fmt_duration(None) == "–"


def test_a_resumed_run_replaces_the_steps_it_redoes():
    h = RunHistory()
    h.add(StartEvent(run_id="r", total_steps=10))
    for s in range(1, 8):
        h.add(StepEvent(step=s, loss=10.0 - s))
    h.add(ChangeEvent(step=6, changes={"learning_rate": [1e-4, 2e-4]}))
    h.add(StartEvent(run_id="r", total_steps=10, step=4, resumed_from="ckpt/step-000004"))
    for s in range(5, 11):
        h.add(StepEvent(step=s, loss=1.0))
    assert list(h.x()) == list(range(1, 11))
    assert list(h.y("loss")) == [9.0, 8.0, 7.0, 6.0] + [1.0] * 6
    assert h.changes == []
