"""Config -> TOML text: what ``relayd check-config`` prints.

Every default is spelled out and secrets are masked; the output parses back
to the same settings, so an operator can start a config file from it.
"""

from __future__ import annotations

from collections.abc import Iterable

from relayd.config.routing import render_routing
from relayd.config.types import Config, Limits, Smarthost
from relayd.config.units import format_duration, format_rate, format_size, key_label, toml_string

SECRET_MASK = "********"


def _fmt_bool(value: bool) -> str:
    return "true" if value else "false"


def _fmt_strings(values: Iterable[object]) -> str:
    return "[" + ", ".join(toml_string(str(v)) for v in values) + "]"


class _Writer:
    """Collects ``key = value`` lines; unset optional keys become comments so
    the output still lists every setting and still parses as TOML."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def section(self, header: str) -> None:
        if self.lines:
            self.lines.append("")
        self.lines.append(header)

    def set(self, key: str, value: str) -> None:
        self.lines.append(f"{key} = {value}")

    def unset(self, key: str, meaning: str) -> None:
        self.lines.append(f"# {key} = ({meaning})")

    def maybe(self, key: str, value: str | None, meaning: str, *, secret: bool = False) -> None:
        if value is None:
            self.unset(key, meaning)
        else:
            self.set(key, toml_string(SECRET_MASK) if secret else toml_string(value))


def _write_limits(w: _Writer, limits: Limits) -> None:
    for name in ("max_connections", "max_connections_per_ip", "max_messages_per_session"):
        value = getattr(limits, name)
        if value is None:
            w.unset(name, "unlimited")
        else:
            w.set(name, str(value))
    w.set("max_errors_per_session", str(limits.max_errors_per_session))
    w.set("auth_failures", format_rate(limits.auth_failures))
    w.set("auth_block", toml_string(format_duration(limits.auth_block)))
    for name in ("messages_per_user", "messages_per_ip"):
        rate = getattr(limits, name)
        if rate is None:
            w.unset(name, "unlimited")
        else:
            w.set(name, format_rate(rate))


def render(config: Config) -> str:
    """The effective configuration, every default spelled out, secrets masked.

    The output is valid TOML that parses back to the same settings (apart from
    the masked secrets), so an operator can start a config file from it.
    """
    w = _Writer()
    w.lines.append(f"# relayd effective configuration, from {config.source}")

    s = config.server
    w.section("[server]")
    w.maybe("hostname", s.hostname, "unset: the FQDN of this machine")
    w.set("spool", toml_string(s.spool))
    w.set("log_format", toml_string(s.log_format))
    w.set("max_hops", str(s.max_hops))
    w.maybe("bounce_from", s.bounce_from, "unset: MAILER-DAEMON@<hostname>")
    w.set("stop_timeout", toml_string(format_duration(s.stop_timeout)))

    if config.tls is not None:
        w.section("[tls]")
        w.set("cert", toml_string(config.tls.cert))
        w.set("key", toml_string(config.tls.key))

    w.section("[http]")
    listen = config.http.listen
    w.set("listen", toml_string("none" if listen is None else listen.description))

    q = config.queue
    w.section("[queue]")
    w.set("retry", _fmt_strings(format_duration(r) for r in q.retry))
    w.set("lifetime", toml_string(format_duration(q.lifetime)))
    w.set("max_messages", str(q.max_messages))
    w.set("min_free_disk", format_size(q.min_free_disk))

    w.section("[limits]")
    _write_limits(w, config.limits)

    for lc in config.listeners:
        w.section("[[listener]]")
        w.set("name", toml_string(lc.name))
        w.set("listen", toml_string(lc.listen.description))
        w.set("tls", toml_string(lc.tls))
        w.set("require_tls", _fmt_bool(lc.require_tls))
        w.set("auth", toml_string(lc.auth))
        w.maybe("auth_backend", lc.auth_backend, "unset")
        w.set("mynetworks", _fmt_strings(lc.mynetworks))
        w.set("allowed_senders", _fmt_strings(lc.allowed_senders))
        w.set("allowed_recipients", _fmt_strings(lc.allowed_recipients))
        w.set("max_message_size", format_size(lc.max_message_size))
        w.set("max_recipients", str(lc.max_recipients))
        w.set("timeout", toml_string(format_duration(lc.timeout)))
        w.set("route", toml_string(lc.route))
        w.set("bare_newline", toml_string(lc.bare_newline))
        w.set("nul", toml_string(lc.nul))
        w.maybe("tls_cert", lc.tls_cert, "unset: the [tls] certificate")
        w.maybe("tls_key", lc.tls_key, "unset: the [tls] key")
        w.set("tls_min_version", toml_string(lc.tls_min_version))
        w.set("plaintext_auth", _fmt_bool(lc.plaintext_auth))
        w.set("proxy_protocol", _fmt_bool(lc.proxy_protocol))
        w.set("proxy_trusted", _fmt_strings(lc.proxy_trusted))
        w.set("dkim", _fmt_bool(lc.dkim))
        _write_limits(w, lc.limits)

    for name, ab in config.auth.items():
        w.section(f"[auth.{key_label(name)}]")
        w.set("type", toml_string(ab.type))
        if ab.type == "htpasswd":
            w.maybe("file", ab.file, "unset")
            w.maybe("senders_file", ab.senders_file, "unset: no sender restrictions")
            continue
        w.maybe("url", ab.url, "unset")
        w.maybe("user_dn", ab.user_dn, "unset: search instead")
        w.maybe("search_base", ab.search_base, "unset")
        w.maybe("search_filter", ab.search_filter, "unset")
        w.maybe("bind_dn", ab.bind_dn, "unset: anonymous search")
        w.maybe("bind_password", ab.bind_password, "unset", secret=True)
        w.set("start_tls", _fmt_bool(ab.start_tls))
        w.maybe("ca_file", ab.ca_file, "unset: the system CA store")
        w.maybe("sender_attribute", ab.sender_attribute, "unset: no sender restrictions")
        w.set("timeout", toml_string(format_duration(ab.timeout)))

    for name, rc in config.routes.items():
        w.section(f"[route.{key_label(name)}]")
        if rc.maildir is not None:
            w.set("maildir", toml_string(rc.maildir))
        else:
            w.set("smarthost", _fmt_strings(_fmt_smarthost(h) for h in rc.smarthost))
            w.set("tls", toml_string(rc.tls))
            w.set("tls_verify", _fmt_bool(rc.tls_verify))
            w.maybe("ca_file", rc.ca_file, "unset: the system CA store")
            w.maybe("tls_server_name", rc.tls_server_name, "unset: the smarthost's name")
            w.maybe("username", rc.username, "unset: no AUTH")
            w.maybe("password", rc.password, "unset", secret=True)
            if rc.max_recipients_per_transaction is None:
                w.unset("max_recipients_per_transaction", "unlimited")
            else:
                w.set("max_recipients_per_transaction", str(rc.max_recipients_per_transaction))
            w.maybe("client_cert", rc.client_cert, "unset")
            w.maybe("client_key", rc.client_key, "unset")
        w.set("concurrency", str(rc.concurrency))
        if rc.max_rate is None:
            w.unset("max_rate", "unlimited")
        else:
            w.set("max_rate", format_rate(rc.max_rate))
        w.set("soft_bounce", _fmt_bool(rc.soft_bounce))

    for entry in config.dkim:
        w.section("[[dkim]]")
        w.set("domain", toml_string(entry.domain))
        w.set("selector", toml_string(entry.selector))
        w.set("key_file", toml_string(entry.key_file))

    w.lines += render_routing(config.routing, config.aliases, config.rewrite)
    return "\n".join(w.lines) + "\n"


def _fmt_smarthost(host: Smarthost) -> str:
    name = f"[{host.host}]" if ":" in host.host else host.host
    return f"{name}:{host.port}"
