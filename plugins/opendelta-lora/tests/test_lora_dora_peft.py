"""DoRA (``LoraConfig.use_dora``) against the REAL peft library (0.21.2) as the oracle.

With the same weights (PEFT's ``lora_A``, ``lora_B`` and magnitude, moved off the identity, copied into ours) our
forward equals PEFT's on tiny BERT, T5, GPT-2 and Llama, and so do the gradients of the magnitude and of ``B``;
merging equals PEFT's ``merge_and_unload``, unmerging restores, detaching is exact; checkpoints round-trip, PEFT DoRA
folders load with PEFT's outputs and our export loads in PEFT with ours.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from opendelta import AutoDeltaModel, DeltaConfigError
from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model
from opendelta_lora import DoraLayer, LoraConfig, LoraModel, load_peft_adapter, save_peft_adapter

peft = pytest.importorskip("peft")

ATOL = 1e-5
HEADS = {"t5": "T5ForConditionalGeneration"}
TARGETS = {"bert": ["query", "value"], "t5": ["q", "v"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
ARCHS = tuple(TARGETS)
R, ALPHA = 4, 8
PREFIX = "base_model.model."


def backbone(arch):
    return tiny_model(arch, head=HEADS.get(arch)).eval()


def outputs(model, arch, grad=False):
    with torch.set_grad_enabled(grad):
        return model_output_tensor(model(**tiny_inputs(arch)))


def peft_model(model, arch, **options):
    extra = {"fan_in_fan_out": True} if arch == "gpt2" else {}
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS[arch], use_dora=True, **extra, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(model), config).eval()


def ours(model, arch, **options):
    options = {"lora_r": R, "lora_alpha": ALPHA, "use_dora": True, **options}
    return LoraModel(backbone_model=model, modified_modules=TARGETS[arch], **options)


def peft_layers(pm):
    return {n[len(PREFIX) :]: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def our_layers(delta_model):
    return {target.name: insertion.delta for target, insertion in delta_model.placements()}


def perturb(pm, scale=0.1):
    """Move every trainable PEFT tensor (``B`` off zero, the magnitude off the norm), as training would."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in pm.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def perturb_ours(delta_model, scale=0.1):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in our_layers(delta_model).values():
            for param in layer.parameters():
                param.add_(scale * torch.randn(param.shape, generator=generator))


def copy_from_peft(pm, delta_model):
    mine, theirs = our_layers(delta_model), peft_layers(pm)
    assert sorted(mine) == sorted(theirs)
    with torch.no_grad():
        for name, layer in theirs.items():
            assert isinstance(mine[name], DoraLayer)
            mine[name].lora_A.copy_(layer.lora_A["default"].weight)
            mine[name].lora_B.copy_(layer.lora_B["default"].weight)
            mine[name].lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight)


def pair(arch, **options):
    """(our model, its delta model, PEFT's model), trained-looking and with equal weights."""
    model = backbone(arch)
    pm = peft_model(model, arch, **options)
    perturb(pm)
    delta_model = ours(model, arch, **options)
    copy_from_peft(pm, delta_model)
    return model, delta_model, pm


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ config
def test_use_dora_must_be_a_flag():
    with pytest.raises(DeltaConfigError, match="use_dora"):
        LoraConfig(use_dora="yes")


def test_a_fresh_dora_is_the_identity_and_its_magnitude_the_row_norms():
    model = backbone("bert")
    before = outputs(model, "bert")
    delta_model = ours(model, "bert")
    torch.testing.assert_close(outputs(model, "bert"), before, atol=ATOL, rtol=0)
    layer = our_layers(delta_model)["bert.encoder.layer.0.attention.self.query"]
    torch.testing.assert_close(
        layer.lora_magnitude_vector, model.bert.encoder.layer[0].attention.self.query.weight.norm(dim=1)
    )
    assert "lora_magnitude_vector" in {n.rpartition(".")[2] for n in delta_model.delta_state_dict()}


# ----------------------------------------------------------------------------- forward equals PEFT's
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_equals_peft(arch):
    model, _, pm = pair(arch)
    bare = outputs(peft_model(backbone(arch), arch).get_base_model(), arch)
    mine, theirs = outputs(model, arch), outputs(pm, arch)
    assert (mine - bare).abs().max() > 10 * ATOL  # the delta is not the identity
    assert (mine - theirs).abs().max().item() <= ATOL


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", {"use_rslora": True}),
        ("t5", {"init_lora_weights": "gaussian"}),
        ("bert", {"init_lora_weights": False}),
        ("bert", {"init_lora_weights": "pissa"}),
        ("llama", {"init_lora_weights": "olora"}),
    ],
)
def test_dora_composes_with_rslora_and_the_inits_as_peft(arch, options):
    model, _, pm = pair(arch, **options)
    assert (outputs(model, arch) - outputs(pm, arch)).abs().max().item() <= ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_of_the_magnitude_and_b_equal_peft(arch):
    model, delta_model, pm = pair(arch)
    outputs(model, arch, grad=True).square().sum().backward()
    outputs(pm, arch, grad=True).square().sum().backward()
    mine, theirs = our_layers(delta_model), peft_layers(pm)
    for name, layer in theirs.items():
        pairs = [
            (mine[name].lora_magnitude_vector.grad, layer.lora_magnitude_vector["default"].weight.grad),
            (mine[name].lora_B.grad, layer.lora_B["default"].weight.grad),
            (mine[name].lora_A.grad, layer.lora_A["default"].weight.grad),
        ]
        for got, want in pairs:  # 1e-5 of the gradient's scale (T5's reach ~20: float32 rounding is ~1e-6 of that)
            assert (got - want).abs().max().item() <= ATOL * max(1.0, want.abs().max().item()), name


def test_dropout_in_training_equals_peft_with_the_same_masks():
    model, _, pm = pair("bert", lora_dropout=0.2)
    model.train(), pm.train()
    torch.manual_seed(1)
    mine = outputs(model, "bert")
    torch.manual_seed(1)
    theirs = outputs(pm, "bert")
    assert (mine - theirs).abs().max().item() <= ATOL


# ---------------------------------------------------------------------------------- merge, detach
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_equals_peft_merge_and_unload_and_unmerge_restores(arch):
    model, delta_model, pm = pair(arch)
    original, unmerged = state(model), outputs(model, arch)
    delta_model.merge()
    merged_peft = pm.merge_and_unload()
    assert (outputs(model, arch) - outputs(merged_peft, arch)).abs().max().item() <= ATOL
    assert (outputs(model, arch) - unmerged).abs().max().item() <= ATOL
    delta_model.unmerge()
    now = model.state_dict()
    assert all(torch.allclose(now[k], v, atol=ATOL, rtol=0) for k, v in original.items())
    assert (outputs(model, arch) - unmerged).abs().max().item() <= ATOL


def test_merge_and_unload_gives_peft_weights():
    _, delta_model, pm = pair("llama")
    plain = delta_model.merge_and_unload()
    theirs = pm.merge_and_unload().state_dict()
    mine = plain.state_dict()
    assert sorted(mine) == sorted(theirs)
    assert all((mine[k] - theirs[k]).abs().max().item() <= ATOL for k in mine)


def test_detach_is_exact():
    model = backbone("gpt2")
    original = state(model)
    bare = outputs(model, "gpt2")
    delta_model = LoraModel(backbone_model=model, lora_r=R, lora_alpha=ALPHA, use_dora=True)  # q, v slices
    perturb_ours(delta_model)
    delta_model.detach()
    assert sorted(model.state_dict()) == sorted(original)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert torch.equal(outputs(model, "gpt2"), bare)


# ------------------------------------------------------------------------------------- checkpoints
def test_save_finetuned_round_trip(tmp_path):
    model, delta_model, _ = pair("bert")
    expected = outputs(model, "bert")
    delta_model.freeze_module(exclude=["deltas"])
    delta_model.save_finetuned(tmp_path / "dora")
    fresh = backbone("bert")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "dora", fresh)
    assert loaded.config.use_dora
    assert torch.equal(outputs(fresh, "bert"), expected)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_a_peft_dora_folder_loads_with_peft_outputs(tmp_path, arch):
    model = backbone(arch)
    pm = peft_model(model, arch)
    perturb(pm)
    pm.save_pretrained(tmp_path / "peft")
    expected = outputs(pm, arch)
    fresh = backbone(arch)
    delta_model = AutoDeltaModel.from_finetuned(tmp_path / "peft", fresh)
    assert delta_model.config.use_dora
    assert (outputs(fresh, arch) - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize(("arch", "modules"), [("bert", None), ("gpt2", None), ("llama", None)])
def test_our_export_loads_in_peft_with_equal_outputs(tmp_path, arch, modules):
    model = backbone(arch)
    # on GPT-2 the default targets: the q and v slices of the fused c_attn (exported as the whole layer)
    delta_model = LoraModel(backbone_model=model, lora_r=R, lora_alpha=ALPHA, use_dora=True, modified_modules=modules)
    perturb_ours(delta_model)
    expected = outputs(model, arch)
    save_peft_adapter(delta_model, tmp_path / "export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(backbone(arch), tmp_path / "export").eval()
    assert (outputs(pm, arch) - expected).abs().max().item() <= ATOL
    again = backbone(arch)
    load_peft_adapter(tmp_path / "export", again)
    assert (outputs(again, arch) - expected).abs().max().item() <= ATOL
