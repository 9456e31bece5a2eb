#!/usr/bin/python
# One look at a cadenza app root and its unit, so that a deploy that changes nothing costs one
# round trip to the host, not one per fact. It reads and never writes.

DOCUMENTATION = r"""
module: cadenza_probe
short_description: What a cadenza app root and its unit look like on a host
description:
  - Reads ROOT/current, the releases under ROOT/releases, whether RELEASE is complete (its
    .cadenza-release marker exists), whether the unit file exists and the unit's ActiveState.
options:
  root: {description: The app root., required: true, type: path}
  release: {description: The release id to look for., required: true, type: str}
  unit: {description: The service unit (APP.service)., required: true, type: str}
  unit_dir: {description: Where the rendered units go., required: true, type: path}
"""

RETURN = r"""
current: {description: "What ROOT/current points to, such as releases/20261127093000; empty when it does not exist.", type: str}
releases: {description: The release directories, sorted by name., type: list}
complete: {description: Whether ROOT/releases/RELEASE/.cadenza-release exists., type: bool}
unit_file: {description: Whether UNIT_DIR/UNIT exists., type: bool}
state: {description: "The unit's ActiveState (active, inactive, failed, activating ...).", type: str}
"""

import os

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(
        argument_spec=dict(root=dict(type="path", required=True), release=dict(type="str", required=True),
                           unit=dict(type="str", required=True), unit_dir=dict(type="path", required=True)),
        supports_check_mode=True)
    p = module.params
    link = os.path.join(p["root"], "current")
    try:
        current = os.readlink(link)
    except FileNotFoundError:
        current = ""
    except OSError as exc:
        module.fail_json(msg=f"{link} is not a symlink ({exc.strerror}): cadenza_release switches it "
                             f"by renaming a new symlink over it; move it away first")
    releases_dir = os.path.join(p["root"], "releases")
    try:
        releases = sorted(name for name in os.listdir(releases_dir)
                          if not name.startswith(".") and os.path.isdir(os.path.join(releases_dir, name)))
    except FileNotFoundError:
        releases = []
    rc, out, err = module.run_command(["systemctl", "show", "--property=ActiveState", "--value", p["unit"]])
    if rc != 0:
        module.fail_json(msg=f"systemctl show {p['unit']} failed (exit {rc}): {err.strip()}")
    module.exit_json(changed=False, current=current, releases=releases,
                     complete=os.path.isfile(os.path.join(releases_dir, p["release"], ".cadenza-release")),
                     unit_file=os.path.exists(os.path.join(p["unit_dir"], p["unit"])), state=out.strip())


if __name__ == "__main__":
    main()
