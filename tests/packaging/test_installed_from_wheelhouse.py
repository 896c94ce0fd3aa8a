"""README's install, literally: the wheelhouse's wheels install core + LoRA into a fresh venv and run the Quick start.

``nox -s wheelhouse`` (CI) builds the wheelhouse and names it in OPENDELTA_WHEELHOUSE; run alone, the test builds
one itself with the installed hatchling. The fresh venv sees no OpenDelta source tree: torch, transformers and the
other third-party dependencies come from this interpreter's site-packages through a folder of links that leaves
every OpenDelta distribution (and editable-install hook) out, so pip installs OpenDelta from the wheelhouse alone,
offline (``--no-index``), and must pull the common structures by itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SOURCES = [ROOT / "opendelta-core", ROOT / "common_structures", *sorted((ROOT / "plugins").glob("opendelta-*"))]
OURS = ("opendelta", "_opendelta", "_editable_impl_opendelta", "__editable__")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    named = os.environ.get("OPENDELTA_WHEELHOUSE")
    if named:
        return Path(named)
    pytest.importorskip("hatchling", reason="building the wheelhouse needs hatchling (opendelta-core[testing])")
    folder = tmp_path_factory.mktemp("wheelhouse")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--wheel-dir"]
    subprocess.run([*build, str(folder), *map(str, SOURCES)], check=True, timeout=600)
    return folder


def readme_install_line() -> str:
    """The wheelhouse install command README gives (``wheelhouse``: the folder ``nox -s wheels`` writes)."""
    found = re.findall(r"^ *(pip install --find-links wheelhouse opendelta-core opendelta-lora)\b", README, re.M)
    assert found, "README lost `pip install --find-links wheelhouse opendelta-core opendelta-lora`"
    return found[0]


def readme_quick_start() -> str:
    section = README.split("## Quick start", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def fresh_venv(folder: Path) -> Path:
    """A venv (no pip of its own) whose only packages are this interpreter's non-OpenDelta ones, linked."""
    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    links = folder / "third_party"
    links.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(OURS) and entry.suffix != ".pth":
            (links / entry.name).symlink_to(entry)
    (site / "third_party.pth").write_text(f"{links}\n")
    return python


def test_every_wheel_carries_the_licence_py_typed_and_project_metadata(wheelhouse):
    wheels = sorted(wheelhouse.glob("opendelta_*.whl"))
    assert len(wheels) == len(SOURCES), [w.name for w in wheels]
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), wheel.name
        assert any(n.endswith("/py.typed") and n.count("/") == 1 for n in names), wheel.name
        assert "License-Expression: Apache-2.0" in metadata and "Project-URL: " in metadata, wheel.name
        assert "Classifier: Typing :: Typed" in metadata, wheel.name


def test_readme_install_from_the_wheelhouse_runs_the_quick_start(wheelhouse, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    command = readme_install_line().split()
    assert command[:4] == ["pip", "install", "--find-links", "wheelhouse"]
    command[3] = str(wheelhouse)
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index", *command[2:]]
    subprocess.run(pip, check=True, timeout=300, env={**os.environ, "PIP_FIND_LINKS": ""})
    where = subprocess.run(
        [str(python), "-c", "import opendelta, opendelta_lora, opendelta_common_structures as s; print(s.__file__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert Path(where.strip()).is_relative_to(tmp_path / "venv"), where  # from the wheels, not the clone's sources
    work = tmp_path / "work"
    work.mkdir()
    (work / "quick_start.py").write_text(readme_quick_start())
    run = subprocess.run(
        [str(python), "quick_start.py"], cwd=work, capture_output=True, text=True, timeout=300, env=_clean_env()
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Trainable Ratio" in run.stdout + run.stderr
    assert (work / "finetuned_delta" / "config.json").is_file()


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
