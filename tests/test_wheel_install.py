"""pytest starts under llmshim, installed from a wheel as PyPI users get it.

pytest marks for assertion rewriting every top-level package of each distribution that declares a
``pytest11`` plugin (``_pytest.config._iter_rewritable_modules`` over the distribution's recorded
files), and warns when such a package was imported before it started; with ``filterwarnings =
error`` that warning stopped pytest before it collected anything. llmshim is imported first under
``llmshim run``, a ``.pth`` or a ``sitecustomize``. An editable install records no package files,
so only a real wheel shows it: this test builds one from a copy of the source, installs it into a
fresh virtual environment (``--system-site-packages``: pytest and llmshim's dependencies come from
this machine, llmshim from the wheel), and runs a small project's tests both ways.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import wrapt

ROOT = Path(__file__).resolve().parent.parent

PROJECT_TEST = '''
import llmshim


def test_llmshim_was_imported_before_pytest_and_its_plugin_is_active(llmshim_calls):
    assert llmshim.__file__.startswith(VENV), llmshim.__file__  # the wheel's copy, not the source tree
    assert llmshim_calls == []


def test_plain():
    assert sum([1, 2]) == 3
'''


def _can_build_offline() -> bool:
    """setuptools builds wheels by itself from 70.1 on, with the ``wheel`` package before that (and
    Python 3.12's virtual environments come without it: pip fetches it then)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(600)  # a wheel build may fetch setuptools into its isolated environment
def test_pytest_starts_under_llmshim_installed_from_a_wheel(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LLMSHIM_", "PYTEST_")) and k not in ("PYTHONPATH", "XDG_CACHE_HOME")}
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "llmshim", source / "llmshim", ignore=shutil.ignore_patterns("__pycache__"))
    offline = ["--no-build-isolation"] if _can_build_offline() else []  # else pip fetches setuptools
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", *offline,
                  "-w", str(tmp_path / "dist"), str(source)], tmp_path, env)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("llmshim-*.whl"))

    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], tmp_path, env)
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    installed = _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q",
                      str(wheel)], tmp_path, env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, env)
    venv_site = Path(purelib.stdout.strip())
    if sys.prefix != sys.base_prefix:  # this interpreter is itself a virtualenv: its packages are not the system's
        import sysconfig

        (venv_site / "_outer_env.pth").write_text(sysconfig.get_path("purelib") + "\n")  # after the wheel's own
    assert (venv_site / "llmshim" / "__init__.py").exists()

    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text(textwrap.dedent("""
        [tool.pytest.ini_options]
        filterwarnings = ["error"]
        """))
    (project / "tests" / "test_project.py").write_text(f"VENV = {str(venv)!r}\n" + PROJECT_TEST)
    # (the project is not async: pytest-asyncio, if present, stays out of it and of its warnings)
    pytest_command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:asyncio", "tests"]
    env = {**env, "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")}  # pip above kept the machine's own cache

    under_run = _run([str(venv / "bin" / "llmshim"), "run", "--", *pytest_command], project, env)
    assert "2 passed" in under_run.stdout, under_run.stdout + under_run.stderr
    assert under_run.returncode == 0

    # A .pth that imports llmshim as the interpreter starts. The venv's own site folder is read before
    # the machine's, where llmshim's dependencies live: a path line (a .pth's other kind of line) puts
    # that folder on sys.path first, as it would already be in an environment that has everything.
    dependencies = str(Path(wrapt.__file__).resolve().parent.parent)
    (venv_site / "00_dependencies.pth").write_text(dependencies + "\n")
    (venv_site / "zz_llmshim.pth").write_text("import llmshim\n")
    imported = _run([python, "-c", "import sys; print('llmshim' in sys.modules)"], project, env)
    assert imported.stdout.strip() == "True", imported.stderr
    under_pth = _run(pytest_command, project, env)
    assert "2 passed" in under_pth.stdout, under_pth.stdout + under_pth.stderr
    assert under_pth.returncode == 0
    assert "PytestAssertRewriteWarning" not in under_run.stderr + under_pth.stderr
