"""Selectors against planted truth and against their references: lazy greedy equals plain greedy pick for pick,
greedy reaches (1 - 1/e) of the exhaustive optimum, exact farthest point equals the dense reference, planted
clusters get one pick each, GreeDi stays within 5% of the centralised greedy, and every budget, quota and cap holds
(hypothesis)."""

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.select import base
from engine.select.base import Candidates
from engine.select.budget import Balance, Budget, Limits, build_limits, codes, label_quotas
from engine.select.facility import FacilityLocation
from engine.select.greedi import greedi
from engine.select.kcenter import KCenter
from engine.select.knn import knn_graph
from kernels.facility_greedy import (
    facility_greedy_reference,
    facility_lazy,
    facility_stochastic,
    reverse_csr,
    stochastic_sample_size,
)
from kernels.farthest_point import farthest_point_reference


def _cfg(**kw):
    d = {
        "quality_weight": 0.0,
        "neighbours": 8,
        "epsilon": 0.0,
        "tau": 0.9,
        "kcenter": "auto",
        "score": "",
        "ascending": False,
        "strata_rows": 10,
    }
    d.update(kw)
    return SimpleNamespace(**d)


def _unit(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clusters(n_clusters, per, d=32, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(n_clusters, d)))
    lab = np.repeat(np.arange(n_clusters), per)
    x = _unit(centres[lab] + rng.normal(size=(len(lab), d)) * spread)
    return x, lab


def _cands(x, quality=None, labels=None, sources=None, tokens=None):
    n = len(x)
    return Candidates(
        np.array([f"r{i}" for i in range(n)], dtype=object),
        np.full(n, 0.5, np.float32) if quality is None else np.asarray(quality, np.float32),
        np.ones(n) if tokens is None else np.asarray(tokens, np.float64),
        emb=np.asarray(x, np.float16),
        labels=labels,
        sources=sources,
    )


def _graph(x, k):
    nbr, sim, _ = knn_graph(x, k=k)
    return reverse_csr(nbr, sim, len(x))


def _none(n):
    return Limits.none(n).args()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_lazy_greedy_equals_plain_greedy(seed, lam):
    rng = np.random.default_rng(seed)
    x = _unit(rng.normal(size=(60, 6)))
    indptr, point, value = _graph(x, 7)
    q = rng.random(60)
    w = np.ones(60)
    order, gains, _cur, _who, _evals = facility_lazy(
        indptr, point, value, w, q, lam, 15, np.zeros(0, np.int64), *_none(60)
    )
    ref_order, ref_gains = facility_greedy_reference(indptr, point, value, w, q, lam, 15)
    assert order.tolist() == ref_order.tolist()
    np.testing.assert_allclose(gains, ref_gains, rtol=1e-12)
    assert np.all(np.diff(gains) <= 1e-12)  # submodular: gains never grow


def _objective(indptr, point, value, n_points, chosen):
    cur = np.zeros(n_points)
    for i in chosen:
        for e in range(indptr[i], indptr[i + 1]):
            cur[point[e]] = max(cur[point[e]], value[e])
    return cur.sum()


@pytest.mark.parametrize("seed", range(6))
def test_greedy_reaches_1_minus_1_over_e_of_the_exhaustive_optimum(seed):
    rng = np.random.default_rng(100 + seed)
    n, k = 11, 3
    x = _unit(rng.normal(size=(n, 4)))
    indptr, point, value = _graph(x, 4)
    _order, _g, cur, _w, _e = facility_lazy(
        indptr, point, value, np.ones(n), np.zeros(n), 0.0, k, np.zeros(0, np.int64), *_none(n)
    )
    best = max(_objective(indptr, point, value, n, S) for S in itertools.combinations(range(n), k))
    got = cur.sum()
    assert got >= (1 - 1 / math.e) * best - 1e-9
    assert got <= best + 1e-9


def test_stochastic_greedy_is_close_to_lazy_and_deterministic():
    x, _ = _clusters(20, 30, seed=3, spread=0.3)
    indptr, point, value = _graph(x, 10)
    n = len(x)
    args = (indptr, point, value, np.ones(n), np.zeros(n), 0.0, 40, np.zeros(0, np.int64))
    _o, _g, lazy_cur, _w, _ = facility_lazy(*args, *_none(n))
    s = stochastic_sample_size(n, 40, 0.05)
    o1, _g1, cur1, _w1, _ev1 = facility_stochastic(*args, *_none(n), s, 7)
    o2, _g2, _c2, _w2, _ = facility_stochastic(*args, *_none(n), s, 7)
    assert o1.tolist() == o2.tolist() and len(set(o1.tolist())) == 40
    assert cur1.sum() >= 0.9 * lazy_cur.sum()


def test_exact_farthest_point_equals_dense_reference():
    rng = np.random.default_rng(5)
    x = _unit(rng.normal(size=(700, 24)))
    c = _cands(x, quality=rng.random(700))
    got = KCenter(_cfg(kcenter="exact", quality_weight=0.0)).select(c, 60, Limits.none(700))
    xr = _unit(np.asarray(c.emb, np.float32))
    ref, ref_gains = farthest_point_reference(xr, np.ones(700), 60, int(got.order[0]))
    assert got.order.tolist() == ref.tolist()
    np.testing.assert_allclose(got.gains[1:], ref_gains[1:], rtol=1e-5)
    assert got.info["distance_evaluations"] <= got.info["dense_evaluations"]


def test_kcenter_graph_path_on_a_complete_graph_is_exact_farthest_point():
    rng = np.random.default_rng(6)
    x = _unit(rng.normal(size=(120, 10)))
    c = _cands(x)
    got = KCenter(_cfg(kcenter="graph", neighbours=120)).select(c, 25, Limits.none(120))
    xr = _unit(np.asarray(c.emb, np.float32))
    ref, _ = farthest_point_reference(xr, np.ones(120), 25, int(got.order[0]))
    assert got.info["phase1_picks"] == 1 and got.order.tolist() == ref.tolist()


@pytest.mark.parametrize("method", ["facility", "kcenter", "kcenter-graph"])
def test_planted_clusters_get_one_pick_each(method):
    x, lab = _clusters(12, 40, spread=0.03, seed=11)
    c = _cands(x)
    if method == "facility":
        picked = FacilityLocation(_cfg(neighbours=20)).select(c, 12, Limits.none(len(x)))
    else:
        mode = "graph" if method == "kcenter-graph" else "exact"
        picked = KCenter(_cfg(kcenter=mode, neighbours=50)).select(c, 12, Limits.none(len(x)))
    assert sorted(lab[picked.order].tolist()) == list(range(12))


def test_greedi_is_within_5_percent_of_the_centralised_greedy():
    x, _ = _clusters(40, 50, spread=0.25, seed=2)
    c = _cands(x)
    sel = FacilityLocation(_cfg(neighbours=12))
    full = sel.select(c, 80, Limits.none(len(x)))
    part = greedi(sel, c, 80, Limits.none(len(x)), parts=4)

    def dense(order):  # the true facility objective: sum_j max_{i in S} max(0, cos(i, j))
        return np.maximum(x @ x[order].T, 0).max(axis=1).sum()

    f_full, f_part = dense(full.order), dense(part.order)
    assert len(set(part.order.tolist())) == 80 and f_part >= 0.95 * f_full


def test_deita_refuses_near_copies_and_ranks_by_quality():
    x, lab = _clusters(5, 10, spread=0.01, seed=4)  # 5 tight clouds: cosine within a cloud ~0.99
    q = np.linspace(0, 1, len(x))
    sel = base.get("deita")(_cfg(tau=0.9, neighbours=12))
    got = sel.select(_cands(x, quality=q), 20, Limits.none(len(x)))
    assert sorted(lab[got.order].tolist()) == list(range(5))  # one per cloud, and only five rows pass
    for g in range(5):  # the accepted row of each cloud is its best
        assert got.order[lab[got.order] == g][0] == np.flatnonzero(lab == g)[np.argmax(q[lab == g])]


def test_topk_orders_by_score_with_nulls_last():
    c = _cands(np.eye(5, 4, dtype=np.float32) + 0.01)
    c.score = np.array([0.3, np.nan, 0.9, 0.1, 0.9])
    got = base.get("topk")(_cfg(score="s")).select(c, 5, Limits.none(5))
    assert got.order.tolist() == [2, 4, 0, 3, 1]
    got = base.get("topk")(_cfg(score="s", ascending=True)).select(c, 5, Limits.none(5))
    assert got.order.tolist() == [3, 0, 2, 4, 1]


def test_label_quotas():
    assert label_quotas({"a": 100, "b": 5, "c": 50}, 30, Balance("equal")) == {"a": 10, "b": 10, "c": 10}
    q = label_quotas({"a": 100, "b": 5, "c": 45}, 30, Balance("proportional"))
    assert q == {"a": 20, "b": 1, "c": 9} and sum(q.values()) == 30
    assert label_quotas({"a": 3, "b": 4}, 10, Balance("min", 2)) == {"a": 2, "b": 2}
    assert Budget.parse("20%").rows(50) == 10 and Budget.parse("tokens:5").rows(50) == 50


METHODS = ["facility", "stratified", "kcenter", "deita", "topk", "random"]
X_PROP, LAB_PROP = _clusters(8, 25, spread=0.2, seed=9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(METHODS),
    k=st.integers(1, 120),
    label_cap=st.integers(1, 30),
    source_cap=st.integers(0, 40),
    token_budget=st.one_of(st.none(), st.floats(1, 3000)),
    seed=st.integers(0, 3),
)
def test_budget_quotas_and_caps_always_hold(method, k, label_cap, source_cap, token_budget, seed):
    n = len(X_PROP)
    rng = np.random.default_rng(seed)
    labels = np.array([f"L{v}" for v in LAB_PROP % 5], dtype=object)
    sources = np.array([f"s{v}" for v in rng.integers(0, 4, n)], dtype=object)
    tokens = rng.integers(1, 60, n).astype(np.float64)
    c = _cands(X_PROP, quality=rng.random(n), labels=labels, sources=sources, tokens=tokens)
    lab_codes, lab_names = codes(labels)
    src_codes, _ = codes(sources)
    budget = Budget("tokens", token_budget) if token_budget else Budget("count", k)
    lim = build_limits(n, tokens, budget, lab_codes, np.full(len(lab_names), label_cap), src_codes, source_cap)
    sel = base.get(method)(_cfg(neighbours=8, kcenter="exact" if seed % 2 else "graph"), seed=seed)
    got = sel.select(c, k, lim)
    order = got.order
    assert len(order) == len(set(order.tolist())) <= k
    assert np.bincount(lab_codes[order], minlength=len(lab_names)).max(initial=0) <= label_cap
    if source_cap:
        assert np.bincount(src_codes[order]).max(initial=0) <= source_cap
    if token_budget:
        assert tokens[order].sum() <= token_budget + 1e-9
    again = base.get(method)(_cfg(neighbours=8, kcenter="exact" if seed % 2 else "graph"), seed=seed).select(c, k, lim)
    assert again.order.tolist() == order.tolist()  # same inputs, same seed: same picks


def test_deita_on_the_graph_equals_the_dense_scan_when_no_row_is_dense():
    from kernels.diversity_scan import diversity_scan_reference

    rng = np.random.default_rng(8)
    x = _unit(rng.normal(size=(300, 12)))
    q = rng.random(300)
    sel = base.get("deita")(_cfg(tau=0.6, neighbours=60))
    got = sel.select(_cands(x, quality=q), 80, Limits.none(300))
    assert got.info["dense_rows"] == 0
    xr = _unit(np.asarray(_cands(x).emb, np.float32))
    ref = diversity_scan_reference(np.argsort(-q, kind="stable"), xr, 0.6, 80)
    assert got.order.tolist() == ref.tolist()


def test_stratified_takes_each_planted_region_in_proportion_where_random_strays():
    # one label, regions of 600 / 300 / 100 rows far apart: a 50-row sample should hold 30 / 15 / 5 of them
    rng = np.random.default_rng(3)
    centres = _unit(rng.normal(size=(3, 32)))
    region = np.repeat([0, 1, 2], [600, 300, 100])
    x = _unit(centres[region] + rng.normal(size=(1000, 32)) * 0.05)
    c = _cands(x)
    dev = {"stratified": [], "random": []}
    for seed in range(20):
        for method, devs in dev.items():
            got = base.get(method)(_cfg(strata_rows=10), seed=seed).select(c, 50, Limits.none(1000))
            counts = np.bincount(region[got.order], minlength=3)
            devs.append(int(np.abs(counts - [30, 15, 5]).max()))
    # proportional allocation: each k-means stratum within one row of its share, a region (one or two strata) within
    # two; a uniform draw strays by 3.5 rows on average here (the variance stratification removes)
    assert max(dev["stratified"]) <= 2 and np.mean(dev["stratified"]) <= 1
    assert np.mean(dev["random"]) >= 2.5
    a = base.get("stratified")(_cfg(), seed=0).select(c, 50, Limits.none(1000)).order
    b = base.get("stratified")(_cfg(), seed=1).select(c, 50, Limits.none(1000)).order
    assert set(a.tolist()) != set(b.tolist())  # the rows within a region are a seeded draw


def test_stratified_order_keeps_every_prefix_proportional():
    from engine.select.stratified import stratified_order

    strata = np.repeat(np.arange(4), [400, 300, 200, 100])
    order = stratified_order(strata, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    for k in (1, 7, 10, 55, 333, 999):
        counts = np.bincount(strata[order[:k]], minlength=4)
        assert np.all(np.abs(counts - k * np.array([0.4, 0.3, 0.2, 0.1])) <= 1.0), (k, counts)


def test_stratified_strata_stay_inside_each_label():
    x, _ = _clusters(4, 50, spread=0.3, seed=5)
    labels = np.array([f"L{v % 2}" for v in range(len(x))], dtype=object)  # labels cut across the regions
    sel = base.get("stratified")(_cfg(strata_rows=5), seed=0)
    strata = sel.strata(_cands(x, labels=labels), 40)
    # every stratum holds one label, and each label gets strata in proportion to its rows (4 + 4 of 8)
    assert all(len(set(labels[strata == s])) == 1 for s in np.unique(strata))
    assert [len(np.unique(strata[labels == lab])) for lab in ("L0", "L1")] == [4, 4]
    got = sel.select(_cands(x, labels=labels), 40, Limits.none(200))
    assert len(got.order) == 40 and got.info["strata"] == 8
    assert abs(int((labels[got.order] == "L1").sum()) - 20) <= 2  # each label's strata take its share


@pytest.mark.parametrize("method", ["facility", "kcenter", "stratified"])
def test_a_seed_past_a_c_int_reaches_faiss_safely(method):
    # --seed is any int >= 0; faiss's clustering seed is a C int (2**31 raised OverflowError). 6,000 rows: facility's
    # kNN graph goes through faiss IVF above 5,000.
    x = _unit(np.random.default_rng(0).normal(size=(6000, 8)))
    got = base.get(method)(_cfg(), seed=2**31 + 7).select(_cands(x), 20, Limits.none(6000))
    assert len(got.order) == 20 and len(set(got.order.tolist())) == 20
