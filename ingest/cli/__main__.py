"""``python -m ingest.cli``: how processes spawn their children."""

import sys

from ingest.cli.main import main

sys.exit(main())
