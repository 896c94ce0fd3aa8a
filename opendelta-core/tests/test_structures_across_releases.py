"""A mapping names modules of every supported transformers release, when a release restructured the module tree.

ViT's blocks are ``encoder.layer.N.attention.attention.query`` on 4.57 and ``layers.N.attention.q_proj`` on 5: the
mapping holds both layouts, each under a ``transformers`` specifier, and only the installed release's applies.
"""

import pytest
from packaging.version import Version
from torch import nn

import opendelta.structures
from opendelta.errors import StructureValidationError
from opendelta.structures import CommonStructure, admits_installed_transformers
from opendelta.testing import tiny_model


def _document(old_releases="<5", new_releases=">=5"):
    block = {"name": "$", "children": {"query": {"name": "attn.q"}}}
    return {
        "schema_version": 1,
        "model_type": "two_layouts",
        "architectures": ["Model"],
        "tree": {
            "children": {
                "encoder.layer": {"name": "encoder.block", "transformers": old_releases, "children": {"$": block}},
                "layers": {"name": "encoder.block", "transformers": new_releases, "children": {"$": block}},
            }
        },
    }


def _model(container):
    model = nn.Module()
    stack = nn.ModuleList([nn.Module()])
    stack[0].query = nn.Linear(2, 2)
    if container == "encoder.layer":
        model.encoder = nn.Module()
        model.encoder.layer = stack
    else:
        model.layers = stack
    return model


@pytest.mark.parametrize(
    "release, container", [("4.57.6", "encoder.layer"), ("5.23.0", "layers"), ("5.0.0.dev0", "layers")]
)
def test_only_the_installed_release_layout_applies(monkeypatch, release, container):
    monkeypatch.setattr(opendelta.structures, "_installed_transformers", lambda: Version(Version(release).base_version))
    structure = CommonStructure(_document())
    model = _model(container)
    assert structure.common_names(model)[f"{container}.0.query"][0].name == "encoder.block.0.attn.q"
    assert structure.missing_paths(model) == ([], [])
    assert structure.unplaced_names(model) == {}


def test_the_other_release_layout_is_not_reported_missing_but_a_real_gap_is(monkeypatch):
    monkeypatch.setattr(opendelta.structures, "_installed_transformers", lambda: Version("5.23.0"))
    structure = CommonStructure(_document())
    old_layout = _model("encoder.layer")
    assert structure.common_names(old_layout) == {}
    assert structure.missing_paths(old_layout) == (["layers"], [])


def test_without_transformers_only_unversioned_nodes_apply(monkeypatch):
    monkeypatch.setattr(opendelta.structures, "_installed_transformers", lambda: None)
    assert admits_installed_transformers(None)
    assert not admits_installed_transformers("<5")


@pytest.mark.parametrize("releases", ["5", "<5.0a1", "", "latest"])
def test_a_specifier_that_is_not_a_plain_release_range_is_refused(releases):
    with pytest.raises(StructureValidationError, match="transformers"):
        CommonStructure(_document(old_releases=releases))


@pytest.mark.parametrize("head", ["ViTModel", "ViTForImageClassification"])
def test_vit_is_mapped_on_the_installed_release(head):
    from opendelta.structure_registry import get_structure

    model = tiny_model("vit", head)
    structure = get_structure("vit")
    assert structure.missing_paths(model) == ([], [])
    names = {c.name for cns in structure.common_names(model).values() for c in cns}
    assert {"encoder.block.0.attn.q", "encoder.block.1.ff.w2", "patch_embeddings", "encoder.layer_norm"} <= names
