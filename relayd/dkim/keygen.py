"""``relayd dkim keygen``: a new key file and the DNS record to publish.

Like maddy's generated keys and ``opendkim-genkey``, but the record is
printed as one zone-file line (its value in strings of at most 255 bytes,
as an RSA-2048 record needs) and the key file is never overwritten: a
rotation makes a new selector, it does not replace a key in use.
"""

from __future__ import annotations

import errno
import sys
from typing import TextIO

from relayd.dkim.keys import KeyProblem, generate_key, write_new_key, zone_line

__all__ = ["keygen"]


def keygen(domain: str, selector: str, algorithm: str, bits: int, out: str,
           stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Write the key to ``out`` (0600) and print its record; 0 or 1."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if not domain.strip(".") or not selector or any(c in selector for c in " ;\"\\"):
        print("relayd dkim keygen: --domain and --selector must be DNS names", file=stderr)
        return 1
    try:
        key = generate_key(algorithm, bits)
        write_new_key(key, out)
    except KeyProblem as e:
        print(f"relayd dkim keygen: {e}", file=stderr)
        return 1
    except OSError as e:
        reason = "exists, not overwritten" if e.errno == errno.EEXIST else e.strerror
        print(f"relayd dkim keygen: {out}: {reason}", file=stderr)
        return 1
    print(zone_line(domain, selector, key), file=stdout)
    return 0
