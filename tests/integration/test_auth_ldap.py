"""The LDAP backend against a real OpenLDAP slapd (tests/slapd.py): direct
bind, search mode, escaping, TLS (ldaps and StartTLS, verified), and the
split between wrong credentials (535) and a backend in trouble (454)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import ldap3
import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relayd.auth import BackendUnavailable, make_backend
from relayd.auth.ldap import LDAPBackend
from relayd.config import AuthBackendConfig
from relayd.errors import ConfigError
from relayd.interfaces import IAuthBackend
from tests import slapd as slapd_helper
from tests.certs import PKI, make_pki
from tests.slapd import PEOPLE, SERVICE_DN, SERVICE_PW, SUFFIX, Slapd, User

pytestmark = pytest.mark.skipif(not slapd_helper.available(), reason="slapd is not installed")

USERS = [
    User("alice", "alice-pw", ("alice@example.org", "*@alice.example.org")),
    User("bob", "bob-pw"),
    User("carol", "carol-pw", cn="shared"),
    User("dave", "dave-pw", cn="shared"),
    User("o'hara, jr", "comma-pw", ("oh@example.org",)),
]


@attrs.frozen
class Env:
    pki: PKI
    server: Slapd


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("ldap")
    pki = make_pki(base / "pki")
    server = Slapd(base / "slapd", pki.server.cert, pki.server.key, pki.ca, users=USERS)
    server.start()
    try:
        yield Env(pki, server)
    finally:
        server.cleanup()


def run_inline(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


def outcome(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def ok(b: LDAPBackend, user: str, password: str) -> bool:
    """True on success, False on UnauthorizedLogin; anything else raises."""
    result = outcome(b.authenticate(user, password))
    if isinstance(result, Failure):
        result.trap(UnauthorizedLogin)
        return False
    assert result == user
    return True


def unavailable(b: LDAPBackend, user: str = "alice", password: str = "alice-pw") -> str:
    result = outcome(b.authenticate(user, password))
    assert isinstance(result, Failure), result
    assert not result.check(UnauthorizedLogin), result
    result.trap(BackendUnavailable)
    return str(result.value)


def direct(env: Env, **kw: Any) -> LDAPBackend:
    values: dict[str, Any] = dict(
        name="corp", type="ldap", url=env.server.ldaps_url, ca_file=str(env.pki.ca),
        user_dn=f"uid={{user}},{PEOPLE}", timeout=3.0,
    )
    values.update(kw)
    return LDAPBackend(AuthBackendConfig(**values), runner=run_inline)


def search(env: Env, **kw: Any) -> LDAPBackend:
    values: dict[str, Any] = dict(
        search_base=SUFFIX, search_filter="(&(objectClass=inetOrgPerson)(uid={user}))",
        user_dn=None, bind_dn=SERVICE_DN, bind_password=SERVICE_PW,
    )
    values.update(kw)
    return direct(env, **values)


@pytest.fixture
def binds(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every ldap3 Connection made and every bind, in order."""
    calls: list[Any] = []
    real_bind, real_init = ldap3.Connection.bind, ldap3.Connection.__init__

    def bind(self: ldap3.Connection, *a: Any, **kw: Any) -> Any:
        calls.append(("bind", self.user))
        return real_bind(self, *a, **kw)

    def init(self: ldap3.Connection, *a: Any, **kw: Any) -> None:
        calls.append(("connection", kw.get("user")))
        real_init(self, *a, **kw)

    monkeypatch.setattr(ldap3.Connection, "bind", bind)
    monkeypatch.setattr(ldap3.Connection, "__init__", init)
    return calls


# -- direct bind ----------------------------------------------------------------


def test_direct_bind(env: Env) -> None:
    b = direct(env)
    verifyObject(IAuthBackend, b)
    assert ok(b, "alice", "alice-pw")
    assert not ok(b, "alice", "bob-pw")
    assert not ok(b, "nobody", "alice-pw")
    # DN metacharacters are escaped, not interpreted.
    assert ok(b, "o'hara, jr", "comma-pw")
    assert not ok(b, "alice,ou=people", "alice-pw")


def test_empty_password_or_user_refused_before_any_bind(env: Env, binds: list[Any]) -> None:
    for b in (direct(env), search(env)):
        assert not ok(b, "alice", "")
        assert not ok(b, "", "alice-pw")
    assert binds == []
    # The same backend does bind when there is something to check.
    assert ok(direct(env), "alice", "alice-pw")
    assert binds == [("connection", f"uid=alice,{PEOPLE}"), ("bind", f"uid=alice,{PEOPLE}")]


# -- search mode ----------------------------------------------------------------


def test_search_mode(env: Env, binds: list[Any]) -> None:
    b = search(env)
    assert ok(b, "alice", "alice-pw")
    assert [c for c in binds if c[0] == "bind"] == [("bind", SERVICE_DN),
                                                   ("bind", f"uid=alice,{PEOPLE}")]
    assert not ok(b, "alice", "wrong")
    assert not ok(b, "nobody", "alice-pw")
    assert ok(b, "o'hara, jr", "comma-pw")


def test_search_mode_anonymous_service(env: Env) -> None:
    b = search(env, bind_dn=None, bind_password=None)
    assert ok(b, "bob", "bob-pw")
    assert not ok(b, "bob", "alice-pw")


def test_filter_injection_is_escaped(env: Env) -> None:
    b = search(env)
    for user in ("*", "*)(uid=*", "alice)(|(uid=*", "al*"):
        assert not ok(b, user, "alice-pw"), user
    # Unescaped, "*)(uid=*" would have matched every entry.
    assert r"(uid=\2A\29\28uid=\2A))" in env.server.log()


def test_ambiguous_search_is_refused(env: Env) -> None:
    b = search(env, search_filter="(cn={user})")
    assert not ok(b, "shared", "carol-pw")
    assert not ok(b, "shared", "dave-pw")


def test_service_bind_failure_is_unavailable(env: Env) -> None:
    b = search(env, bind_password="wrong")
    assert "service bind" in unavailable(b)


def test_missing_search_base_is_unavailable(env: Env) -> None:
    b = search(env, search_base="ou=nowhere,dc=example,dc=org")
    unavailable(b)


# -- TLS ------------------------------------------------------------------------


def test_ldaps_with_the_test_ca(env: Env) -> None:
    assert ok(direct(env, url=env.server.ldaps_url), "alice", "alice-pw")


def test_ldaps_with_the_wrong_ca_is_unavailable(env: Env) -> None:
    unavailable(direct(env, ca_file=str(env.pki.rogue_ca)))
    unavailable(direct(env, ca_file=str(env.pki.rogue_ca)), "alice", "wrong")


def test_ldaps_name_mismatch_is_unavailable(env: Env) -> None:
    unavailable(direct(env, url=env.server.ldaps_mismatch_url))


def test_starttls(env: Env) -> None:
    before = env.server.log().count("TLS established")
    b = direct(env, url=env.server.ldap_url, start_tls=True)
    assert ok(b, "alice", "alice-pw")
    assert not ok(b, "alice", "wrong")
    assert env.server.log().count("TLS established") >= before + 2
    unavailable(direct(env, url=env.server.ldap_url, start_tls=True,
                       ca_file=str(env.pki.rogue_ca)))


def test_plain_ldap_without_tls_still_classifies(env: Env) -> None:
    b = direct(env, url=env.server.ldap_url, ca_file=None)
    assert ok(b, "bob", "bob-pw") and not ok(b, "bob", "x")


# -- the directory in trouble -------------------------------------------------------


def test_server_down_is_unavailable(env: Env) -> None:
    port = slapd_helper.free_port()
    unavailable(direct(env, url=f"ldap://127.0.0.1:{port}"))
    unavailable(search(env, url=f"ldaps://127.0.0.1:{port}"))


def test_silent_server_times_out(env: Env) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(5)  # never accepted, never answered
        url = f"ldap://127.0.0.1:{s.getsockname()[1]}"
        unavailable(direct(env, url=url, timeout=0.3))


def test_not_started_is_unavailable(env: Env) -> None:
    b = LDAPBackend(AuthBackendConfig(name="corp", type="ldap", url=env.server.ldaps_url,
                                      ca_file=str(env.pki.ca), user_dn=f"uid={{user}},{PEOPLE}"))
    unavailable(b)


def test_bad_ca_file_is_a_config_error(env: Env, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        direct(env, ca_file=str(tmp_path / "missing.pem"))
    assert e.value.key == "auth.corp.ca_file"


# -- sender_attribute -------------------------------------------------------------


def test_sender_attribute(env: Env) -> None:
    for b in (search(env, sender_attribute="mail"), direct(env, sender_attribute="mail")):
        assert ok(b, "alice", "alice-pw")
        assert set(outcome(b.sender_patterns("alice"))) == {"alice@example.org",
                                                            "*@alice.example.org"}
        assert ok(b, "bob", "bob-pw")
        assert outcome(b.sender_patterns("bob")) == ()


def test_sender_attribute_without_prior_login(env: Env) -> None:
    for b in (search(env, sender_attribute="mail"),
              direct(env, sender_attribute="mail", bind_dn=SERVICE_DN,
                     bind_password=SERVICE_PW)):
        assert outcome(b.sender_patterns("o'hara, jr")) == ("oh@example.org",)
        assert outcome(b.sender_patterns("nobody")) == ()


def test_no_sender_attribute_means_unlimited(env: Env) -> None:
    assert outcome(search(env).sender_patterns("alice")) is None


# -- wiring -------------------------------------------------------------------------


def test_make_backend_with_its_own_pool(env: Env) -> None:
    cfg = AuthBackendConfig(name="corp", type="ldap", url=env.server.ldaps_url,
                            ca_file=str(env.pki.ca), user_dn=f"uid={{user}},{PEOPLE}")
    b = make_backend(cfg, task.Clock())
    assert isinstance(b, LDAPBackend)
    b.start()
    try:
        assert b._threads is not None
        pool = b._threads._pool
        assert pool is not None and (pool.min, pool.max, pool.name) == (1, 4, "relayd-auth")
    finally:
        b.stop()
    assert b._threads is None
