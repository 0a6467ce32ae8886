"""The repository's promises: CI runs the README's test command; the CLI answers --help."""

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\s*```\s*\n(.+?)\n```", readme)
    assert match, "README.md must mark its test command with <!-- test-command -->"
    extracted = subprocess.run(
        ["sed", "-n", "/<!-- test-command -->/{n;n;p;}", "README.md"], cwd=ROOT,
        capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == match.group(1).strip()
    assert "pytest" in extracted
    assert 'bash -c "$TEST_COMMAND"' in (ROOT / ".ci" / "run").read_text()


def test_cli_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "dsmi_cli", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    from dsmi_cli.main import COMMANDS
    for name in COMMANDS:
        assert name in out


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_train_help_names_every_config_field():
    import dataclasses

    from training.config import DataConfig, ModelConfig, TrainConfig
    out = subprocess.run([sys.executable, "-m", "dsmi_cli", "train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    flat = " ".join(out.split())  # the list is wrapped
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}=" in flat, f"{section}.{f.name}"


def test_a_command_without_its_extra_names_the_extra_in_one_line(tmp_path):
    """A module of a missing extra (torch here, hidden by a stub that refuses to import)
    gives one line and exit 2, not a traceback."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'fastapi'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for args, extra in ((["variants"], "train"), (["export", "--help"], "train"),
                        (["train", "--out", str(tmp_path / "r")], "train"),
                        (["serve"], "serve")):
        result = subprocess.run([sys.executable, "-m", "dsmi_cli", *args], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"needs the '{extra}' extra" in lines[0] and "pip install" in lines[0]


def test_library_packages_hold_no_command_line():
    """The dsmi command lives in dsmi_cli; model/, training/ and service/ hold functions."""
    offenders = [str(p.relative_to(ROOT)) for package in ("model", "training", "service")
                 for p in (ROOT / package).rglob("*.py") if "argparse" in p.read_text()]
    assert offenders == []


def test_tests_mirror_the_packages():
    # tests/<package>/ for each package's tests; only repository-wide checks at the top.
    top = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert top == ["test_deploy.py", "test_repo.py"]
    for package in ("model", "training", "service", "bench", "dsmi_cli"):
        assert (ROOT / package).is_dir()
        assert list((ROOT / "tests" / package).glob("test_*.py")), package
