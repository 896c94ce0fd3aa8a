"""The third-party gated adapter passes core's conformance battery on all seven mapped architectures."""

from opendelta.testing import DeltaMethodSuite


class TestGatedAdapterConformance(DeltaMethodSuite):
    method_name = "gated_adapter"
