"""A round's weights: sample counts, with no device above `[server] max_weight_share`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.aggregation import capped_weights


def test_counts_under_the_cap_are_kept() -> None:
    counts = {"a": 10, "b": 20, "c": 30, "d": 40, "e": 50}
    assert capped_weights(counts, 0.5) == {k: float(v) for k, v in counts.items()}


def test_an_inflated_count_is_cut_to_the_cap() -> None:
    weights = capped_weights({"liar": 60000, **{f"h{i}": 600 for i in range(5)}}, 0.25)
    assert weights["liar"] / sum(weights.values()) == pytest.approx(0.25)
    assert all(weights[f"h{i}"] == 600 for i in range(5))


def test_too_few_devices_for_the_cap_weigh_equally() -> None:
    assert capped_weights({"a": 60000, "b": 600, "c": 600}, 0.25) == dict.fromkeys("abc", 1.0)
    assert capped_weights({}, 0.25) == {}
    with pytest.raises(ValueError, match="max_share"):
        capped_weights({"a": 1}, 0.0)


@given(
    st.dictionaries(st.text(min_size=1, max_size=4), st.integers(1, 10**9), min_size=1),
    st.floats(0.01, 1.0),
)
def test_no_share_exceeds_the_cap_and_order_is_kept(counts: dict[str, int], cap: float) -> None:
    weights = capped_weights(counts, cap)
    total = sum(weights.values())
    assert max(weights.values()) / total <= max(cap, 1 / len(counts)) * (1 + 1e-9)
    for a in counts:
        for b in counts:
            if counts[a] <= counts[b]:
                assert weights[a] <= weights[b] * (1 + 1e-12)
        assert 0 < weights[a] <= max(counts[a], 1.0)
