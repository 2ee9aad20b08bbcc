"""Every metric relayd exports, declared once with its help text.

One ``Metrics`` object per process (a fresh one per test) so that tests can
start several relays without sharing prometheus-client's global registry.
Labels are bounded: listener and route names come from the config, reply
codes, results, reasons and TLS versions from the fixed sets below.
"""

from __future__ import annotations

import math
import os
import platform

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

import twisted
from relayd import __version__

#: ``relayd_auth_failures_total{reason}``: why an AUTH did not succeed.
AUTH_FAILURE_REASONS = (
    "bad_credentials",  # 535: wrong password, unknown user, empty password, foreign authzid
    "backend_error",  # 454: the backend failed (LDAP down, unreadable file)
    "backend_timeout",  # 454: the backend did not answer in time
    "blocked",  # 421: the client address is blocked after too many failures
    "tls_required",  # 530/503: AUTH before STARTTLS (never offered in plaintext)
    "mechanism",  # 504: a mechanism other than PLAIN and LOGIN
    "malformed",  # 501/500: bad syntax, undecodable base64, over-long response
    "aborted",  # 501: the client cancelled the exchange with "*"
    "sequence",  # 503: before EHLO, twice, or inside a mail transaction
)
#: ``relayd_tls_handshake_failures_total{reason}``: why an inbound TLS
#: handshake (STARTTLS or implicit TLS) did not complete.
TLS_FAILURE_REASONS = (
    "certificate_rejected",  # the client refused our certificate (unknown CA, bad name)
    "protocol_version",  # no TLS version in common (a legacy client below tls_min_version)
    "no_shared_cipher",  # no cipher or signature algorithm in common
    "not_tls",  # the client spoke something else (plaintext on an implicit-TLS port)
    "closed",  # the connection ended before the handshake did
    "timeout",  # the listener's timeout ran out during the handshake
    "other",  # any other TLS error (the log has it)
)
#: ``relayd_tls_sessions_total{version}``: anything else is counted as "other".
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
#: ``relayd_message_size_bytes`` buckets: 1 KiB to 64 MiB by fours (the
#: default max_message_size is 25 MiB).
MESSAGE_SIZE_BUCKETS = tuple(float(1024 * 4**i) for i in range(9))


class Metrics:
    """The registry and the metric objects the other modules update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.smtp_connections = Counter(
            "relayd_smtp_connections", "SMTP connections accepted", ["listener"], registry=r
        )
        self.smtp_connections_active = Gauge(
            "relayd_smtp_connections_active", "SMTP connections open now", ["listener"], registry=r
        )
        self.messages_received = Counter(
            "relayd_messages_received", "messages accepted into the spool (250 after DATA)",
            ["listener"], registry=r,
        )
        self.smtp_rejects = Counter(
            "relayd_smtp_rejects",
            "4xx and 5xx replies sent to SMTP clients (status: the enhanced status code)",
            ["listener", "code", "status"], registry=r,
        )
        self.queue_messages = Gauge(
            "relayd_queue_messages", "messages in the spool by state", ["state"], registry=r
        )
        self.queue_oldest_age = Gauge(
            "relayd_queue_oldest_age_seconds", "age of the oldest message in the spool", registry=r
        )
        self.deliveries = Counter(
            "relayd_deliveries", "delivery attempts by outcome (sent, deferred, bounced)",
            ["route", "result"], registry=r,
        )
        self.delivery_seconds = Histogram(
            "relayd_delivery_seconds", "time taken by one delivery attempt", ["route"],
            registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.auth_attempts = Counter(
            "relayd_auth_attempts", "SMTP AUTH attempts by outcome (success, failure, error)",
            ["listener", "result"], registry=r,
        )
        self.auth_blocked = Counter(
            "relayd_auth_blocked",
            "client addresses blocked after too many AUTH failures (limits.auth_failures)",
            ["listener"], registry=r,
        )
        self.tls_certificate_expiry = Gauge(
            "relayd_tls_certificate_expiry_seconds",
            "not-after time of the certificate a listener serves (Unix time; "
            "alert on this minus time())",
            ["listener"], registry=r,
        )
        self.auth_failures = Counter(
            "relayd_auth_failures",
            "SMTP AUTH commands that did not authenticate, by reason (bad_credentials, "
            "backend_error, backend_timeout, blocked, tls_required, mechanism, malformed, "
            "aborted, sequence)",
            ["listener", "reason"], registry=r,
        )
        self.tls_handshakes = Counter(
            "relayd_tls_handshakes",
            "inbound TLS handshakes (STARTTLS and implicit TLS) by result (success, failure)",
            ["listener", "result"], registry=r,
        )
        self.tls_handshake_failures = Counter(
            "relayd_tls_handshake_failures",
            "inbound TLS handshakes that did not complete, by reason (certificate_rejected, "
            "protocol_version, no_shared_cipher, not_tls, closed, timeout, other)",
            ["listener", "reason"], registry=r,
        )
        self.tls_sessions = Counter(
            "relayd_tls_sessions",
            "completed inbound TLS handshakes by protocol version (TLSv1, TLSv1.1, TLSv1.2, "
            "TLSv1.3, other): finds the clients that still need tls_min_version below 1.2",
            ["listener", "version"], registry=r,
        )
        self.smarthost_tls_handshakes = Counter(
            "relayd_smarthost_tls_handshakes",
            "outbound TLS handshakes with smarthosts by route and result (success, "
            "verification_failed: the certificate or its name was refused, failure: any "
            "other handshake error)",
            ["route", "result"], registry=r,
        )
        self.dkim_signatures = Counter(
            "relayd_dkim_signatures",
            "DKIM signatures added by cleanup, by signing domain, selector and result (signed, "
            "error: the message was refused with 451 4.3.0 and the client retries)",
            ["domain", "selector", "result"], registry=r,
        )
        self.message_size = Histogram(
            "relayd_message_size_bytes",
            "size of each accepted message as the client sent it in DATA (after "
            "dot-unstuffing, before relayd adds its Received: header)",
            ["listener"], registry=r, buckets=MESSAGE_SIZE_BUCKETS,
        )
        self.spool_free_bytes = Gauge(
            "relayd_spool_free_bytes",
            "bytes available to relayd on the spool's file system (statvfs f_bavail, what "
            "queue.min_free_disk is compared with; NaN when it cannot be read)",
            registry=r,
        )
        self.spool_free_inodes = Gauge(
            "relayd_spool_free_inodes",
            "inodes available to relayd on the spool's file system (a message takes one, two "
            "once deferred; NaN when it cannot be read)",
            registry=r,
        )
        self.spool_free_bytes.set(math.nan)
        self.spool_free_inodes.set(math.nan)
        self.build_info = Gauge(
            "relayd_build_info", "always 1; the labels say what is running",
            ["version", "python", "twisted"], registry=r,
        )
        self.build_info.labels(
            __version__, platform.python_version(), twisted.__version__
        ).set(1)
        # process_* (CPU, resident memory, open and maximum file descriptors,
        # start time) from /proc: connections are file descriptors.
        ProcessCollector(registry=r)
        for state in ("active", "deferred", "held"):
            self.queue_messages.labels(state).set(0)

    def watch_spool(self, path: str) -> None:
        """Report the free space and inodes of ``path``'s file system, read
        with statvfs at each scrape (never an error: NaN when unreadable)."""

        def free(field: str) -> float:
            try:
                st = os.statvfs(path)
            except OSError:
                return math.nan
            if field == "bytes":
                return float(st.f_bavail * st.f_frsize)
            return float(st.f_favail)

        self.spool_free_bytes.set_function(lambda: free("bytes"))
        self.spool_free_inodes.set_function(lambda: free("inodes"))

    def exposition(self) -> bytes:
        """The Prometheus text format of everything registered."""
        return generate_latest(self.registry)
