"""``python -m AnatomyDTLib`` runs the ``anatomydt`` command line."""

import sys

from .cli import main

sys.exit(main())
