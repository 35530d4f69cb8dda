"""Hypothesis strategies the servers' property tests share."""

from hypothesis import strategies as st

# any JSON value: what a client may put anywhere in a body (no NaN or infinity: strict JSON has none)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
