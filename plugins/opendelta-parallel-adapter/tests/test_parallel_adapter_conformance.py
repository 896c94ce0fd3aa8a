"""The parallel adapter passes the core conformance battery on all seven mapped architectures."""

from opendelta.testing import DeltaMethodSuite


class TestParallelAdapterConformance(DeltaMethodSuite):
    method_name = "parallel_adapter"


class TestScaledReluParallelAdapterConformance(DeltaMethodSuite):
    """The paper's scale s = 4, a narrow bottleneck and another activation."""

    method_name = "parallel_adapter"
    config_kwargs = {"bottleneck_dim": 3, "non_linearity": "relu", "scaled": 4.0}


class TestParallelAdapterOnFeedForwardOnlyConformance(DeltaMethodSuite):
    """Only the feed-forward span, written as a common-name pair (round-trips through JSON as a nested list)."""

    method_name = "parallel_adapter"
    config_kwargs = {"modified_modules": [["ff.w1", "ff.w2"]], "common_structure": True, "bottleneck_dim": 5}
