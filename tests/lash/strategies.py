"""Hypothesis settings and strategies shared by the property tests (any input either works or is
a one-line ValueError) in test_config, test_data and test_cli."""

import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ODD = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(allow_nan=True), st.integers(-3, 6))
NUMBER = st.one_of(st.integers(-2, 5), st.floats(-2, 5), st.sampled_from([math.nan, math.inf, -0.0]))
