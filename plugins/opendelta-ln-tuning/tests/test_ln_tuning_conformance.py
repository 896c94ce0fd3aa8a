"""LN tuning passes the core conformance battery on the seven classic architectures."""

from opendelta.testing import DeltaMethodSuite


class TestLnTuning(DeltaMethodSuite):
    method_name = "ln_tuning"
