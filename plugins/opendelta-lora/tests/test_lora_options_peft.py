"""LoRA's PEFT options (``use_rslora``, ``init_lora_weights``, LoRA+) against the REAL peft library as the oracle.

With the same weights our forward equals PEFT's on tiny BERT, T5, GPT-2 and Llama; PiSSA's and OLoRA's residual base
weight equals the one PEFT writes, while ours is never written (``detach()`` gives the original back bit for bit);
PEFT folders of each option load through ``AutoDeltaModel.from_finetuned`` with PEFT's outputs, or are refused by
name; merging equals PEFT's ``merge_and_unload``; LoRA+ groups parameters as PEFT's ``create_loraplus_optimizer``.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

from opendelta import AutoDeltaModel, CheckpointError, DeltaConfigError
from opendelta.plugin_api import stored_update
from opendelta.testing import model_output_tensor, tiny_inputs, tiny_model
from opendelta_lora import LoraConfig, LoraModel, create_loraplus_optimizer, save_peft_adapter

peft = pytest.importorskip("peft")
peft_optimizers = pytest.importorskip("peft.optimizers")

ATOL = 1e-5
HEADS = {"t5": "T5ForConditionalGeneration"}
TARGETS = {"bert": ["query", "value"], "t5": ["q", "v"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
ARCHS = tuple(TARGETS)
R, ALPHA = 4, 8


def backbone(arch):
    return tiny_model(arch, head=HEADS.get(arch))


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def peft_config(arch, **options):
    extra = {"fan_in_fan_out": True} if arch == "gpt2" else {}
    return peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS[arch], **extra, **options)


def peft_model(model, arch, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(model), peft_config(arch, **options)).eval()


def ours(model, arch, **options):
    options = {"lora_r": R, "lora_alpha": ALPHA, **options}
    return LoraModel(backbone_model=model, modified_modules=TARGETS[arch], **options)


def peft_layers(pm):
    """``{module name: PEFT LoRA layer}``, by the backbone's names."""
    prefix = "base_model.model."
    return {n[len(prefix) :]: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def our_layers(delta_model):
    return {target.name: insertion.delta for target, insertion in delta_model.placements()}


def perturb_peft(pm, scale=0.1):
    """Move every trainable PEFT tensor, as training would (so ``B`` is not zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in pm.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def copy_from_peft(pm, delta_model):
    ours_ = our_layers(delta_model)
    theirs = peft_layers(pm)
    assert sorted(ours_) == sorted(theirs)
    with torch.no_grad():
        for name, layer in theirs.items():
            ours_[name].lora_A.copy_(layer.lora_A["default"].weight)
            ours_[name].lora_B.copy_(layer.lora_B["default"].weight)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_equal(model, saved, *, attached=False):
    """The backbone's tensors bit for bit as saved; detached, nothing else either."""
    now = model.state_dict()
    if not attached:
        assert sorted(now) == sorted(saved)
    assert all(torch.equal(now[k], saved[k]) for k in saved)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("value", ["Pissa", "pissa_niter_", "pissa_niter_x", "corda", "loftq", "kaiming_normal"])
def test_an_unknown_init_is_refused_naming_the_field_and_the_values(value):
    with pytest.raises(DeltaConfigError, match=r"init_lora_weights.*True, False or one of 'kaiming', 'gaussian'"):
        LoraConfig(init_lora_weights=value)


def test_wrong_types_are_refused_naming_the_field():
    with pytest.raises(DeltaConfigError, match="use_rslora"):
        LoraConfig(use_rslora="yes")
    with pytest.raises(DeltaConfigError, match="init_lora_weights"):
        LoraConfig(init_lora_weights=1.5)


# ----------------------------------------------------------------------------- forward equals PEFT's
OPTIONS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "gaussian": {"init_lora_weights": "gaussian"},
    "random": {"init_lora_weights": False},
    "rslora-gaussian": {"use_rslora": True, "init_lora_weights": "gaussian"},
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("option", OPTIONS)
def test_forward_equals_peft_with_the_same_weights(arch, option):
    model = backbone(arch)
    pm = peft_model(model, arch, **OPTIONS[option])
    perturb_peft(pm)
    delta_model = ours(model, arch, **OPTIONS[option])
    layer = next(iter(our_layers(delta_model).values()))
    peft_layer = next(iter(peft_layers(pm).values()))
    assert layer.scaling == pytest.approx(peft_layer.scaling["default"], rel=1e-12)
    copy_from_peft(pm, delta_model)
    error = (run(model, arch) - run(pm, arch)).abs().max().item()
    assert error <= ATOL, error


def test_rslora_scales_by_alpha_over_sqrt_r():
    delta_model = ours(backbone("bert"), "bert", use_rslora=True)
    assert all(layer.scaling == ALPHA / math.sqrt(R) for layer in our_layers(delta_model).values())


def test_the_inits_are_peft_s():
    """Gaussian: ``A ~ N(0, 1/r)``, ``B = 0``; False: ``B`` Kaiming-uniform too, so the outputs change at once."""
    torch.manual_seed(0)
    model = backbone("llama")
    bare = run(model, "llama")
    gaussian = ours(model, "llama", init_lora_weights="gaussian", lora_r=64)
    a = torch.cat([layer.lora_A.flatten() for layer in our_layers(gaussian).values()])
    assert abs(a.std().item() - 1 / 64) < 0.1 / 64
    assert all(not layer.lora_B.any() for layer in our_layers(gaussian).values())
    torch.testing.assert_close(run(model, "llama"), bare, atol=0, rtol=0)
    gaussian.detach()
    random = ours(model, "llama", init_lora_weights=False)
    assert not random.identity_at_init
    for layer in our_layers(random).values():
        assert layer.lora_B.any() and layer.lora_B.abs().max() <= 1 / math.sqrt(R)  # nn.Linear(r, out)'s bound
    assert (run(model, "llama") - bare).abs().max() > 100 * ATOL


# --------------------------------------------------------------------------------------- PiSSA / OLoRA
RESIDUAL_ARCHS = {  # PEFT's OLoRA decomposes GPT-2's Conv1D weight in its stored [in, out] layout, which is no LoRA
    "pissa": ARCHS,
    "olora": ("bert", "t5", "llama"),
}
RESIDUAL_CASES = [(init, arch) for init, archs in RESIDUAL_ARCHS.items() for arch in archs]


@pytest.mark.parametrize(("init", "arch"), RESIDUAL_CASES)
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_r", "rslora"])
def test_pissa_olora_residual_and_outputs_equal_peft_s_and_detach_is_exact(init, arch, rslora):
    model = backbone(arch)
    original, bare = state(model), run(model, arch)
    pm = peft_model(model, arch, init_lora_weights=init, use_rslora=rslora)
    delta_model = ours(model, arch, init_lora_weights=init, use_rslora=rslora)
    assert_bit_equal(model, original, attached=True)  # the stored weights are never written
    modules = dict(model.named_modules())
    worst_weight = worst_init = 0.0
    for name, layer in peft_layers(pm).items():
        mine = our_layers(delta_model)[name]
        residual = modules[name].weight + stored_update(modules[name], mine.base_update())
        worst_weight = max(worst_weight, (residual - layer.get_base_layer().weight).abs().max().item())
        worst_init = max(worst_init, (mine.lora_A - layer.lora_A["default"].weight).abs().max().item())
        worst_init = max(worst_init, (mine.lora_B - layer.lora_B["default"].weight).abs().max().item())
    assert worst_weight <= ATOL and worst_init <= ATOL, (worst_weight, worst_init)
    torch.testing.assert_close(run(model, arch), run(pm, arch), atol=ATOL, rtol=0)  # both the bare model's
    torch.testing.assert_close(run(model, arch), bare, atol=ATOL, rtol=0)
    perturb_peft(pm, scale=0.1 if arch == "t5" else 0.25)  # T5's unscaled attention amplifies rounding the most
    copy_from_peft(pm, delta_model)
    expected = run(pm, arch)
    peft_merged = run(copy.deepcopy(pm).merge_and_unload(), arch)
    assert (expected - bare).abs().max() > 100 * ATOL
    assert (run(model, arch) - expected).abs().max() <= ATOL
    delta_model.detach()
    assert_bit_equal(model, original)
    torch.testing.assert_close(run(model, arch), bare, atol=0, rtol=0)
    delta_model.attach()
    assert (run(model, arch) - expected).abs().max() <= ATOL
    # merged, both sides round differently from unmerged (PEFT's own merge differs from its unmerged by ~1e-5 on
    # T5, whose unscaled attention amplifies rounding): merged is compared with merged
    delta_model.merge()
    assert (run(model, arch) - peft_merged).abs().max() <= ATOL
    delta_model.unmerge()
    assert (run(model, arch) - expected).abs().max() <= ATOL
    unloaded = delta_model.merge_and_unload()
    assert (run(unloaded, arch) - peft_merged).abs().max() <= ATOL


def test_pissa_niter_is_a_low_rank_svd_and_computes_as_peft_with_its_decomposition():
    arch = "llama"
    model = backbone(arch)
    original = state(model)
    pm = peft_model(model, arch, init_lora_weights="pissa_niter_4")
    initial = {
        n: (m.lora_A["default"].weight.clone(), m.lora_B["default"].weight.clone()) for n, m in peft_layers(pm).items()
    }
    delta_model = ours(model, arch, init_lora_weights="pissa_niter_4")
    for layer in our_layers(delta_model).values():  # a rank-r part, subtracted from the base: identity at first
        assert torch.linalg.matrix_rank(layer.base_update()) == R
        assert layer.delta_weight().abs().max() <= ATOL
    with torch.no_grad():  # the same decomposition as PEFT's: its initial A, B as ours
        for name, (a0, b0) in initial.items():
            layer = our_layers(delta_model)[name]
            layer.lora_A0.copy_(a0)
            layer.lora_B0.copy_(b0)
    perturb_peft(pm)
    copy_from_peft(pm, delta_model)
    assert (run(model, arch) - run(pm, arch)).abs().max() <= ATOL
    delta_model.detach()
    assert_bit_equal(model, original)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_saved_pissa_checkpoint_loads_onto_a_fresh_backbone_with_the_same_outputs(init, tmp_path):
    arch = "llama"
    model = backbone(arch)
    delta_model = ours(model, arch, init_lora_weights=init, use_rslora=True)
    with torch.no_grad():
        for layer in our_layers(delta_model).values():
            layer.lora_B.add_(0.1)
    expected = run(model, arch)
    delta_model.freeze_module()
    delta_model.save_finetuned(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["init_lora_weights"] == init and saved["use_rslora"] is True
    fresh = backbone(arch)
    original = state(fresh)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "ckpt", backbone_model=fresh)
    assert (run(fresh, arch) - expected).abs().max() <= ATOL
    loaded.detach()
    assert_bit_equal(fresh, original)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_exported_pissa_model_loads_in_peft_as_its_converted_lora(init, tmp_path):
    arch = "llama"
    model = backbone(arch)
    delta_model = ours(model, arch, init_lora_weights=init)
    with torch.no_grad():
        for layer in our_layers(delta_model).values():
            layer.lora_A.add_(0.05)
            layer.lora_B.add_(0.05)
    expected = run(model, arch)
    save_peft_adapter(delta_model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["init_lora_weights"]) == (2 * R, 2 * ALPHA, True)
    loaded = peft.PeftModel.from_pretrained(backbone(arch), tmp_path / "adapter").eval()
    assert (run(loaded, arch) - expected).abs().max() <= ATOL


# -------------------------------------------------------------------------------------------- PEFT folders
FOLDER_OPTIONS = {
    "rslora": {"use_rslora": True},
    "gaussian": {"init_lora_weights": "gaussian"},
    "random": {"init_lora_weights": False},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "pissa-rslora": {"init_lora_weights": "pissa", "use_rslora": True},
}


def saved_by_peft(arch, folder, **options):
    model = backbone(arch)
    pm = peft_model(model, arch, **options)
    perturb_peft(pm, scale=0.5)
    pm.save_pretrained(folder)
    return run(pm, arch)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("option", FOLDER_OPTIONS)
def test_a_peft_folder_of_each_option_loads_with_peft_s_outputs(arch, option, tmp_path):
    expected = saved_by_peft(arch, tmp_path / "adapter", **FOLDER_OPTIONS[option])
    fresh = backbone(arch)
    original, bare = state(fresh), run(fresh, arch)
    assert (expected - bare).abs().max() > 100 * ATOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(backbone(arch), tmp_path / "adapter").eval()
    assert (run(reloaded, arch) - expected).abs().max() <= ATOL  # PEFT itself reloads it so
    delta_model = AutoDeltaModel.from_finetuned(tmp_path / "adapter", backbone_model=fresh)
    assert (run(fresh, arch) - expected).abs().max() <= ATOL
    delta_model.detach()
    assert_bit_equal(fresh, original)


def test_a_pissa_niter_folder_is_refused_naming_it_and_peft_s_conversion(tmp_path):
    saved_by_peft("llama", tmp_path / "adapter", init_lora_weights="pissa_niter_2")
    fresh = backbone("llama")
    original = state(fresh)
    with pytest.raises(CheckpointError, match=r"pissa_niter_2.*path_initial_model_for_weight_conversion"):
        AutoDeltaModel.from_finetuned(tmp_path / "adapter", backbone_model=fresh)
    assert_bit_equal(fresh, original)


@pytest.mark.parametrize("init", ["corda", "lora_ga", "loftq", "mica"])
def test_other_base_rewriting_inits_are_refused_by_name(init, tmp_path):
    saved_by_peft("llama", tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "init_lora_weights": init}))
    with pytest.raises(CheckpointError, match=rf"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        AutoDeltaModel.from_finetuned(tmp_path / "adapter", backbone_model=backbone("llama"))


@pytest.mark.parametrize("init", ["pissa_niter_2", "olora"])
def test_a_peft_converted_folder_loads_as_plain_lora(init, tmp_path):
    arch = "llama"
    model = backbone(arch)
    pm = peft_model(model, arch, init_lora_weights=init)
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter, as plain LoRA
    pm.save_pretrained(tmp_path / "initial")
    pm.peft_config["default"].init_lora_weights = init
    perturb_peft(pm, scale=0.5)
    expected = run(pm, arch)
    with warnings.catch_warnings():  # (PEFT warns that OLoRA changes the base weights)
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    fresh = backbone(arch)
    delta_model = AutoDeltaModel.from_finetuned(tmp_path / "converted", backbone_model=fresh)
    assert delta_model.config.lora_r == 2 * R
    assert (run(fresh, arch) - expected).abs().max() <= ATOL


# ------------------------------------------------------------------------------------------------- LoRA+
def test_loraplus_groups_equal_peft_s():
    arch = "bert"
    model = backbone(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            copy.deepcopy(model), peft.LoraConfig(r=R, target_modules=TARGETS[arch], modules_to_save=["classifier"])
        )
    theirs = peft_optimizers.create_loraplus_optimizer(
        pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01
    )
    delta_model = ours(model, arch)
    delta_model.freeze_module(exclude=["deltas", "classifier"])
    mine = create_loraplus_optimizer(delta_model, torch.optim.AdamW, lr=1e-3, loraplus_weight_decay=0.01)

    def settings(optimizer, names):
        return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}

    def peft_name(name):
        name = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
        for part in ("lora_A", "lora_B"):
            name = name.replace(f".{part}.default.weight", f".lora.{part}")
        return name

    peft_names = {id(p): peft_name(n) for n, p in pm.named_parameters()}
    our_names = {id(p): n for n, p in model.named_parameters()}
    expected = settings(theirs, peft_names)
    assert settings(mine, our_names) == expected
    assert expected["classifier.bias"] == (16e-3, 0.0)  # a bias: B's rate, no decay, as PEFT
    assert expected["classifier.weight"] == (1e-3, 0.01)
    assert {v for k, v in expected.items() if k.endswith("lora_B")} == {(16e-3, 0.01)}
