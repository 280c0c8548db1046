"""`python -m napari_tbsn ...` runs the `tbsn` command line (and `torchrun -m napari_tbsn fit ...`
fits on several processes)."""

import sys

from .cli import main

sys.exit(main())
