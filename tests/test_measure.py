import numpy as np
import pytest

from hwnas.backends import compile_model
from hwnas.export import export_onnx
from hwnas.measure import (LatencyStats, NoiseReport, Protocol, local_levels, measure,
                           measure_interleaved, round_medians)

from conftest import FAST


def test_stats_from_rounds():
    s = LatencyStats.from_rounds([[1.0, 2.0, 3.0], [2.0, 2.0, 9.0], [0.5, 1.5, 1.6]])
    assert s.best_ms == 1.5 and s.median_ms == 2.0  # round medians 2, 2, 1.5
    assert s.n == 9 and s.p10_ms <= s.median_ms <= s.p90_ms
    assert s.spread == pytest.approx(np.std([2, 2, 1.5]) / 2.0)
    with pytest.raises(ValueError):
        LatencyStats.from_rounds([])


def test_rounds_cover_the_span():
    p = Protocol(rounds=5, span_s=1.0)
    assert p.rounds_for(10.0) == 100  # 1 s of 10 ms rounds
    assert p.rounds_for(500.0) == 5   # never fewer than `rounds`


def test_noise_report():
    r = NoiseReport.from_values("protocol", [1.0, 1.02, 0.98])
    assert r.range_rel == pytest.approx(0.04)
    assert 0 < r.cv < 0.03


@pytest.fixture
def runners(tiny, device, tmp_path):
    out = []
    for i, c in enumerate((0, 3)):
        p = export_onnx(tiny.build(tiny.arch([c] * 4)), tiny.default_input, tmp_path / f"{i}.onnx")
        out.append(compile_model(p, device))
    yield out
    for r in out:
        r.close()


def test_interleaved_measurement_of_real_sessions(runners):
    calls = []
    m = measure_interleaved(runners, FAST, on_round=lambda d, t, r: calls.append((d, t)))
    stats = m.stats
    assert len(stats) == 2 and m.contention.rounds == 3
    assert all(s.best_ms > 0 and s.n >= FAST.rounds * FAST.min_reps for s in stats)
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_resume_measures_only_missing_rounds(runners):
    prior = [[[1e-6, 1e-6]], [[2e-6, 2e-6]]]  # one round each, already recorded
    calls = []
    stats = measure_interleaved(runners, FAST, prior_rounds=prior,
                                on_round=lambda d, t, r: calls.append(d)).stats
    assert calls == [2, 3]
    assert stats[0].best_ms == 1e-6  # the recorded round is part of the result


def test_runner_checks_inputs(runners):
    r = runners[0]
    with pytest.raises(ValueError, match="missing input"):
        r.run({})
    with pytest.raises(ValueError, match="shape"):
        r.run({"input": np.zeros((1, 3, 8, 8), np.float32)})
    out = r.run(r.random_feed())
    assert out[0].shape == (1, 10)
    assert measure(r, FAST).best_ms > 0


def test_measuring_flag_is_held_only_while_timing(runners, tmp_path, monkeypatch):
    import os

    flag = tmp_path / "measuring"
    monkeypatch.setenv("HWNAS_MEASURING_FLAG", str(flag))
    seen = []
    measure_interleaved(runners, FAST, on_round=lambda d, t, r: seen.append(flag.read_text()))
    assert seen and all(s.strip() == str(os.getpid()) for s in seen)
    assert not flag.exists()


def test_contention_counts_rounds_where_every_item_ran_slow():
    from hwnas.measure import Contention

    quiet = [[[1.0, 1.0]] * 10, [[2.0, 2.0]] * 10]
    assert Contention.from_rounds(quiet).quiet_fraction == 1.0
    # the host slows both items by 30% in 6 of 10 rounds: contended
    slow = [[[1.0]] * 4 + [[1.3]] * 6, [[2.0]] * 4 + [[2.6]] * 6]
    c = Contention.from_rounds(slow)
    assert c.quiet_fraction == pytest.approx(0.4) and c.contended
    assert c.worst_slowdown_pct == pytest.approx(30.0)
    # one item alone being slow in a round is that item, not the host (median over items)
    one = [[[1.0]] * 10, [[2.0]] * 5 + [[3.0]] * 5, [[1.0]] * 10]
    assert Contention.from_rounds(one).quiet_fraction == 1.0
    both = Contention.combine([Contention.from_rounds(quiet), c])
    assert both.rounds == 20 and both.quiet_fraction == pytest.approx(0.7)


def test_rounds_go_on_until_the_best_settles():
    p = Protocol(settle_pct=0.5, settle_window=10)
    assert p.settled([[[1.0]] * 30, [[2.0]] * 30])  # nothing improved: done
    # the best came in the last 10 rounds: not settled, a busy host needs more rounds
    assert not p.settled([[[1.2]] * 20 + [[1.0]] * 10, [[2.4]] * 20 + [[2.0]] * 10])
    assert not p.settled([[[1.0]] * 5])  # too few rounds to say


def test_zero_span_never_extends_the_plan(runners):
    calls = []
    measure_interleaved(runners, FAST, on_round=lambda d, t, r: calls.append(d))
    assert calls == [1, 2, 3]


def test_a_plan_longer_than_the_settle_time_may_still_extend(runners):
    # never settled (gains are >= 0), and the settle time alone is over before the plan ends:
    # a long run (a mixed table's profile) still gets up to `settle_plan_factor` x its plan
    base = dict(warmup_ms=5, min_warmup=2, rounds=4, span_s=1e-3, round_ms=2.0, min_reps=2,
                settle_pct=-1.0, settle_window=1, settle_factor=0.0, max_rounds=200)
    n = measure_interleaved(runners, Protocol(**base, settle_plan_factor=2.0)).contention.rounds
    assert n > 4
    n = measure_interleaved(runners, Protocol(**base, settle_plan_factor=1.0)).contention.rounds
    assert n == 4


def _spread_pct(est, truth):
    x = np.log(np.asarray(est) / truth)
    return 100 * float(np.std(x - np.median(x)))


def test_local_levels_read_the_host_from_all_items():
    """30 items, 24 rounds, on a host whose speed drifts (a random walk, up to tens of %) with
    short bursts, and 1% noise per round median: the lowest round median keeps each item's
    own luck, the local levels share the host's reading across items (on the AVX2 host's real
    rounds: 1.1% against 2.8% between runs, hwnas/measure.py)."""
    rng = np.random.default_rng(0)
    n, r = 30, 24
    truth = rng.uniform(3.0, 5.0, n)
    walk = np.cumsum(rng.normal(0, 0.01, n * r))  # time order: round-major
    slow = 0.5 * (walk - walk.min()) + 0.2 * (rng.random(n * r) < 0.05)
    medians = truth[:, None] * (1 + slow.reshape(r, n).T) * np.exp(rng.normal(0, 0.01, (n, r)))
    local = local_levels(medians, 10)
    lowest = medians.min(axis=1)
    assert _spread_pct(local, truth) < 0.5 * _spread_pct(lowest, truth)
    assert abs(np.median(np.log(local / truth))) < 0.02  # at the quiet host's level
    assert np.allclose(local_levels(medians * 2.0, 10), 2.0 * local)  # unit-free


def test_local_estimate_is_what_the_protocol_reports(runners):
    """Real sessions: with estimate "local" the protocol's best_ms is `local_levels` of the
    rounds it timed; one item alone keeps its lowest round median."""
    p = Protocol(warmup_ms=5, min_warmup=2, rounds=6, span_s=0.0, round_ms=2.0, min_reps=2,
                 estimate="local", local_window=2)
    seen = {}
    stats = measure_interleaved(runners, p, on_round=lambda d, t, r: seen.update(r=r)).stats
    medians = round_medians(seen["r"])
    assert [s.best_ms for s in stats] == pytest.approx(list(local_levels(medians, 2)))
    assert [s.median_ms for s in stats] == pytest.approx(list(np.median(medians, axis=1)))
    one = measure_interleaved(runners[:1], p, on_round=lambda d, t, r: seen.update(r=r)).stats
    assert one[0].best_ms == pytest.approx(min(np.median(x) for x in seen["r"][0]))
    with pytest.raises(ValueError, match="unknown estimate"):
        Protocol(estimate="mean")
