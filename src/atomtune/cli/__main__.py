"""``python -m atomtune.cli`` (what ``accelerate launch -m atomtune.cli`` runs)."""

import sys

from atomtune.cli.main import main

sys.exit(main())
