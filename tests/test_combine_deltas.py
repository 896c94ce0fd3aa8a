"""``combine_deltas`` against the REAL peft 0.21.2 as the oracle (its ``add_weighted_adapter``).

For every LoRA combination type, two or three LoRA deltas on a tiny BERT, GPT-2 (the whole fused ``c_attn``, and its
q and v slices) and Llama are copied into a PeftModel as adapters; PEFT's ``add_weighted_adapter`` and ours then give
the same dense update ``s B A`` per module and the same outputs. DARE's draws cannot line up with PEFT's (PEFT's new
adapter draws its random init first), so DARE is checked exactly against PEFT's ``merge_utils`` with the same seed,
and statistically on models. IA3 is checked against PEFT's IA3 ``add_weighted_adapter``, BitFit against the weighted
sum by hand. Every refusal is checked by its message, with nothing changed; the inputs stay as they were; the result
saves and loads.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from opendelta import (
    AdapterModel,
    BitFitModel,
    DeltaClassError,
    DeltaConfigError,
    DeltaModel,
    DeltaStateError,
    IA3Model,
    LoraModel,
    combine_deltas,
)
from opendelta import merge_arithmetic as ma
from opendelta.combination import COMBINATION_TYPES
from opendelta.testing import model_output_tensor, perturb, tiny_inputs, tiny_model

peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

ATOL = 1e-5
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
WEIGHTS = [0.7, -0.4, 1.3]
DETERMINISTIC = [t for t in COMBINATION_TYPES if not t.startswith("dare")]
DENSITY = 0.6


def run(model, arch):
    with torch.no_grad():
        return model_output_tensor(model(**tiny_inputs(arch)))


def setup(arch, ranks, alphas=None, **options):
    """A backbone with one perturbed LoRA per rank, and a PeftModel holding the same LoRAs as adapters a0, a1..."""
    model = tiny_model(arch).eval()
    bare = copy.deepcopy(model)
    alphas = alphas or [2 * r for r in ranks]
    deltas = []
    for i, (r, alpha) in enumerate(zip(ranks, alphas, strict=True)):
        delta = LoraModel(model, modified_modules=TARGETS[arch], lora_r=r, lora_alpha=alpha, **options)
        perturb(delta, seed=i + 1, scale=0.3)
        deltas.append(delta)
    extra = {"fan_in_fan_out": True} if arch == "gpt2" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = None
        for i, (r, alpha) in enumerate(zip(ranks, alphas, strict=True)):
            config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS[arch], **extra, **options)
            if pm is None:
                pm = peft.get_peft_model(bare, config, adapter_name=f"a{i}")
            else:
                pm.add_adapter(f"a{i}", config)
    layers = peft_layers(pm)
    with torch.no_grad():
        for i, delta in enumerate(deltas):
            for target, insertion in delta.placements():
                layers[target.name].lora_A[f"a{i}"].weight.copy_(insertion.delta.lora_A)
                layers[target.name].lora_B[f"a{i}"].weight.copy_(insertion.delta.lora_B)
    return model, deltas, pm.eval()


def peft_layers(pm):
    prefix = "base_model.model."
    return {n[len(prefix) :]: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "a0" in m.lora_A}


def peft_dense(layer, name):
    """PEFT's update of adapter ``name`` as ``[out, in]`` (its LoRA layers hold ``B``, ``A`` as ours do)."""
    return layer.lora_B[name].weight @ layer.lora_A[name].weight * layer.scaling[name]


def ours_dense(delta_model):
    return {target.name: insertion.delta.delta_weight() for target, insertion in delta_model.placements()}


def combine_both(arch, kind, ranks, n=2, **kwargs):
    model, deltas, pm = setup(arch, ranks)
    weights = WEIGHTS[:n]
    names = [f"a{i}" for i in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_weighted_adapter(names, weights, "combo", combination_type=kind, **kwargs)
    combined = combine_deltas(deltas, weights, kind, **kwargs)
    return model, deltas, pm, combined


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_lora_combinations_equal_peft(arch, kind):
    """Dense updates, the new rank and the outputs equal PEFT's, for every deterministic combination type."""
    same_rank = kind in ("linear", "ties", "magnitude_prune")
    ranks = [4, 4, 4] if same_rank else [2, 4, 3]
    options = {"density": DENSITY} if "ties" in kind or "magnitude" in kind else {}
    if kind == "svd":
        options["svd_clamp"] = 0.95
    model, deltas, pm, combined = combine_both(arch, kind, ranks, n=3, **options)
    layers = peft_layers(pm)
    assert combined.config.lora_r == pm.peft_config["combo"].r
    assert combined.config.lora_alpha == pm.peft_config["combo"].lora_alpha
    for name, dense in ours_dense(combined).items():
        expected = peft_dense(layers[name], "combo")
        torch.testing.assert_close(dense, expected, atol=ATOL, rtol=1e-4)
        assert dense.abs().max() > 1e-3  # a real update, not zeros compared with zeros
    for delta in deltas:
        delta.detach()
    pm.set_adapter("combo")
    torch.testing.assert_close(run(model, arch), run(pm, arch), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "cat", "ties"])
def test_factor_wise_kinds_write_peft_factors(kind):
    """Where PEFT's factors are unique (no SVD), ours are the same tensors, not just the same product."""
    ranks = [2, 3] if kind == "cat" else [3, 3]
    options = {"density": DENSITY} if kind == "ties" else {}
    _, _, pm, combined = combine_both("bert", kind, ranks, **options)
    layers = peft_layers(pm)
    for target, insertion in combined.placements():
        torch.testing.assert_close(insertion.delta.lora_A, layers[target.name].lora_A["combo"].weight)
        torch.testing.assert_close(insertion.delta.lora_B, layers[target.name].lora_B["combo"].weight)


def test_fused_slices_equal_peft_on_the_whole_layer():
    """GPT-2's q and v slices of ``c_attn`` (out_index): PEFT's LoRA on the whole layer, zero outside, same result."""
    model = tiny_model("gpt2").eval()
    bare = copy.deepcopy(model)
    deltas = [LoraModel(model, lora_r=2, lora_alpha=4) for _ in range(2)]  # default: q and v rows of c_attn
    for i, delta in enumerate(deltas):
        perturb(delta, seed=i + 5, scale=0.3)
        assert all(ins.delta.out_index is not None for ins in delta.insertions())
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(bare, config, adapter_name="a0")
        pm.add_adapter("a1", config)
    layers = peft_layers(pm)
    with torch.no_grad():
        for i, delta in enumerate(deltas):
            for target, ins in delta.placements():
                layer = layers[target.name]
                layer.lora_A[f"a{i}"].weight.copy_(ins.delta.lora_A)
                layer.lora_B[f"a{i}"].weight.zero_().index_copy_(0, ins.delta.out_index, ins.delta.lora_B)
    for kind in ("linear", "cat", "svd"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.add_weighted_adapter(["a0", "a1"], [0.8, 0.5], kind, combination_type=kind)
        combined = combine_deltas(deltas, [0.8, 0.5], kind)
        for name, dense in ours_dense(combined).items():
            torch.testing.assert_close(dense, peft_dense(layers[name], kind), atol=ATOL, rtol=1e-4)
        combined.detach()


@pytest.mark.parametrize("kind", list(ma.BASE_KINDS))
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_tensor_arithmetic_equals_peft_merge_utils(kind, method):
    """The core math equals PEFT's merge_utils bit for bit, DARE's draws included (same seed, same order)."""
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    weights = torch.tensor([0.5, -1.2, 0.9])
    peft_fn = getattr(merge_utils, "task_arithmetic" if kind == "linear" else kind)
    extra = () if kind == "linear" else (DENSITY,)
    extra = (*extra, method) if "ties" in kind else extra
    torch.manual_seed(11)
    expected = peft_fn(tensors, weights, *extra)
    torch.manual_seed(11)
    got = ma.combine_tensors(kind, tensors, weights, None if kind == "linear" else DENSITY, method)
    assert torch.equal(got, expected)


def test_svd_factors_clamp_and_pad():
    """A truncated SVD is the best low-rank part; a rank beyond the matrix pads zeros; the clamp bounds entries."""
    dense = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    down, up = ma.svd_factors(dense, 5)
    assert down.shape == (5, 3) and up.shape == (6, 5)
    torch.testing.assert_close(up @ down, dense, atol=1e-5, rtol=1e-5)
    free_down, free_up = ma.svd_factors(dense, 2)
    limit = torch.quantile(torch.cat([free_up.flatten(), free_down.flatten()]), 0.9)  # of the signed entries
    down, up = ma.svd_factors(dense, 2, clamp=0.9)
    assert torch.equal(down, free_down.clamp(-limit, limit)) and torch.equal(up, free_up.clamp(-limit, limit))
    assert up.abs().max() == limit < free_up.abs().max()


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_is_reproducible_and_density_one_prunes_nothing(kind):
    """DARE on models: reproducible from a generator, other draws with another; density 1 is the un-pruned kind."""
    _, deltas, _ = setup("bert", [3, 3])
    first = ours_dense(
        combine_deltas(deltas, [0.6, 0.4], kind, density=0.5, generator=torch.Generator().manual_seed(1))
    )
    again = ours_dense(
        combine_deltas(deltas, [0.6, 0.4], kind, density=0.5, generator=torch.Generator().manual_seed(1))
    )
    other = ours_dense(
        combine_deltas(deltas, [0.6, 0.4], kind, density=0.5, generator=torch.Generator().manual_seed(2))
    )
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.allclose(first[n], other[n]) for n in first)
    plain = kind.removeprefix("dare_").replace("linear_svd", "svd")  # linear, ties, svd, ties_svd
    full = ours_dense(combine_deltas(deltas, [0.6, 0.4], kind, density=1.0))
    reference = ours_dense(combine_deltas(deltas, [0.6, 0.4], plain, density=1.0))
    for name in full:
        torch.testing.assert_close(full[name], reference[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_draws_as_peft_does(kind):
    """From one seed, each module's A then B masks are PEFT's draws in PEFT's order (its new adapter's own random
    init, drawn first, is what keeps a whole-model comparison from lining up)."""
    _, deltas, _ = setup("bert", [3, 3])
    weights = [0.6, -0.4]
    torch.manual_seed(7)
    combined = combine_deltas(deltas, weights, kind, density=0.5)
    torch.manual_seed(7)
    peft_fn = getattr(merge_utils, kind)
    extra = ("total",) if kind == "dare_ties" else ()
    for j, (_, ins) in enumerate(combined.placements()):
        layers = [list(d.placements())[j].insertion.delta for d in deltas]
        scaled = [w * layer.scaling for w, layer in zip(weights, layers, strict=True)]
        root = [abs(x) ** 0.5 for x in scaled]
        signed = torch.tensor([r if x >= 0 else -r for r, x in zip(root, scaled, strict=True)])
        down = peft_fn([layer.lora_A.detach() for layer in layers], signed, 0.5, *extra)
        up = peft_fn([layer.lora_B.detach() for layer in layers], torch.tensor(root), 0.5, *extra)
        assert torch.equal(ins.delta.lora_A, down) and torch.equal(ins.delta.lora_B, up)


def test_dare_linear_masks_are_bernoulli_and_rescaled():
    """One delta's A under dare_linear: about ``density`` of the entries kept, each divided by ``density``."""
    _, deltas, _ = setup("bert", [4, 4])
    density, weights = 0.3, [1.0, 0.0]  # the second delta weighs nothing: what is left is the first's, pruned
    kept, first_module = [], []
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        combined = combine_deltas(deltas, weights, "dare_linear", density=density, generator=generator)
        for (_, ins), (_, own) in zip(combined.placements(), deltas[0].placements(), strict=True):
            source = own.delta.lora_A * own.delta.scaling**0.5  # A's weight: sqrt(w s), w = 1
            got = ins.delta.lora_A
            nonzero = got != 0
            kept.append(nonzero.float().mean().item())
            torch.testing.assert_close(got[nonzero], source[nonzero] / density)
        first_module.append(next(combined.placements()).insertion.delta.lora_A.clone())
        combined.detach()
    assert abs(sum(kept) / len(kept) - density) < 0.03
    own = next(deltas[0].placements()).insertion.delta
    source = own.lora_A * own.scaling**0.5
    mean = torch.stack(first_module).mean(0)  # over the seeds: the expectation is the un-pruned tensor
    assert (mean - source).abs().mean() < 0.35 * source.abs().mean()


def test_ia3_linear_equals_peft_and_the_weighted_sum():
    model = tiny_model("bert").eval()
    bare = copy.deepcopy(model)
    options = {
        "modified_modules": ["key", "value", "intermediate.dense"],
        "feedforward_modules": ["intermediate.dense"],
    }
    deltas = [IA3Model(model, **options) for _ in range(2)]
    for i, delta in enumerate(deltas):
        perturb(delta, seed=i + 1, scale=0.3)
    config = peft.IA3Config(
        target_modules=["key", "value", "intermediate.dense"], feedforward_modules=["intermediate.dense"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(bare, config, adapter_name="a0")
        pm.add_adapter("a1", config)
    prefix = "base_model.model."
    layers = {n[len(prefix) :]: m for n, m in pm.named_modules() if hasattr(m, "ia3_l") and "a0" in m.ia3_l}
    with torch.no_grad():
        for i, delta in enumerate(deltas):
            for target, ins in delta.placements():
                layers[target.name].ia3_l[f"a{i}"].copy_(ins.delta.ia3_l.view_as(layers[target.name].ia3_l[f"a{i}"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_weighted_adapter(["a0", "a1"], [0.7, 0.5], "combo")
    combined = combine_deltas(deltas, [0.7, 0.5], "linear")
    for (target, ins), (_, a), (_, b) in zip(
        combined.placements(), deltas[0].placements(), deltas[1].placements(), strict=True
    ):
        torch.testing.assert_close(ins.delta.ia3_l, 0.7 * a.delta.ia3_l + 0.5 * b.delta.ia3_l)
        torch.testing.assert_close(ins.delta.ia3_l, layers[target.name].ia3_l["combo"].flatten())
    for delta in deltas:
        delta.detach()
    pm.set_adapter("combo")
    torch.testing.assert_close(run(model, "bert"), run(pm, "bert"), atol=ATOL, rtol=1e-4)


def test_bitfit_linear_is_the_weighted_sum():
    model = tiny_model("gpt2").eval()
    deltas = [BitFitModel(model) for _ in range(3)]
    for i, delta in enumerate(deltas):
        perturb(delta, seed=i + 1)
    combined = combine_deltas(deltas, [0.2, 0.5, -0.3], "linear")
    assert len(list(combined.placements())) == len(list(deltas[0].placements()))
    for (_, ins), *sources in zip(combined.placements(), *(d.placements() for d in deltas), strict=True):
        expected = sum(w * s.insertion.delta.bias for w, s in zip([0.2, 0.5, -0.3], sources, strict=True))
        torch.testing.assert_close(ins.delta.bias, expected)
    for delta in deltas:
        delta.detach()
    got = run(model, "gpt2")
    combined.detach()
    by_hand = BitFitModel(model)  # the weighted sums written in by hand: the same model
    with torch.no_grad():
        for (_, ins), (_, own) in zip(by_hand.placements(), combined.placements(), strict=True):
            ins.delta.bias.copy_(own.delta.bias)
    torch.testing.assert_close(run(model, "gpt2"), got)
    by_hand.detach()
    assert not torch.allclose(run(model, "gpt2"), got)


def test_inputs_are_left_as_they_were():
    _, deltas, _ = setup("bert", [3, 3])
    deltas[1].detach()
    before = [{k: v.clone() for k, v in d.delta_state_dict().items()} for d in deltas]
    grads = [[p.requires_grad for p in d.parameters()] for d in deltas]
    rng = torch.get_rng_state()
    combined = combine_deltas(deltas, [0.5, 0.5], "svd")
    assert torch.equal(torch.get_rng_state(), rng)  # building the new delta drew from a forked generator
    assert deltas[0].attached and not deltas[1].attached and combined.attached
    for d, state, flags in zip(deltas, before, grads, strict=True):
        after = d.delta_state_dict()
        assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
        assert [p.requires_grad for p in d.parameters()] == flags


def test_save_and_load_round_trip(tmp_path):
    model, deltas, _ = setup("bert", [2, 3])
    combined = combine_deltas(deltas, [0.5, 0.5], "cat")
    for delta in deltas:
        delta.detach()
    expected = run(model, "bert")
    combined.detach()
    assert not torch.allclose(run(model, "bert"), expected)  # the combined delta changes the outputs
    combined.attach()
    combined.freeze_module()  # only the combined delta is trainable, so only it is saved
    combined.save_finetuned(tmp_path / "combined")
    combined.detach()
    loaded = LoraModel.from_finetuned(tmp_path / "combined", model)
    assert loaded.config.lora_r == 5 and loaded.config.lora_alpha == 5
    torch.testing.assert_close(run(model, "bert"), expected)


def _state(model):
    return [n for n, _ in model.named_modules()], run(model, "bert")


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda d, o: combine_deltas([], []), DeltaConfigError, "at least one delta model"),
        (lambda d, o: combine_deltas(d, [1.0]), DeltaConfigError, "2 delta models but 1 weights"),
        (lambda d, o: combine_deltas(d, [1.0, float("nan")]), DeltaConfigError, "finite numbers"),
        (lambda d, o: combine_deltas([d[0], o["bitfit"]], [1, 1], "linear"), DeltaConfigError, "one method"),
        (lambda d, o: combine_deltas([d[0], o["elsewhere"]], [1, 1]), DeltaStateError, "different models"),
        (lambda d, o: combine_deltas([d[0], o["key"]], [1, 1]), DeltaConfigError, "same modified_modules"),
        (lambda d, o: combine_deltas(d, [1, 1], "average"), DeltaConfigError, "'svd', 'linear', 'cat', 'ties'"),
        (lambda d, o: combine_deltas(d, [1, 1], "ties"), DeltaConfigError, "got no density; pass density="),
        (lambda d, o: combine_deltas(d, [1, 1], "dare_linear", density=0), DeltaConfigError, "in (0, 1]"),
        (lambda d, o: combine_deltas(d, [1, 1], "magnitude_prune", density=1.5), DeltaConfigError, "density=1.5"),
        (lambda d, o: combine_deltas([o["bitfit"]], [1]), DeltaConfigError, "combination_type='linear'"),
        (lambda d, o: combine_deltas([d[0], o["rank4"]], [1, 1], "linear"), DeltaConfigError, "same lora_r"),
        (lambda d, o: combine_deltas(d, [1, 1], svd_rank=0), DeltaConfigError, "svd_rank"),
        (lambda d, o: combine_deltas(d, [1, 1], svd_clamp=2), DeltaConfigError, "svd_clamp"),
        (
            lambda d, o: combine_deltas(d, [1, 1], "ties", density=0.5, majority_sign_method="most"),
            DeltaConfigError,
            "'total' or 'frequency'",
        ),
        (lambda d, o: combine_deltas([d[0], o["merged"]], [1, 1]), DeltaStateError, "unmerge() it first"),
        (lambda d, o: combine_deltas([d[0], o["dora"]], [1, 1]), DeltaStateError, "not a plain low-rank product"),
    ],
)
def test_refusals_name_the_problem_and_change_nothing(make, error, message):
    model, deltas, _ = setup("bert", [2, 2])
    others = {
        "bitfit": BitFitModel(model, modified_modules=["query", "value"]),
        "elsewhere": LoraModel(tiny_model("bert"), modified_modules=["query", "value"], lora_r=2),
        "key": LoraModel(model, modified_modules=["query", "key"], lora_r=2),
        "rank4": LoraModel(model, modified_modules=["query", "value"], lora_r=4),
        "merged": LoraModel(model, modified_modules=["query", "value"], lora_r=2),
        "dora": LoraModel(model, modified_modules=["query", "value"], lora_r=2, use_dora=True),
    }
    for other in others.values():
        if other.backbone_model is model:
            perturb(other, seed=9)
    others["merged"].merge()
    states = [{k: v.clone() for k, v in d.delta_state_dict().items()} for d in deltas]
    names, output = _state(model)
    with pytest.raises(error, match=re.escape(message)):
        make(deltas, others)
    assert _state(model)[0] == names
    torch.testing.assert_close(_state(model)[1], output)
    for d, state in zip(deltas, states, strict=True):
        assert all(torch.equal(v, d.delta_state_dict()[k]) for k, v in state.items())


def test_one_delta_is_combined_linearly_as_peft_does():
    _, _, pm, combined = combine_both("bert", "svd", [3], n=1)
    assert combined.config.lora_r == 3 == pm.peft_config["combo"].r
    layers = peft_layers(pm)
    for target, ins in combined.placements():
        torch.testing.assert_close(ins.delta.lora_A, layers[target.name].lora_A["combo"].weight)


def test_methods_declaring_no_combination_are_refused():
    model = tiny_model("bert")
    deltas = [AdapterModel(model) for _ in range(2)]
    with pytest.raises(DeltaConfigError, match=r"AdapterModel deltas cannot be combined: .* low_rank_fields"):
        combine_deltas(deltas, [0.5, 0.5], "linear")


def test_low_rank_fields_must_name_config_fields():
    with pytest.raises(DeltaClassError, match=r"low_rank_fields must be None or \(rank field, alpha field\)"):

        class Wrong(LoraModel):
            low_rank_fields = ("rank", "lora_alpha")

    assert LoraModel.low_rank_fields == ("lora_r", "lora_alpha") and DeltaModel.low_rank_fields is None
    assert BitFitModel.combines_linearly and IA3Model.combines_linearly and not LoraModel.combines_linearly


@pytest.mark.parametrize("kind", ["linear", "svd"])
def test_rslora_scales_as_peft_does(kind):
    """With use_rslora the combined delta's scale is alpha / sqrt(r) = sqrt(r), which PEFT leaves as it is too."""
    _, deltas, pm = setup("bert", [4, 4], use_rslora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], "combo", combination_type=kind)
    combined = combine_deltas(deltas, [0.5, 0.5], kind)
    layers = peft_layers(pm)
    for name, dense in ours_dense(combined).items():
        torch.testing.assert_close(dense, peft_dense(layers[name], "combo"), atol=ATOL, rtol=1e-4)
    assert next(combined.insertions()).delta.scaling == 2.0  # 4 / sqrt(4)


def test_training_mode_dropout_is_refused_until_eval():
    model = tiny_model("bert")
    deltas = [LoraModel(model, modified_modules=["query"], lora_r=2, lora_dropout=0.1) for _ in range(2)]
    model.train()
    with pytest.raises(DeltaStateError, match=r"dropout in training mode.*call backbone.eval\(\)"):
        combine_deltas(deltas, [0.5, 0.5])
    model.eval()
    assert combine_deltas(deltas, [0.5, 0.5]).attached


def test_stacked_expert_weights_are_refused_as_peft_does():
    """transformers 5's experts hold 3-D weights (a parameter delta, PEFT's target_parameters): refused by name.

    transformers 4.57's experts are lists of linear layers, whose LoRA deltas combine like any other.
    """
    model = tiny_model("mixtral")
    deltas = [LoraModel(model, modified_modules=["experts"], lora_r=2) for _ in range(2)]
    if any(t.parameter is not None for t in deltas[0].targets):
        names = [n for n, _ in model.named_modules()]
        with pytest.raises(DeltaStateError, match=r"has no low-rank factors to combine .* stacked expert weights"):
            combine_deltas(deltas, [0.5, 0.5])
        assert [n for n, _ in model.named_modules()] == names  # nothing built
    else:
        assert combine_deltas(deltas, [0.5, 0.5], "cat").config.lora_r == 4


def test_a_failure_while_writing_takes_the_new_delta_out(monkeypatch):
    """Should writing the combined factors fail half-way, the half-built delta leaves the backbone."""
    model, deltas, _ = setup("bert", [2, 2])
    names, output = _state(model)
    calls = []

    def failing(self, down, up):
        calls.append(self)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(type(next(deltas[0].insertions()).delta), "load_low_rank_factors", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        combine_deltas(deltas, [0.5, 0.5], "linear")
    assert len(calls) == 2
    assert _state(model)[0] == names
    torch.testing.assert_close(_state(model)[1], output)
