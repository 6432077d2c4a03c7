"""`python -m latentforge ...` (what `torchrun -m latentforge train ...` runs)."""

import sys

from .cli import main

sys.exit(main())
