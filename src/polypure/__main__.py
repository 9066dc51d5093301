"""``python -m polypure`` runs the ``polypure`` command."""

import sys

from polypure.cli import main

sys.exit(main())
