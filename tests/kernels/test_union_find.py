import numpy as np

from kernels.union_find import all_roots, union_pairs


def test_components_match_a_breadth_first_search_and_roots_are_the_smallest_row():
    rng = np.random.default_rng(0)
    n = 300
    a = rng.integers(0, n, 200)
    b = rng.integers(0, n, 200)
    parent = np.arange(n, dtype=np.int64)
    merged = union_pairs(parent, a, b)
    roots = all_roots(parent)
    adj = {i: set() for i in range(n)}
    for x, y in zip(a.tolist(), b.tolist()):
        adj[x].add(y)
        adj[y].add(x)
    seen, comps = set(), []
    for s in range(n):
        if s in seen:
            continue
        comp, todo = [], [s]
        seen.add(s)
        while todo:
            v = todo.pop()
            comp.append(v)
            for w in adj[v] - seen:
                seen.add(w)
                todo.append(w)
        comps.append(comp)
    for comp in comps:
        assert set(roots[comp].tolist()) == {min(comp)}
    assert merged == n - len(comps)
