"""``python -m medseg`` (and ``torchrun -m medseg train ...``) run the command line."""

import sys

from medseg.cli import main

sys.exit(main())
