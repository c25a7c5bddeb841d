"""Put on PYTHONPATH by `llmshim run`: installs llmshim when the interpreter starts, in this process
and every Python child that inherits the environment (subprocess, multiprocessing spawn and
forkserver, server workers), then runs the sitecustomize that was there before, if any."""

import os
import sys


def _llmshim_boot() -> None:
    try:
        exporter = os.environ.get("LLMSHIM_RUN_OTEL_EXPORTER")  # a setting `llmshim run` has validated
        if exporter:
            from llmshim.run import configure_exporter

            configure_exporter(exporter)
        import llmshim

        llmshim.install()
    except Exception as exc:  # never break the program's start-up
        sys.stderr.write(f"llmshim run: llmshim is not active in this process: {exc}\n")


def _chain_original() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_llmshim_boot()
_chain_original()
