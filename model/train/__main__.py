"""``python -m model.train``: the training command (model/train/cli.py)."""

import sys

from .cli import main

sys.exit(main())
