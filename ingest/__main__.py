"""``python -m ingest`` runs the command line."""

import sys

from ingest.app.cli import main

sys.exit(main())
