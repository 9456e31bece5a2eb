#!/bin/sh
# activate.sh ROOT ID UNIT CANARY SETTLE_TIMEOUT   (the role feeds it to sh on stdin)
#
# Points ROOT/current at releases/ID and makes UNIT serve it: `systemctl reload` (or the pinned
# `supervisorctl upgrade --canary K`) when the unit is active, `systemctl start` when it is not.
# When that fails, current points at the previous release again, which the unit still serves:
# current always names the release the unit runs, so a later restart cannot pick up a release
# that failed.
#
# One remote command, not several tasks, so that a connection lost between the switch and the
# reload cannot leave current switched and the reload never run; and once begun it ignores
# hang-ups and TERM (a dying ssh session) and finishes.
set -u
trap '' HUP INT TERM PIPE
root=$1 id=$2 unit=$3 canary=$4 settle=$5
target=releases/$id
previous=$(readlink "$root/current" 2>/dev/null) || previous=

switch() {   # rename(2) over current: readers see the old link or the new one, never none
    ln -sfn "$1" "$root/.current.activate" && mv -T "$root/.current.activate" "$root/current"
}

state() { systemctl show --property=ActiveState --value "$unit"; }

# systemd 252 merges a reload into a start job still running and never runs ExecReload: wait
# until the unit has settled, and join a reload already running rather than race it.
deadline=$(($(date +%s) + settle))
now=$(state)
while [ "$now" = activating ] || [ "$now" = reloading ] || [ "$now" = deactivating ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "$unit is still $now after ${settle}s; $root/current is left at ${previous:-nothing}" >&2
        exit 1
    fi
    sleep 0.2
    now=$(state)
done

# The unit can have come up by itself from current (socket activation, a first install):
# then it serves the release already.
if [ "$previous" = "$target" ] && [ "$now" = active ]; then
    echo "$unit serves $target already"
    exit 0
fi
if ! switch "$target"; then
    echo "cannot point $root/current at $target; it is left at ${previous:-nothing}" >&2
    exit 1
fi
if [ "$now" != active ]; then
    verb="systemctl start $unit"
    systemctl start "$unit"
elif [ "$canary" -gt 0 ]; then
    verb="$root/shared/bin/supervisorctl upgrade --canary $canary"
    "$root/shared/bin/supervisorctl" upgrade --canary "$canary"
else
    verb="systemctl reload $unit"
    systemctl reload "$unit"
fi
rc=$?
if [ "$rc" -eq 0 ]; then
    echo "$unit serves $target ($verb)"
    exit 0
fi

# The master keeps the reason of the last upgrade (the reload itself only says "Job failed").
why=$("$root/shared/bin/supervisorctl" status 2>/dev/null | sed -n 's/^ *last //p')
if [ -z "$previous" ] || [ "$previous" = "$target" ]; then
    back="no previous release to point $root/current back at"
elif switch "$previous"; then
    back="$root/current points at $previous again"
else
    back="could not point $root/current back at $previous"
fi
echo "$verb failed (exit $rc): ${why:-see journalctl -u $unit}; $back" >&2
exit 1
