"""Every shipped config passes ``relayd check-config``.

The worked examples (etc/relayd/examples/) and the Debian package's
/etc/relayd/relayd.toml name files that exist only on a configured machine:
secrets, certificates, an htpasswd file.  Each test puts stand-ins for those
files in a temporary directory, rewrites the paths, and then runs what
check-config runs: parse and validate, then read every certificate and key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from relayd.config import Config, parse
from relayd.tap import check_files
from tests.certs import PKI, make_pki

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "etc" / "relayd" / "examples").glob("*.toml"))
PACKAGED = ROOT / "packaging" / "deb" / "relayd.toml"


#: Keys naming a certificate or key, and which stand-in of the test PKI they get.
_CERT_ROLES = {
    "cert": "server.cert", "key": "server.key",
    "tls_cert": "server.cert", "tls_key": "server.key",
    "client_cert": "client.cert", "client_key": "client.key",
}


def _files(table: object) -> list[tuple[str, str]]:
    """(key, path) for every value that names a file read at load or check time."""
    found: list[tuple[str, str]] = []
    if isinstance(table, dict):
        for key, value in table.items():
            if isinstance(value, str) and (key.endswith("_file") or key in _CERT_ROLES
                                           or key == "file"):
                found.append((key, value))
            else:
                found += _files(value)
    elif isinstance(table, list):
        for item in table:
            found += _files(item)
    return found


def check_with_stand_ins(path: Path, tmp_path: Path) -> Config:
    """check-config on ``path`` with the files it names replaced by stand-ins."""
    text = path.read_text()
    pki: PKI = make_pki(tmp_path / "pki")
    for n, (key, original) in enumerate(_files(tomllib.loads(text))):
        if key in _CERT_ROLES:
            holder, attr = _CERT_ROLES[key].split(".")
            stand_in = getattr(getattr(pki, holder), attr)
        elif key == "ca_file":
            stand_in = pki.ca
        elif key == "file":  # an htpasswd file: empty is valid (nobody logs in)
            stand_in = tmp_path / f"file{n}"
            stand_in.write_text("")
        else:  # password_file, bind_password_file: one line
            stand_in = tmp_path / f"secret{n}"
            stand_in.write_text("not-a-real-secret\n")
        text = text.replace(f'"{original}"', f'"{stand_in}"')
    config = parse(text, str(path))
    check_files(config)
    return config


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"amazon-ses.toml", "gmail-workspace.toml", "exchange-online.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_check_config(path: Path, tmp_path: Path) -> None:
    check_with_stand_ins(path, tmp_path)


def test_amazon_ses(tmp_path: Path) -> None:
    config = check_with_stand_ins(ROOT / "etc/relayd/examples/amazon-ses.toml", tmp_path)
    route = config.routes[config.listeners[0].route]
    assert route.smarthost[0].host.startswith("email-smtp.")
    assert route.smarthost[0].port == 587 and route.tls == "starttls" and route.tls_verify
    assert route.username and route.password
    # SES's own limits: 50 recipients per message, the account's send rate.
    assert route.max_recipients_per_transaction == 50
    assert route.max_rate is not None


def test_gmail_workspace(tmp_path: Path) -> None:
    config = check_with_stand_ins(ROOT / "etc/relayd/examples/gmail-workspace.toml", tmp_path)
    # Google may refuse a generic EHLO name; the example sets one.
    assert config.server.hostname
    by_ip, by_auth = config.routes["google"], config.routes["google-auth"]
    for route in (by_ip, by_auth):
        assert [(h.host, h.port) for h in route.smarthost] == [("smtp-relay.gmail.com", 587)]
        assert route.tls == "starttls" and route.tls_verify
    assert by_ip.username is None
    assert by_auth.username and by_auth.password


def test_exchange_online(tmp_path: Path) -> None:
    config = check_with_stand_ins(ROOT / "etc/relayd/examples/exchange-online.toml", tmp_path)
    route = config.routes[config.listeners[0].route]
    host = route.smarthost[0]
    assert host.host.endswith(".mail.protection.outlook.com") and host.port == 25
    assert route.tls == "starttls" and route.tls_verify
    assert route.client_cert and route.client_key and route.username is None


def test_debian_package_config(tmp_path: Path) -> None:
    """/etc/relayd/relayd.toml as the package installs it: 25 and 1025 for
    localhost, 587 with STARTTLS and AUTH, mail held in the outbox."""
    config = check_with_stand_ins(PACKAGED, tmp_path)
    listeners = {lc.name: lc for lc in config.listeners}
    assert {name: lc.listen.port for name, lc in listeners.items()} == {
        "mta": 25, "local": 1025, "submission": 587}
    assert listeners["mta"].listen.interface == "127.0.0.1"
    assert listeners["local"].listen.interface == "127.0.0.1"
    sub = listeners["submission"]
    assert (sub.tls, sub.require_tls, sub.auth) == ("starttls", True, "required")
    assert sub.mynetworks == ()
    assert sub.auth_backend and config.auth[sub.auth_backend].type == "htpasswd"
    assert all(not r.smarthost for r in config.routes.values())
    assert {lc.route for lc in config.listeners} == {"outbox"}
    assert config.routes["outbox"].maildir == "/var/lib/relayd/outbox"
    assert config.server.spool == "/var/spool/relayd"
    # The real file names stay what the package's postinst and ssl-cert create.
    text = PACKAGED.read_text()
    for name in ("/etc/ssl/certs/ssl-cert-snakeoil.pem", "/etc/ssl/private/ssl-cert-snakeoil.key",
                 "/etc/relayd/passwd"):
        assert f'"{name}"' in text
