import pytest

from hwnas.errors import UserError
from hwnas.latency import LatencyTable, table_path
from hwnas.measure import LatencyStats


def _path(root, tiny):
    return table_path(root, "cpu-ort-fp32", tiny.name, tiny.default_input)


def test_round_trip(tiny_tables, tiny, tmp_path):
    t = LatencyTable.load(_path(tiny_tables, tiny))
    assert len(t.rows) == len(tiny.unique_op_keys())
    t.path = tmp_path / "copy.csv"
    t.save()
    t2 = LatencyTable.load(tmp_path / "copy.csv")
    assert t2.rows.keys() == t.rows.keys()
    for k in t.rows:
        assert t2.rows[k].best_ms == pytest.approx(t.rows[k].best_ms, rel=1e-5)
    assert t2.meta["fingerprint"] == t.meta["fingerprint"]


def _damage(path, how):
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if how == "truncated":
        return text[:-7]
    if how == "garbage":
        return "".join(lines[:2]) + "this,is,not,a,row\n" + "".join(lines[3:])
    if how == "header":
        return "a,b,c\n" + "".join(lines[1:])
    if how == "duplicate":
        return text + lines[1]
    if how == "negative":
        f = lines[1].split(",")
        f[1] = "-1"
        return "".join(lines[:1]) + ",".join(f) + "".join(lines[2:])
    if how == "binary":
        return "\udcff"
    raise AssertionError(how)


@pytest.mark.parametrize("how,match", [("truncated", "truncated"), ("garbage", "line 3"),
                                       ("header", "line 1"), ("duplicate", "duplicate key"),
                                       ("negative", "non-negative")])
def test_damaged_tables_are_refused_and_left_alone(tables_copy, tiny, how, match):
    path = _path(tables_copy, tiny)
    damaged = _damage(path, how)
    path.write_text(damaged)
    with pytest.raises(UserError, match=match):
        LatencyTable.load(path)
    assert path.read_text() == damaged


def test_missing_table_and_sidecar(tables_copy, tiny):
    path = _path(tables_copy, tiny)
    with pytest.raises(UserError, match="hwnas profile"):
        LatencyTable.load(path.with_name("nope.csv"))
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(UserError, match="sidecar"):
        LatencyTable.load(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(UserError, match="no sidecar"):
        LatencyTable.load(path)


def test_fingerprint_mismatch_warns_or_refuses(tables_copy, tiny, device, capsys):
    t = LatencyTable.load(_path(tables_copy, tiny))
    assert t.check_fingerprint(device) == []
    t.meta["fingerprint"]["cpu_model"] = "Some Other CPU"
    diffs = t.check_fingerprint(device)
    assert diffs and "another machine" in capsys.readouterr().err
    with pytest.raises(UserError, match="--strict"):
        t.check_fingerprint(device, strict=True)


def test_stats_fields_are_the_columns():
    s = LatencyStats(1.0, 1.1, 0.9, 1.3, 1.1, 0.1, 10, 0.01)
    assert s.best_ms == 1.0 and s.n == 10


def test_reference_times_settle_past_a_slow_spell():
    """The host's speed now, for pricing: timed until two timings agree, each reference at
    its lowest; a slow spell over a whole timing does not set the prices."""
    from hwnas.latency.lookup import settled_times

    def seq(*scales):
        calls = []

        def once():
            s = scales[len(calls)]
            calls.append(s)
            return {"a": 2.0 * s, "b": 3.0 * s * (1.01 if s > 1.1 else 1.0)}
        return once, calls

    once, calls = seq(1.25, 1.0, 1.01)  # slow spell, then two timings that agree
    assert settled_times(once) == {"a": 2.0, "b": 3.0} and len(calls) == 3
    once, calls = seq(1.0, 1.02)  # agree at once: two timings
    assert settled_times(once) == {"a": 2.0, "b": 3.0} and len(calls) == 2
    once, calls = seq(1.3, 1.0, 1.2, 1.0)  # never two alike: at most three, the lowest kept
    assert settled_times(once) == {"a": 2.0, "b": 3.0} and len(calls) == 3


def test_references_settled_in_a_spell_are_timed_again_after_a_pause():
    """Two timings can agree inside a slow spell that outlasts them: settled more than
    SPELL_PCT over the table's times, the references are settled again after a pause, each at
    its lowest; a host that is still slow then keeps its speed (the price follows it)."""
    from hwnas.latency.lookup import SPELL_PCT, settled_times

    table = {"a": 2.0, "b": 3.0}

    def run(scales, pause_s=45.0):
        calls, waits, notes = [], [], []

        def once():
            s = scales[len(calls)]
            calls.append(s)
            return {k: v * s for k, v in table.items()}
        got = settled_times(once, expected=table, pause_s=pause_s, sleep=waits.append,
                            note=notes.append)
        return got, len(calls), waits, notes

    slow = 1 + 1.5 * SPELL_PCT / 100
    got, n, waits, notes = run([slow, slow, 1.01, 1.0])  # a spell, gone after the pause
    assert got == pytest.approx(table) and n == 4 and waits == [45.0]
    assert f"{(slow - 1) * 100:+.1f}% over the table" in notes[0]
    got, n, waits, _ = run([slow] * 4)  # a slower host, not a spell
    assert got == pytest.approx({k: v * slow for k, v in table.items()}) and waits == [45.0]
    near = 1 + 0.5 * SPELL_PCT / 100
    got, n, waits, notes = run([near, near])  # within SPELL_PCT: no second look
    assert n == 2 and waits == [] and notes == []
    got, n, waits, _ = run([slow, slow], pause_s=0.0)  # span 0 (tests): never waits
    assert n == 2 and waits == [] and got == pytest.approx({k: v * slow for k, v in table.items()})
