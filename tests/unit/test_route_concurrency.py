"""A route's concurrency has one owner: the config (issue 13.4)."""

from __future__ import annotations

from relayd.config import parse


def test_config_gives_every_route_its_concurrency() -> None:
    config = parse(
        '[[listener]]\nname = "a"\nlisten = "tcp:0"\nroute = "slow"\n'
        '[route.slow]\nmaildir = "m"\nconcurrency = 2\n'
        '[route.default]\nsmarthost = ["smtp.example.org"]\n',
        "t",
    )
    # The default (10, design §1) comes from the config, not from the scheduler.
    assert config.concurrency() == {"slow": 2, "default": 10}
