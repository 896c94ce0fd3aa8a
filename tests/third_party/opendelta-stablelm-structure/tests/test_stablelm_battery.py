"""Every installed delta method passes the conformance battery on StableLM, whose mapping core never heard of."""

from opendelta.testing import DeltaMethodSuite


class TestEveryInstalledMethodOnStableLm(DeltaMethodSuite):
    method_name = None  # parametrized over every installed method (the nox session installs LoRA and the adapter)
    architectures = ("stablelm",)
