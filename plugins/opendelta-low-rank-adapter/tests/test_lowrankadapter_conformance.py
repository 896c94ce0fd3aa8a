"""The low-rank adapter passes the core conformance battery on all seven mapped architectures."""

from opendelta.testing import DeltaMethodSuite


class TestLowRankAdapterConformance(DeltaMethodSuite):
    method_name = "low_rank_adapter"


class TestRank3SwishLowRankAdapterConformance(DeltaMethodSuite):
    # rank above 1 (which the original could not do), a wider bottleneck (32 // 8 = 4) and other initialisers
    method_name = "low_rank_adapter"
    config_kwargs = {"reduction_factor": 8, "low_rank_rank": 3, "non_linearity": "swish", "low_rank_w_init": "normal"}


class TestWideGlorotNormalLowRankAdapterConformance(DeltaMethodSuite):
    # a wide bottleneck (32 // 4 = 8) with the other Glorot initialiser and a saturating activation
    method_name = "low_rank_adapter"
    config_kwargs = {"reduction_factor": 4, "low_rank_w_init": "glorot-normal", "non_linearity": "tanh"}
