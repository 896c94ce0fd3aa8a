"""What the PEFT oracle tests share: PEFT's OFT/BOFT on a copy of a tiny model, and its parameters copied into ours.

PEFT 0.21.2 puts OFT and BOFT on ``nn.Linear`` only, so for GPT-2 (whose projections are ``Conv1D``) PEFT runs on a
copy whose ``Conv1D`` layers are equivalent ``nn.Linear`` ones (same names, the weight transposed): the same model.
"""

import copy
import warnings

import torch
from torch import nn

from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model

PEFT_TARGETS = {
    # arch: PEFT target_modules, real module names (the query and value projections, GPT-2's fused c_attn)
    "bert": ["query", "value"],
    "t5": ["q", "v"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
}
PREFIX = "base_model.model."


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def fresh(arch):
    return tiny_model(arch).eval()


def max_error(a, b):
    return (a - b).abs().max().item()


def linear_copy(model):
    """A deep copy of ``model`` whose transformers ``Conv1D`` layers are ``nn.Linear`` ones computing the same."""
    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


def quiet(call, *args, **kwargs):
    """PEFT's own warnings (BOFT's missing CUDA extension...) are not what these tests check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def perturb(peft_model, names, seed, scale=0.1, around=None):
    """Redraw PEFT's adapter parameters whose name contains one of ``names``: ``around + scale N(0, 1)``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if any(n in name for n in names):
                noise = scale * torch.randn(param.shape, generator=generator)
                param.copy_(noise + (around.get(next(n for n in names if n in name), 0.0) if around else 0.0))
    return peft_model


def peft_oft(model, arch, seed=0, **options):
    """PEFT's OFT on a linear copy of ``model``, its skew parameters drawn from ``0.1 N(0, 1)``, in eval mode."""
    peft = __import__("peft")
    config = peft.OFTConfig(target_modules=PEFT_TARGETS[arch], **{"oft_block_size": 8, **options})
    peft_model = quiet(peft.get_peft_model, linear_copy(model), config)
    return perturb(peft_model, ["oft_R"], seed).eval()


def peft_oft_blocks(peft_model):
    """``{backbone module name: oft_R weight}`` of a PEFT OFT model."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "oft_R") and "default" in module.oft_R:
            out[name.removeprefix(PREFIX).removesuffix(".base_layer")] = module.oft_R["default"].weight.detach()
    return out


def copy_oft(blocks, delta_model):
    placed = {t.name: i.delta for t, i in delta_model.placements()}
    assert set(blocks) == set(placed), sorted(set(placed) ^ set(blocks))
    with torch.no_grad():
        for name, delta in placed.items():
            delta.oft_R.copy_(blocks[name])


class PythonFbd:
    """Stands in for PEFT's CUDA ``fbd_cuda`` extension (``forward(blocks) -> [block diagonals]``), in PyTorch.

    PEFT without the extension silently drops to one butterfly factor; with this, PEFT runs its own multi-factor
    code path (``FastBlockDiag``), which is the oracle for ``boft_n_butterfly_factor > 1``.
    """

    @staticmethod
    def forward(blocks):  # (N, D, H, H) -> [(N, D H, D H)]
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks.unbind(0)])]


def peft_boft(model, arch, seed=0, monkeypatch=None, **options):
    """PEFT's BOFT on a linear copy of ``model``, ``R ~ 0.1 N(0, 1)`` and ``s ~ 1 + 0.1 N(0, 1)``, in eval mode.

    With ``monkeypatch``, PEFT sees :class:`PythonFbd` as its CUDA extension (more than one factor works).
    """
    peft = __import__("peft")
    if monkeypatch is not None:
        monkeypatch.setattr("peft.tuners.boft.layer.get_fbd_cuda", lambda: PythonFbd)
    config = peft.BOFTConfig(target_modules=PEFT_TARGETS[arch], **{"boft_block_size": 4, **options})
    peft_model = quiet(peft.get_peft_model, linear_copy(model), config)
    return perturb(peft_model, ["boft_R", "boft_s"], seed, around={"boft_s": 1.0}).eval()


def peft_boft_tensors(peft_model):
    """``{backbone module name: (boft_R, boft_s)}`` of a PEFT BOFT model."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "boft_R") and "default" in module.boft_R:
            key = name.removeprefix(PREFIX).removesuffix(".base_layer")
            out[key] = (module.boft_R["default"].detach(), module.boft_s["default"].detach())
    return out


def copy_boft(tensors, delta_model):
    placed = {t.name: i.delta for t, i in delta_model.placements()}
    assert set(tensors) == set(placed), sorted(set(placed) ^ set(tensors))
    with torch.no_grad():
        for name, delta in placed.items():
            delta.boft_R.copy_(tensors[name][0])
            delta.boft_s.copy_(tensors[name][1])


def check_rows_routed(model, inputs, first, second):
    """Each routed row gets exactly what its delta model alone gives it (``first``/``second`` by row parity)."""
    from opendelta import route_rows

    runs = {}
    for name, other in (("first", second), ("second", first)):
        other.detach()
        with torch.no_grad():
            runs[name] = model_output_tensor(model(**inputs))
        other.attach()
    rows = inputs["input_ids"].shape[0]
    plan = [first if i % 2 == 0 else second for i in range(rows)]
    with torch.no_grad(), route_rows(model, plan):
        routed = model_output_tensor(model(**inputs))
    for i in range(rows):
        torch.testing.assert_close(routed[i], runs["first" if i % 2 == 0 else "second"][i], rtol=1e-5, atol=1e-6)


def check_merge_like_peft(kind, model, weights, peft_model, delta_model, child, tolerance=1e-5):
    """Ours attached == PEFT; merged == PEFT's ``merge_and_unload``; unmerge gives ``weights`` back; unload merges.

    ``weights``: the backbone's parameters before the deltas; ``child``: the deltas' child name (``oft``...).
    """
    attached = run(model, kind)
    expected = run(quiet(peft_model.merge_and_unload), kind)
    assert max_error(attached, expected) <= tolerance
    delta_model.merge()
    assert not any(f".{child}" in n for n in dict(model.named_modules()))
    assert max_error(run(model, kind), expected) <= tolerance
    delta_model.unmerge()
    for name, param in model.named_parameters():
        if f".{child}." not in name:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6, msg=name)
    assert max_error(run(model, kind), attached) <= tolerance
    delta_model.merge_and_unload()
    assert max_error(run(model, kind), expected) <= tolerance


def check_refused(folder, fields, named):
    """With ``fields`` written into the folder's PEFT config, loading is refused naming ``named``, changing nothing."""
    import json

    import pytest

    from opendelta import AutoDeltaModel, CheckpointError
    from opendelta.testing import Pristine

    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    model = fresh("bert")
    before = Pristine.of(model)
    with pytest.raises(CheckpointError, match=named):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    before.assert_unchanged(model)
