"""LoHa passes the core conformance battery on the classic architectures, with its defaults and otherwise."""

from opendelta.testing import DeltaMethodSuite


class TestLoHa(DeltaMethodSuite):
    method_name = "loha"


class TestLoHaFeedForwardConformance(DeltaMethodSuite):
    """Both feed-forward projections by common name, a rank pattern, and a non-zero start (``init_weights=False``)."""

    method_name = "loha"
    config_kwargs = {
        "modified_modules": ["ff.w1", "ff.w2"],
        "common_structure": True,
        "r": 2,
        "init_weights": False,
        "rank_pattern": {r"fc2|wo|c_proj|output\.dense": 1},
    }
