"""`python -m loraplex.localcluster up|down|status`."""

import sys

from loraplex.localcluster.cli import main

sys.exit(main())
