"""check-config checks what run checks (issue 14.3), with real processes.

Every case runs ``relayd check-config`` and ``relayd run`` on the same file
and expects the same single line ``FILE: key: reason`` on stderr, exit 1 and
no traceback.  Failures only ``run`` can meet (a port in use, the spool held
by another relayd) are one line too, and leave no port bound.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest

from tests.certs import make_pki
from tests.relay import Relay, config_text


def relayd(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relayd.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exactly one line on stderr and no traceback."""
    assert out.returncode == 1, (out.returncode, out.stdout[-2000:], out.stderr)
    assert "Traceback" not in out.stderr + out.stdout, out.stderr + out.stdout[-4000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def users_file(path: Path) -> Path:
    path.write_text(f"app:{bcrypt.hashpw(b'secret', bcrypt.gensalt(4)).decode()}\n")
    return path


def base(tmp: Path, listener_extra: str = "", extra: str = "", route_extra: str = "") -> str:
    return config_text(tmp / "spool", tmp / "outbox", listener_extra=listener_extra,
                       extra=extra, route_extra=route_extra)


def _auth(file_line: str, key: str) -> Callable[[Path], tuple[str, str]]:
    def make(tmp: Path) -> tuple[str, str]:
        pki = make_pki(tmp / "pki")
        users = users_file(tmp / "users")
        text = base(tmp, listener_extra=f'tls = "starttls"\nauth = "optional"\nauth_backend = "apps"\n'
                    f'tls_cert = "{pki.server.cert}"\ntls_key = "{pki.server.key}"',
                    extra='[auth.apps]\ntype = "htpasswd"\n'
                    + file_line.format(users=users, missing=tmp / "missing"))
        return text, key
    return make


def _unused_tls(tmp: Path) -> tuple[str, str]:
    (tmp / "broken.crt").write_text("not a certificate\n")
    pki = make_pki(tmp / "pki")
    # No listener uses [tls] (tls = "none"): it is checked all the same.
    return base(tmp, listener_extra='tls = "none"',
                extra=f'[tls]\ncert = "{tmp / "broken.crt"}"\nkey = "{pki.server.key}"'), "tls.cert"


def _unused_tls_missing_key(tmp: Path) -> tuple[str, str]:
    pki = make_pki(tmp / "pki")
    return base(tmp, listener_extra='tls = "none"',
                extra=f'[tls]\ncert = "{pki.server.cert}"\nkey = "{tmp / "nope.key"}"'), "tls.key"


def _listener_cert_mismatch(tmp: Path) -> tuple[str, str]:
    pki = make_pki(tmp / "pki")
    # The client certificate's key does not belong to the server certificate.
    return base(tmp, listener_extra=f'tls = "starttls"\ntls_cert = "{pki.server.cert}"\n'
                f'tls_key = "{pki.client.key}"'), "listener[mta].tls_key"


def _listener_cert_without_tls(tmp: Path) -> tuple[str, str]:
    return base(tmp, listener_extra=f'tls = "none"\ntls_cert = "{tmp / "nope.crt"}"\n'
                f'tls_key = "{tmp / "nope.key"}"'), "listener[mta].tls_cert"


def _route_client_cert(tmp: Path) -> tuple[str, str]:
    text = base(tmp, extra='[route.upstream]\nsmarthost = ["127.0.0.1:2525"]\n'
                f'client_cert = "{tmp / "nope.crt"}"\nclient_key = "{tmp / "nope.key"}"\n')
    return text, "route.upstream.client_cert"


def _route_ca_file_unused(tmp: Path) -> tuple[str, str]:
    text = base(tmp, extra='[route.upstream]\nsmarthost = ["127.0.0.1:2525"]\ntls = "none"\n'
                f'ca_file = "{tmp / "nope.pem"}"\n')
    return text, "route.upstream.ca_file"


def _spool_is_a_file(tmp: Path) -> tuple[str, str]:
    (tmp / "spool").write_text("in the way\n")
    return base(tmp), "server.spool"


CASES = {
    "auth-file-missing": _auth('file = "{missing}"', "auth.apps.file"),
    "senders-file-missing": _auth('file = "{users}"\nsenders_file = "{missing}"',
                                  "auth.apps.senders_file"),
    "unused-tls-cert-broken": _unused_tls,
    "unused-tls-key-missing": _unused_tls_missing_key,
    "listener-key-mismatch": _listener_cert_mismatch,
    "listener-cert-without-tls": _listener_cert_without_tls,
    "route-client-cert-missing": _route_client_cert,
    "route-ca-file-without-tls": _route_ca_file_unused,
    "spool-is-a-file": _spool_is_a_file,
}


@pytest.mark.parametrize("case", CASES)
def test_check_config_and_run_refuse_alike(tmp_path: Path, case: str) -> None:
    text, key = CASES[case](tmp_path)
    path = tmp_path / "relayd.toml"
    path.write_text(text)
    checked = one_line(relayd("check-config", "--config", str(path), cwd=tmp_path))
    assert checked.startswith(f"{path}: {key}: "), checked
    ran = one_line(relayd("run", "--config", str(path), cwd=tmp_path))
    assert ran == checked


def test_the_same_config_fixed_passes(tmp_path: Path) -> None:
    """The cases above fail for the file they name, not for the shape of the
    config: with the file in place, check-config passes."""
    pki = make_pki(tmp_path / "pki")
    users = users_file(tmp_path / "users")
    path = tmp_path / "relayd.toml"
    path.write_text(base(
        tmp_path, listener_extra=f'tls = "none"\ntls_cert = "{pki.server.cert}"\n'
        f'tls_key = "{pki.server.key}"',
        extra=f'[tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\n'
        f'[auth.apps]\ntype = "htpasswd"\nfile = "{users}"\nsenders_file = "{users}"\n'))
    out = relayd("check-config", "--config", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _busy_socket() -> socket.socket:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    return busy


def test_listener_port_in_use(tmp_path: Path) -> None:
    with _busy_socket() as busy:
        port = busy.getsockname()[1]
        path = tmp_path / "relayd.toml"
        path.write_text(base(tmp_path).replace(
            'name = "mta"\nlisten = "tcp:0:interface=127.0.0.1"',
            f'name = "mta"\nlisten = "tcp:{port}:interface=127.0.0.1"'))
        line = one_line(relayd("run", "--config", str(path), cwd=tmp_path))
    assert line == (f"{path}: listener[mta].listen: cannot listen on "
                    f"tcp:{port}:interface=127.0.0.1: Address already in use"), line


def test_http_port_in_use_binds_nothing(tmp_path: Path) -> None:
    """[http] cannot bind: one line naming http.listen, and the SMTP listener
    (bound before it) is not left listening."""
    smtp_port = _free_port()
    with _busy_socket() as busy:
        http_port = busy.getsockname()[1]
        path = tmp_path / "relayd.toml"
        path.write_text(base(tmp_path).replace(
            '[http]\nlisten = "tcp:0:interface=127.0.0.1"',
            f'[http]\nlisten = "tcp:{http_port}:interface=127.0.0.1"').replace(
            'name = "mta"\nlisten = "tcp:0:interface=127.0.0.1"',
            f'name = "mta"\nlisten = "tcp:{smtp_port}:interface=127.0.0.1"'))
        line = one_line(relayd("run", "--config", str(path), cwd=tmp_path))
    assert line == (f"{path}: http.listen: cannot listen on "
                    f"tcp:{http_port}:interface=127.0.0.1: Address already in use"), line
    assert not _listening(smtp_port)
    assert not (tmp_path / "spool" / "control.sock").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_spool_held_by_another_relayd(relay_factory, tmp_path: Path) -> None:
    """A second relayd on the same spool: one line naming server.spool, and
    the first one keeps running."""
    first: Relay = relay_factory()
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    path = second_dir / "relayd.toml"
    path.write_text(config_text(first.spool, second_dir / "outbox"))
    line = one_line(relayd("run", "--config", str(path), cwd=second_dir))
    assert line == f"{path}: server.spool: {first.spool} is in use by another relayd", line
    assert first.proc is not None and first.proc.poll() is None
