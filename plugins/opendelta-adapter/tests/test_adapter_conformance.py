"""The adapter passes the core conformance battery on all seven mapped architectures."""

from opendelta.testing import DeltaMethodSuite


class TestAdapterConformance(DeltaMethodSuite):
    method_name = "adapter"


class TestSmallReluAdapterConformance(DeltaMethodSuite):
    method_name = "adapter"
    config_kwargs = {"bottleneck_dim": 3, "non_linearity": "relu"}
