"""Entry point: python -m piaa_personalization.evaluation (see cli.py)."""

import sys

from piaa_personalization.evaluation.cli import main

sys.exit(main())
