"""The one place that words "install this distribution", so every error and the model card say it the same way.

Why two forms: the published name (``pip install opendelta-lora``) is what works once the distributions are on a
package index, but until then (and offline) the working command installs from a wheelhouse built from a clone of
this repository with ``nox -s wheels``. ``opendelta`` on PyPI is thunlp's 0.3.2, a different project with the same
import name, so no hint ever names it.
"""

from __future__ import annotations

import re

WHEELHOUSE = "wheelhouse"
"""The folder ``nox -s wheels`` writes, relative to the root of a clone."""
SHIPPED = frozenset(
    {
        "opendelta-core",
        "opendelta-common-structures",
        "opendelta-adalora",
        "opendelta-adapter",
        "opendelta-bitfit",
        "opendelta-compacter",
        "opendelta-fourierft",
        "opendelta-ia3",
        "opendelta-ln-tuning",
        "opendelta-loha",
        "opendelta-lokr",
        "opendelta-lora",
        "opendelta-low-rank-adapter",
        "opendelta-oft",
        "opendelta-p-tuning",
        "opendelta-parallel-adapter",
        "opendelta-prefix",
        "opendelta-soft-prompt",
        "opendelta-vera",
    }
)
"""The distributions this repository builds into the wheelhouse (a third party's are not in it)."""


def install_command(*requirements: str, upgrade: bool = False) -> str:
    """``pip install [-U] REQ...`` with the published names (requirements may carry ``>=`` specifiers, quoted)."""
    flag = "-U " if upgrade else ""
    return f"pip install {flag}{' '.join(_quoted(r) for r in requirements)}"


def wheelhouse_command(*requirements: str, upgrade: bool = False) -> str:
    """The same install from a local wheelhouse (``nox -s wheels`` in a clone writes it); works offline."""
    flag = "-U " if upgrade else ""
    return f"pip install {flag}--find-links {WHEELHOUSE} {' '.join(_quoted(r) for r in requirements)}"


def install_hint(*requirements: str, upgrade: bool = False) -> str:
    """Both forms in one sentence, for an error message: the published name, then the wheelhouse install.

    The wheelhouse form is added only when every requirement is a distribution of this repository: a third-party
    plugin's name is all we know about it.
    """
    if not all(_name(r) in SHIPPED for r in requirements):
        return install_command(*requirements, upgrade=upgrade)
    return (
        f"{install_command(*requirements, upgrade=upgrade)} (if pip cannot find it, nothing is published yet: in a "
        f"clone of OpenDelta run `nox -s wheels`, then {wheelhouse_command(*requirements, upgrade=upgrade)})"
    )


def _quoted(requirement: str) -> str:
    """Quote a requirement with a specifier or extras, so a shell reads neither ``>`` nor ``[...]`` itself."""
    return f"'{requirement}'" if any(c in requirement for c in "<>=!~ []") else requirement


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")
