"""Every metric relayd exports, declared once with its help text.

One ``Metrics`` object per process (a fresh one per test) so that tests can
start several relays without sharing prometheus-client's global registry.
Labels are bounded: listener and route names come from the config, reply
codes from a fixed set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


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
            "relayd_smtp_rejects", "4xx and 5xx replies sent to SMTP clients",
            ["listener", "code"], registry=r,
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
        for state in ("active", "deferred", "held"):
            self.queue_messages.labels(state).set(0)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything registered."""
        return generate_latest(self.registry)
