"""``python -m declora`` (also what ``torchrun -m declora`` runs)."""

import sys

from declora.cli.app import main

sys.exit(main())
