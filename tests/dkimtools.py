"""DKIM helpers for tests: keys made by ``relayd dkim keygen``, and the
verifiers (dkimpy; OpenDKIM and Perl Mail::DKIM, which nobody here wrote)
reading the zone-file lines keygen printed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import dkim
import pytest

from relayd.cli import main


def keygen(tmp_path: Path, domain: str, selector: str, algorithm: str = "rsa",
           bits: int = 2048, capsys: pytest.CaptureFixture[str] | None = None) -> tuple[Path, str]:
    """Run ``relayd dkim keygen``; return the key file and the printed zone line."""
    import contextlib
    import io

    out = tmp_path / f"{domain}.{selector}.pem"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["dkim", "keygen", "--domain", domain, "--selector", selector,
                   "--algorithm", algorithm, "--bits", str(bits), "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue().strip()


def zone_records(zone_lines: list[str]) -> dict[str, bytes]:
    """owner name (no final dot) -> TXT value, the strings of each line joined
    as a resolver joins them."""
    records = {}
    for line in zone_lines:
        owner = line.split()[0].rstrip(".").lower()
        records[owner] = "".join(re.findall(r'"([^"]*)"', line)).encode("ascii")
    return records


def dkimpy_results(message: bytes, zone_lines: list[str]) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature, top first."""
    records = zone_records(zone_lines)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip(".").lower())

    d = dkim.DKIM(message)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")

    def verify(i: int) -> bool:
        try:
            return bool(d.verify(idx=i, dnsfunc=dnsfunc))
        except dkim.DKIMException:  # dkimpy raises some failures instead of returning False
            return False

    return [verify(i) for i in range(count)]


def opendkim_results(message: bytes, zone_lines: list[str], tmp_path: Path) -> dict[str, str]:
    """OpenDKIM's (libopendkim, C) verdict per selector: ``{"s1": "pass"}``,
    from its Authentication-Results in test mode (``opendkim -t``), with the
    keys in a ``TestPublicKeys`` file."""
    opendkim = shutil.which("opendkim") or "/usr/sbin/opendkim"
    if not Path(opendkim).exists():
        pytest.skip("opendkim is not installed")
    keys = tmp_path / "opendkim-keys.txt"
    keys.write_text("".join(f"{name} {value.decode()}\n"
                            for name, value in zone_records(zone_lines).items()))
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode v\nTestPublicKeys {keys}\nSyslog no\nAuthservID test\n"
                    "AlwaysAddARHeader yes\nLogResults yes\nMinimumKeyBits 1024\n")
    msg = tmp_path / "opendkim-message.eml"
    msg.write_bytes(message)
    done = subprocess.run([opendkim, "-x", str(conf), "-t", str(msg), "-vvv"], capture_output=True,
                          text=True, timeout=60)
    output = done.stdout + done.stderr
    return dict((s, r) for r, s in re.findall(r"dkim=(\w+)[^;]*?header\.s=([\w.-]+)", output))


def mail_dkim_results(message: bytes, zone_lines: list[str], tmp_path: Path) -> dict[str, str]:
    """Perl Mail::DKIM's verdict per selector (RSA only: Debian 12's
    Mail::DKIM has no Ed25519), reading the zone lines with Net::DNS::ZoneFile."""
    if subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"],
                      capture_output=True).returncode != 0:
        pytest.skip("Mail::DKIM (libmail-dkim-perl) is not installed")
    zone = tmp_path / "dkim.zone"
    zone.write_text("$TTL 300\n" + "\n".join(zone_lines) + "\n")
    script = Path(__file__).parent / "dkimverify.pl"
    done = subprocess.run(["perl", str(script), str(zone)], input=message, capture_output=True,
                          timeout=60, check=True)
    results = {}
    for line in done.stdout.decode().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] != "overall":
            results[parts[2]] = parts[0]
    return results
