"""Job entry point: `python pipeline/curate.py [--debug] --config jobs/X.yaml [KEY=VALUE ...]`.

The same as `curate run`: locally this starts an embedded Ray; under `ray job submit` it attaches to
the cluster. An error is one `curate: ...` line (exit 2 for the user's own); --debug adds the traceback.
"""

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: make the repository root importable instead of this folder, whose module
    # names must not shadow top-level packages.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    from pipeline.cli import main  # noqa: E402
except ModuleNotFoundError as missing:
    if (missing.name or "").split(".")[0] == "pipeline":
        raise
    # Under `ray job submit`, `python` is whatever the head's PATH finds first, often not the
    # environment Curate is installed in.
    print(f"curate: {sys.executable} cannot import {missing.name!r}: run the job with the Python that has "
          f"Curate installed (pip install -e . there), e.g. `ray job submit -- /path/to/venv/bin/python "
          f"pipeline/curate.py ...`, or put that environment first on the cluster's PATH", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
