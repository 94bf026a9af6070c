"""Check that requirements/lock.txt agrees with pyproject.toml, or that an environment follows it.

    python requirements/check_lock.py              # every range in pyproject.toml (dependencies and
                                                   # every extra) and every pin in pins.in is met by
                                                   # the lock: it fails after an edit that needs `make lock`
    python requirements/check_lock.py --installed  # this interpreter's packages are at the locked
                                                   # versions and pip check passes (--strict: and
                                                   # nothing outside the lock is installed)

The lock is universal (one file for every platform and Python >= 3.10): a package may have several
entries, each under an environment marker.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

LOCK = Path("requirements/lock.txt")
PINS = Path("requirements/pins.in")
PROJECT = "curate"
# Installed by the environment itself, not by the project's requirements.
TOOLING = {"pip", "setuptools", "wheel", "uv", PROJECT}


def requirement_lines(path: Path) -> list[Requirement]:
    """The requirements of a pip requirements/constraints file (comments and options skipped)."""
    requirements = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            requirements.append(Requirement(line))
    return requirements


def lock_entries(path: Path) -> dict[str, list[Requirement]]:
    entries: dict[str, list[Requirement]] = {}
    for req in requirement_lines(path):
        pinned = [spec for spec in req.specifier if spec.operator == "=="]
        if len(pinned) != 1 or len(req.specifier) != 1:
            raise SystemExit(f"{path}: {req} is not pinned to one version (lock entries are name==version)")
        entries.setdefault(canonicalize_name(req.name), []).append(req)
    return entries


def pinned_version(req: Requirement) -> Version:
    return Version(next(iter(req.specifier)).version)


def project_requirements(pyproject: Path) -> list[tuple[str, Requirement]]:
    """(where, requirement) for the dependencies and every extra; self-references are skipped."""
    project = tomllib.loads(pyproject.read_text())["project"]
    found = [("dependencies", Requirement(text)) for text in project.get("dependencies", [])]
    for extra, texts in project.get("optional-dependencies", {}).items():
        found += [(f"extra '{extra}'", Requirement(text)) for text in texts]
    return [(where, req) for where, req in found if canonicalize_name(req.name) != PROJECT]


def check_against_project(root: Path) -> list[str]:
    entries = lock_entries(root / LOCK)
    problems = []
    for where, req in project_requirements(root / "pyproject.toml"):
        locked = entries.get(canonicalize_name(req.name))
        if not locked:
            problems.append(f"{req} ({where}) is not in the lock")
            continue
        for entry in locked:
            if not req.specifier.contains(pinned_version(entry), prereleases=True):
                problems.append(f"{req} ({where}) is not met by the lock's {entry}")
    for pin in requirement_lines(root / PINS):
        locked = entries.get(canonicalize_name(pin.name), [])
        if not locked or any(not pin.specifier.contains(pinned_version(e), prereleases=True) for e in locked):
            problems.append(f"pins.in asks for {pin}; the lock has {', '.join(map(str, locked)) or 'nothing'}")
    return problems


def check_installed(root: Path, strict: bool) -> list[str]:
    entries = lock_entries(root / LOCK)
    wanted = {
        name: pinned_version(entry)
        for name, reqs in entries.items()
        for entry in reqs
        if entry.marker is None or entry.marker.evaluate()
    }
    problems = []
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in metadata.distributions()}
    for name, version in sorted(installed.items()):
        if name in TOOLING:
            continue
        if name not in wanted:
            message = f"{name} {version} is installed but not in the lock"
            if strict:
                problems.append(message)
            else:
                print(f"check_lock: note: {message}", file=sys.stderr)
        elif version != wanted[name]:
            problems.append(f"{name} {version} is installed; the lock has {wanted[name]}")
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if check.returncode != 0:
        problems.append("pip check: " + (check.stdout + check.stderr).strip().replace("\n", "; "))
    if not problems:
        locked = sum(1 for name in installed if name in wanted)
        print(f"lock honoured: {locked} installed packages at the versions in {LOCK}; pip check passes")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--installed", action="store_true",
                        help="check this interpreter's installed packages against the lock instead")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the project folder (pyproject.toml, requirements/)")
    parser.add_argument("--strict", action="store_true",
                        help="with --installed: a package that is not in the lock fails the check too")
    args = parser.parse_args(argv)
    problems = check_installed(args.root, args.strict) if args.installed else check_against_project(args.root)
    for problem in problems:
        print(f"check_lock: {problem}", file=sys.stderr)
    if problems and not args.installed:
        print("check_lock: run `make lock` to recompile requirements/lock.txt", file=sys.stderr)
    if not problems and not args.installed:
        print(f"lock agrees with pyproject.toml and {PINS}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
