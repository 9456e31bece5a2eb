"""Every exit code cadenza gives, in one place (DESIGN §2). They are a contract: units list the
permanent ones in RestartPreventExitStatus=, scripts test supervisorctl's, and `--help` and the
README print this same table.

The daemon follows sysexits(3); supervisorctl has its own five; a worker says "the application
could not be loaded" with 3, which the master decodes as such in logs and STATUS=.
"""

# cadenza run (the master)
OK = 0
UNCLEAN_HANDOVER = 1   # a next generation whose predecessor died before naming it in MAINPID=
USAGE = 64             # EX_USAGE
SOFTWARE = 70          # EX_SOFTWARE: an internal error; a bug to report
OSERR = 71             # EX_OSERR: a listener could not be bound or adopted
CANTCREAT = 73         # EX_CANTCREAT: the control socket could not be created
TEMPFAIL = 75          # EX_TEMPFAIL: the workers did not become ready
CONFIG = 78            # EX_CONFIG: the config, a unit setting such as a too low LimitNOFILE=, or an
                       # application that cannot be loaded (a worker exited 3 before any was ready)

DAEMON = {OK: "clean stop", UNCLEAN_HANDOVER: "the previous generation died before the hand-over",
          USAGE: "usage error", SOFTWARE: "internal error", OSERR: "a listener could not be bound or adopted",
          CANTCREAT: "the control socket could not be created", TEMPFAIL: "the workers did not become ready",
          CONFIG: "configuration error, or the application could not be loaded"}

# supervisorctl, also carried in the control protocol's final "done" event
CTL_OK = 0
CTL_FAILED = 1         # the operation failed; for upgrade: the old generation still serves
CTL_USAGE = 2
CTL_UNREACHABLE = 3
CTL_DENIED = 4

CTL = {CTL_OK: "done", CTL_FAILED: "the operation failed (for upgrade: the old generation is still serving)",
       CTL_USAGE: "usage or config error", CTL_UNREACHABLE: "cannot reach the master",
       CTL_DENIED: "permission denied"}

# worker -> master
WORKER_APP_ERROR = 3   # the application could not be loaded
WORKER_EXEC_FAILED = 127


def describe(table: dict[int, str]) -> str:
    return "; ".join(f"{code} {text}" for code, text in table.items())
