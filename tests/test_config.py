import json
import os
import tempfile
from pathlib import Path

import pytest

from cadenza import config, records, runtime
from cadenza.config import ConfigError, Readiness
from cadenza.trust import config_problems

FULL = """
[app]
name = "demo"
root = "/srv/demo"

[listen]
addresses = ["127.0.0.1:8000", "[::1]:8000", "unix:/run/demo/http.sock;mode=0660"]

[workers]
count = 4
app = "demo.wsgi:application"
ready = "uptime:2s"
ready_timeout = 10
graceful_timeout = 5.5

[upgrade]
timeout = 90

[control]
socket = "/run/demo/control.sock"
allow_users = ["deploy"]
allow_groups = ["ops"]
status_groups = ["monitoring"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cadenza.toml"
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == "\n".join(info.value.problems)
    for problem in info.value.problems:
        assert problem.startswith(f"{path}: "), problem
    return info.value.problems


def only_problem(tmp_path: Path, text: str) -> str:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    return problems[0]


# --- a good file and the defaults ---------------------------------------------------------

def test_full_file_loads(tmp_path):
    path = write(tmp_path, FULL)
    cfg = config.load(path)
    assert cfg.source == path
    assert cfg.app.name == "demo"
    assert cfg.app.root == Path("/srv/demo")
    assert cfg.listen.addresses == ("127.0.0.1:8000", "[::1]:8000", "unix:/run/demo/http.sock;mode=0660")
    assert cfg.workers.count == 4
    assert cfg.workers.app == "demo.wsgi:application"
    assert cfg.workers.command is None
    assert cfg.workers.ready == Readiness("uptime", 2.0)
    assert cfg.workers.ready_timeout == 10.0 and isinstance(cfg.workers.ready_timeout, float)
    assert cfg.workers.graceful_timeout == 5.5
    assert cfg.upgrade.timeout == 90.0
    assert cfg.control.socket == Path("/run/demo/control.sock")
    assert cfg.control.allow_users == ("deploy",)
    assert cfg.control.allow_groups == ("ops",)
    assert cfg.control.status_groups == ("monitoring",)


def test_defaults():
    cfg = config.defaults()
    assert cfg.source is None
    assert cfg.app.name == "cadenza"
    assert cfg.listen.addresses == ("127.0.0.1:8000",)
    assert cfg.workers.count == 2
    assert cfg.workers.app == config.DEFAULT_APP == "cadenza.demo:app"
    assert cfg.workers.command is None
    assert cfg.workers.ready == Readiness("notify")
    assert (cfg.workers.ready_timeout, cfg.workers.graceful_timeout, cfg.upgrade.timeout) == (30, 30, 60)
    assert cfg.exec_path is None and cfg.directory is None
    assert cfg.control_socket == Path("/run/cadenza/cadenza/control.sock")


def test_empty_file_names_no_app_and_is_refused(tmp_path):
    # An empty or truncated cadenza.toml in a new release must never serve the built-in demo.
    path = write(tmp_path, "")
    cfg = config.load(path)
    assert cfg.source == path and cfg.workers.app is None and cfg.workers.command is None
    with pytest.raises(ConfigError) as exc:
        config.require_app(cfg)
    assert str(path) in str(exc.value) and "names no application" in str(exc.value)


def test_no_file_at_all_serves_the_demo():
    assert config.require_app(config.defaults()).workers.app == config.DEFAULT_APP == "cadenza.demo:app"


def test_command_instead_of_app(tmp_path):
    cfg = config.load(write(tmp_path, '[workers]\ncommand = ["uvicorn", "demo.asgi:app", "--fd", "3"]\n'))
    assert cfg.workers.command == ("uvicorn", "demo.asgi:app", "--fd", "3")
    assert cfg.workers.app is None


def test_parse_uses_source_in_messages():
    with pytest.raises(ConfigError) as info:
        config.parse("[workers]\ncount = 0\n", "release/cadenza.toml")
    assert info.value.problems == [
        "release/cadenza.toml: workers.count: expected an integer from 1 to 1024, got 0"]
    assert config.parse("", "x.toml").source == Path("x.toml")


# --- derived paths ------------------------------------------------------------------------

def test_paths_derived_from_root(tmp_path):
    cfg = config.load(write(tmp_path, '[app]\nname = "demo"\nroot = "/srv/demo"\n'))
    assert cfg.exec_path == Path("/srv/demo/shared/bin/cadenza")
    assert cfg.directory == Path("/srv/demo/current")
    assert cfg.control_socket == Path("/run/cadenza/demo/control.sock")


def test_explicit_paths_win_over_root(tmp_path):
    cfg = config.load(write(tmp_path, '[app]\nroot = "/srv/demo"\nexec_path = "/opt/bin/cadenza"\n'
                                      'directory = "/srv/other/current"\n'
                                      '[control]\nsocket = "/run/x/c.sock"\n'))
    assert cfg.exec_path == Path("/opt/bin/cadenza")
    assert cfg.directory == Path("/srv/other/current")
    assert cfg.control_socket == Path("/run/x/c.sock")


def test_directory_is_not_resolved(tmp_path):
    release = tmp_path / "releases" / "1"
    release.mkdir(parents=True)
    (tmp_path / "current").symlink_to(release)
    cfg = config.load(write(tmp_path, f'[app]\nroot = "{tmp_path}"\n'))
    assert cfg.directory == tmp_path / "current"
    assert cfg.directory.is_symlink()


# --- reading the file ---------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.problems == [f"{path}: cannot read config: No such file or directory; "
                                   "create it or pass -c with the right path"]


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot read config: Is a directory")


def test_unreadable_file(tmp_path):
    path = write(tmp_path, "")
    path.chmod(0)
    os.chmod(tmp_path, 0o755)
    # Root reads any file: the load runs in a child that became nobody.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            config.load(path)
            os.write(w, b"loaded")
        except ConfigError as exc:
            os.write(w, str(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    assert message == f"{path}: cannot read config: Permission denied; make it readable by the service user"


def test_workers_watchdog_is_seconds_or_zero():
    assert config.parse("[workers]\nwatchdog = 0\n", "t.toml").workers.watchdog == 0.0
    assert config.parse("[workers]\nwatchdog = 2.5\n", "t.toml").workers.watchdog == 2.5
    with pytest.raises(ConfigError, match="workers.watchdog: expected a number of seconds"):
        config.parse("[workers]\nwatchdog = -1\n", "t.toml")


def test_path_through_a_file(tmp_path):
    path = write(tmp_path, "") / "cadenza.toml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.problems == [f"{path}: cannot read config: Not a directory; "
                                   "check the path and its permissions"]


def test_not_utf8(tmp_path):
    path = tmp_path / "cadenza.toml"
    path.write_bytes(b'[app]\nname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert f"{path}: is not UTF-8" in str(info.value)


def test_toml_syntax_error_has_line_and_column(tmp_path):
    problem = only_problem(tmp_path, "[workers]\ncount = = 4\n")
    assert "invalid TOML" in problem
    assert "line 2, column" in problem


# --- unknown names ------------------------------------------------------------------------

def test_unknown_section_suggests_the_right_one(tmp_path):
    problem = only_problem(tmp_path, "[wokers]\ncount = 4\n")
    assert ": wokers: unknown section" in problem
    assert "[app], [listen], [workers], [upgrade], [control]" in problem
    assert "did you mean [workers]?" in problem


def test_unknown_key_lists_allowed_keys(tmp_path):
    problem = only_problem(tmp_path, "[workers]\ncuont = 4\n")
    assert ": workers.cuont: unknown key" in problem
    assert "count, app, command, ready, ready_timeout, graceful_timeout" in problem
    assert "did you mean count?" in problem


def test_top_level_key_is_an_unknown_section(tmp_path):
    problem = only_problem(tmp_path, 'name = "demo"\n')
    assert ": name: unknown section" in problem


def test_section_that_is_not_a_table(tmp_path):
    problem = only_problem(tmp_path, "workers = 4\n")
    assert ": workers: expected a table [workers]" in problem and "got 4" in problem


def test_nested_table_is_an_unknown_key(tmp_path):
    problem = only_problem(tmp_path, "[workers.envs]\nA = \"1\"\n")
    assert ": workers.envs: unknown key" in problem and "did you mean env?" in problem


# --- wrong types, one per section ---------------------------------------------------------

@pytest.mark.parametrize("text, key, expected", [
    ("[app]\nname = 5\n", "app.name", "expected a name of 1 to 64 letters"),
    ("[app]\nroot = 5\n", "app.root", "expected an absolute path"),
    ('[listen]\naddresses = "127.0.0.1:80"\n', "listen.addresses", "expected a non-empty list of addresses"),
    ('[workers]\ncount = "4"\n', "workers.count", 'expected an integer from 1 to 1024, got "4"'),
    ("[workers]\ncount = 4.0\n", "workers.count", "expected an integer from 1 to 1024, got 4.0"),
    ("[workers]\napp = 1\n", "workers.app", 'expected "module:object"'),
    ('[workers]\ncommand = "uvicorn app"\n', "workers.command", "expected a non-empty list of non-empty strings"),
    ("[workers]\ncommand = [1]\n", "workers.command", "got [1]"),
    ("[workers]\nready = 1\n", "workers.ready", 'expected "notify", "spawn" or "uptime:DURATION"'),
    ('[workers]\nready_timeout = "30"\n', "workers.ready_timeout", 'expected a number of seconds'),
    ('[upgrade]\ntimeout = "60s"\n', "upgrade.timeout", 'got "60s"'),
    ("[control]\nsocket = 1\n", "control.socket", "expected an absolute path"),
    ('[control]\nallow_users = "deploy"\n', "control.allow_users", 'expected a list of non-empty strings'),
    ("[control]\nallow_groups = [1]\n", "control.allow_groups", "got [1]"),
    ('[control]\nstatus_groups = "ops"\n', "control.status_groups", 'got "ops"'),
])
def test_wrong_type(tmp_path, text, key, expected):
    problem = only_problem(tmp_path, text)
    assert f": {key}: " in problem
    assert expected in problem


def test_boolean_is_not_an_integer(tmp_path):
    problem = only_problem(tmp_path, "[workers]\ncount = true\n")
    assert problem.endswith("workers.count: expected an integer from 1 to 1024, got true")


def test_boolean_is_not_a_number_of_seconds(tmp_path):
    problem = only_problem(tmp_path, "[upgrade]\ntimeout = true\n")
    assert "upgrade.timeout: expected a number of seconds" in problem and problem.endswith("got true")


# --- impossible values --------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, -1, 1025])
def test_worker_count_out_of_range(tmp_path, count):
    problem = only_problem(tmp_path, f"[workers]\ncount = {count}\n")
    assert problem == f"{tmp_path / 'cadenza.toml'}: workers.count: expected an integer from 1 to 1024, got {count}"


def test_worker_count_limits_accepted(tmp_path):
    assert config.load(write(tmp_path, "[workers]\ncount = 1024\n")).workers.count == 1024
    assert config.load(write(tmp_path, "[workers]\ncount = 1\n")).workers.count == 1


@pytest.mark.parametrize("key", ["workers.ready_timeout", "workers.graceful_timeout", "upgrade.timeout"])
@pytest.mark.parametrize("value", ["0", "-1", "86401", "nan", "inf"])
def test_timeouts_out_of_range(tmp_path, key, value):
    section, name = key.split(".")
    problem = only_problem(tmp_path, f"[{section}]\n{name} = {value}\n")
    assert f": {key}: expected a number of seconds greater than 0 and at most 86400, got {value}" in problem


def test_timeout_limit_and_fraction_accepted(tmp_path):
    cfg = config.load(write(tmp_path, "[upgrade]\ntimeout = 86400\n[workers]\ngraceful_timeout = 0.25\n"))
    assert cfg.upgrade.timeout == 86400.0 and cfg.workers.graceful_timeout == 0.25


@pytest.mark.parametrize("name", ["", "my app", "a/b", "../x", "..", ".", "x" * 65, "é"])
def test_bad_app_name(tmp_path, name):
    problem = only_problem(tmp_path, f'[app]\nname = "{name}"\n')
    assert ": app.name: expected a name of 1 to 64 letters, digits or _ . @ -" in problem


@pytest.mark.parametrize("name", ["demo", "demo-2.api@eu_1", "x" * 64])
def test_good_app_name(tmp_path, name):
    assert config.load(write(tmp_path, f'[app]\nname = "{name}"\n')).app.name == name


@pytest.mark.parametrize("key", ["root", "exec_path", "directory"])
def test_relative_app_paths(tmp_path, key):
    problem = only_problem(tmp_path, f'[app]\n{key} = "srv/demo"\n')
    assert f": app.{key}: expected an absolute path such as /srv/demo, got \"srv/demo\"" in problem


def test_relative_control_socket(tmp_path):
    problem = only_problem(tmp_path, '[control]\nsocket = "control.sock"\n')
    assert ': control.socket: expected an absolute path' in problem and '"control.sock"' in problem


def test_control_socket_too_long_for_sun_path(tmp_path):
    problem = only_problem(tmp_path, f'[control]\nsocket = "/run/{"x" * 120}.sock"\n')
    assert ": control.socket: a unix socket path can be at most 107 bytes" in problem


def test_empty_names_in_allow_lists(tmp_path):
    problem = only_problem(tmp_path, '[control]\nallow_users = ["deploy", ""]\n')
    assert ': control.allow_users: expected a list of non-empty strings (user names), got ["deploy", ""]' in problem


def test_allow_lists_may_name_accounts_that_do_not_exist(tmp_path):
    cfg = config.load(write(tmp_path, '[control]\nallow_users = ["no-such-user-xyz"]\n'
                                      'allow_groups = []\n'))
    assert cfg.control.allow_users == ("no-such-user-xyz",) and cfg.control.allow_groups == ()


# --- listen addresses ---------------------------------------------------------------------

def test_empty_address_list(tmp_path):
    problem = only_problem(tmp_path, "[listen]\naddresses = []\n")
    assert ": listen.addresses: expected a non-empty list of addresses" in problem and "got []" in problem


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "needs a port"),
    ("127.0.0.1:99999", "port must be a number from 0 to 65535"),
    ("local_host:80", "is neither a numeric IP address nor a host name"),
    ("999.1.1.1:80", "is neither a numeric IP address nor a host name"),
    ("-x.example:80", "is neither a numeric IP address nor a host name"),
    ("::1:80:x", "port must be a number"),
    ("[::1:80", "IPv6 address must look like [::1]:8000"),
    ("[::g]:80", "is neither a numeric IP address nor a host name"),
    ("unix:run/x.sock", "unix socket path must be absolute"),
    ("unix:/run/x.sock;mode=0999", "unix socket mode must be octal"),
    ("unix:/run/x.sock;mode=01777", "between 0000 and 0777"),
    ("unix:/run/x.sock;owner=me", "unknown unix socket option"),
])
def test_bad_address_names_index_and_reason(tmp_path, address, reason):
    problem = only_problem(tmp_path, f'[listen]\naddresses = ["127.0.0.1:8000", "{address}"]\n')
    assert ": listen.addresses[1]: " in problem
    assert reason in problem


def test_address_that_is_not_a_string(tmp_path):
    problem = only_problem(tmp_path, '[listen]\naddresses = ["127.0.0.1:8000", 8001]\n')
    assert ": listen.addresses[1]: expected an address" in problem


def test_good_addresses(tmp_path):
    addresses = ["0.0.0.0:80", "[::]:80", ":8080", "[fe80::1]:443", "unix:/run/a.sock;mode=0600"]
    cfg = config.load(write(tmp_path, f"[listen]\naddresses = {addresses!r}\n".replace("'", '"')))
    assert cfg.listen.addresses == tuple(addresses)


@pytest.mark.parametrize("first, second", [
    ("127.0.0.1:8000", "127.0.0.1:8000"),
    (":8000", "0.0.0.0:8000"),
    ("[::1]:80", "[0:0::1]:80"),
    ("unix:/run/a.sock", "unix:/run/a.sock;mode=0660"),
])
def test_duplicate_address(tmp_path, first, second):
    problem = only_problem(tmp_path, f'[listen]\naddresses = ["{first}", "{second}"]\n')
    assert ": listen.addresses[1]: " in problem
    assert "duplicates listen.addresses[0]" in problem


def test_same_port_on_different_families_is_not_a_duplicate(tmp_path):
    cfg = config.load(write(tmp_path, '[listen]\naddresses = ["0.0.0.0:80", "[::]:80"]\n'))
    assert len(cfg.listen.addresses) == 2


# --- workers.app / workers.command --------------------------------------------------------

def test_both_app_and_command(tmp_path):
    problem = only_problem(tmp_path, '[workers]\napp = "demo:app"\ncommand = ["uvicorn"]\n')
    assert "set either workers.app or workers.command, not both" in problem


@pytest.mark.parametrize("spec", ["demo:app", "demo.wsgi:application", "a.b.c:obj.attr", "_m:_o"])
def test_good_app_spec(tmp_path, spec):
    assert config.load(write(tmp_path, f'[workers]\napp = "{spec}"\n')).workers.app == spec


@pytest.mark.parametrize("spec", ["demo:", ":app", "demo:app()", "1demo:app", "demo..x:app", "1demo",
                                  "demo:app:x", "my-app:app", "import:app", ""])
def test_bad_app_spec(tmp_path, spec):
    problem = only_problem(tmp_path, f'[workers]\napp = "{spec}"\n')
    assert ': workers.app: expected "module:object" such as "demo.wsgi:application"' in problem


@pytest.mark.parametrize("command", ["[]", '["uvicorn", ""]', '[""]'])
def test_bad_command(tmp_path, command):
    problem = only_problem(tmp_path, f"[workers]\ncommand = {command}\n")
    assert ": workers.command: expected a non-empty list of non-empty strings" in problem


# --- readiness ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("notify", Readiness("notify")),
    ("spawn", Readiness("spawn")),
    ("uptime:2s", Readiness("uptime", 2.0)),
    ("uptime:500ms", Readiness("uptime", 0.5)),
    ("uptime:1.5s", Readiness("uptime", 1.5)),
    ("uptime:2", Readiness("uptime", 2.0)),
    ("uptime:3600s", Readiness("uptime", 3600.0)),
])
def test_readiness_forms(text, expected):
    assert Readiness.parse(text) == expected


def test_readiness_round_trips_through_str():
    for text in ["notify", "spawn", "uptime:2s", "uptime:0.5s"]:
        assert str(Readiness.parse(text)) == text


@pytest.mark.parametrize("text, reason", [
    ("notfy", 'expected "notify", "spawn" or "uptime:DURATION"'),
    ("uptime", 'expected "notify", "spawn" or "uptime:DURATION"'),
    ("uptime:", "expected uptime:DURATION such as uptime:2s"),
    ("uptime:2h", "expected uptime:DURATION"),
    ("uptime:-1s", "expected uptime:DURATION"),
    ("uptime:0s", "greater than 0 and at most 3600 seconds"),
    ("uptime:0ms", "greater than 0"),
    ("uptime:3601", "at most 3600 seconds"),
])
def test_bad_readiness(tmp_path, text, reason):
    with pytest.raises(ValueError, match="uptime|notify"):
        Readiness.parse(text)
    problem = only_problem(tmp_path, f'[workers]\nready = "{text}"\nready_timeout = 7200\n')
    assert ": workers.ready: " in problem and reason in problem and f'"{text}"' in problem


def test_uptime_must_be_shorter_than_ready_timeout(tmp_path):
    problem = only_problem(tmp_path, '[workers]\nready = "uptime:60s"\n')
    assert ": workers.ready: uptime:60s is never reached within workers.ready_timeout = 30 s" in problem
    cfg = config.load(write(tmp_path, '[workers]\nready = "uptime:60s"\nready_timeout = 90\n'))
    assert cfg.workers.ready.seconds == 60


# --- all problems at once -----------------------------------------------------------------

def test_several_problems_reported_together(tmp_path):
    problems = problems_of(tmp_path, """
[app]
name = "bad name"
root = "relative"
[listen]
addresses = ["nowhere"]
[workers]
count = 0
ready = "later"
[upgrade]
timeout = -5
[control]
allow_groups = "ops"
[extra]
""")
    keys = [problem.split(": ")[1] for problem in problems]
    assert keys == ["app.name", "app.root", "listen.addresses[0]", "workers.count", "workers.ready",
                    "upgrade.timeout", "control.allow_groups", "extra"]


# --- command-line overrides ---------------------------------------------------------------

def base(tmp_path):
    return config.load(write(tmp_path, FULL))


def test_override_nothing_keeps_config(tmp_path):
    cfg = base(tmp_path)
    assert config.override(cfg) == cfg
    assert config.override(cfg, binds=[], command=[]) == cfg


def test_override_binds_replace_addresses(tmp_path):
    cfg = config.override(base(tmp_path), binds=["0.0.0.0:9000", "unix:/run/x.sock"])
    assert cfg.listen.addresses == ("0.0.0.0:9000", "unix:/run/x.sock")


def test_override_workers(tmp_path):
    cfg = config.override(base(tmp_path), workers=8)
    assert cfg.workers.count == 8
    assert cfg.workers.app == "demo.wsgi:application"


def test_override_command_clears_app(tmp_path):
    cfg = config.override(base(tmp_path), command=["uvicorn", "x:app"])
    assert cfg.workers.command == ("uvicorn", "x:app") and cfg.workers.app is None


def test_override_app_clears_command(tmp_path):
    cfg = config.load(write(tmp_path, '[workers]\ncommand = ["uvicorn"]\nready = "spawn"\n'))
    cfg = config.override(cfg, app="other.mod:app")
    assert cfg.workers.app == "other.mod:app" and cfg.workers.command is None
    assert cfg.workers.ready == Readiness("spawn")


def test_override_keeps_source_and_other_sections(tmp_path):
    cfg = base(tmp_path)
    new = config.override(cfg, workers=1, binds=["127.0.0.1:1"])
    assert new.source == cfg.source and new.app == cfg.app and new.control == cfg.control


@pytest.mark.parametrize("kwargs, start", [
    ({"workers": 0}, "--workers: expected an integer from 1 to 1024, got 0"),
    ({"workers": True}, "--workers: expected an integer from 1 to 1024, got true"),
    ({"binds": ["local_host:80"]}, '--bind "local_host:80": '),
    ({"binds": ["localhost:80", "LocalHost.:80"]}, '--bind "LocalHost.:80": duplicates --bind "localhost:80"'),
    ({"binds": [":80", "0.0.0.0:80"]}, '--bind "0.0.0.0:80": duplicates --bind ":80"'),
    ({"app": "no-colon"}, '--app: expected "module:object"'),
    ({"name": "a b"}, "--name: expected a name of 1 to 64 letters"),
    ({"control_socket": "ctl.sock"}, '--control-socket: expected an absolute path such as /srv/demo, got "ctl.sock"'),
    ({"control_socket": "/" + "x" * 120}, "--control-socket: a unix socket path can be at most 107 bytes"),
    ({"app": "a:b", "command": ["x"]}, "--app: pass either --app or a command after --, not both"),
    ({"command": [""]}, "command after --: expected a non-empty list of non-empty strings"),
])
def test_override_validation(tmp_path, kwargs, start):
    with pytest.raises(ConfigError) as info:
        config.override(base(tmp_path), **kwargs)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(start)


def test_override_reports_every_bad_flag(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.override(base(tmp_path), binds=["x"], workers=-1, app="1x")
    assert [p.split(":")[0] for p in info.value.problems] == ['--bind "x"', "--workers", "--app"]


# --- file safety --------------------------------------------------------------------------

def test_safe_file(tmp_path):
    path = write(tmp_path, "")
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    assert config_problems(path) == []


def test_world_writable_file(tmp_path):
    path = write(tmp_path, "")
    path.chmod(0o666)
    tmp_path.chmod(0o755)
    problems = config_problems(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: the config file is writable by group and others (mode 0666)")
    assert problems[0].endswith(f"run chmod go-w {path}")


def test_group_writable_directory(tmp_path):
    path = write(tmp_path, "")
    path.chmod(0o600)
    tmp_path.chmod(0o775)
    problems = config_problems(path)
    assert problems == [f"{tmp_path}: the directory holding cadenza.toml is writable by group "
                        f"(mode 0775), so they could change what the service runs; run chmod g-w {tmp_path}"]


def test_others_writable_file_and_directory(tmp_path):
    path = write(tmp_path, "")
    path.chmod(0o602)
    tmp_path.chmod(0o757)
    problems = config_problems(path)
    assert len(problems) == 2
    assert "writable by others (mode 0602)" in problems[0] and f"chmod o-w {path}" in problems[0]
    assert "writable by others (mode 0757)" in problems[1] and f"chmod o-w {tmp_path}" in problems[1]


def test_file_safety_of_missing_file(tmp_path):
    problems = config_problems(tmp_path / "nope.toml")
    assert problems[0].startswith(f"{tmp_path / 'nope.toml'}: cannot check permissions")


def test_load_does_not_check_safety(tmp_path):
    path = write(tmp_path, "")
    path.chmod(0o666)
    assert config.load(path).source == path


# --- [http] -------------------------------------------------------------------------------

HTTP_KEYS = ["protocol", "loop", "lifespan", "keepalive", "access_log", "proxy_headers", "forwarded_allow_ips",
             "root_path", "limit_concurrency", "certfile", "keyfile", "wsgi_threads"]


def http_of(text: str) -> dict:
    return json.loads(config.http_environment(config.parse(text, "t.toml"))["CADENZA_HTTP"])


def test_http_defaults_are_those_documented():
    assert config.defaults().http is None
    assert http_of('[workers]\napp = "demo:app"\n') == {
        "protocol": "auto", "loop": "auto", "lifespan": "auto", "keepalive": 5, "access_log": False,
        "proxy_headers": True, "forwarded_allow_ips": ["127.0.0.1"], "root_path": "", "limit_concurrency": 0,
        "certfile": None, "keyfile": None, "wsgi_threads": 10}
    assert list(records.fields(config.HttpSection)) == HTTP_KEYS


def test_every_http_key_set():
    text = ('[workers]\napp = "demo:app"\n[http]\nprotocol = "h11"\nloop = "asyncio"\nlifespan = "off"\n'
            'keepalive = 0.5\naccess_log = true\nproxy_headers = false\n'
            'forwarded_allow_ips = ["10.0.0.0/8", "::1", "unix"]\nroot_path = "/api/v1"\n'
            'limit_concurrency = 100\ncertfile = "/etc/ssl/demo.pem"\nkeyfile = "/etc/ssl/demo.key"\n'
            'wsgi_threads = 1024\n')
    cfg = config.parse(text, "t.toml")
    assert cfg.http == config.HttpSection("h11", "asyncio", "off", 0.5, True, False, ("10.0.0.0/8", "::1", "unix"),
                                          "/api/v1", 100, "/etc/ssl/demo.pem", "/etc/ssl/demo.key", 1024)
    env = config.http_environment(cfg)
    assert list(env) == ["CADENZA_HTTP"]
    values = json.loads(env["CADENZA_HTTP"])
    assert list(values) == HTTP_KEYS
    assert values["forwarded_allow_ips"] == ["10.0.0.0/8", "::1", "unix"]
    assert values["certfile"] == "/etc/ssl/demo.pem" and values["keepalive"] == 0.5
    # What the worker rebuilds from it is what the master validated.
    rebuilt = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    assert config.HttpSection(**rebuilt) == cfg.http


@pytest.mark.parametrize("body", ['', '[http]\n'])
def test_http_goes_to_the_builtin_worker_only(body):
    builtin = config.parse('[workers]\napp = "demo:app"\n' + body, "t.toml")
    assert "CADENZA_HTTP" in config.worker_environment(builtin)
    command = config.parse('[workers]\ncommand = ["uvicorn", "x:app"]\n', "t.toml")
    assert config.http_environment(command) == {} and config.worker_environment(command) == {}


@pytest.mark.parametrize("text, expected", [
    ("[http]\nforwarded_allow_ips = []\n", ()),
    ('[http]\nforwarded_allow_ips = ["*"]\n', ("*",)),
    ('[http]\nforwarded_allow_ips = ["unix", "127.0.0.1", "fd00::/8"]\n', ("unix", "127.0.0.1", "fd00::/8")),
])
def test_good_forwarded_allow_ips(text, expected):
    assert config.parse(text, "t.toml").http.forwarded_allow_ips == expected


@pytest.mark.parametrize("value", ['""', '"/api"', '"/a/b.c-d_e"'])
def test_good_root_path(value):
    assert config.parse(f"[http]\nroot_path = {value}\n", "t.toml").http.root_path == json.loads(value)


def test_certfile_alone_is_a_pem_with_its_key():
    assert config.parse('[http]\ncertfile = "/etc/ssl/both.pem"\n', "t.toml").http.keyfile is None


@pytest.mark.parametrize("text, key, expected", [
    ('protocol = "httptool"', "http.protocol",
     'expected one of "auto", "httptools", "h11", got "httptool" (did you mean "httptools"?)'),
    ("protocol = 1", "http.protocol", 'expected one of "auto", "httptools", "h11", got 1'),
    ('loop = "uv"', "http.loop", 'expected one of "auto", "uvloop", "asyncio", got "uv"'),
    ("lifespan = true", "http.lifespan", 'expected one of "auto", "on", "off", got true'),
    ("keepalive = 0", "http.keepalive", "expected a number of seconds greater than 0 and at most 86400, got 0"),
    ("keepalive = -1", "http.keepalive", "expected a number of seconds greater than 0"),
    ('keepalive = "5"', "http.keepalive", 'got "5"'),
    ('access_log = "yes"', "http.access_log", 'expected true or false, got "yes"'),
    ("proxy_headers = 1", "http.proxy_headers", "expected true or false, got 1"),
    ('forwarded_allow_ips = "127.0.0.1"', "http.forwarded_allow_ips",
     'expected a list of IP addresses or networks such as ["127.0.0.1", "10.0.0.0/8"], or ["*"] for any, '
     'or ["unix"] for unix-socket listeners, got "127.0.0.1"'),
    ('forwarded_allow_ips = ["10.0.0.1/8"]', "http.forwarded_allow_ips[0]",
     '"10.0.0.1/8" has host bits set; the network is "10.0.0.0/8"'),
    ('forwarded_allow_ips = ["127.0.0.1", "proxy"]', "http.forwarded_allow_ips[1]",
     '"proxy" is not an IP address or network'),
    ("forwarded_allow_ips = [1]", "http.forwarded_allow_ips[0]", "expected an IP address or network as a string"),
    ('forwarded_allow_ips = ["*", "10.0.0.0/8"]', "http.forwarded_allow_ips",
     '"*" trusts every peer already; list it alone'),
    ('root_path = "/"', "http.root_path", 'expected "" or a path such as "/api": starting with "/", without a '
                                          'trailing "/", spaces, ? or #, got "/"'),
    ('root_path = "api"', "http.root_path", 'got "api"'),
    ('root_path = "/api/"', "http.root_path", 'got "/api/"'),
    ('root_path = "/a b"', "http.root_path", 'got "/a b"'),
    ('root_path = "/a//b"', "http.root_path", 'got "/a//b"'),
    ("root_path = 1", "http.root_path", "got 1"),
    ("limit_concurrency = -1", "http.limit_concurrency", "expected an integer from 0 to 1000000, got -1"),
    ("limit_concurrency = 1.5", "http.limit_concurrency", "got 1.5"),
    ("limit_concurrency = 1000001", "http.limit_concurrency", "got 1000001"),
    ('certfile = "cert.pem"', "http.certfile", 'expected an absolute path such as "/etc/ssl/private/demo.pem", '
                                               'got "cert.pem"'),
    ('certfile = "/c.pem"\nkeyfile = 5', "http.keyfile", "expected an absolute path"),
    ('keyfile = "/etc/ssl/demo.key"', "http.keyfile", "a key needs its certificate: set http.certfile too"),
    ("wsgi_threads = 0", "http.wsgi_threads", "expected an integer from 1 to 1024, got 0"),
    ("wsgi_threads = 1025", "http.wsgi_threads", "got 1025"),
    ('wsgi_threads = "10"', "http.wsgi_threads", 'got "10"'),
    ("keep_alive = 5", "http.keep_alive", "unknown key; the keys of [http] are protocol, loop, lifespan, "
                                          "keepalive, access_log, proxy_headers, forwarded_allow_ips, root_path, "
                                          "limit_concurrency, certfile, keyfile, wsgi_threads (did you mean keepalive?)"),
])
def test_bad_http_value(tmp_path, text, key, expected):
    problem = only_problem(tmp_path, f"[http]\n{text}\n")
    assert f": {key}: " in problem and expected in problem, problem


def test_http_with_a_command_worker_is_refused(tmp_path):
    problem = only_problem(tmp_path, '[workers]\ncommand = ["uvicorn", "x:app"]\n[http]\nkeepalive = 2\n')
    assert problem.endswith(": http: [http] configures the built-in worker (workers.app) only; workers.command "
                            "runs a server of its own, which these settings never reach: remove [http] or set "
                            "them in that command")


def test_http_with_a_command_after_dashes_is_refused(tmp_path):
    cfg = config.load(write(tmp_path, '[workers]\napp = "demo:app"\n[http]\nkeepalive = 2\n'))
    with pytest.raises(ConfigError) as info:
        config.override(cfg, command=["uvicorn", "x:app"])
    assert info.value.problems == [f"command after --: {tmp_path / 'cadenza.toml'}: [http] configures the "
                                   "built-in worker only, and a command runs a server of its own: remove [http] "
                                   "there, or serve the app with --app"]
    assert config.override(config.defaults(), command=["uvicorn"]).workers.command == ("uvicorn",)


def test_http_that_is_not_a_table(tmp_path):
    problem = only_problem(tmp_path, "http = 1\n")
    assert ": http: expected a table [http] holding its keys, got 1" in problem


# --- [workers.env] ------------------------------------------------------------------------

def test_workers_env(tmp_path):
    cfg = config.load(write(tmp_path, '[workers]\ncommand = ["x"]\n[workers.env]\n'
                                      'DJANGO_SETTINGS_MODULE = "demo.settings"\nEMPTY = ""\n_a1 = "x=y z"\n'
                                      'PATH = "/opt/demo/bin:/usr/bin"\n'))
    assert cfg.workers.env == (("DJANGO_SETTINGS_MODULE", "demo.settings"), ("EMPTY", ""), ("_a1", "x=y z"),
                               ("PATH", "/opt/demo/bin:/usr/bin"))
    assert config.worker_environment(cfg) == dict(cfg.workers.env)   # a command worker: no CADENZA_HTTP


def test_workers_env_inline_and_with_http():
    cfg = config.parse('[workers]\napp = "demo:app"\nenv = { A = "1" }\n', "t.toml")
    env = config.worker_environment(cfg)
    assert env["A"] == "1" and set(env) == {"A", "CADENZA_HTTP"}
    assert config.defaults().workers.env == ()


@pytest.mark.parametrize("line, key, expected", [
    ('"1ABC" = "x"', 'workers.env."1ABC"', "expected an environment variable name: letters, digits and _, "
                                           "not starting with a digit"),
    ('"A-B" = "x"', 'workers.env."A-B"', "expected an environment variable name"),
    ('"A B" = "x"', 'workers.env."A B"', "expected an environment variable name"),
    ('"" = "x"', 'workers.env.""', "expected an environment variable name"),
    ('CADENZA_HTTP = "{}"', "workers.env.CADENZA_HTTP",
     "CADENZA_HTTP is reserved: cadenza sets CADENZA_*, LISTEN_*, NOTIFY_SOCKET and WATCHDOG_* for each worker "
     "itself; choose another name"),
    ('LISTEN_FDS = "3"', "workers.env.LISTEN_FDS", "LISTEN_FDS is reserved"),
    ('NOTIFY_SOCKET = "/x"', "workers.env.NOTIFY_SOCKET", "NOTIFY_SOCKET is reserved"),
    ('WATCHDOG_USEC = "1"', "workers.env.WATCHDOG_USEC", "WATCHDOG_USEC is reserved"),
    ("WORKERS = 4", "workers.env.WORKERS", 'expected a string (an environment value is text: quote numbers and '
                                           'booleans, such as "4"), got 4'),
    ("DEBUG = true", "workers.env.DEBUG", "got true"),
    ('LIST = ["a"]', "workers.env.LIST", 'got ["a"]'),
    ('NUL = "a\\u0000b"', "workers.env.NUL", "contains a NUL character, which no environment value can hold"),
])
def test_bad_workers_env(tmp_path, line, key, expected):
    problem = only_problem(tmp_path, f"[workers.env]\n{line}\n")
    assert f": {key}: " in problem and expected in problem, problem


def test_workers_env_nested_table_and_not_a_table(tmp_path):
    problem = only_problem(tmp_path, '[workers.env.X]\nY = "1"\n')
    assert ": workers.env.X: expected a string" in problem and "got a table" in problem
    problem = only_problem(tmp_path, '[workers]\nenv = "A=1"\n')
    assert ': workers.env: expected a table of NAME = "value"' in problem and 'got "A=1"' in problem


def test_workers_env_reports_every_problem(tmp_path):
    problems = problems_of(tmp_path, '[workers.env]\nOK = "1"\n"9" = "x"\nLISTEN_PID = "1"\nN = 1\n')
    assert [p.split(": ")[1] for p in problems] == ['workers.env."9"', "workers.env.LISTEN_PID", "workers.env.N"]


# --- command-line papercuts ---------------------------------------------------------------

@pytest.mark.parametrize("spec, full", [("demo", "demo:application"), ("demo.wsgi", "demo.wsgi:application"),
                                        ("demo:app", "demo:app")])
def test_app_without_object_means_application(tmp_path, spec, full):
    assert config.load(write(tmp_path, f'[workers]\napp = "{spec}"\n')).workers.app == full
    assert config.override(config.defaults(), app=spec).workers.app == full


def test_name_and_control_socket_flags(tmp_path):
    cfg = config.override(base(tmp_path), name="other")
    assert cfg.app.name == "other" and cfg.control_socket == Path("/run/demo/control.sock")   # FULL sets it
    cfg = config.override(config.defaults(), name="other")
    assert cfg.control_socket == Path("/run/cadenza/other/control.sock")
    cfg = config.override(base(tmp_path), control_socket="/tmp/x/c.sock")
    assert cfg.control.socket == Path("/tmp/x/c.sock") and runtime.run_control_socket(cfg) == Path("/tmp/x/c.sock")


def test_run_flags_reach_the_config(tmp_path, monkeypatch):
    from cadenza.cli import parse_run_argv
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CADENZA_CONFIG", raising=False)
    args, command = parse_run_argv(["run", "--name", "two", "--control-socket", "/tmp/two.sock", "--app", "mod",
                                    "--bind", "localhost:8001", "--workers", "3"])
    cfg = config.from_run_args(args, command)
    assert (cfg.app.name, cfg.control.socket, cfg.workers.app, cfg.workers.count, cfg.listen.addresses) == (
        "two", Path("/tmp/two.sock"), "mod:application", 3, ("localhost:8001",))
    assert config.listen_origins(cfg) == ['--bind "localhost:8001"']


def test_listen_origins_name_the_key_or_the_default(tmp_path):
    cfg = config.load(write(tmp_path, '[listen]\naddresses = ["127.0.0.1:1", "localhost:2"]\n'))
    assert config.listen_origins(cfg) == [f"{cfg.source}: listen.addresses[0]", f"{cfg.source}: listen.addresses[1]"]
    assert config.listen_origins(config.defaults()) == ["the default address (--bind ADDR picks another)"]


def as_nobody(tmp_path, probe, env: dict | None = None) -> str:
    """probe() in a forked child that became nobody, with `env` in its environment."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.environ.pop("XDG_RUNTIME_DIR", None)
            os.environ.update(env or {})
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, str(probe()).encode())
        except BaseException as exc:  # noqa: BLE001 - the parent shows it
            os.write(w, f"child failed: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_control_socket_of_a_user_that_cannot_write_run(tmp_path):
    name = f"t{os.getpid()}"
    cfg = config.override(config.defaults(), name=name)
    assert runtime.run_control_socket(cfg) == Path(f"/run/cadenza/{name}/control.sock")   # root
    with tempfile.TemporaryDirectory(prefix="cadenza-test-xdg-", dir="/tmp") as xdg:   # nobody reaches it
        os.chown(xdg, 65534, 65534)
        user_runtime_paths(tmp_path, cfg, Path(xdg))


def user_runtime_paths(tmp_path: Path, cfg: config.Config, xdg: Path) -> None:
    name = cfg.app.name
    assert as_nobody(tmp_path, lambda: runtime.run_control_socket(cfg), {"XDG_RUNTIME_DIR": str(xdg)}) == \
        f"{xdg}/cadenza/{name}/control.sock"
    # Without it, or with one that is not this user's: /tmp/cadenza-UID (bind_socket makes it 0700).
    assert as_nobody(tmp_path, lambda: runtime.run_control_socket(cfg)) == f"/tmp/cadenza-65534/cadenza/{name}/control.sock"
    assert as_nobody(tmp_path, lambda: runtime.run_control_socket(cfg), {"XDG_RUNTIME_DIR": "/tmp"}) == \
        f"/tmp/cadenza-65534/cadenza/{name}/control.sock"
    explicit = config.override(cfg, control_socket="/srv/x/c.sock")
    assert as_nobody(tmp_path, lambda: runtime.run_control_socket(explicit)) == "/srv/x/c.sock"
    # A client run as that user looks where such a master would be.
    assert as_nobody(tmp_path, lambda: runtime.find_control_socket(cfg), {"XDG_RUNTIME_DIR": str(xdg)}) == \
        f"{xdg}/cadenza/{name}/control.sock"


@pytest.mark.parametrize("listen, expected", [
    ("0.0.0.0:9808", "is not a loopback address"),
    ("10.1.2.3:9808", "is not a loopback address"),
    ("localhost:9808", "is not a loopback address"),
    ("127.0.0.1", "address needs a port"),
    ("unix:relative.sock", "unix socket path must be absolute"),
])
def test_metrics_listen_is_loopback_or_a_unix_socket(tmp_path, listen, expected):
    problem = only_problem(tmp_path, f'[metrics]\nlisten = "{listen}"\n')
    assert "metrics.listen" in problem and expected in problem, problem


def test_metrics_and_canary_settings_are_read(tmp_path):
    cfg = config.parse('[workers]\napp = "a:b"\n[metrics]\nlisten = "[::1]:9808"\nmultiprocess = true\n'
                  '[upgrade]\ncanary = 1\ncanary_duration = 5\ncanary_max_error_rate = 0.05\n', "t")
    assert cfg.metrics.listen == "[::1]:9808" and cfg.metrics.multiprocess
    assert (cfg.upgrade.canary, cfg.upgrade.canary_duration, cfg.upgrade.canary_max_error_rate) == (1, 5.0, 0.05)
    assert "expected a fraction" in only_problem(tmp_path, "[upgrade]\ncanary_max_error_rate = 2\n")
