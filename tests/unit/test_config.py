"""Tests for relayd.config: the file format is a user-facing contract, so every
default, every spelling and every error message shape is pinned here."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

import attrs
import pytest

from relayd import config as cfg
from relayd.config import (
    DEFAULT_CONFIG_SOURCE,
    DEFAULT_CONFIG_TEXT,
    Config,
    Endpoint,
    Limits,
    Rate,
    Smarthost,
    load,
    load_default,
    parse,
    parse_duration,
    parse_rate,
    parse_size,
    render,
)
from relayd.errors import ConfigError

SAMPLE = Path(__file__).resolve().parents[2] / "etc" / "relayd" / "relayd.toml"

LISTENER = """
[[listener]]
name = "a"
listen = "tcp:2525"
"""
ROUTE = """
[route.default]
maildir = "out"
"""
MINIMAL = LISTENER + ROUTE


def error(text: str, source: str = "test.toml") -> ConfigError:
    """The ConfigError ``parse`` raises for ``text``, checked for the
    ``FILE: key: reason`` shape every caller prints."""
    with pytest.raises(ConfigError) as info:
        parse(text, source)
    e = info.value
    assert str(e) == f"{source}: {e.key}: {e.reason}"
    assert e.source == source
    return e


def validate_error(text: str) -> ConfigError:
    """Like :func:`error`, for checks that run before the not-built refusals."""
    with pytest.raises(ConfigError) as info:
        cfg._validate(text, "test.toml")
    return info.value


def one_listener(**keys: str) -> str:
    """MINIMAL with extra listener lines (values are TOML source)."""
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return LISTENER + extra + ROUTE


# --- the embedded default and the shipped sample ----------------------------


def test_embedded_default() -> None:
    c = load_default()
    assert c.source == DEFAULT_CONFIG_SOURCE == "<embedded default>"
    assert c == parse(DEFAULT_CONFIG_TEXT, DEFAULT_CONFIG_SOURCE)
    (listener,) = c.listeners
    assert listener.name == "default"
    assert listener.listen == Endpoint(
        "tcp:1025:interface=127.0.0.1", "tcp", port=1025, interface="127.0.0.1"
    )
    assert listener.mynetworks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert listener.route == "outbox"
    assert listener.tls == "none" and listener.auth == "none"
    assert c.routes["outbox"].maildir == "relayd-data/outbox"
    assert c.server.spool == "relayd-data/spool"
    assert c.http.listen is not None and c.http.listen.port == 8025
    assert c.http.listen.interface == "127.0.0.1"


def test_shipped_sample_parses() -> None:
    c = load(str(SAMPLE))
    assert c.source == str(SAMPLE)
    assert [lc.name for lc in c.listeners] == ["mta", "local"]
    mta, local = c.listeners
    assert mta.listen.port == 25 and mta.listen.interface is None
    assert local.listen.port == 1025 and local.listen.interface == "127.0.0.1"
    assert {lc.route for lc in c.listeners} == {"outbox"}
    assert c.routes["outbox"].maildir == "/var/lib/relayd/outbox"
    assert c.server.spool == "/var/spool/relayd"
    assert c.http.listen is not None and c.http.listen.description == "tcp:8025:interface=127.0.0.1"
    assert c.tls is None and c.auth == {}


def test_shipped_sample_commented_blocks_are_valid_for_later_versions(tmp_path: Path) -> None:
    """The commented-out examples must be right when a later version enables
    them: uncomment every setting, keep one LDAP bind style, point the secret
    files at real files, and validate (without the not-built refusals)."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    lines = []
    for line in SAMPLE.read_text().splitlines():
        m = re.match(r"^#(\S.*)$", line)
        if m:
            line = m.group(1)
            if line.startswith(("search_base", "search_filter")):
                continue
            line = re.sub(r'^(\w+_file) = "[^"]*"', rf'\1 = "{secret}"', line)
        lines.append(line)
    c = cfg._validate("\n".join(lines), "sample")
    assert [lc.name for lc in c.listeners] == ["mta", "local", "submission"]
    assert c.tls is not None
    assert c.listeners[2].tls == "starttls" and c.listeners[2].auth == "required"
    assert c.auth["corp"].bind_password == "s3cret"
    assert c.routes["default"].password == "s3cret"
    assert c.routes["default"].smarthost == (Smarthost("email-smtp.eu-west-1.amazonaws.com", 587),)


# --- defaults ----------------------------------------------------------------


def test_defaults() -> None:
    c = parse(MINIMAL, "x.toml")
    assert c.source == "x.toml"
    s = c.server
    assert (s.hostname, s.spool, s.log_format, s.max_hops, s.bounce_from) == (
        None,
        "/var/spool/relayd",
        "text",
        50,
        None,
    )
    assert c.tls is None
    assert c.http.listen == Endpoint(
        "tcp:8025:interface=127.0.0.1", "tcp", port=8025, interface="127.0.0.1"
    )
    q = c.queue
    assert q.retry == (60.0, 300.0, 900.0, 3600.0)
    assert q.lifetime == 5 * 86400.0
    assert q.max_messages == 100000
    assert q.min_free_disk == 500 * 1024 * 1024
    assert c.limits == Limits(
        max_connections=None,
        max_connections_per_ip=None,
        max_messages_per_session=None,
        max_errors_per_session=20,
        auth_failures=Rate(10, 300.0),
        auth_block=600.0,
        messages_per_user=None,
        messages_per_ip=None,
    )
    (lc,) = c.listeners
    assert lc.tls == "none"
    assert lc.require_tls is False
    assert lc.auth == "none" and lc.auth_backend is None
    assert [str(n) for n in lc.mynetworks] == ["127.0.0.0/8", "::1/128"]
    assert lc.allowed_senders == () and lc.allowed_recipients == ()
    assert lc.max_message_size == 25 * 1024 * 1024
    assert lc.max_recipients == 100
    assert lc.timeout == 300.0
    assert lc.route == "default"
    assert lc.bare_newline == "normalize"
    assert lc.tls_cert is None and lc.tls_key is None
    assert lc.tls_min_version == "1.2"
    assert lc.plaintext_auth is False
    assert lc.proxy_protocol is False and lc.proxy_trusted == ()
    assert lc.limits == c.limits
    r = c.routes["default"]
    assert r.maildir == "out" and r.smarthost == ()
    assert r.concurrency == 10 and r.max_rate is None and r.soft_bounce is False
    assert r.tls == "starttls" and r.tls_verify is True


def test_listener_tls_defaults_to_starttls_with_tls_section() -> None:
    text = '[tls]\ncert = "c.pem"\nkey = "k.pem"\n' + MINIMAL
    c = cfg._validate(text, "t")
    assert c.tls == cfg.TLSConfig("c.pem", "k.pem")
    assert c.listeners[0].tls == "starttls"


def test_tls_section_with_explicit_plain_listener_is_accepted() -> None:
    text = '[tls]\ncert = "c.pem"\nkey = "k.pem"\n' + one_listener(tls='"none"')
    assert parse(text).listeners[0].tls == "none"


def test_defaults_of_auth_and_smarthost_sections() -> None:
    text = (
        MINIMAL
        + '[auth.apps]\ntype = "htpasswd"\nfile = "u.htpasswd"\n'
        + '[auth.corp]\ntype = "ldap"\nurl = "ldaps://ldap.example.org"\n'
        + 'user_dn = "uid={user},dc=example,dc=org"\n'
        + '[route.up]\nsmarthost = ["mx.example.org", "[2001:db8::1]", "10.0.0.1:2525"]\n'
        + '[route.up465]\nsmarthost = ["mx.example.org"]\ntls = "implicit"\n'
    )
    c = cfg._validate(text, "t")
    assert c.auth["apps"] == cfg.AuthBackendConfig("apps", "htpasswd", file="u.htpasswd")
    corp = c.auth["corp"]
    assert corp.timeout == 10.0 and corp.start_tls is False and corp.bind_dn is None
    up = c.routes["up"]
    assert up.smarthost == (
        Smarthost("mx.example.org", 25),
        Smarthost("2001:db8::1", 25),
        Smarthost("10.0.0.1", 2525),
    )
    assert (up.tls, up.tls_verify, up.concurrency, up.username, up.password) == (
        "starttls",
        True,
        10,
        None,
        None,
    )
    assert c.routes["up465"].smarthost == (Smarthost("mx.example.org", 465),)


def test_listener_limits_override_server_limits() -> None:
    text = (
        '[limits]\nmax_connections = 100\nmessages_per_ip = "50/h"\n'
        + one_listener(max_connections="5", auth_block='"1h"')
        + '[[listener]]\nname = "b"\nlisten = "tcp:2526"\n'
    )
    a, b = cfg._validate(text, "t").listeners
    assert a.limits.max_connections == 5
    assert a.limits.auth_block == 3600.0
    assert a.limits.messages_per_ip == Rate(50, 3600.0)
    assert b.limits.max_connections == 100 and b.limits.auth_block == 600.0


def test_config_is_frozen() -> None:
    c = load_default()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.source = "x"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.listeners[0].route = "x"  # type: ignore[misc]
    assert isinstance(c.listeners, tuple) and isinstance(c.queue.retry, tuple)


# --- sizes, durations, rates -------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (0, 0),
        (1000, 1000),
        ("1000", 1000),
        ("100B", 100),
        ("1KB", 1024),
        ("1kb", 1024),
        ("2 MB", 2 * 1024 * 1024),
        ("25MB", 25 * 1024 * 1024),
        ("25M", 25 * 1024 * 1024),
        ("1MiB", 1024 * 1024),
        ("3GB", 3 * 1024**3),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value, "f", "k") == expected


@pytest.mark.parametrize(
    "value, reason",
    [
        (-1, "must not be negative"),
        ("-1MB", "is not a size"),
        ("1.5MB", "is not a size"),
        ("25 megabytes", "is not a size"),
        ("1TB", "is not a size"),
        ("", "is not a size"),
        (True, "not a boolean"),
        (1.5, "not a float"),
        ([], "not an array"),
    ],
)
def test_parse_size_rejects(value: object, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, "f", "queue.min_free_disk")
    assert info.value.key == "queue.min_free_disk"
    assert reason in info.value.reason


@pytest.mark.parametrize(
    "value, expected",
    [
        (30, 30.0),
        (0.5, 0.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("5d", 432000.0),
        ("1w", 604800.0),
        ("2 H", 7200.0),
    ],
)
def test_parse_duration(value: object, expected: float) -> None:
    assert parse_duration(value, "f", "k") == expected


@pytest.mark.parametrize(
    "value, reason",
    [
        (0, "must be a positive duration"),
        ("0s", "must be a positive duration"),
        (-5, "must be a positive duration"),
        ("-5m", "is not a duration"),
        ("5y", "is not a duration"),
        ("5 minutes", "is not a duration"),
        (float("inf"), "finite"),
        (float("nan"), "finite"),
        (True, "not a boolean"),
        ({}, "not a table"),
    ],
)
def test_parse_duration_rejects(value: object, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "f", "queue.lifetime")
    assert info.value.key == "queue.lifetime"
    assert reason in info.value.reason


@pytest.mark.parametrize(
    "value, expected",
    [
        ("14/s", Rate(14, 1.0)),
        ("100/m", Rate(100, 60.0)),
        ("100/h", Rate(100, 3600.0)),
        ("1000/d", Rate(1000, 86400.0)),
        ("10/5m", Rate(10, 300.0)),
        ("10 / 30s", Rate(10, 30.0)),
        ("3/90", Rate(3, 90.0)),
    ],
)
def test_parse_rate(value: str, expected: Rate) -> None:
    assert parse_rate(value, "f", "k") == expected


@pytest.mark.parametrize(
    "value, reason",
    [
        ("0/h", "at least 1"),
        ("10", "is not a rate"),
        ("x/h", "is not a rate"),
        ("-1/h", "is not a rate"),
        ("10/", "is not a rate"),
        ("10/0s", "positive duration"),
        ("10/year", "is not a duration"),
        (10, "not an integer"),
    ],
)
def test_parse_rate_rejects(value: object, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rate(value, "f", "limits.auth_failures")
    assert info.value.key == "limits.auth_failures"
    assert reason in info.value.reason


def test_scalars_in_context_name_their_key() -> None:
    e = error('[queue]\nmin_free_disk = "lots"\n' + MINIMAL)
    assert e.key == "queue.min_free_disk"
    e = error(one_listener(timeout='"forever"'))
    assert e.key == "listener[a].timeout"
    e = error(one_listener(max_message_size="0"))
    assert (e.key, e.reason) == ("listener[a].max_message_size", "must be a positive size")
    e = error('[queue]\nretry = ["1m", "soon"]\n' + MINIMAL)
    assert e.key == "queue.retry[1]"
    e = error("[queue]\nretry = []\n" + MINIMAL)
    assert e.key == "queue.retry" and "at least one" in e.reason
    e = error('[limits]\nmessages_per_user = "lots"\n' + MINIMAL)
    assert e.key == "limits.messages_per_user"


# --- unknown keys and wrong types ---------------------------------------------


@pytest.mark.parametrize(
    "text, key, reason",
    [
        (
            "[serverr]\nspool = 'x'\n" + MINIMAL,
            "serverr",
            "unknown section (did you mean 'server'?)",
        ),
        ("hostname = 'x'\n" + MINIMAL, "hostname", "unknown key"),
        ("[server]\nspol = 'x'\n" + MINIMAL, "server.spol", "unknown key (did you mean 'spool'?)"),
        (one_listener(tsl='"none"'), "listener[a].tsl", "unknown key (did you mean 'tls'?)"),
        (MINIMAL + "smarthosts = ['x']\n", "route.default.smarthosts", "unknown key"),
        (
            MINIMAL + "[auth.apps]\ntype = 'htpasswd'\nfile = 'f'\npassword = 'x'\n",
            "auth.apps.password",
            "unknown key",
        ),
        ("[limits]\nmax_conections = 3\n" + MINIMAL, "limits.max_conections", "unknown key"),
        ("[http]\nport = 8025\n" + MINIMAL, "http.port", "unknown key"),
        ("[queue]\nretries = []\n" + MINIMAL, "queue.retries", "unknown key"),
        ("[tls]\ncert = 'c'\nkey = 'k'\nca = 'x'\n" + MINIMAL, "tls.ca", "unknown key"),
    ],
)
def test_unknown_keys(text: str, key: str, reason: str) -> None:
    e = error(text)
    assert e.key == key
    assert e.reason.startswith(reason)


def test_unknown_key_wins_over_missing_key() -> None:
    """A typo must be reported as a typo, not as the key it was meant to be."""
    e = error('[[listener]]\nname = "a"\nlistn = "tcp:25"\n' + ROUTE)
    assert e.key == "listener[a].listn"


@pytest.mark.parametrize(
    "text, key, reason",
    [
        ("[server]\nspool = 5\n" + MINIMAL, "server.spool", "must be a string, not an integer"),
        (
            "[server]\nmax_hops = '50'\n" + MINIMAL,
            "server.max_hops",
            "must be an integer, not a string",
        ),
        (
            "[server]\nmax_hops = true\n" + MINIMAL,
            "server.max_hops",
            "must be an integer, not a boolean",
        ),
        ("[server]\nmax_hops = 0\n" + MINIMAL, "server.max_hops", "must be at least 1, got 0"),
        (
            "[server]\nlog_format = 'xml'\n" + MINIMAL,
            "server.log_format",
            'must be "text" or "json", not "xml"',
        ),
        (
            "[queue]\nmax_messages = 1.0\n" + MINIMAL,
            "queue.max_messages",
            "must be an integer, not a float",
        ),
        (
            "[limits]\nmax_connections = false\n" + MINIMAL,
            "limits.max_connections",
            "must be an integer, not a boolean",
        ),
        ("server = 1\n" + MINIMAL, "server", "must be a table, not an integer"),
        (
            one_listener(require_tls='"yes"'),
            "listener[a].require_tls",
            "must be true or false, not a string",
        ),
        (
            one_listener(proxy_protocol="1"),
            "listener[a].proxy_protocol",
            "must be true or false, not an integer",
        ),
        (
            one_listener(max_recipients="true"),
            "listener[a].max_recipients",
            "must be an integer, not a boolean",
        ),
        (
            one_listener(mynetworks='"10.0.0.0/8"'),
            "listener[a].mynetworks",
            "must be an array, not a string",
        ),
        (
            one_listener(allowed_senders="[1]"),
            "listener[a].allowed_senders[0]",
            "must be a string, not an integer",
        ),
        (
            '[[listener]]\nname = "a"\nlisten = 2525\n' + ROUTE,
            "listener[a].listen",
            "must be a string, not an integer",
        ),
        (one_listener(route='""'), "listener[a].route", "must not be empty"),
        (
            one_listener(bare_newline='"strip"'),
            "listener[a].bare_newline",
            'must be "normalize" or "reject", not "strip"',
        ),
        (
            one_listener(tls_min_version="1.3"),
            "listener[a].tls_min_version",
            "must be a string, not a float",
        ),
        (
            MINIMAL + "concurrency = true\n",
            "route.default.concurrency",
            "must be an integer, not a boolean",
        ),
        (MINIMAL + "concurrency = 0\n", "route.default.concurrency", "must be at least 1, got 0"),
        (
            MINIMAL + "soft_bounce = 'no'\n",
            "route.default.soft_bounce",
            "must be true or false, not a string",
        ),
        (
            MINIMAL + "[route.x]\nmaildir = 1979-05-27\n",
            "route.x.maildir",
            "must be a string, not a date/time",
        ),
        (
            MINIMAL + "[auth]\ntype = 'htpasswd'\n",
            "auth.type",
            "must be a table [auth.NAME], not a string",
        ),
        ("route = 'default'\n" + LISTENER, "route", "must be tables [route.NAME], not a string"),
    ],
)
def test_wrong_types(text: str, key: str, reason: str) -> None:
    e = error(text)
    assert (e.key, e.reason) == (key, reason)


# --- listeners -----------------------------------------------------------------


def test_listeners_required() -> None:
    e = error(ROUTE)
    assert (e.key, e.reason) == ("listener", "at least one [[listener]] is required")
    e = error('[listener]\nname = "a"\nlisten = "tcp:25"\n' + ROUTE)
    assert e.key == "listener" and "[[listener]]" in e.reason


def test_listener_name_and_listen_required() -> None:
    e = error('[[listener]]\nlisten = "tcp:25"\n' + ROUTE)
    assert e.key == "listener[0].name" and e.reason.startswith("required")
    e = error('[[listener]]\nname = "a"\n' + ROUTE)
    assert (e.key, e.reason) == ("listener[a].listen", "required")
    e = error(MINIMAL + '[[listener]]\nname = "bad name"\nlisten = "tcp:26"\n')
    assert e.key == "listener[1].name" and "letters, digits" in e.reason


def test_duplicate_listener_name() -> None:
    e = error(MINIMAL + '[[listener]]\nname = "a"\nlisten = "tcp:2526"\n')
    assert e.key == "listener[1].name"
    assert e.reason == 'duplicate listener name "a" (also listener[0])'


@pytest.mark.parametrize(
    "first, second",
    [
        ("tcp:2525", "tcp:2525"),
        ("tcp:2525", "tcp:port=2525:interface=127.0.0.1"),
        ("tcp:2525:interface=127.0.0.1", "tcp:2525"),
        ("tcp:2525:interface=0.0.0.0", "tcp:2525:interface=10.0.0.1"),
        ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.1:backlog=10"),
        ("tcp6:2525", "tcp6:2525:interface=\\\\:\\\\:1"),
    ],
)
def test_duplicate_port(first: str, second: str) -> None:
    text = (
        f'[[listener]]\nname = "a"\nlisten = "{first}"\n'
        f'[[listener]]\nname = "b"\nlisten = "{second}"\n' + ROUTE
    )
    e = error(text)
    assert (e.key, e.reason) == (
        "listener[b].listen",
        "duplicate port 2525: also used by listener[a]",
    )


@pytest.mark.parametrize(
    "first, second",
    [
        ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.2"),
        ("tcp:2525", "tcp6:2525"),
        ("tcp:0", "tcp:0"),
        ("tcp:2525", "tcp:2526"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET6:index=1"),
    ],
)
def test_listeners_that_do_not_clash(first: str, second: str) -> None:
    text = (
        f'[[listener]]\nname = "a"\nlisten = "{first}"\n'
        f'[[listener]]\nname = "b"\nlisten = "{second}"\n' + ROUTE
    )
    assert len(parse(text).listeners) == 2


def test_duplicate_systemd_index() -> None:
    text = (
        '[[listener]]\nname = "a"\nlisten = "systemd:domain=INET:index=0"\n'
        '[[listener]]\nname = "b"\nlisten = "systemd:domain=INET6:index=0"\n' + ROUTE
    )
    e = error(text)
    assert e.key == "listener[b].listen"
    assert e.reason == "duplicate systemd index 0: also used by listener[a]"


def test_http_port_clash_with_listener() -> None:
    e = error('[http]\nlisten = "tcp:2525"\n' + MINIMAL)
    assert (e.key, e.reason) == ("http.listen", "duplicate port 2525: also used by listener[a]")


@pytest.mark.parametrize("value", ["", "none", "None"])
def test_http_can_be_disabled(value: str) -> None:
    assert parse(f'[http]\nlisten = "{value}"\n' + MINIMAL).http.listen is None


@pytest.mark.parametrize(
    "listen, expected",
    [
        ("tcp:25", Endpoint("tcp:25", "tcp", port=25)),
        ("tcp:port=25", Endpoint("tcp:port=25", "tcp", port=25)),
        (
            "tcp:25:interface=127.0.0.1:backlog=100",
            Endpoint(
                "tcp:25:interface=127.0.0.1:backlog=100", "tcp", port=25, interface="127.0.0.1"
            ),
        ),
        (
            r"tcp6:25:interface=\:\:1",
            Endpoint(r"tcp6:25:interface=\:\:1", "tcp6", port=25, interface="::1"),
        ),
        ("tcp6:port=25", Endpoint("tcp6:port=25", "tcp6", port=25)),
        (
            "systemd:domain=INET6:index=2",
            Endpoint("systemd:domain=INET6:index=2", "systemd", index=2),
        ),
    ],
)
def test_endpoints(listen: str, expected: Endpoint) -> None:
    text = f"[[listener]]\nname = \"a\"\nlisten = '{listen}'\n" + ROUTE
    assert parse(text).listeners[0].listen == expected


@pytest.mark.parametrize(
    "listen, reason",
    [
        (
            "ssl:465:privateKey=k.pem",
            "TLS endpoints are refused: TLS comes from the listener's tls key",
        ),
        ("tls:465", "TLS endpoints are refused"),
        ("haproxy:tcp:25", "PROXY protocol is the listener's proxy_protocol key"),
        ("unix:/run/relayd.sock", "Unix socket endpoints are not supported"),
        ("udp:25", "unsupported endpoint type 'udp'"),
        ("TCP:25", "unsupported endpoint type 'TCP'"),
        ("25", "is not an endpoint"),
        ("tcp", "is not an endpoint"),
        ("tcp:smtp", "'smtp' is not a port number"),
        ("tcp:65536", "is not a port number"),
        ("tcp:-1", "is not a port number"),
        ("tcp:interface=127.0.0.1", "has no port"),
        ("tcp:25:port=25", "unexpected arguments"),
        ("tcp:25:interface=localhost", "not an IPv4 address"),
        ("tcp:25:interface=::1", "unexpected arguments"),
        ("tcp6:25:interface=::1", "escape the colons"),
        ("tcp6:25:interface=127.0.0.1", "not an IPv6 address"),
        ("tcp:25:backlog=0", "backlog '0' is not a positive integer"),
        ("tcp:25:reuse=yes", "unknown tcp: option 'reuse'"),
        ("tcp:25:port=26:port=27", "given twice"),
        ("tcp:25\\", "lone backslash"),
        ("systemd:index=0", "domain=INET or domain=INET6"),
        ("systemd:domain=UNIX:index=0", "domain=INET or domain=INET6"),
        ("systemd:domain=INET", "index=N"),
        ("systemd:domain=INET:name=smtp", "unknown systemd: option 'name'"),
    ],
)
def test_refused_endpoints(listen: str, reason: str) -> None:
    e = error(f"[[listener]]\nname = \"a\"\nlisten = '{listen}'\n" + ROUTE)
    assert e.key == "listener[a].listen"
    assert reason in e.reason


def test_mynetworks() -> None:
    c = parse(one_listener(mynetworks='["10.0.0.0/8", "192.0.2.1", "2001:db8::/32", "::1"]'))
    assert [str(n) for n in c.listeners[0].mynetworks] == [
        "10.0.0.0/8",
        "192.0.2.1/32",
        "2001:db8::/32",
        "::1/128",
    ]
    assert parse(one_listener(mynetworks="[]")).listeners[0].mynetworks == ()


def test_bad_cidr_names_the_index() -> None:
    e = error(one_listener(mynetworks='["10.0.0.0/8", "127.0.0.1", "10.0.0.300/32"]'))
    assert e.key == "listener[a].mynetworks[2]"
    assert e.reason == '"10.0.0.300/32" is not an IP address or network (CIDR)'


def test_host_bits_set_is_an_error() -> None:
    e = error(one_listener(mynetworks='["10.0.0.1/8"]'))
    assert e.key == "listener[a].mynetworks[0]"
    assert e.reason == '"10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)'


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0"])
def test_mynetworks_refuses_an_open_relay(network: str) -> None:
    e = error(one_listener(mynetworks=f'["127.0.0.0/8", "{network}"]'))
    assert e.key == "listener[a].mynetworks[1]"
    assert "open relay" in e.reason


def test_proxy_trusted_may_stay_while_proxy_protocol_is_off() -> None:
    c = parse(one_listener(proxy_trusted='["10.0.0.0/8"]'))
    assert [str(n) for n in c.listeners[0].proxy_trusted] == ["10.0.0.0/8"]


def test_unknown_route() -> None:
    e = error(one_listener(route='"nowhere"'))
    assert (e.key, e.reason) == ("listener[a].route", 'unknown route "nowhere"')
    e = error(LISTENER + '[route.other]\nmaildir = "x"\n')
    assert (e.key, e.reason) == ("listener[a].route", 'unknown route "default"')


def test_unknown_auth_backend() -> None:
    e = error(one_listener(auth_backend='"x"'))
    assert (e.key, e.reason) == ("listener[a].auth_backend", 'unknown auth backend "x"')


def test_auth_backend_allowed_on_plain_listener() -> None:
    text = one_listener(auth_backend='"apps"') + '[auth.apps]\ntype = "htpasswd"\nfile = "f"\n'
    assert parse(text).listeners[0].auth_backend == "apps"


@pytest.mark.parametrize(
    "keys, key, reason",
    [
        ({"tls": '"starttls"'}, "listener[a].tls", "needs a certificate"),
        ({"tls_cert": '"c.pem"'}, "listener[a].tls_key", "tls_cert and tls_key go together"),
        ({"require_tls": "true"}, "listener[a].require_tls", 'require_tls needs tls = "starttls"'),
        ({"auth": '"required"'}, "listener[a].auth_backend", 'required when auth = "required"'),
        (
            {"auth": '"optional"', "auth_backend": '"x"'},
            "listener[a].auth",
            "AUTH is only offered over TLS",
        ),
        ({"proxy_protocol": "true"}, "listener[a].proxy_trusted", "needs the proxies' networks"),
        (
            {"allowed_senders": '["a b@example.org"]'},
            "listener[a].allowed_senders[0]",
            "not an address pattern",
        ),
    ],
)
def test_listener_consistency(keys: dict[str, str], key: str, reason: str) -> None:
    e = error(one_listener(**keys))
    assert e.key == key
    assert reason in e.reason


def test_listener_with_own_certificate_validates() -> None:
    text = one_listener(tls='"implicit"', tls_cert='"c.pem"', tls_key='"k.pem"', require_tls="true")
    lc = cfg._validate(text, "t").listeners[0]
    assert (lc.tls, lc.tls_cert, lc.tls_key, lc.require_tls) == ("implicit", "c.pem", "k.pem", True)


# --- server -------------------------------------------------------------------


@pytest.mark.parametrize("hostname", ["relay.example.org", "relay", "mx-1.example.co.uk"])
def test_hostname_ok(hostname: str) -> None:
    assert parse(f'[server]\nhostname = "{hostname}"\n' + MINIMAL).server.hostname == hostname


@pytest.mark.parametrize(
    "hostname",
    ["relay example.org", "-relay.example.org", "relay..example.org", "10.0.0.1", "a_b.org"],
)
def test_hostname_bad(hostname: str) -> None:
    e = error(f'[server]\nhostname = "{hostname}"\n' + MINIMAL)
    assert e.key == "server.hostname" and "is not a host name" in e.reason


def test_bounce_from() -> None:
    text = '[server]\nbounce_from = "MAILER-DAEMON@relay.example.org"\n' + MINIMAL
    assert parse(text).server.bounce_from == "MAILER-DAEMON@relay.example.org"
    for bad in ("MAILER-DAEMON", "@example.org", "a@", "a b@example.org", "<a@example.org>"):
        e = error(f'[server]\nbounce_from = "{bad}"\n' + MINIMAL)
        assert e.key == "server.bounce_from" and "is not a mail address" in e.reason


# --- routes -------------------------------------------------------------------


def test_route_needs_exactly_one_destination() -> None:
    e = error(LISTENER + "[route.default]\nconcurrency = 2\n")
    assert e.key == "route.default" and "needs smarthost" in e.reason
    e = error(LISTENER + '[route.default]\nmaildir = "m"\nsmarthost = ["h"]\n')
    assert (e.key, e.reason) == (
        "route.default.maildir",
        "give either smarthost or maildir, not both",
    )
    e = validate_error(LISTENER + "[route.default]\nsmarthost = []\n")
    assert (e.key, e.reason) == ("route.default.smarthost", "must list at least one host")
    e = validate_error(LISTENER + '[route.default]\nsmarthost = "h"\n')
    assert (e.key, e.reason) == ("route.default.smarthost", "must be an array, not a string")


def test_maildir_route_refuses_smarthost_settings() -> None:
    e = error(MINIMAL + 'username = "u"\n')
    assert e.key == "route.default.username" and "only for smarthost routes" in e.reason


@pytest.mark.parametrize(
    "host, reason",
    [
        ("::1", "write IPv6 addresses in brackets"),
        ("[::1", "missing ']'"),
        ("[mx.example.org]:25", "brackets hold an IPv6 address"),
        ("[::1]25", "expected ':PORT'"),
        ("mx.example.org:", "port must be 1-65535"),
        ("mx.example.org:0", "port must be 1-65535"),
        ("mx.example.org:smtp", "port must be 1-65535"),
        ("mx example.org", "is not a host name"),
    ],
)
def test_bad_smarthost(host: str, reason: str) -> None:
    e = validate_error(LISTENER + f'[route.default]\nsmarthost = ["ok.example.org", "{host}"]\n')
    assert e.key == "route.default.smarthost[1]"
    assert reason in e.reason


def test_smarthost_v6_with_port() -> None:
    c = cfg._validate(LISTENER + '[route.default]\nsmarthost = ["[2001:db8::2]:587"]\n', "t")
    assert c.routes["default"].smarthost == (Smarthost("2001:db8::2", 587),)


@pytest.mark.parametrize(
    "extra, key, reason",
    [
        ('username = "u"\n', "route.default.password", "username needs password"),
        ('password = "p"\n', "route.default.username", "required with a password"),
        (
            'username = "u"\npassword = "p"\ntls = "opportunistic"\n',
            "route.default.tls",
            "in the clear",
        ),
        ('password = "p"\npassword_file = "f"\n', "route.default.password_file", "not both"),
        ('client_cert = "c"\n', "route.default.client_key", "go together"),
        ('tls = "smtps"\n', "route.default.tls", "must be"),
        ('max_rate = "fast"\n', "route.default.max_rate", "is not a rate"),
        (
            "max_recipients_per_transaction = 0\n",
            "route.default.max_recipients_per_transaction",
            "at least 1",
        ),
        ('tls_server_name = "not a name"\n', "route.default.tls_server_name", "is not a host name"),
    ],
)
def test_smarthost_route_consistency(extra: str, key: str, reason: str) -> None:
    e = validate_error(LISTENER + '[route.default]\nsmarthost = ["h.example.org"]\n' + extra)
    assert e.key == key
    assert reason in e.reason


def test_route_name_must_be_simple() -> None:
    e = error(MINIMAL + '[route."a b"]\nmaildir = "m"\n')
    assert e.key == 'route."a b"'


# --- auth backends ------------------------------------------------------------


@pytest.mark.parametrize(
    "body, key, reason",
    [
        ('file = "f"\n', "auth.x.type", "required"),
        ('type = "pam"\n', "auth.x.type", 'must be "htpasswd" or "ldap", not "pam"'),
        ('type = "htpasswd"\n', "auth.x.file", "required"),
        (
            'type = "htpasswd"\nfile = "f"\nurl = "ldap://h"\n',
            "auth.x.url",
            "only for ldap backends",
        ),
        ('type = "ldap"\nuser_dn = "uid={user}"\n', "auth.x.url", "required"),
        (
            'type = "ldap"\nurl = "http://h"\nuser_dn = "uid={user}"\n',
            "auth.x.url",
            "must be ldap://",
        ),
        (
            'type = "ldap"\nurl = "ldap://"\nuser_dn = "uid={user}"\n',
            "auth.x.url",
            "must be ldap://",
        ),
        (
            'type = "ldap"\nurl = "ldap://h"\nfile = "f"\n',
            "auth.x.file",
            "only for htpasswd backends",
        ),
        ('type = "ldap"\nurl = "ldap://h"\n', "auth.x.search_base", "required without user_dn"),
        (
            'type = "ldap"\nurl = "ldap://h"\nuser_dn = "uid=x"\n',
            "auth.x.user_dn",
            "must contain {user}",
        ),
        (
            'type = "ldap"\nurl = "ldap://h"\nsearch_base = "dc=x"\n',
            "auth.x.search_filter",
            "required with search_base",
        ),
        (
            'type = "ldap"\nurl = "ldap://h"\nsearch_base = "dc=x"\nsearch_filter = "(uid=x)"\n',
            "auth.x.search_filter",
            "must contain {user}",
        ),
        (
            'type = "ldap"\nurl = "ldap://h"\nuser_dn = "uid={user}"\nsearch_base = "dc=x"\n',
            "auth.x.search_base",
            "either user_dn",
        ),
        (
            'type = "ldap"\nurl = "ldaps://h"\nuser_dn = "uid={user}"\nstart_tls = true\n',
            "auth.x.start_tls",
            "TLS already",
        ),
        (
            'type = "ldap"\nurl = "ldap://h"\nuser_dn = "uid={user}"\nbind_dn = "cn=r"\n',
            "auth.x.bind_password",
            "required with bind_dn",
        ),
        (
            'type = "ldap"\nurl = "ldap://h"\nuser_dn = "uid={user}"\nbind_password = "p"\n',
            "auth.x.bind_password",
            "needs bind_dn",
        ),
        (
            'type = "ldap"\nurl = "ldap://h"\nuser_dn = "uid={user}"\ntimeout = 0\n',
            "auth.x.timeout",
            "positive duration",
        ),
    ],
)
def test_auth_backend_validation(body: str, key: str, reason: str) -> None:
    e = error(MINIMAL + "[auth.x]\n" + body)
    assert e.key == key
    assert reason in e.reason


def test_ldap_search_backend_is_accepted() -> None:
    text = MINIMAL + (
        '[auth.corp]\ntype = "ldap"\nurl = "ldap://ldap.example.org:389"\nstart_tls = true\n'
        'search_base = "ou=people,dc=example,dc=org"\nsearch_filter = "(uid={user})"\n'
        'sender_attribute = "mail"\ntimeout = "30s"\n'
    )
    corp = parse(text).auth["corp"]
    assert corp.start_tls is True and corp.search_filter == "(uid={user})" and corp.timeout == 30.0


# --- secrets ----------------------------------------------------------------------


def ldap_with_bind(password_line: str) -> str:
    return MINIMAL + (
        '[auth.corp]\ntype = "ldap"\nurl = "ldaps://ldap.example.org"\n'
        'search_base = "dc=example,dc=org"\nsearch_filter = "(uid={user})"\n'
        f'bind_dn = "cn=relayd,dc=example,dc=org"\n{password_line}\n'
    )


def test_password_files_are_read_and_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "ldap.secret"
    secret.write_text("  hunter2 \n")
    c = parse(ldap_with_bind(f'bind_password_file = "{secret}"'))
    assert c.auth["corp"].bind_password == "hunter2"

    route_secret = tmp_path / "ses.secret"
    route_secret.write_text("smtp-pass\n")
    text = LISTENER + (
        '[route.default]\nsmarthost = ["smtp.example.org:587"]\n'
        f'username = "AKIA"\npassword_file = "{route_secret}"\n'
    )
    assert cfg._validate(text, "t").routes["default"].password == "smtp-pass"


def test_missing_password_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    e = error(ldap_with_bind(f'bind_password_file = "{missing}"'))
    assert e.key == "auth.corp.bind_password_file"
    assert e.reason == f"cannot read {missing}: No such file or directory"
    e = error(
        LISTENER
        + f'[route.default]\nsmarthost = ["h"]\nusername = "u"\npassword_file = "{missing}"\n'
    )
    assert e.key == "route.default.password_file"


@pytest.mark.parametrize("content, reason", [("\n  \n", "is empty"), ("a\nb\n", "single line")])
def test_bad_password_file(tmp_path: Path, content: str, reason: str) -> None:
    secret = tmp_path / "s"
    secret.write_text(content)
    e = error(ldap_with_bind(f'bind_password_file = "{secret}"'))
    assert e.key == "auth.corp.bind_password_file" and reason in e.reason


def test_secrets_hidden_from_repr_and_render(tmp_path: Path) -> None:
    c = parse(ldap_with_bind('bind_password = "hunter2"'))
    assert c.auth["corp"].bind_password == "hunter2"
    assert "hunter2" not in repr(c)
    text = render(c)
    assert "hunter2" not in text
    assert 'bind_password = "********"' in text

    route = cfg.RouteConfig(
        name="up", smarthost=(Smarthost("h", 25),), username="u", password="s3cret"
    )
    assert "s3cret" not in repr(route)
    rendered = render(attrs.evolve(c, routes={"up": route}))
    assert "s3cret" not in rendered and 'password = "********"' in rendered


# --- load() -------------------------------------------------------------------------


def test_load_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.source, info.value.key) == (path, "-")
    assert str(info.value) == f"{path}: -: cannot read the config file: No such file or directory"


def test_load_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root reads any file whatever its mode; a directory still fails.
        path = str(tmp_path)
        expected = "Is a directory"
    else:
        f = tmp_path / "secret.toml"
        f.write_text(MINIMAL)
        f.chmod(0)
        path = str(f)
        expected = "Permission denied"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.source, info.value.key) == (path, "-")
    assert expected in info.value.reason


def test_load_non_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin1.toml"
    f.write_bytes('[server]\nhostname = "caf\xe9.example.org"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load(str(f))
    assert (info.value.source, info.value.key) == (str(f), "-")
    assert info.value.reason == "not valid UTF-8 (byte 0xe9 at offset 24)"


def test_load_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    f = tmp_path / "bom.toml"
    f.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load(str(f)).listeners[0].name == "a"


def test_invalid_toml_says_where(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text('[server]\nspool = "/var/spool/relayd"\nhostname = \n')
    with pytest.raises(ConfigError) as info:
        load(str(f))
    e = info.value
    assert (e.source, e.key) == (str(f), "-")
    assert e.reason.startswith("invalid TOML: ")
    assert "line 3" in e.reason
    assert str(e).startswith(f"{f}: -: invalid TOML: ")


def test_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "relayd.toml"
    f.write_text(one_listener(mynetworks='["10.0.0.1/8"]'))
    with pytest.raises(ConfigError) as info:
        load(str(f))
    assert str(info.value) == (
        f'{f}: listener[a].mynetworks[0]: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)'
    )


def test_parse_default_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse("")
    assert str(info.value) == "<string>: listener: at least one [[listener]] is required"


# --- not built yet ---------------------------------------------------------------------








def test_accepts_proxy_protocol() -> None:
    c = parse(one_listener(proxy_protocol="true", proxy_trusted='["10.0.0.0/8"]'))
    assert c.listeners[0].proxy_protocol is True
    assert [str(n) for n in c.listeners[0].proxy_trusted] == ["10.0.0.0/8"]


def test_accepts_smarthost_route() -> None:
    c = parse(MINIMAL + '[route.up]\nsmarthost = ["smtp.example.org:587", "[2001:db8::1]"]\n')
    assert [(s.host, s.port) for s in c.routes["up"].smarthost] == [
        ("smtp.example.org", 587), ("2001:db8::1", 25)]
    assert c.routes["up"].tls == "starttls" and c.routes["up"].tls_verify is True


def test_validation_errors_come_before_refusals() -> None:
    e = error(one_listener(tls='"starttls"', route='"nowhere"', tls_cert='"c"', tls_key='"k"'))
    assert e.key == "listener[a].route"


# --- render() -------------------------------------------------------------------------------


RICH = (
    '[server]\nhostname = "relay.example.org"\nlog_format = "json"\nmax_hops = 30\n'
    'bounce_from = "postmaster@example.org"\n'
    '[http]\nlisten = "none"\n'
    '[queue]\nretry = [30, "90s", "2h", 0.5]\nlifetime = "1w"\nmax_messages = 7\n'
    "min_free_disk = 1000\n"
    '[limits]\nmax_connections = 9\nmessages_per_user = "7/90s"\n'
    "[[listener]]\nname = \"x.y-z\"\nlisten = 'tcp6:2525:interface=\\:\\:1'\n"
    'mynetworks = ["192.0.2.0/24"]\nallowed_senders = ["*@example.org", "a\\"b@example.org"]\n'
    'max_message_size = "3KB"\ntimeout = 45\nroute = "out"\nbare_newline = "reject"\n'
    "max_connections = 2\n"
    '[auth.h]\ntype = "htpasswd"\nfile = "/etc/u"\nsenders_file = "/etc/s"\n'
    '[auth.l]\ntype = "ldap"\nurl = "ldap://l"\nuser_dn = "uid={user}"\nstart_tls = true\n'
    '[route.out]\nmaildir = "/tmp/out dir"\nconcurrency = 3\nmax_rate = "14/s"\nsoft_bounce = true\n'
)


@pytest.mark.parametrize(
    "text", [DEFAULT_CONFIG_TEXT, RICH, MINIMAL], ids=["default", "rich", "min"]
)
def test_render_round_trips(text: str) -> None:
    c = cfg._validate(text, "a.toml")
    rendered = render(c)
    assert rendered.startswith("# relayd effective configuration, from a.toml\n")
    assert cfg._validate(rendered, "a.toml") == c


def test_inbound_rate_limits_accepted() -> None:
    c = parse('[limits]\nmessages_per_ip = "50/h"\n' + MINIMAL)
    assert c.listeners[0].limits.messages_per_ip == Rate(50, 3600.0)


def test_render_round_trips_the_sample() -> None:
    c = load(str(SAMPLE))
    assert parse(render(c), c.source) == c


def test_render_round_trips_future_features(tmp_path: Path) -> None:
    text = (
        '[tls]\ncert = "c"\nkey = "k"\n'
        + one_listener(
            auth='"required"',
            auth_backend='"l"',
            proxy_protocol="true",
            proxy_trusted='["10.0.0.0/8"]',
            tls_min_version='"1.3"',
        )
        + '[auth.l]\ntype = "ldap"\nurl = "ldap://l"\nuser_dn = "uid={user}"\n'
        + '[route.up]\nsmarthost = ["[::1]:2525", "h"]\ntls = "implicit"\ntls_verify = false\n'
        + 'ca_file = "ca"\ntls_server_name = "h.example"\nclient_cert = "cc"\nclient_key = "ck"\n'
        + "max_recipients_per_transaction = 50\n"
    )
    c = cfg._validate(text, "t")
    assert cfg._validate(render(c), "t") == c


def test_render_shows_every_default() -> None:
    text = render(parse(MINIMAL))
    for line in (
        'spool = "/var/spool/relayd"',
        'listen = "tcp:8025:interface=127.0.0.1"',
        'retry = ["1m", "5m", "15m", "1h"]',
        'lifetime = "5d"',
        'min_free_disk = "500MB"',
        'auth_failures = "10/5m"',
        'auth_block = "10m"',
        'max_message_size = "25MB"',
        'timeout = "5m"',
        'mynetworks = ["127.0.0.0/8", "::1/128"]',
        'bare_newline = "normalize"',
        "# hostname = (unset: the FQDN of this machine)",
        "# max_connections = (unlimited)",
    ):
        assert line in text.splitlines()


def test_config_objects_can_be_built_directly() -> None:
    """Other modules' tests build configs without TOML; the defaults must make
    that short."""
    listener = cfg.ListenerConfig(name="t", listen=Endpoint("tcp:0", "tcp", port=0))
    c = Config(
        source="t",
        listeners=(listener,),
        routes={"default": cfg.RouteConfig("default", maildir="m")},
    )
    assert c.listeners[0].limits == Limits() and c.http == cfg.HTTPConfig()
