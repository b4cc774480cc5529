"""The commands' shared plumbing (ldu_jax/cli/__init__.py), as a console script or ``python -m``
meets it: config files found from any directory, a missing one reported in one line, --help."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, cwd, *argv):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True)


# what a console script does: import the command module, call main(); __main__ has no docstring
SCRIPT = "import sys; sys.argv[0] = 'ldu-attack'; from ldu_jax.cli.attack import main; main()"


def test_a_project_config_is_found_from_another_directory(tmp_path):
    r = _run(SCRIPT, str(tmp_path), "nosuchattack", "--config=configs/attack_ti_tiny.py", "--images=x", "--workdir=y")
    # the config loaded (configs/ is the checkout's); the command then refuses the attack kind
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["error: unknown attack 'nosuchattack'; one of "
                                                                  "('ti', 'dreambooth')"], r.stderr[-2000:]


def test_a_missing_config_file_is_one_line(tmp_path):
    r = _run(SCRIPT, str(tmp_path), "ti", "--config=configs/nope.py", "--images=x", "--workdir=y")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: --config: config file configs/nope.py does not exist"]


def test_help_prints_the_command_docstring(tmp_path):
    r = _run(SCRIPT, str(tmp_path), "--help")   # (absl ends --help with status 1)
    assert "Traceback" not in r.stderr
    assert "Personalization attacks on a folder of photos" in r.stdout + r.stderr
