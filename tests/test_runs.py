"""`hwnas.runs.StageJournal`: a stopped job resumes after its last finished stage."""

import json

import pytest

from hwnas.errors import UserError
from hwnas.runs import StageJournal


class Stop(Exception):
    pass


def job(path, settings, calls, stop_after=None):
    """Three stages (the second keyed by what it was asked); `stop_after` kills the job there."""
    j = StageJournal(path, settings)
    out = []
    for i, key in enumerate([None, ["a", "b"], None]):
        def compute(i=i):
            calls.append(i)
            return {"ms": [1.5 * i, 2.0], "i": i}
        out.append(j.stage(f"s{i}", compute, key=key, load=lambda v: (v["i"], tuple(v["ms"]))))
        if stop_after == i:
            raise Stop
    j.finish()
    return out


def test_a_stopped_job_resumes_after_its_last_finished_stage(tmp_path):
    path, settings = tmp_path / "state.json", {"budgets": 20, "seed": 0}
    calls = []
    with pytest.raises(Stop):
        job(path, settings, calls, stop_after=1)
    assert calls == [0, 1] and path.is_file()
    resumed = job(path, settings, calls)
    assert calls == [0, 1, 2]  # stages 0 and 1 came from the journal
    assert not path.exists()  # finished: a new run starts afresh
    fresh_calls = []
    assert job(path, settings, fresh_calls) == resumed and fresh_calls == [0, 1, 2]


def test_a_journal_of_other_settings_is_refused_and_kept(tmp_path):
    path = tmp_path / "state.json"
    with pytest.raises(Stop):
        job(path, {"budgets": 20, "seed": 0}, [], stop_after=0)
    before = path.read_text()
    with pytest.raises(UserError, match=r"seed 0 \(journal\) vs 1 \(now\)"):
        StageJournal(path, {"budgets": 20, "seed": 1})
    assert path.read_text() == before


def test_a_stage_resumed_for_another_question_is_an_internal_error(tmp_path):
    path = tmp_path / "state.json"
    j = StageJournal(path, {})
    j.stage("timing-0", lambda: {"x": 1.0}, key=["x"])
    assert json.loads(path.read_text())["stages"]["timing-0"]["key"] == ["x"]
    with pytest.raises(RuntimeError, match="journalled for"):
        StageJournal(path, {}).stage("timing-0", lambda: {"y": 1.0}, key=["y"])
