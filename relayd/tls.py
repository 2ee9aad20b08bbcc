"""TLS contexts for the smarthost client and for the SMTP listeners.

Everything TLS-specific that the courier needs is built here, once per route,
when the courier is constructed: the CA file and the client certificate are
read at that point, so an unreadable or malformed file stops start-up (or a
reload) with a :class:`ConfigError` instead of failing every delivery.
Over 400 lines because the client and server sides share the file loading
and the version policy, which must not drift apart.

Policy (design §3 invariant 5: TLS to the smarthost is verified by default):

* ``tls_verify = true``: the chain is checked against ``ca_file`` (PEM, may
  hold several certificates) or the system CA store, and the certificate must
  name ``tls_server_name``, else the smarthost's host string.  IP address
  smarthosts are verified as IP addresses (an ``IP`` subjectAltName),
  which ``service_identity`` supports on every version we run on (18.1+).
* ``tls_verify = false``: encrypted, not authenticated.
* ``tls = "opportunistic"``: like Postfix's ``smtp_tls_security_level = may``,
  never verified: a certificate check that can fail would make the "may" a
  "must" without the protection of one (an attacker strips STARTTLS anyway).
* TLS 1.2 is the minimum in every mode.

Server side (:class:`ServerTLS`, one per TLS listener): the certificate
(full chain PEM) and key are read when the object is built, so a bad file is
a start-up error, and again on :meth:`ServerTLS.reload` (SIGHUP), where a bad
file is logged and the old certificate stays in use.  The object is the
connection creator itself, so STARTTLS and implicit-TLS listeners always
hand new sessions the newest certificate while existing sessions keep theirs.

Only ``relayd.config`` and ``relayd.errors`` are imported from relayd.
"""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

from relayd.config import Config, ListenerConfig, RouteConfig
from relayd.errors import ConfigError

__all__ = [
    "MINIMUM_VERSION",
    "ClientTLS",
    "ServerTLS",
    "client_tls_options",
    "handshake_failure_reason",
    "server_tls_files",
    "tls_version",
    "verify_name",
]

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def verify_name(route: RouteConfig, host: str) -> str:
    """The name the smarthost's certificate must carry."""
    return route.tls_server_name or host


def _read(path: str, route: RouteConfig, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(
            path, f"route.{route.name}.{key}", f"cannot read: {e.strerror or e}"
        ) from e


def _certificates(data: bytes, path: str, route: RouteConfig, key: str) -> list[crypto.X509]:
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise ConfigError(path, f"route.{route.name}.{key}", "no PEM certificate in the file")
    try:
        return [crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in blocks]
    except crypto.Error as e:
        raise ConfigError(path, f"route.{route.name}.{key}", f"bad PEM certificate: {e}") from e


def _public_key(key: crypto.PKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    public = key.to_cryptography_key()
    if hasattr(public, "public_key"):
        public = public.public_key()
    return public.public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _takes_cryptography_objects(cert: crypto.X509, key: crypto.PKey) -> bool:
    probe = SSL.Context(SSL.TLS_METHOD)
    try:
        probe.use_certificate(cert.to_cryptography())  # type: ignore[arg-type]
        probe.use_privatekey(key.to_cryptography_key())  # type: ignore[arg-type]
    except (TypeError, SSL.Error):
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """Encrypts without authenticating the server; still sends SNI, which
    shared smarthosts need to pick the certificate."""

    def __init__(self, context: SSL.Context, server_name: str) -> None:
        self._context = context
        self._sni: bytes | None = None
        if not (isIPAddress(server_name) or isIPv6Address(server_name)):
            try:
                self._sni = server_name.encode("idna")
            except UnicodeError:
                self._sni = None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


class ClientTLS:
    """The TLS side of one ``[route.NAME]``: trust roots and the client
    certificate, loaded once; a connection creator per smarthost name."""

    def __init__(self, route: RouteConfig) -> None:
        self.route = route
        self.verify = route.tls_verify and route.tls != "opportunistic"
        self._trust: Any = None
        if self.verify:
            if route.ca_file:
                certs = _certificates(
                    _read(route.ca_file, route, "ca_file"), route.ca_file, route, "ca_file"
                )
                self._trust = ssl.trustRootFromCertificates(
                    [ssl.Certificate(c) for c in certs]
                )
            else:
                self._trust = ssl.platformTrust()
        self._client: dict[str, object] = {}
        if route.client_cert and route.client_key:
            self._client = self._load_client_certificate(route.client_cert, route.client_key)
        self._creators: dict[tuple[str, bool], IOpenSSLClientConnectionCreator] = {}

    def _load_client_certificate(self, cert_path: str, key_path: str) -> dict[str, object]:
        route = self.route
        certs = _certificates(
            _read(cert_path, route, "client_cert"), cert_path, route, "client_cert"
        )
        key_data = _read(key_path, route, "client_key")
        try:
            key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_data)
        except crypto.Error as e:
            raise ConfigError(
                key_path, f"route.{route.name}.client_key", f"bad PEM private key: {e}"
            ) from e
        if _public_key(certs[0].get_pubkey()) != _public_key(key):
            raise ConfigError(
                key_path,
                f"route.{route.name}.client_key",
                f"does not match the certificate in {cert_path}",
            )
        chain: list[Any] = list(certs)
        private: Any = key
        if _takes_cryptography_objects(certs[0], key):
            # pyOpenSSL >= 24.3 deprecates its own X509/PKey objects here;
            # Debian's 23.0 only takes those.
            chain = [c.to_cryptography() for c in certs]
            private = key.to_cryptography_key()
        options: dict[str, object] = {"privateKey": private, "certificate": chain[0]}
        if len(chain) > 1:
            options["extraCertChain"] = chain[1:]
        return options

    def creator(self, host: str, *, verify: bool | None = None) -> IOpenSSLClientConnectionCreator:
        """A connection creator for the smarthost ``host``.

        :param verify: ``False`` forces an unverified connection (used for
            opportunistic STARTTLS); ``None`` follows the route.
        """
        verify = self.verify if verify is None else (verify and self.verify)
        name = verify_name(self.route, host)
        cached = self._creators.get((name, verify))
        if cached is not None:
            return cached
        creator: IOpenSSLClientConnectionCreator
        if verify:
            extra: dict[str, object] = {"raiseMinimumTo": MINIMUM_VERSION}
            extra.update(self._client)
            creator = ssl.optionsForClientTLS(
                name, trustRoot=self._trust, extraCertificateOptions=extra
            )
        else:
            options = ssl.CertificateOptions(
                verify=False,
                raiseMinimumTo=MINIMUM_VERSION,
                **self._client,  # type: ignore[arg-type]
            )
            creator = _UnverifiedClientTLS(options.getContext(), name)
        self._creators[(name, verify)] = creator
        return creator


def route_client_tls(route: RouteConfig) -> ClientTLS | None:
    """The TLS side of a smarthost route with a connection creator built for
    every smarthost now, or ``None`` for a route without TLS.

    The one pre-check of a route's client TLS files (CA file, client
    certificate and key): the courier calls it when it is made and
    ``check-config`` calls it too, so a bad file stops both alike.

    :raises ConfigError: naming the route's key, when a file cannot be used.
    """
    if route.tls == "none" or not route.smarthost:
        return None
    client = ClientTLS(route)
    for smarthost in route.smarthost:
        try:
            client.creator(smarthost.host, verify=route.tls != "opportunistic")
        except ConfigError:
            raise
        except Exception as e:
            reason = (str(e) or e.__class__.__name__).rstrip(".")
            raise ConfigError(
                f"[route.{route.name}]", f"route.{route.name}.tls",
                f"cannot set up TLS for {smarthost.host}: {reason}",
            ) from e
    return client


def client_tls_options(
    route: RouteConfig, host: str | None = None
) -> IOpenSSLClientConnectionCreator | None:
    """A connection creator for ``host`` (default: the route's first
    smarthost), or ``None`` when the route does not use TLS."""
    if route.tls == "none":
        return None
    if host is None:
        if not route.smarthost:
            return None
        host = route.smarthost[0].host
    return ClientTLS(route).creator(host)


# ---------------------------------------------------------------------------
# Server side: STARTTLS and implicit-TLS listeners
# ---------------------------------------------------------------------------

_log = Logger(namespace="relayd.tls")

_SERVER_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1_0,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
#: Versions only old printers and scanners still need: OpenSSL 3 refuses them
#: at its default security level, so they also lower that (SECLEVEL=0).
LEGACY_VERSIONS = ("1.0", "1.1")


def server_tls_files(config: Config, listener: ListenerConfig) -> tuple[str, str, str, str]:
    """``(cert, key, cert_key_label, key_key_label)`` a listener serves: its
    own ``tls_cert``/``tls_key``, else the global ``[tls]`` pair."""
    label = f"listener[{listener.name}]"
    if listener.tls_cert and listener.tls_key:
        return listener.tls_cert, listener.tls_key, f"{label}.tls_cert", f"{label}.tls_key"
    if config.tls is None:
        raise ConfigError(config.source, f"{label}.tls", "needs tls_cert/tls_key or a [tls] section")
    return config.tls.cert, config.tls.key, "tls.cert", "tls.key"


def _not_after(cert: crypto.X509) -> float:
    import calendar
    import time

    text = (cert.get_notAfter() or b"").decode("ascii")
    return float(calendar.timegm(time.strptime(text, "%Y%m%d%H%M%SZ")))


def _no_application_protocol(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """The ALPN answer of every relayd listener: none, and go on.

    A listener speaks one protocol whatever the client offers, so the offer
    (``smtp``, or a TLS stack's default ``h2``/``http/1.1``) is ignored and
    the handshake goes on without the extension, as Postfix does.  Twisted's own select callback,
    which ``CertificateOptions`` installs, answers an empty protocol name when
    nothing overlaps; the OpenSSL 4 in PyPI's cryptography wheel answers that
    with an internal-error alert (Debian 12's OpenSSL 3.0 lets it pass), so
    every client offering ALPN was turned away.  ``NO_OVERLAPPING_PROTOCOLS``
    (in Debian 12's pyOpenSSL 23.0 and in PyPI's) makes the callback decline
    instead (SSL_TLSEXT_ERR_NOACK)."""
    return SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server certificate of one listener, reloadable.

    Pass the object itself to ``transport.startTLS`` or
    ``TLSMemoryBIOFactory``: each new TLS connection is made from the
    context current at that moment.

    :param min_version: ``"1.2"`` or ``"1.3"`` (``tls_min_version``).
    :raises ConfigError: when a file cannot be read or does not hold a
        usable certificate chain and matching key.
    """

    def __init__(
        self,
        cert_path: str,
        key_path: str,
        min_version: str = "1.2",
        *,
        cert_label: str = "tls.cert",
        key_label: str = "tls.key",
        name: str = "",
    ) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.min_version = min_version
        self.name = name
        self._cert_label = cert_label
        self._key_label = key_label
        self.options, self.not_after, self.subject = self._load()

    def _load(self) -> tuple[ssl.CertificateOptions, float, str]:
        try:
            with open(self.cert_path, "rb") as f:
                cert_data = f.read()
        except OSError as e:
            raise ConfigError(
                self.cert_path, self._cert_label, f"cannot read: {e.strerror or e}"
            ) from e
        try:
            with open(self.key_path, "rb") as f:
                key_data = f.read()
        except OSError as e:
            raise ConfigError(
                self.key_path, self._key_label, f"cannot read: {e.strerror or e}"
            ) from e
        blocks = _PEM_CERT.findall(cert_data)
        if not blocks:
            raise ConfigError(self.cert_path, self._cert_label, "no PEM certificate in the file")
        try:
            certs = [crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in blocks]
        except crypto.Error as e:
            raise ConfigError(
                self.cert_path, self._cert_label, f"bad PEM certificate: {e}"
            ) from e
        try:
            key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_data)
        except crypto.Error as e:
            raise ConfigError(self.key_path, self._key_label, f"bad PEM private key: {e}") from e
        if _public_key(certs[0].get_pubkey()) != _public_key(key):
            raise ConfigError(
                self.key_path, self._key_label, f"does not match the certificate in {self.cert_path}"
            )
        chain: list[Any] = list(certs)
        private: Any = key
        if _takes_cryptography_objects(certs[0], key):
            chain = [c.to_cryptography() for c in certs]
            private = key.to_cryptography_key()
        version = _SERVER_VERSIONS.get(self.min_version)
        if version is None:
            raise ConfigError(
                self.cert_path, "tls_min_version", f"unsupported TLS version {self.min_version!r}"
            )
        legacy = self.min_version in LEGACY_VERSIONS
        bound: dict[str, Any] = (
            {"insecurelyLowerMinimumTo": version} if legacy else {"raiseMinimumTo": version}
        )
        try:
            options = ssl.CertificateOptions(
                privateKey=private,
                certificate=chain[0],
                extraCertChain=chain[1:],
                **bound,
            )
            context = options.getContext()
            context.set_alpn_select_callback(_no_application_protocol)
            if legacy:
                context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
                _log.warn(
                    "listener {name}: tls_min_version = {version!r} allows obsolete TLS "
                    "(for legacy clients); use 1.2 or newer where you can",
                    name=self.name, version=self.min_version,
                )
        except Exception as e:
            raise ConfigError(self.cert_path, self._cert_label, f"cannot use: {e}") from e
        subject = certs[0].get_subject().CN or ""
        return options, _not_after(certs[0]), subject

    def reload(self) -> bool:
        """Read the files again; on any problem log it and keep serving the
        old certificate.  True when the new one is in use."""
        try:
            self.options, self.not_after, self.subject = self._load()
        except Exception as e:
            _log.error(
                "listener {name}: cannot reload the TLS certificate, keeping the old one: "
                "{error}", name=self.name, error=str(e),
            )
            return False
        _log.info("listener {name}: TLS certificate loaded from {path} ({subject})",
                  name=self.name, path=self.cert_path, subject=self.subject)
        return True

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        return connection


# ---------------------------------------------------------------------------
# Naming handshake outcomes for metrics (bounded label values)
# ---------------------------------------------------------------------------

#: OpenSSL reason strings (lower case, as pyOpenSSL reports them; OpenSSL
#: 1.1 and 3.x spell some alerts "sslv3 alert" or "tls alert") -> reason.
_FAILURE_PATTERNS = (
    ("not_tls", ("wrong version number", "http request", "https proxy request",
                 "unknown protocol", "packet length too long", "record layer failure")),
    ("closed", ("unexpected eof",)),
    ("protocol_version", ("unsupported protocol", "protocol version", "version too low",
                          "no protocols available", "wrong ssl version",
                          "inappropriate fallback")),
    ("no_shared_cipher", ("no shared cipher", "no suitable signature", "no shared signature",
                          "no shared group", "alert handshake failure",
                          "insufficient security")),
    ("certificate_rejected", ("unknown ca", "certificate")),
)
_VERSIONS = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})


def handshake_failure_reason(reason: Any) -> str:
    """Why an inbound handshake failed, from the ``connectionLost`` reason:
    one of ``relayd.metrics.TLS_FAILURE_REASONS`` (never the raw error text,
    which is unbounded)."""
    if reason is None or not reason.check(SSL.Error):
        return "closed"
    errors = reason.value.args[0] if reason.value.args else ()
    if not isinstance(errors, list):
        errors = [errors]
    # pyOpenSSL: a list of (library, function, reason) tuples.
    text = " | ".join(
        str(e[-1] if isinstance(e, tuple) and e else e).lower() for e in errors
    )
    for name, needles in _FAILURE_PATTERNS:
        if any(n in text for n in needles):
            return name
    return "other"


def tls_version(transport: Any) -> str:
    """The TLS version of an established connection: ``TLSv1`` ..
    ``TLSv1.3``, else ``other`` (also when the transport shows no TLS)."""
    try:
        name = transport.getHandle().get_protocol_version_name()
    except Exception:
        return "other"
    return name if name in _VERSIONS else "other"
