"""The dependency lock: it agrees with pyproject.toml, and the check catches an edit that needs `make lock`."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "requirements" / "check_lock.py"


def _check(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def project_copy(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    return tmp_path


def test_the_checked_in_lock_agrees_with_pyproject():
    result = _check(ROOT)
    assert result.returncode == 0, result.stderr
    assert "lock agrees" in result.stdout


def test_lock_pins_every_package_to_one_version_and_torch_as_a_pair():
    lines = [line.split(";")[0].strip() for line in (ROOT / "requirements/lock.txt").read_text().splitlines()
             if line and not line.startswith((" ", "#"))]
    assert all("==" in line for line in lines)
    assert "torch==2.14.1" in lines and "torchvision==0.29.1" in lines


def test_a_range_the_lock_does_not_meet_is_reported(project_copy):
    pyproject = project_copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"numpy>=1.26"', '"numpy>=99"'))
    result = _check(project_copy)
    assert result.returncode == 1
    assert "numpy>=99 (dependencies) is not met by the lock's numpy==" in result.stderr
    assert "make lock" in result.stderr


def test_a_new_dependency_missing_from_the_lock_is_reported(project_copy):
    pyproject = project_copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('gcs = ["gcsfs>=2024.2"]', 'gcs = ["gcsfs>=2024.2", "adlfs>=2024.2"]'))
    result = _check(project_copy)
    assert result.returncode == 1
    assert "adlfs>=2024.2 (extra 'gcs') is not in the lock" in result.stderr


def test_a_pin_the_lock_does_not_hold_is_reported(project_copy):
    pins = project_copy / "requirements" / "pins.in"
    pins.write_text(pins.read_text().replace("torch==2.14.1", "torch==2.13.0"))
    result = _check(project_copy)
    assert result.returncode == 1
    assert "pins.in asks for torch==2.13.0" in result.stderr


def test_this_environment_follows_the_lock():
    """What `make install` checks after installing: every package at its locked version, pip check clean."""
    result = _check(ROOT, "--installed")
    assert result.returncode == 0, result.stderr
    assert "lock honoured" in result.stdout
