"""BitFit passes the core conformance battery on all seven mapped architectures."""

from opendelta.testing import DeltaMethodSuite


class TestBitFitConformance(DeltaMethodSuite):
    method_name = "bitfit"


class TestBitFitExplicitModulesConformance(DeltaMethodSuite):
    """BitFit has no hyper-parameters: this run uses real-name targets broadcast to submodules, with an exclusion.

    ``[r]...`` matches each architecture's self-attention container (BERT-likes' ``attention``, T5's ``layer.0``,
    GPT-2's ``attn``, BART/OPT's ``self_attn``) and every feed-forward projection; the exclusion removes the first
    layer of every stack (``encoder.layer.0``, ``decoder.layers.0``, ``encoder.block.0``, GPT-2's ``h.0``).
    """

    method_name = "bitfit"
    config_kwargs = {
        "modified_modules": [
            r"[r](attention|self_attn|attn|layer\.0)",
            r"[r](intermediate\.dense|output\.dense|fc1|fc2|mlp|DenseReluDense)",
        ],
        "exclude_modules": [r"[r]((encoder|decoder)\.(layer|layers|block)|h)\.0"],
    }
