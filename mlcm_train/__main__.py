"""``python -m mlcm_train``: dispatch to the subcommands in cli.py."""

from __future__ import annotations

import sys

from mlcm_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
