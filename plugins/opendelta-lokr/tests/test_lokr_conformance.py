"""LoKr passes the core conformance battery on the classic architectures, with its defaults and otherwise."""

from opendelta.testing import DeltaMethodSuite


class TestLoKr(DeltaMethodSuite):
    method_name = "lokr"


class TestLoKrFeedForwardConformance(DeltaMethodSuite):
    """Both feed-forward projections by common name, a rank pattern, decomposed factors, a non-zero start."""

    method_name = "lokr"
    config_kwargs = {
        "modified_modules": ["ff.w1", "ff.w2"],
        "common_structure": True,
        "r": 1,
        "decompose_both": True,
        "init_weights": False,
        "rank_pattern": {r"fc2|wo|c_proj|output\.dense": 1},
    }
