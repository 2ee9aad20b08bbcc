"""DKIM signing inside the relay (RFC 6376, RFC 8463): no milter, no second daemon.

``bodyhash`` hashes the body as it streams in, ``keys`` reads, checks and
makes keys, ``signer`` decides which keys sign a message and makes the
DKIM-Signature headers (dkimpy for the header canonicalisation), and
``keygen`` is the ``relayd dkim keygen`` command.  Cleanup calls
``Signer.plan`` and ``MessageSigning``; nothing here touches the spool.
"""
