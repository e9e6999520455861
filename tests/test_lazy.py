from fgbg_utils.data.lazy import LazySequence


def test_lazy_sequence_loads_on_access_only():
    calls = []
    seq = LazySequence([1, 2, 3], lambda k: calls.append(k) or k * 10)
    assert len(seq) == 3 and calls == []
    assert seq[1] == 20 and seq[-1] == 30 and seq[0:2] == [10, 20]
    both = seq + LazySequence("ab", str.upper)
    assert len(both) == 5 and list(both) == [10, 20, 30, "A", "B"]
    assert calls == [2, 3, 1, 2, 1, 2, 3]
