"""The folders here are separate distributions, tested where they are installed, not by a run over ``tests/``.

``opendelta-thirdparty-method`` (a delta method) and ``opendelta-stablelm-structure`` (a StableLM mapping) are what a
third party would publish. The nox ``third_party`` session installs them beside core and runs ``pytest`` inside each
folder, where the folder's own ``pyproject.toml`` is the pytest configuration (and this file is not loaded).
"""

collect_ignore_glob = ["opendelta-*"]
