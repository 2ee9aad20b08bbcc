"""[[routing]], [aliases], [rewrite]: config errors name FILE, key and reason;
check-config shows them; ``relayd address`` prints design §1b's lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.cli import main
from relayd.config import parse, render
from relayd.errors import ConfigError

BASE = """\
[[listener]]
name = "mta"
listen = "tcp:2525:interface=127.0.0.1"
route = "default"

[[listener]]
name = "printers"
listen = "tcp:2526:interface=127.0.0.1"
route = "default"

[route.default]
smarthost = ["smtp.example.net:25"]
tls = "none"

[route.exchange]
smarthost = ["exchange.example.net:25"]
tls = "none"

[route.google]
smarthost = ["google.example.net:25"]
tls = "none"
"""

RULES = """
[[routing]]
recipient_domains = ["example.gov.uk", ".example.gov.uk"]
route = "exchange"

[[routing]]
senders = ["*@digital.example.org"]
route = "google"

[[routing]]
recipient_domains = ["blocked.example"]
reject = "550 5.7.1 Mail to this domain is not relayed"

[[routing]]
recipients = ["noreply@example.org"]
listeners = ["printers"]
discard = true

[[routing]]
users = ["app1"]
clients = ["10.0.0.0/8"]
route = "google"
"""


@pytest.mark.parametrize(("extra", "key", "reason"), [
    ('[[routing]]\nrecipient_domains = ["a.example"]\nroute = "nowhere"\n',
     "routing[0].route", 'unknown route "nowhere"'),
    ('[[routing]]\nrecipient_domains = ["a.example"]\nreject = "450 4.7.1 later"\n',
     "routing[0].reject", "permanent reply"),
    ('[[routing]]\nrecipient_domains = ["a.example"]\nreject = "550 4.7.1 x"\n',
     "routing[0].reject", "permanent reply"),
    ('[[routing]]\nrecipient_domains = ["a.example"]\nroute = "google"\n'
     '[[routing]]\nrecipient_domains = ["a b.example"]\nroute = "google"\n',
     "routing[1].recipient_domains[0]", "not a domain"),
    ('[[routing]]\nrecipient_domains = ["xn--a.example"]\nroute = "google"\n',
     "routing[0].recipient_domains[0]", ""),
    ('[[routing]]\nrecipient_domains = ["*.example"]\nroute = "google"\n',
     "routing[0].recipient_domains[0]", "not a domain"),
    ('[[routing]]\nsenders = ["a b@x"]\nroute = "google"\n',
     "routing[0].senders[0]", "not an address pattern"),
    ('[[routing]]\nclients = ["10.0.0.1/8"]\nroute = "google"\n', "routing[0].clients[0]", ""),
    ('[[routing]]\nlisteners = ["nope"]\nroute = "google"\n',
     "routing[0].listeners[0]", 'unknown listener "nope"'),
    ('[[routing]]\nrecipient_domains = ["a.example"]\n', "routing[0]", "exactly one action"),
    ('[[routing]]\nrecipient_domains = ["a.example"]\nroute = "google"\ndiscard = true\n',
     "routing[0]", "exactly one action"),
    ('[[routing]]\nrecipient_domain = ["a.example"]\nroute = "google"\n',
     "routing[0].recipient_domain", "did you mean 'recipient_domains'"),
    ('[[routing]]\nrecipient_domains = []\nroute = "google"\n',
     "routing[0].recipient_domains", "must not be empty"),
    ('[routing]\nroute = "google"\n', "routing", "[[routing]]"),
    ('[aliases]\nfile = "/x"\n', "aliases.domains", "required"),
    ('[aliases]\ndomains = ["a.example"]\n', "aliases.file", "required"),
    ('[rewrite]\nsenders = { "nodomain" = "@b.example" }\n', 'rewrite.senders."nodomain"',
     "expected user@domain or @domain"),
    ('[rewrite]\nheaders = "yes"\n', "rewrite.headers", "true or false"),
])
def test_config_errors_name_file_key_reason(extra: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(BASE + extra, "/etc/relayd/relayd.toml")
    assert e.value.key == key
    assert reason in e.value.reason
    assert str(e.value).startswith(f"/etc/relayd/relayd.toml: {key}: ")


def test_rules_parse_and_render_round_trip() -> None:
    extra = RULES + ('[aliases]\ndomains = ["uss.example.org"]\nfile = "/etc/relayd/aliases"\n'
                     '[rewrite]\nheaders = true\nsenders = { "@app.internal" = "@example.org" }\n')
    config = parse(BASE + extra, "f")
    assert len(config.routing) == 5
    assert config.routing[0].recipient_domains == ("example.gov.uk", ".example.gov.uk")
    assert config.routing[2].reject == "550 5.7.1 Mail to this domain is not relayed"
    assert config.routing[3].discard and config.routing[3].listeners == ("printers",)
    assert config.aliases is not None and config.aliases.domains == ("uss.example.org",)
    assert config.rewrite is not None and config.rewrite.headers
    again = parse(render(config), "f")
    assert (again.routing, again.aliases, again.rewrite) == (
        config.routing, config.aliases, config.rewrite)


ALIASES = """\
uss@uss.example.org: person@example.net, copy@example.gov.uk
blocked@uss.example.org: x@blocked.example
"""


def write_config(tmp_path: Path, text: str) -> str:
    (tmp_path / "aliases").write_text(ALIASES)
    path = tmp_path / "relayd.toml"
    path.write_text(BASE + RULES + f'[aliases]\ndomains = ["uss.example.org"]\n'
                    f'file = "{tmp_path / "aliases"}"\n' + text)
    return str(path)


def test_relayd_address_prints_decisions(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "")
    assert main(["address", "--config", config, "a@sub.example.gov.uk", "b@other.example",
                 "c@blocked.example", "uss@USS.example.org", "stranger@uss.example.org"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "a@sub.example.gov.uk -> a@sub.example.gov.uk route=exchange rule=routing[0]",
        "b@other.example -> b@other.example route=default rule=listener",
        'c@blocked.example reject="550 5.7.1 Mail to this domain is not relayed" '
        "rule=routing[2]",
        "uss@USS.example.org -> person@example.net route=default rule=listener",
        "uss@USS.example.org -> copy@example.gov.uk route=exchange rule=routing[0]",
        'stranger@uss.example.org reject="550 5.1.1 <stranger@uss.example.org>: Recipient '
        'address rejected: User unknown in virtual alias table" rule=aliases',
    ]
    assert main(["address", "--config", config, "--sender", "x@Digital.example.org",
                 "b@other.example"]) == 0
    assert capsys.readouterr().out == "b@other.example -> b@other.example route=google " \
                                      "rule=routing[1]\n"
    assert main(["address", "--config", config, "--listener", "printers",
                 "noreply@example.org", "--user", "app1", "--client", "10.1.2.3"]) == 0
    assert capsys.readouterr().out == "noreply@example.org discard rule=routing[3]\n"
    assert main(["address", "--config", config, "--user", "app1", "--client", "10.1.2.3",
                 "z@other.example"]) == 0
    assert capsys.readouterr().out == "z@other.example -> z@other.example route=google " \
                                      "rule=routing[4]\n"


def test_relayd_address_unparsable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "")
    assert main(["address", "--config", config, "ok@example.org", "bad <address",
                 "x@exa mple.org"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "ok@example.org -> ok@example.org route=default rule=listener\n"
    err = captured.err.splitlines()
    assert len(err) == 2 and all("cannot be parsed as an address" in line for line in err)
    assert "'bad <address'" in err[0]


def test_broken_alias_file_is_a_config_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "")
    (tmp_path / "aliases").write_text("ok@uss.example.org: a@b.example\nbroken line\n")
    assert main(["check-config", "--config", config]) == 1
    err = capsys.readouterr().err
    assert f"{config}: aliases.file: {tmp_path / 'aliases'}:2: " in err
    assert main(["address", "--config", config, "a@b.example"]) == 1
