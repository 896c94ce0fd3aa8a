"""Compacter passes the core conformance battery on all seven mapped architectures, in each of its variants."""

from opendelta.testing import DeltaMethodSuite


class TestCompacterConformance(DeltaMethodSuite):
    method_name = "compacter"


class TestPHMAdapterConformance(DeltaMethodSuite):
    """Unfactorised blocks, factorised rule, dense Kronecker path, other initialisers, no down-projection bias."""

    method_name = "compacter"
    config_kwargs = {
        "factorized_phm": False,
        "factorized_phm_rule": True,
        "kronecker_prod": True,
        "hypercomplex_division": 2,
        "reduction_factor": 4,
        "phm_c_init": "uniform",
        "hypercomplex_nonlinearity": "glorot-normal",
        "non_linearity": "relu",
        "use_bias_down_sampler": False,
    }


class TestFixedRuleConformance(DeltaMethodSuite):
    """``learn_phm=False``: the rule is a buffer, so "every delta parameter gets a gradient" still holds."""

    method_name = "compacter"
    config_kwargs = {"learn_phm": False, "phm_rank": 3, "hypercomplex_nonlinearity": "normal", "phm_init_range": 0.1}


class TestSharedConformance(DeltaMethodSuite):
    """One rule for every projection, one set of blocks per projection direction, for the whole delta model."""

    method_name = "compacter"
    config_kwargs = {"shared_phm_rule": True, "shared_W_phm": True}
