"""``python -m polypure`` runs the ``polypure`` command."""

import sys

from .cli import main

sys.exit(main())
