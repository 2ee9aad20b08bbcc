"""The configuration values: frozen attrs classes, nothing else.

Every consumer of the configuration (the listeners, the couriers, the auth
backends, the wiring) depends on these shapes and on nothing of how they are
read from TOML (:mod:`relayd.config.parser`) or written back
(:mod:`relayd.config.render`), so this module imports nothing from relayd.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, TypeAlias

import attrs
from attrs import field, frozen

if TYPE_CHECKING:
    from relayd.config.routing import AliasesConfig, RewriteConfig, RoutingRule

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * 1024 * 1024

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
WEEK = 7 * DAY


@frozen
class Rate:
    """``count`` events per ``per`` seconds: one shape for every rate limit,
    so the limiter needs no knowledge of how the user spelled it."""

    count: int
    per: float


@frozen
class Endpoint:
    """A listening endpoint, checked here and bound later by Twisted.

    ``description`` is the string exactly as written, so the wiring code can
    hand it to ``serverFromString`` unchanged; the parsed fields exist so that
    clashes between listeners are found before anything binds.
    ``interface is None`` means every address of the family.
    """

    description: str
    kind: str
    port: int | None = None
    interface: str | None = None
    index: int | None = None


@frozen
class ServerConfig:
    """Process-wide settings.  ``hostname is None`` means "the FQDN", looked up
    at start-up by the caller because this module must not do DNS."""

    hostname: str | None = None
    spool: str = "/var/spool/relayd"
    log_format: str = "text"
    max_hops: int = 50
    bounce_from: str | None = None
    #: A stop (SIGTERM) lets SMTP transactions and deliveries in flight
    #: finish for this long before it cuts them off.
    stop_timeout: float = 30.0


@frozen
class TLSConfig:
    """The server certificate shared by listeners without their own; paths
    only, because the files are reread on SIGHUP by the TLS module."""

    cert: str
    key: str


DEFAULT_HTTP_ENDPOINT = Endpoint(
    description="tcp:8025:interface=127.0.0.1", kind="tcp", port=8025, interface="127.0.0.1"
)


@frozen
class HTTPConfig:
    """Status and metrics endpoint; ``listen is None`` turns HTTP off."""

    listen: Endpoint | None = DEFAULT_HTTP_ENDPOINT


@frozen
class QueueConfig:
    """Retry schedule and the limits that make the spool answer 452 rather
    than fill the disk."""

    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0)
    lifetime: float = 5 * DAY
    max_messages: int = 100000
    min_free_disk: int = 500 * MiB


@frozen
class Limits:
    """Abuse limits.  ``None`` means unlimited; the server-wide values are the
    defaults of every listener, which may override each key."""

    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    max_messages_per_session: int | None = None
    max_errors_per_session: int = 20
    auth_failures: Rate = Rate(10, 300.0)
    auth_block: float = 600.0
    messages_per_user: Rate | None = None
    messages_per_ip: Rate | None = None


_DEFAULT_MYNETWORKS: tuple[Network, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)


@frozen
class ListenerConfig:
    """One SMTP port and its policy.  The name labels logs and metrics, so it
    is the tenant; ``limits`` is already merged with the server-wide
    ``[limits]``, so consumers never look in two places."""

    name: str
    listen: Endpoint
    tls: str = "none"
    require_tls: bool = False
    auth: str = "none"
    auth_backend: str | None = None
    mynetworks: tuple[Network, ...] = _DEFAULT_MYNETWORKS
    allowed_senders: tuple[str, ...] = ()
    allowed_recipients: tuple[str, ...] = ()
    max_message_size: int = 25 * MiB
    max_recipients: int = 100
    timeout: float = 300.0
    route: str = "default"
    bare_newline: str = "normalize"
    nul: str = "strip"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_min_version: str = "1.2"
    plaintext_auth: bool = False
    proxy_protocol: bool = False
    proxy_trusted: tuple[Network, ...] = ()
    limits: Limits = field(factory=Limits)
    dkim: bool = True


@frozen
class AuthBackendConfig:
    """A named credential store.  One class for both types keeps the mapping
    ``Config.auth`` homogeneous; the fields of the other type stay ``None``."""

    name: str
    type: str
    file: str | None = None
    senders_file: str | None = None
    url: str | None = None
    user_dn: str | None = None
    search_base: str | None = None
    search_filter: str | None = None
    bind_dn: str | None = None
    bind_password: str | None = field(default=None, repr=False)
    start_tls: bool = False
    ca_file: str | None = None
    sender_attribute: str | None = None
    timeout: float = 10.0


@frozen
class Smarthost:
    """A next hop taken literally: no MX lookup, tried in the listed order."""

    host: str
    port: int


@frozen
class RouteConfig:
    """Where accepted mail goes: a smarthost list (failover) or a maildir."""

    name: str
    smarthost: tuple[Smarthost, ...] = ()
    maildir: str | None = None
    tls: str = "starttls"
    tls_verify: bool = True
    ca_file: str | None = None
    tls_server_name: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    concurrency: int = 10
    max_rate: Rate | None = None
    max_recipients_per_transaction: int | None = None
    client_cert: str | None = None
    client_key: str | None = None
    soft_bounce: bool = False


@frozen
class DkimConfig:
    """One ``[[dkim]]`` entry: mail whose From: domain is ``domain`` gets a
    signature with this selector and key (two entries for one domain: dual
    RSA + Ed25519 signatures, or a rotation).  The key file is read and
    checked where the signer is built (``relayd.parts``), by ``run`` and
    ``check-config`` alike."""

    domain: str
    selector: str
    key_file: str


@frozen
class Config:
    """The whole validated configuration; ``source`` is where it came from so
    later messages (reload, check-config) can name the file."""

    source: str
    server: ServerConfig = field(factory=ServerConfig)
    tls: TLSConfig | None = None
    http: HTTPConfig = field(factory=HTTPConfig)
    queue: QueueConfig = field(factory=QueueConfig)
    limits: Limits = field(factory=Limits)
    listeners: tuple[ListenerConfig, ...] = ()
    auth: dict[str, AuthBackendConfig] = field(factory=dict)
    routes: dict[str, RouteConfig] = field(factory=dict)
    dkim: tuple[DkimConfig, ...] = ()
    #: [[routing]], [aliases], [rewrite] (relayd.config.routing); None: absent.
    routing: tuple[RoutingRule, ...] = ()
    aliases: AliasesConfig | None = None
    rewrite: RewriteConfig | None = None

    def concurrency(self) -> dict[str, int]:
        """Attempts in flight per route, as every route's config says: the
        one place the scheduler's limits come from, at start and reload."""
        return {name: route.concurrency for name, route in self.routes.items()}


#: What a reload (SIGHUP) cannot change in a running relay: the spool is
#: locked and recovered at start, the HTTP endpoint and the hostname are
#: bound into running parts, and the queue settings shape messages already
#: scheduled.  Everything else (listeners, their policy and limits, [tls],
#: [auth.*], routes) applies live.
RESTART_ONLY = ("server", "queue", "http")


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys that differ between ``old`` and ``new`` but need a restart,
    as ``section.key`` (empty: the reload may go ahead)."""
    changed = []
    for section in RESTART_ONLY:
        before, after = getattr(old, section), getattr(new, section)
        for name in attrs.fields_dict(type(before)):
            if getattr(before, name) != getattr(after, name):
                changed.append(f"{section}.{name}")
    return changed
