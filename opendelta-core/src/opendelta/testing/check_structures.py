"""Check every registered common-structure mapping on real models (``python -m opendelta.testing.check_structures``).

For each mapping, every architecture it lists (that transformers provides) is built from a tiny config of the
mapping's ``model_type``, and every module of its tree and heads must resolve. The nox ``wheelhouse`` session runs
this on the *built wheels*, which proves the JSON files ship inside the distribution; a third-party mapping
package can run it too.
"""

from __future__ import annotations

import sys

import transformers
from torch import nn

from opendelta.structure_registry import list_structures
from opendelta.structures import CommonStructure


def _build(model_type: str, class_name: str) -> nn.Module | None:
    """A tiny model of ``class_name``, or ``None`` when transformers has no such class.

    From ``tiny_models``' own config where it has one (ViT's heads and Whisper's widths must agree, a CLIP config
    nests its towers'), else from a generic width-32 config of ``model_type``.
    """
    from opendelta.testing.tiny_models import registered_architectures, tiny_model

    if model_type in registered_architectures():
        return tiny_model(model_type, class_name)
    cls = getattr(transformers, class_name, None)
    if cls is None:
        return None
    return cls(transformers.AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=2))


def check(structure: CommonStructure) -> list[str]:
    """Problems of one mapping (empty when it is fine)."""
    problems: list[str] = []
    heads_missing: set[str] | None = None
    for class_name in structure.architectures:
        try:
            model = _build(structure.model_type, class_name)
        except Exception as exc:
            problems.append(f"{class_name}: cannot build a tiny model ({type(exc).__name__}: {exc})")
            continue
        if model is None:
            problems.append(f"{class_name}: not provided by transformers {transformers.__version__}")
            continue
        tree_missing, head_missing = structure.missing_paths(model)
        problems += [f"{class_name}: {path} does not exist" for path in tree_missing]
        heads_missing = set(head_missing) if heads_missing is None else heads_missing & set(head_missing)
        if not structure.common_names(model):
            problems.append(f"{class_name}: no module got a common name")
    missing = _without_renamed_heads(structure, heads_missing or set())
    problems += [f"head {path} exists on none of {structure.architectures}" for path in sorted(missing)]
    return problems


def _without_renamed_heads(structure: CommonStructure, heads_missing: set[str]) -> set[str]:
    """The missing heads, less those renamed between transformers releases.

    Heads of one common name are one head (GPT-NeoX's ``embed_out`` on 4.57 is ``lm_head`` on 5), missing only when
    none of them exists.
    """
    names: dict[str, set[str]] = {}
    for key, node in structure._heads.children:
        names.setdefault(node.name or "", set()).add(".".join(key))
    return {path for path in heads_missing if all(p in heads_missing for g in names.values() if path in g for p in g)}


def main() -> int:
    """Check all mappings; print one line per mapping; exit 1 on any problem."""
    structures = list_structures()
    failed = 0
    for structure in structures:
        problems = check(structure)
        status = "ok" if not problems else "FAILED"
        print(f"{structure.model_type:12} {status:6} {', '.join(structure.architectures)}  ({structure.source})")
        for problem in problems:
            print(f"    {problem}")
        failed += bool(problems)
    print(f"{len(structures)} mappings, {failed} with problems")
    return 1 if failed or not structures else 0


if __name__ == "__main__":
    sys.exit(main())
