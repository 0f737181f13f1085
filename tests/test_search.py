"""Searches on the tiny space (and det20's committed LUT) with synthetic objectives whose optimum
is known, resume of a search checkpoint, the CLI end to end, and bad input."""

import itertools
import json

import numpy as np
import pytest

from hwnas.errors import UserError
from hwnas.hosts import known_hosts
from hwnas.latency import LatencyTable, LutPredictor, table_path, tables_dir
from hwnas.search import EvolutionSearch, PCNASSearch, RandomSearch, SearchResult
from hwnas.spaces import get_space
from conftest import run_cli

SMALL_EVO = dict(population=12, parents=4, mutations=6, crossovers=6)


@pytest.fixture(scope="module")
def tiny_lut(tiny_tables, tiny):
    return LutPredictor(LatencyTable.load(table_path(tiny_tables, "cpu-ort-fp32", "tiny",
                                                     tiny.default_input)), tiny)


class Additive:
    """score = Σ w[layer, choice]: an objective whose constrained optimum brute force finds."""

    def __init__(self, weights):
        self.w, self.calls = weights, 0

    def predict(self, archs):
        self.calls += len(archs)
        return np.array([self.w[np.arange(len(a.choices)), list(a.choices)].sum()
                         for a in archs])


def brute_force(space, lut, acc, budget):
    rows = np.array(list(itertools.product(range(4), repeat=space.num_layers)))
    lat = lut.predict_many(rows)
    score = np.array([acc.w[np.arange(space.num_layers), r].sum() for r in rows])
    score[lat > budget] = -np.inf
    return "tiny:" + "".join(map(str, rows[int(np.argmax(score))]))


class GridLatency:
    """A fixed additive latency model (ms): the searches' known-optimum tests must not depend on
    a LUT measured at test time, whose numbers change from run to run."""

    def __init__(self, grid_ms, fixed_ms=1.0):
        self.grid_ms, self.fixed_ms = np.asarray(grid_ms, float), fixed_ms

    def predict_many(self, rows):
        rows = np.asarray(rows, np.int64)
        return self.fixed_ms + self.grid_ms[np.arange(rows.shape[1]), rows].sum(1)

    def predict(self, arch):
        return float(self.predict_many(np.array([arch.choices]))[0])

    def fastest_ms(self):
        return self.fixed_ms + float(self.grid_ms.min(1).sum())


@pytest.fixture(scope="module")
def synth(tiny):
    """A budget that binds: the unconstrained optimum is too slow."""
    rng = np.random.default_rng(3)
    lut = GridLatency(rng.uniform(0.1, 1.0, (tiny.num_layers, 4)))
    w = rng.uniform(0, 1, (tiny.num_layers, 4)) + 2 * lut.grid_ms  # slower scores higher
    rows = np.array(list(itertools.product(range(4), repeat=tiny.num_layers)))
    budget = float(np.percentile(lut.predict_many(rows), 40))
    acc = Additive(w)
    unconstrained = "tiny:" + "".join(map(str, w.argmax(1)))
    best = brute_force(tiny, lut, acc, budget)
    assert best != unconstrained and lut.predict(tiny.parse(unconstrained)) > budget
    return lut, acc, budget, best


@pytest.fixture(scope="module")
def problem(tiny, tiny_lut):
    """The same kind of objective priced by the real (measured) tiny LUT."""
    w = np.random.default_rng(3).uniform(0, 1, (tiny.num_layers, 4))
    rows = np.array(list(itertools.product(range(4), repeat=tiny.num_layers)))
    budget = float(np.percentile(tiny_lut.predict_many(rows), 40))
    acc = Additive(w)
    return acc, budget, brute_force(tiny, tiny_lut, acc, budget)


@pytest.mark.parametrize("cls,kw", [(EvolutionSearch, SMALL_EVO), (RandomSearch, {})])
def test_search_finds_known_optimum_within_budget(cls, kw, tiny, synth):
    lut, acc, budget, best = synth
    res = cls(tiny, lut, acc, budget, evaluations=150, seed=0, **kw).run()
    assert res.best_arch == best
    assert res.predicted_latency_ms <= budget
    assert all(r[2] <= budget for r in res.evaluated)  # nothing over budget was evaluated
    assert res.evaluations <= 150 and res.history


@pytest.mark.parametrize("problem_seed", [0, 1, 2])
def test_pcnas_finds_known_optimum(tiny, problem_seed):
    """PC-NAS is greedy over prefixes: exact when the latency filter does not make the best
    prefix look worse than it is (the optimum is feasible, the filter still rejects 40% of the
    space); with a binding budget it lands in the top 5% of feasible candidates (next test)."""
    rng = np.random.default_rng(problem_seed)
    lut = GridLatency(rng.uniform(0.1, 1.0, (tiny.num_layers, 4)))
    acc = Additive(rng.uniform(0, 1, (tiny.num_layers, 4)))
    opt = tiny.arch(acc.w.argmax(1))
    rows = np.array(list(itertools.product(range(4), repeat=tiny.num_layers)))
    budget = max(float(np.percentile(lut.predict_many(rows), 60)), lut.predict(opt))
    res = PCNASSearch(tiny, lut, acc, budget, 150, 0, pool_size=4, samples=8).run()
    assert res.best_arch == str(opt) and res.predicted_latency_ms <= budget


def test_pcnas_near_optimum_when_budget_binds(tiny, synth):
    lut, acc, budget, best = synth
    res = PCNASSearch(tiny, lut, acc, budget, 150, 0, pool_size=4, samples=8).run()
    rows = np.array(list(itertools.product(range(4), repeat=tiny.num_layers)))
    feasible = rows[lut.predict_many(rows) <= budget]
    scores = acc.w[np.arange(tiny.num_layers), feasible].sum(1)
    assert res.predicted_latency_ms <= budget
    assert (scores > res.score + 1e-9).sum() <= 0.05 * len(feasible)


def test_searches_with_the_measured_lut(tiny, tiny_lut, problem):
    acc, budget, best = problem
    for cls in (EvolutionSearch, PCNASSearch, RandomSearch):
        res = cls(tiny, tiny_lut, acc, budget, 60, 0, **(SMALL_EVO if cls is EvolutionSearch
                                                        else {})).run()
        assert tiny_lut.predict(tiny.parse(res.best_arch)) == pytest.approx(
            res.predicted_latency_ms) and res.predicted_latency_ms <= budget


def test_evolution_finds_optimum_on_det20():
    """Regularized-evolution sanity check at SPOS settings on det20's real LUT: the objective is
    closeness to a hidden feasible target, so the optimum (the target) is known."""
    space = get_space("det20")
    # any committed host's det20 table: the test needs real op prices, not this host's
    host = known_hosts(tables_dir(), "cpu-ort-fp32")[0]
    lut = LutPredictor(LatencyTable.load(table_path(tables_dir(), "cpu-ort-fp32", "det20",
                                                    space.default_input, host)), space)
    rng = np.random.default_rng(1)
    cands = space.sample_many(5000, rng)
    lat = lut.predict_many(cands)
    budget = float(np.percentile(lat, 50))
    target = cands[int(np.argmin(np.abs(lat - np.percentile(lat, 30))))]

    class Closeness:
        def predict(self, archs):
            return np.array([-float((np.array(a.choices) != target).sum()) for a in archs])

    evo = EvolutionSearch(space, lut, Closeness(), budget, evaluations=1000, seed=0).run()
    assert evo.best_arch == "det20:" + "".join(map(str, target)) and evo.score == 0
    rnd = RandomSearch(space, lut, Closeness(), budget, evaluations=1000, seed=0).run()
    pc = PCNASSearch(space, lut, Closeness(), budget, evaluations=1000, seed=0).run()
    assert pc.score >= rnd.score and evo.score > rnd.score


def test_search_checkpoint_resumes(tmp_path, tiny, tiny_lut, problem):
    acc, budget, _ = problem
    state = tmp_path / "s.state.json"
    full = EvolutionSearch(tiny, tiny_lut, Additive(acc.w), budget, 48, 0, **SMALL_EVO).run()
    # first run stops after 24 evaluations (two generations), as if killed
    part = EvolutionSearch(tiny, tiny_lut, Additive(acc.w), budget, 48, 0, state_path=state,
                           **SMALL_EVO)
    part.evaluations = 24
    part.run()
    doc = json.loads(state.read_text())
    assert doc["n_evals"] == 24 and len(doc["history"]) == 2
    counted = Additive(acc.w)
    resumed = EvolutionSearch(tiny, tiny_lut, counted, budget, 48, 0, state_path=state,
                              **SMALL_EVO)
    resumed.load_state = _load_ignoring_budget(resumed)
    res = resumed.run()
    assert counted.calls == 24  # only the missing generations were evaluated
    assert res.best_arch == full.best_arch and res.history == full.history


def _load_ignoring_budget(search):
    """The killed run had a smaller evaluation budget in its params; accept its state."""
    orig = search.load_state

    def load():
        doc = json.loads(search.state_path.read_text())
        doc["params"]["evaluations"] = search.evaluations
        search.state_path.write_text(json.dumps(doc))
        return orig()

    return load


def test_pcnas_resume_and_trainer_hook(tmp_path, tiny, synth):
    tiny_lut, acc, budget, best = synth

    class CountingTrainer:
        step = 0
        paths: list = []

        def train_to(self, stop, sampler, desc=""):
            rng = np.random.default_rng(self.step)
            while self.step < stop:
                self.paths.append(tuple(int(c) for c in sampler(rng)))
                self.step += 1

    tr = CountingTrainer()
    res = PCNASSearch(tiny, tiny_lut, acc, budget, 150, 0, trainer=tr, train_interval=5,
                      pool_size=4, samples=8, state_path=tmp_path / "p.json").run()
    assert tr.step == 5 * (tiny.num_layers - 1)
    # every trained path keeps the budget and starts with a prefix the pool held then
    assert all(tiny_lut.predict(tiny.arch(p)) <= budget for p in tr.paths)
    assert res.predicted_latency_ms <= budget
    again = PCNASSearch(tiny, tiny_lut, acc, budget, 150, 0, trainer=tr, train_interval=5,
                        pool_size=4, samples=8, state_path=tmp_path / "p.json")
    calls = acc.calls
    assert again.run().best_arch == res.best_arch and acc.calls == calls  # finished: no new work


def test_infeasible_budget(tiny, tiny_lut, problem):
    with pytest.raises(UserError, match=f"{tiny_lut.fastest_ms():.3f}"):
        RandomSearch(tiny, tiny_lut, problem[0], tiny_lut.fastest_ms() * 0.5, 10, 0)


def test_result_json_and_plot(tmp_path, tiny, tiny_lut, problem):
    acc, budget, _ = problem
    res = RandomSearch(tiny, tiny_lut, acc, budget, 30, 0).run()
    res.save(tmp_path / "r.json")
    back = SearchResult.load(tmp_path / "r.json")
    assert back.best_arch == res.best_arch and len(back.evaluated) == 30
    assert res.plot(tmp_path / "r.png").stat().st_size > 1000
    front = res.pareto_front()
    assert front[0][2] == min(r[2] for r in res.evaluated)


@pytest.fixture(scope="module")
def tiny_supernet(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("sn")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / "data" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                root / "data" / c / f"{i}.png")
    ck = root / "tiny.pt"
    run_cli("supernet", "train", "--space", "tiny", "--data", root / "data", "--image-size",
            32, "--steps", 3, "--warmup-steps", 1, "--match-steps", 1, "--batch-size", 8,
            "--ckpt-every", 2, "-o", ck, "--quiet",
            check_rc=0)
    return ck


@pytest.mark.slow
def test_cli_search_end_to_end(tmp_path, tiny_tables, tiny_supernet, tiny_lut):
    budget = f"{tiny_lut.fastest_ms() * 1.3:.4f}"
    common = ["--device", "cpu-ort-fp32", "--space", "tiny", "--tables", tiny_tables,
              "--budget-ms", budget, "--supernet", tiny_supernet, "--quiet"]
    for method in ("evolution", "pcnas", "random"):
        prefix = tmp_path / f"{method}_1.5ms"  # a dot in the prefix is not a suffix
        p = run_cli("search", *common, "--method", method, "--evaluations", 16, "-o",
                    prefix, "--json", check_rc=0)
        out = json.loads(p.stdout)
        assert out["method"] == method and out["predicted_latency_ms"] <= float(budget)
        assert out["context"]["json"] == f"{prefix}.json"
        assert SearchResult.load(f"{prefix}.json").best_arch == out["best_arch"]
        assert (tmp_path / f"{method}_1.5ms.png").is_file()
    p = run_cli("search", *common, "--method", "random", "--evaluations", 8, "--verify",
                "--span-s", 0, "-o", tmp_path / "v", "--json", check_rc=0)
    v = json.loads(p.stdout)["verify"]
    assert v["measured_ms"] > 0 and v["budget_ms"] == float(budget)
    # timed with the table's references: the host's change since pricing is in the verdict
    assert isinstance(v["host_shift_pct"], float) and isinstance(v["keeps_budget_raw"], bool)
    assert 0 <= v["contention"]["quiet_fraction"] <= 1
    assert "since priced" in run_cli("search", *common, "--method", "random", "--evaluations",
                                     8, "--verify", "--span-s", 0, "-o", tmp_path / "v2",
                                     check_rc=0).stdout


@pytest.mark.slow
def test_cli_bad_input(tmp_path, tiny_tables, tiny_supernet, tiny_lut):
    common = ["--device", "cpu-ort-fp32", "--space", "tiny", "--tables", tiny_tables,
              "--quiet"]
    p = run_cli("search", *common, "--budget-ms", 1e-4, "--supernet", tiny_supernet,
                check_rc=2)
    assert f"{tiny_lut.fastest_ms():.3f}" in p.stderr and "fastest" in p.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(tiny_supernet.read_bytes()[:100])
    p = run_cli("search", *common, "--budget-ms", 100, "--supernet", bad, check_rc=2)
    assert "corrupt" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert bad.read_bytes() == tiny_supernet.read_bytes()[:100]
    # a checkpoint of another space (tiny) used for det20
    p = run_cli("search", "--device", "cpu-ort-fp32", "--space", "det20", "--budget-ms", 100,
                "--supernet", tiny_supernet, "--quiet", check_rc=2)
    assert "cannot score det20" in p.stderr
    # training into a checkpoint of another width is refused, and the file kept
    before = tiny_supernet.read_bytes()
    p = run_cli("supernet", "train", "--space", "tiny-w2", "--data", tiny_supernet.parent / "data",
                "--image-size", 32, "--steps", 1, "--warmup-steps", 0, "--match-steps", 0,
                "-o", tiny_supernet, "--quiet", check_rc=2)
    assert "tiny-w2" in p.stderr and tiny_supernet.read_bytes() == before


def test_tight_budget_still_finds_the_fastest(tiny, tiny_lut):
    """At a budget equal to the fastest candidate, rejection sampling alone would rarely hit the
    one feasible arch; every search still returns it."""
    acc = Additive(np.zeros((tiny.num_layers, 4)))
    budget = tiny_lut.fastest_ms() + 1e-9
    for cls in (EvolutionSearch, PCNASSearch, RandomSearch):
        res = cls(tiny, tiny_lut, acc, budget, 20, 0).run()
        assert res.predicted_latency_ms <= budget


# ---- issue 13: resume identity, mid-round checkpoints, malformed states ----------------------
@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """Real supernet scorers: two checkpoints of the tiny space that differ in their weights."""
    import os

    from hwnas.data import load_data
    from hwnas.train import SupernetScorer, SupernetTrainer, TrainConfig, load_supernet

    root = tmp_path_factory.mktemp("ident")
    old = os.environ.get("HWNAS_CACHE")
    os.environ["HWNAS_CACHE"] = str(root / "cache")
    try:
        splits = load_data("shapes", 32, {"train": 32, "val": 12, "test": 4})
    finally:
        os.environ.pop("HWNAS_CACHE") if old is None else os.environ.update(HWNAS_CACHE=old)
    nets = []
    for steps in (1, 2):
        c = TrainConfig(space="tiny", image_size=32, steps=steps, batch_size=8, ckpt_every=1,
                        warmup_steps=0, match_steps=0)
        with SupernetTrainer(c, root / f"s{steps}.pt", splits, progress=False) as tr:
            tr.run()
        nets.append(load_supernet(root / f"s{steps}.pt")[0])

    def make(net=0, val_n=8):
        return SupernetScorer(nets[net], splits, bn_batches=1, bn_batch_size=8, val_n=val_n)

    return make, [root / "s1.pt", root / "s2.pt"]


def test_resume_refused_under_another_supernet_val_n_table_or_lut(tmp_path, tiny, tiny_lut,
                                                                  scorers):
    from hwnas.search.identity import search_identity

    make, files = scorers
    budget = tiny_lut.fastest_ms() * 1.5
    state = tmp_path / "r.state.json"
    table = tmp_path / "t.csv"
    table.write_text("key,median_ms\n")
    ident = search_identity("cpu", table, files[0], tiny.default_input)

    def search(scorer, lut=tiny_lut, identity=ident):
        return RandomSearch(tiny, lut, scorer, budget, 6, 0, state_path=state,
                            identity=identity)

    first = search(make()).run()
    doc = json.loads(state.read_text())
    assert doc["identity"]["supernet_sha256"] and doc["identity"]["accuracy_model"]["val_n"] == 8
    for args, named in (((make(net=1),), "weights_sha256"),
                        ((make(val_n=4),), r"val_n: 8 \(saved\) vs 4 \(now\)"),
                        ((make(), GridLatency(np.zeros((tiny.num_layers, 4)), budget / 2)),
                         "latency_prices_sha256"),
                        ((make(), tiny_lut, {**ident, "table_sha256": "0" * 64}),
                         "table_sha256")):
        with pytest.raises(UserError, match=named):
            search(*args).run()
    assert json.loads(state.read_text()) == doc  # refused, not overwritten
    table.write_text("key,median_ms\nchanged,1\n")  # re-profiled in place: another identity
    with pytest.raises(UserError, match="table_sha256"):
        search(make(), identity=search_identity("cpu", table, files[0],
                                                tiny.default_input)).run()
    assert search(make()).run().to_dict() == first.to_dict()  # the same inputs resume


class Interrupted(Additive):
    """An accuracy model whose `stop_at`-th call (one chunk) is interrupted, after copying the
    state file as a SIGKILL at that instant would leave it."""

    def __init__(self, weights, state, stop_at):
        super().__init__(weights)
        self.state, self.stop_at, self.n, self.snapshot = state, stop_at, 0, None

    def predict(self, archs):
        self.n += 1
        if self.n == self.stop_at:
            self.snapshot = self.state.read_text() if self.state.exists() else None
            raise KeyboardInterrupt
        return super().predict(archs)


@pytest.mark.parametrize("checkpoint_s", [0.0, 1e9])
def test_mid_round_checkpoint_and_interrupt_lose_nothing(tmp_path, tiny, tiny_lut, problem,
                                                         checkpoint_s):
    """checkpoint_s=0: a checkpoint after every chunk (the ~10 s timer, elapsed), and the file a
    kill would leave resumes; 1e9: no timed checkpoint, the interrupt itself saves."""
    acc, budget, _ = problem
    full = EvolutionSearch(tiny, tiny_lut, Additive(acc.w), budget, 48, 0, **SMALL_EVO).run()
    state = tmp_path / "e.state.json"

    def search(model):
        s = EvolutionSearch(tiny, tiny_lut, model, budget, 48, 0, state_path=state,
                            checkpoint_s=checkpoint_s, **SMALL_EVO)
        s.checkpoint_chunk = 4
        return s

    # generation 0 = calls 1-3, generation 1 = calls 4-6: interrupted inside generation 1
    model = Interrupted(acc.w, state, stop_at=6)
    with pytest.raises(KeyboardInterrupt):
        search(model).run()
    doc = json.loads(state.read_text())
    assert doc["n_evals"] == 12 and len(doc["pending"]) == 8  # boundary + 2 chunks of gen 1
    if checkpoint_s == 0:
        assert json.loads(model.snapshot) == doc  # the timer had saved it before the kill
    counted = Additive(acc.w)
    res = search(counted).run()
    assert counted.calls == 48 - 20  # the 20 scores saved are not recomputed
    assert res.best_arch == full.best_arch and res.history == full.history
    assert res.evaluated == full.evaluated


def test_malformed_search_state_refused(tmp_path, tiny, tiny_lut, problem):
    acc, budget, _ = problem
    state = tmp_path / "m.state.json"

    def search():
        return RandomSearch(tiny, tiny_lut, acc, budget, 6, 0, state_path=state)

    search().run()
    good = json.loads(state.read_text())
    edits = [lambda d: [d], lambda d: {**d, "evaluated": [1, 2]},
             lambda d: {**d, "n_evals": "many"}, lambda d: {**d, "rng": {"state": 3}},
             lambda d: {**d, "evaluated": {"tiny:99": [0.5, 1.0, 0]}},
             lambda d: {k: v for k, v in d.items() if k != "history"},
             lambda d: {**d, "identity": None}]
    for edit in edits:
        state.write_text(json.dumps(edit(json.loads(json.dumps(good)))))
        with pytest.raises(UserError, match="search state"):
            search().run()
    (tmp_path / "dir.state.json").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        RandomSearch(tiny, tiny_lut, acc, budget, 6, 0,
                     state_path=tmp_path / "dir.state.json").run()
