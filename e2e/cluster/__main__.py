"""`python -m loraplex.localcluster up|down|status`, and `... pods` (the local pod runner)."""

import sys

if sys.argv[1:2] == ["pods"]:
    from loraplex.localcluster.pod_runner import main as pods_main

    sys.exit(pods_main(sys.argv[2:]))

from loraplex.localcluster.cli import main

sys.exit(main())
