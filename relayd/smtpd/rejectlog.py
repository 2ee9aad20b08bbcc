"""What the SMTP server refuses, told once: the metric and the Postfix-style mail-log line.

Postfix writes one ``NOQUEUE: reject:`` line for every refusal, and a
postmaster greps for it first; a counter alone says that something was
refused, not to whom or why.  Every 4xx/5xx reply that refuses something
(and every 421 that closes a session on policy) goes through ``Rejects``:
``relayd_smtp_rejects_total{listener,code,status}`` counts it, with the
enhanced status as its own label so ``452 4.5.3`` (too many recipients)
and ``452 4.3.1`` (queue full) stay apart, and the line reads::

    NOQUEUE: reject: RCPT from unknown[192.0.2.1]: 550 5.7.1 <b@example.net>:
    Relay access denied; from=<a@example.org> to=<b@example.net> proto=ESMTP
    helo=<client.example> listener=mta

(one line; ``unknown``: relayd does no reverse lookups).  The stage is the
command refused, ``END-OF-MESSAGE`` for a message refused after its data,
``CONNECT`` for a session refused or closed outside a command.
"""

from __future__ import annotations

from twisted.logger import Logger

from relayd.metrics import Metrics

__all__ = ["Rejects"]

maillog = Logger(namespace="relayd.mail")


class Rejects:
    """Counts and logs one listener's refusals."""

    def __init__(self, metrics: Metrics, listener: str) -> None:
        self._metrics = metrics
        self._listener = listener

    def reject(
        self,
        code: int,
        enhanced: str | None,
        text: str,
        *,
        stage: str,
        client: str,
        sender: str | None = None,
        recipient: str | None = None,
        proto: str = "SMTP",
        helo: str = "",
    ) -> None:
        self._metrics.smtp_rejects.labels(self._listener, str(code), enhanced or "").inc()
        envelope = ""
        if sender is not None:
            envelope += f"from=<{sender}> "
        if recipient is not None:
            envelope += f"to=<{recipient}> "
        maillog.info(
            "NOQUEUE: reject: {stage} from unknown[{client}]: {code} {status}{text}; "
            "{envelope}proto={proto} helo=<{helo}> listener={listener}",
            stage=stage, client=client, code=code,
            status=f"{enhanced} " if enhanced else "", text=text, envelope=envelope,
            sender=sender, rcpt=recipient, proto=proto, helo=helo, listener=self._listener,
        )
