"""Ordered read-ahead (stitcher and compressor): order kept, memory budget respected, errors
stop it cleanly."""

from __future__ import annotations

import threading

import pytest

from sparsestitch.engine.readahead import in_order


def run(names, sizes, budget, fail_at=None):
    """Drive ``in_order``; record which tensors were being prepared while each was finished."""
    prepared, overlaps, lock = [], {}, threading.Lock()

    def prepare(name):
        if name == fail_at:
            raise ValueError(f"cannot read {name}")
        with lock:
            prepared.append(name)
        return name

    out = []
    for name, finish in in_order(names, prepare, sizes.__getitem__, budget=budget):
        assert finish == name
        out.append(name)
        overlaps[name] = list(prepared)
    return out, overlaps


def test_reading_ahead_goes_as_far_as_the_budget_allows():
    names = list("abcdef")
    out, overlaps = run(names, dict.fromkeys(names, 10), budget=30)
    assert out == names
    for k, name in enumerate(names):   # never more than three tensors held at once
        assert set(overlaps[name]) <= set(names[:k + 3])


def test_order_is_kept_and_read_ahead_happens_only_within_the_budget():
    names = ["a", "b", "c", "d"]
    sizes = {"a": 10, "b": 10, "c": 95, "d": 10}
    out, overlaps = run(names, sizes, budget=100)
    assert out == names
    # While "a" is finished, "b" may already be prepared (10 + 10 <= 100); "c" never
    # overlaps "b" or "d" (10 + 95 > 100), so it is prepared only after "b" is done.
    assert "c" not in overlaps["b"]
    assert "d" not in overlaps["c"]


def test_an_error_while_preparing_reaches_the_caller_and_nothing_after_it_is_prepared():
    with pytest.raises(ValueError, match="cannot read c"):
        run(["a", "b", "c", "d"], dict(a=1, b=1, c=1, d=1), budget=100, fail_at="c")


def test_stopping_early_stops_the_reader():
    prepared = []
    tensors = in_order(["a", "b", "c", "d"], lambda n: prepared.append(n) or n,
                         lambda n: 1, budget=2)   # at most two tensors held
    assert next(tensors)[0] == "a"
    tensors.close()
    assert prepared in (["a"], ["a", "b"])
    assert list(in_order([], None, None, budget=1)) == []


def test_no_workers_prepares_in_the_callers_thread():
    threads = []
    out = [name for name, _ in in_order(["a", "b"], lambda n: threads.append(
        threading.current_thread()) or n, lambda n: 1, budget=1, workers=0)]
    assert out == ["a", "b"] and threads == [threading.main_thread()] * 2
