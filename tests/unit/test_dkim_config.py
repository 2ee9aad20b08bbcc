"""``[[dkim]]`` and the listener's ``dkim`` key: parsed, rendered, keys checked
by check-config exactly as by run (``relayd.parts.dkim_signer``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.cli import main
from relayd.config import DkimConfig, parse, render
from relayd.errors import ConfigError
from relayd.metrics import Metrics
from relayd.parts import dkim_signer
from relayd.preflight import check_files
from tests.dkimtools import keygen

BASE = """
[[listener]]
name = "mta"
listen = "tcp:2525:interface=127.0.0.1"
route = "out"
[[listener]]
name = "pass"
listen = "tcp:2526:interface=127.0.0.1"
route = "out"
dkim = false
[route.out]
maildir = "{dir}/out"
"""


def dkim_entry(domain: str, selector: str, key_file: object) -> str:
    return f'[[dkim]]\ndomain = "{domain}"\nselector = "{selector}"\nkey_file = "{key_file}"\n'


def test_parse_and_render(tmp_path: Path) -> None:
    text = BASE.format(dir=tmp_path) + dkim_entry("Example.ORG", "s2026", "/k1") + \
        dkim_entry("example.org", "2026", "/k2")
    config = parse(text, "relayd.toml")
    assert config.dkim == (DkimConfig("example.org", "s2026", "/k1"),
                           DkimConfig("example.org", "2026", "/k2"))
    assert [x.dkim for x in config.listeners] == [True, False]
    assert parse(render(config), "again").dkim == config.dkim
    assert "dkim = false" in render(config)


@pytest.mark.parametrize("extra,error", [
    ('[dkim]\ndomain = "example.org"\n', "f.toml: dkim: must be an array of tables"),
    (dkim_entry("example.org", "a b", "/k"), 'f.toml: dkim[0].selector: "a b" is not a selector'),
    (dkim_entry("not a domain", "s", "/k"), "f.toml: dkim[0].domain:"),
    ('[[dkim]]\ndomain = "example.org"\nselector = "s"\n', "f.toml: dkim[0].key_file: required"),
    (dkim_entry("example.org", "s", "/k") + 'algorithm = "rsa"\n',
     "f.toml: dkim[0].algorithm: unknown key"),
    (dkim_entry("example.org", "s", "/k") + dkim_entry("EXAMPLE.org", "S", "/k2"),
     'f.toml: dkim[1].selector: "s" is already used for "example.org" by dkim[0]'),
])
def test_config_errors(tmp_path: Path, extra: str, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(BASE.format(dir=tmp_path) + extra, "f.toml")
    assert str(e.value).startswith(error)


def test_listener_dkim_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"listener\[pass\]\.dkim: must be true or false"):
        parse(BASE.format(dir=tmp_path).replace("dkim = false", 'dkim = "no"'), "f.toml")


def test_key_files_are_checked_like_run_does(tmp_path: Path) -> None:
    good, _ = keygen(tmp_path, "example.org", "good", "ed25519")
    public = tmp_path / "public.pem"
    public.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    for key_file, reason in ((tmp_path / "missing.pem", "cannot read"),
                             (public, "holds no private key")):
        config = parse(BASE.format(dir=tmp_path) + dkim_entry("example.org", "good", good)
                       + dkim_entry("example.org", "bad", key_file), "relayd.toml")
        with pytest.raises(ConfigError) as e:
            check_files(config)
        assert str(e.value).startswith("relayd.toml: dkim[1].key_file: ")
        assert reason in str(e.value)


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, _ = keygen(tmp_path, "example.org", "s1", "rsa", 1024)
    path = tmp_path / "relayd.toml"
    path.write_text(BASE.format(dir=tmp_path) + dkim_entry("example.org", "s1", good))
    assert main(["check-config", "--config", str(path)]) == 0
    assert f'key_file = "{good}"' in capsys.readouterr().out
    good.chmod(0)
    path.write_text(BASE.format(dir=tmp_path) + dkim_entry("example.org", "s1", tmp_path / "nope"))
    assert main(["check-config", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: dkim[0].key_file: cannot read {tmp_path}/nope:")
    assert "Traceback" not in err


def test_signer_counts_into_the_metric(tmp_path: Path) -> None:
    good, _ = keygen(tmp_path, "example.org", "s1", "ed25519")
    config = parse(BASE.format(dir=tmp_path) + dkim_entry("example.org", "s1", good), "f")
    metrics = Metrics()
    signer = dkim_signer(config, metrics)
    assert signer.unsigned_listeners == frozenset({"pass"})
    plan = signer.plan(b"From: a@example.org\r\n", 0.0, "mta")
    assert plan is not None
    plan.update(b"From: a@example.org\r\n\r\nbody\r\n")
    plan.signatures()
    assert b'relayd_dkim_signatures_total{domain="example.org",result="signed",selector="s1"} 1.0' \
        in metrics.exposition()
