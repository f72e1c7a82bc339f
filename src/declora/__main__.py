"""``python -m declora`` (also what ``torchrun -m declora`` runs)."""

import sys

from declora.cli.main import main

sys.exit(main())
