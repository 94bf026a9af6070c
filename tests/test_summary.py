"""The run summary ends with the report's path and a `curate query` command that runs as printed,
whether or not the environment's bin directory is on PATH."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runner import format_summary, run_pipeline
from pipeline.synth import synthesize
from tests.helpers import WITHOUT_MODEL

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "curate"
pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="the package is not installed with its console script")


@pytest.fixture(scope="module")
def summary(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("summary")
    synthesize(str(root / "pool"), samples=100, seed=5, shard_size=100)
    return run_pipeline(load_config(str(ROOT / "jobs" / "quickstart.yaml"),
                                    [f"input={root / 'pool'}", f"output={root / 'run dir'}", *WITHOUT_MODEL]))


def _printed(summary, key: str) -> str:
    lines = format_summary(summary).splitlines()
    return next(line for line in lines if line.startswith(key)).removeprefix(key).strip()


def _run_as_pasted(command: str, cwd, path: str) -> str:
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env={**os.environ, "PATH": path},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_report_path_is_printed(summary):
    assert Path(_printed(summary, "report:")) == Path(summary.output) / "report.html"
    assert (Path(summary.output) / "report.html").is_file()


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_query_runs_as_printed_without_curate_on_path(summary, monkeypatch, tmp_path, where):
    cwd = ROOT if where == "root" else tmp_path
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    command = _printed(summary, "query:")
    program = command.split()[0]
    assert Path(cwd, program).resolve() == SCRIPT.resolve()
    if where == "root" and SCRIPT.absolute().is_relative_to(ROOT):
        assert not Path(program).is_absolute()  # e.g. .venv/bin/curate, as a user inside the checkout types it
    printed = _run_as_pasted(command, cwd, "/usr/bin:/bin")
    assert summary.dropped and all(reason in printed for reason in summary.dropped)


def test_query_is_plain_curate_when_the_shell_finds_this_environment(summary, monkeypatch):
    path = f"{SCRIPT.parent}:/usr/bin:/bin"
    monkeypatch.setenv("PATH", path)
    command = _printed(summary, "query:")
    assert command.startswith("curate query ")
    assert all(reason in _run_as_pasted(command, ROOT, path) for reason in summary.dropped)
