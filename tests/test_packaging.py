"""The installable package: every console script of pyproject.toml names a command module's
``main``, every command module has one; the source passes pyproject.toml's lint (ruff)."""
import importlib
import os
import shutil
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_command_is_a_console_script_with_a_main():
    scripts = _pyproject()["project"]["scripts"]
    commands = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "ldu_jax", "cli"))
                      if f.endswith(".py") and f != "__init__.py")
    targets = sorted(t.split(":")[0].rsplit(".", 1)[1] for t in scripts.values())
    assert targets == commands       # one script per command module, none missing or stale
    for name, target in scripts.items():
        module, func = target.split(":")
        assert name == "ldu-" + module.rsplit(".", 1)[1].replace("_", "-")
        # importing defines absl flags: one command per process, as when it runs
        code = f"import {module}; assert callable({module}.{func})"
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"


def test_packages_and_data_are_included():
    from setuptools import find_packages
    cfg = _pyproject()["tool"]["setuptools"]
    found = find_packages(ROOT, include=cfg["packages"]["find"]["include"])
    for pkg in ("ldu_jax", "ldu_jax.cli", "ldu_jax.jobs", "ldu_jax.evaluate", "ldu_jax.protect.baselines", "configs"):
        assert pkg in found
    assert "tests" not in found and "bench" not in found
    data = cfg["package-data"]["ldu_jax"]
    assert os.path.isdir(os.path.join(ROOT, "ldu_jax", "miniworld", "models")) and "miniworld/models/**/*" in data
    assert os.path.isdir(os.path.join(ROOT, "ldu_jax", "sd", "tiny_tokenizer")) and "sd/tiny_tokenizer/*" in data


def test_the_cli_modules_import_no_command_from_another():
    """A command module imports library code and ldu_jax.cli's plumbing, never another command
    (two commands in one process would define their flags twice)."""
    for f in os.listdir(os.path.join(ROOT, "ldu_jax", "cli")):
        if f.endswith(".py") and f != "__init__.py":
            src = open(os.path.join(ROOT, "ldu_jax", "cli", f)).read()
            assert "from ldu_jax.cli." not in src and "import ldu_jax.cli." not in src, f
    importlib.import_module("ldu_jax.cli")   # the plumbing imports (its flags: the multi-host start-up)


def test_lint_is_clean():
    """``ruff check .`` from the repository root passes (pyproject.toml [tool.ruff]: E, F, W at 120
    columns; ruff is pinned in requirements-test.txt)."""
    ruff = shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -r requirements-test.txt"
    r = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
