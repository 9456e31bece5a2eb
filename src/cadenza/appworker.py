"""`python -m cadenza.appworker`: the worker module an older master of a shared venv still
starts after the venv was upgraded under it. The worker lives in cadenza.worker.app."""

import sys

from cadenza.worker.app import main

if __name__ == "__main__":
    sys.exit(main())
