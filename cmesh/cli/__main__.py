"""``python -m cmesh.cli``."""
import sys

from cmesh.cli import main

sys.exit(main())
