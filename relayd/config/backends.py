"""The named sections: ``[auth.NAME]`` credential stores and ``[route.NAME]``
next hops (with the smarthost address grammar).

They live apart from :mod:`relayd.config.parser` because each is a small
language of its own (LDAP bind modes, smarthost credentials and TLS) and
the next sections of this kind (OAuth, MX routes) arrive beside them.
"""

from __future__ import annotations

import ipaddress
import re

from relayd.config.fields import (
    _NAME_RE,
    _array,
    _bool,
    _choice,
    _duration,
    _hostname,
    _int_at_least,
    _is_hostname,
    _rate,
    _secret,
    _string,
    _Table,
)
from relayd.config.types import AuthBackendConfig, RouteConfig, Smarthost
from relayd.config.units import is_decimal, key_label, toml_string, type_name
from relayd.errors import ConfigError

_HTPASSWD_KEYS = ("type", "file", "senders_file")
_LDAP_KEYS = (
    "type",
    "url",
    "user_dn",
    "search_base",
    "search_filter",
    "bind_dn",
    "bind_password",
    "bind_password_file",
    "start_tls",
    "ca_file",
    "sender_attribute",
    "timeout",
)
_ROUTE_SMARTHOST_ONLY_KEYS = (
    "tls",
    "tls_verify",
    "ca_file",
    "tls_server_name",
    "username",
    "password",
    "password_file",
    "client_cert",
    "client_key",
    "max_recipients_per_transaction",
)
_ROUTE_KEYS = (
    "smarthost",
    "maildir",
    *_ROUTE_SMARTHOST_ONLY_KEYS,
    "concurrency",
    "max_rate",
    "soft_bounce",
)



def _check_name(source: str, section: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise ConfigError(
            source,
            f"{section}.{key_label(name)}",
            "use letters, digits, '_', '.' and '-' only in names",
        )


def _auth_backend(source: str, name: str, data: object) -> AuthBackendConfig:
    _check_name(source, "auth", name)
    path = f"auth.{key_label(name)}"
    t = _Table(source, path, data, dict.fromkeys((*_HTPASSWD_KEYS, *_LDAP_KEYS)))  # ordered, unique
    kind = t.required("type", _choice("htpasswd", "ldap"))
    own, other = (_HTPASSWD_KEYS, "ldap") if kind == "htpasswd" else (_LDAP_KEYS, "htpasswd")
    for key in t.data:
        if key not in own:
            raise t.error(key, f"only for {other} backends, not {kind}")

    if kind == "htpasswd":
        return AuthBackendConfig(
            name=name,
            type=kind,
            file=t.required("file", _string),
            senders_file=t.optional("senders_file", _string),
        )

    url = t.required("url", _string)
    if not re.match(r"^ldaps?://[^/?#]+", url, re.IGNORECASE):
        raise t.error(
            "url", f"{toml_string(url)} must be ldap://HOST[:PORT] or ldaps://HOST[:PORT]"
        )
    start_tls = t.get("start_tls", _bool, False)
    if start_tls and url.lower().startswith("ldaps://"):
        raise t.error("start_tls", "ldaps:// is TLS already; start_tls is for ldap:// URLs")
    user_dn = t.optional("user_dn", _string)
    search_base = t.optional("search_base", _string)
    search_filter = t.optional("search_filter", _string)
    if user_dn is not None:
        if search_base is not None or search_filter is not None:
            key = "search_base" if search_base is not None else "search_filter"
            raise t.error(key, "give either user_dn (direct bind) or search_base/search_filter")
        if "{user}" not in user_dn:
            raise t.error(
                "user_dn", 'must contain {user}, e.g. "uid={user},ou=people,dc=example,dc=org"'
            )
    else:
        if search_base is None:
            raise t.error(
                "search_base", "required without user_dn: give user_dn or search_base/search_filter"
            )
        if search_filter is None:
            raise t.error("search_filter", "required with search_base")
        if "{user}" not in search_filter:
            raise t.error("search_filter", 'must contain {user}, e.g. "(uid={user})"')
    bind_dn = t.optional("bind_dn", _string)
    bind_password = _secret(t, "bind_password")
    if bind_dn is not None and bind_password is None:
        # A simple bind with a DN and no password is an unauthenticated bind
        # that "succeeds": never what was meant.
        raise t.error("bind_password", "required with bind_dn (or bind_password_file)")
    if bind_dn is None and bind_password is not None:
        key = "bind_password_file" if t.has("bind_password_file") else "bind_password"
        raise t.error(key, "needs bind_dn")
    return AuthBackendConfig(
        name=name,
        type=kind,
        url=url,
        user_dn=user_dn,
        search_base=search_base,
        search_filter=search_filter,
        bind_dn=bind_dn,
        bind_password=bind_password,
        start_tls=start_tls,
        ca_file=t.optional("ca_file", _string),
        sender_attribute=t.optional("sender_attribute", _string),
        timeout=t.get("timeout", _duration, 10.0),
    )


def _smarthost(value: object, source: str, key: str, default_port: int) -> Smarthost:
    """``host``, ``host:port``, ``[v6addr]`` or ``[v6addr]:port``; brackets make
    an IPv6 address's colons unambiguous, as in Postfix's relayhost."""
    text = _string(value, source, key).strip()
    port_text: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ConfigError(source, key, f"{toml_string(text)}: missing ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                source, key, f"{toml_string(text)}: brackets hold an IPv6 address"
            ) from None
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(source, key, f"{toml_string(text)}: expected ':PORT' after ']'")
            port_text = rest[1:]
    else:
        if text.count(":") > 1:
            raise ConfigError(
                source,
                key,
                f"{toml_string(text)}: write IPv6 addresses in brackets, like [2001:db8::1]:25",
            )
        host, colon, port_part = text.partition(":")
        if colon:
            port_text = port_part
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _is_hostname(host):
                raise ConfigError(
                    source, key, f"{toml_string(host)} is not a host name or address"
                ) from None
    if port_text is None:
        return Smarthost(host=host, port=default_port)
    if not is_decimal(port_text) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(source, key, f"{toml_string(text)}: port must be 1-65535")
    return Smarthost(host=host, port=int(port_text))


def _route(source: str, name: str, data: object) -> RouteConfig:
    _check_name(source, "route", name)
    t = _Table(source, f"route.{key_label(name)}", data, _ROUTE_KEYS)
    d = RouteConfig(name=name)
    if t.has("smarthost") and t.has("maildir"):
        raise t.error("maildir", "give either smarthost or maildir, not both")
    if not t.has("smarthost") and not t.has("maildir"):
        raise ConfigError(source, t.path, "needs smarthost (a list of hosts) or maildir (a path)")
    concurrency = t.get("concurrency", _int_at_least(1), d.concurrency)
    max_rate = t.optional("max_rate", _rate)
    soft_bounce = t.get("soft_bounce", _bool, d.soft_bounce)

    if t.has("maildir"):
        for key in _ROUTE_SMARTHOST_ONLY_KEYS:
            if t.has(key):
                raise t.error(key, "only for smarthost routes; this route delivers to a maildir")
        return RouteConfig(
            name=name,
            maildir=t.required("maildir", _string),
            concurrency=concurrency,
            max_rate=max_rate,
            soft_bounce=soft_bounce,
        )

    tls = t.get("tls", _choice("starttls", "implicit", "opportunistic", "none"), d.tls)
    default_port = 465 if tls == "implicit" else 25
    hosts = _array(t.data["smarthost"], source, t.key("smarthost"))
    if not hosts:
        raise t.error("smarthost", "must list at least one host")
    smarthosts = tuple(
        _smarthost(item, source, f"{t.key('smarthost')}[{i}]", default_port)
        for i, item in enumerate(hosts)
    )
    username = t.optional("username", _string)
    password = _secret(t, "password")
    if username is not None and password is None:
        raise t.error("password", "username needs password or password_file")
    if username is None and password is not None:
        raise t.error("username", "required with a password")
    if username is not None and tls in ("none", "opportunistic"):
        raise t.error(
            "tls",
            f'tls = "{tls}" would let the password go out in the clear; '
            'use "starttls" or "implicit" with username/password',
        )
    client_cert = t.optional("client_cert", _string)
    client_key = t.optional("client_key", _string)
    if (client_cert is None) != (client_key is None):
        missing = "client_key" if client_key is None else "client_cert"
        raise t.error(missing, "client_cert and client_key go together: give both or neither")
    return RouteConfig(
        name=name,
        smarthost=smarthosts,
        tls=tls,
        tls_verify=t.get("tls_verify", _bool, d.tls_verify),
        ca_file=t.optional("ca_file", _string),
        tls_server_name=t.optional("tls_server_name", _hostname),
        username=username,
        password=password,
        concurrency=concurrency,
        max_rate=max_rate,
        max_recipients_per_transaction=t.optional(
            "max_recipients_per_transaction", _int_at_least(1)
        ),
        client_cert=client_cert,
        client_key=client_key,
        soft_bounce=soft_bounce,
    )


def _named_tables(source: str, section: str, data: object) -> dict[str, object]:
    """``[auth.NAME]`` / ``[route.NAME]``: a table of tables."""
    if not isinstance(data, dict):
        raise ConfigError(
            source, section, f"must be tables [{section}.NAME], not {type_name(data)}"
        )
    for name, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(
                source,
                f"{section}.{key_label(name)}",
                f"must be a table [{section}.NAME], not {type_name(value)}",
            )
    return data

