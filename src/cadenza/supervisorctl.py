"""`python -m cadenza.supervisorctl` (the module path that pinned launchers name) and the
`supervisorctl` command. The tool itself lives in cadenza.tools.supervisorctl."""

from cadenza.exiting import exit_now
from cadenza.tools.supervisorctl import main


def console() -> None:
    """main(), then the process ends at once (exiting.py: this is what `systemctl reload` waits for)."""
    exit_now(main())


if __name__ == "__main__":
    console()
