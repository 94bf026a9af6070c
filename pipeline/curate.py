"""Job entry point: `python pipeline/curate.py --config jobs/X.yaml [KEY=VALUE ...]`.

Locally this starts an embedded Ray; under `ray job submit` it attaches to the cluster.
"""

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: make the repository root importable instead of this folder, whose module
    # names must not shadow top-level packages.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
