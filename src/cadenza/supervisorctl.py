"""`python -m cadenza.supervisorctl`: the module path that pinned launchers already name.
The tool itself lives in cadenza.tools.supervisorctl."""

import sys

from cadenza.tools.supervisorctl import main

if __name__ == "__main__":
    sys.exit(main())
