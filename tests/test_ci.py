"""CI runs what the README tells a new user to run: its set-up block, as written, in a fresh venv."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.setup_commands


def test_ci_runs_the_readme_set_up_commands_in_a_fresh_venv():
    commands = _readme_commands()((ROOT / "README.md").read_text())
    assert commands == [
        'pip install -e ".[dev]" && python colab2.py',
        'pip install -e ".[dev,hf]" && python -m pytest -q -n auto',
    ]
    run = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in run and ".ci/readme_commands.py README.md" in run
    assert "pip install" not in run.replace("README", "")  # nothing installed that the README does not install


def test_ci_checks_every_triton_release_a_supported_torch_pulls():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.11,<2.16"' in pyproject and '"triton>=3.6,<3.10;' in pyproject
    releases = (ROOT / ".ci" / "triton_releases.sh").read_text()
    for version in ("3.6.0", "3.7.0", "3.7.1", "3.8.0", "3.9.0"):
        assert version in releases
    assert "aot_check --full" in releases
