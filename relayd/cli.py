"""The ``relayd`` command: run, check-config, queue, drain, dkim keygen, --version.

``relayd run`` is ``twistd -n relayd`` without depending on the plugin
cache: the service maker is handed to twistd directly, so it works from a
venv, an editable install or a Debian package alike.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import relayd
from relayd.errors import ConfigError


def _run(config_option: str | None, log_format: str | None = None) -> int:
    from twisted.scripts.twistd import ServerOptions, runApp

    from relayd.plugin import SERVICE_MAKER
    from relayd.tap import PreloadedServiceMaker, check_files, load_config

    try:
        config = load_config(config_option)
        check_files(config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    # The config is read once, here: twistd's options get it ready-made.
    maker = PreloadedServiceMaker(SERVICE_MAKER, config)

    class Options(ServerOptions):
        _getPlugins = staticmethod(lambda interface: [maker])  # type: ignore[assignment]

    argv = ["--nodaemon", "--pidfile="]
    if (log_format or config.server.log_format) == "json":
        argv.append("--logger=relayd.logs.json_observer")
    else:
        argv.append("--logger=relayd.logs.text_observer")
    argv.append("relayd")
    options = Options()
    try:
        options.parseOptions(argv)
    except SystemExit:
        raise
    except Exception as e:  # usage errors from relayd.tap.Options
        print(e, file=sys.stderr)
        return 1
    from twisted.internet.error import CannotListenError

    # twistd has sent sys.stderr into the log by the time the start fails:
    # the one line goes to the real stderr, where check-config puts it.
    try:
        runApp(options)
    except ConfigError as e:
        # A spool in use, a port that cannot be had: FILE: key: reason.
        print(e, file=sys.__stderr__)
        return 1
    except (OSError, CannotListenError) as e:
        print(f"relayd: cannot start: {e}", file=sys.__stderr__)
        return 1
    return 0


def _check_config(config_option: str | None) -> int:
    from relayd.config import render
    from relayd.tap import check_files, load_config

    try:
        config = load_config(config_option)
        check_files(config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(render(config), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="relayd", description="SMTP relay: ESMTP in, durable spool, smarthost or maildir out."
    )
    parser.add_argument("--version", action="version", version=f"relayd {relayd.__version__}")
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="config file (default: $RELAYD_CONFIG, else the embedded default)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    log_format_help = "text (Postfix-style lines) or json (one object per line, the same " \
        "fields); overrides [server] log_format"
    parser.add_argument("--log-format", choices=("text", "json"), help=log_format_help)
    for name, text in (("run", "run in the foreground (the default)"),
                       ("check-config", "validate and print the effective config")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", "-c", metavar="FILE", dest="sub_config",
                       help="config file (default: $RELAYD_CONFIG, else the embedded default)")
        if name == "run":
            p.add_argument("--log-format", choices=("text", "json"), dest="sub_log_format",
                           help=log_format_help)
    address = sub.add_parser("address", help="show where addresses go: alias expansion and "
                                              "the routing decision (like exim -bt)")
    address.add_argument("--config", "-c", metavar="FILE", dest="sub_config",
                         help="config file (default: $RELAYD_CONFIG, else the embedded default)")
    address.add_argument("--sender", default="", metavar="S", help="envelope sender (default <>)")
    address.add_argument("--listener", metavar="L", help="listener name (default: the first)")
    address.add_argument("--user", metavar="U", help="authenticated user name")
    address.add_argument("--client", default="", metavar="IP", help="client IP address")
    address.add_argument("addresses", nargs="+", metavar="ADDRESS")
    drain = sub.add_parser("drain", help="stop accepting mail (readiness 503), keep delivering")
    drain.add_argument("--config", "-c", metavar="FILE", dest="sub_config",
                       help="config file (default: $RELAYD_CONFIG, else the embedded default)")
    drain.add_argument("--cancel", action="store_true",
                       help="undo a drain: listen again, readiness back to 200")
    queue = sub.add_parser("queue", help="list and manage queued mail (mailq/postsuper)")
    queue.add_argument("--config", "-c", metavar="FILE", dest="sub_config",
                       help="config file (default: $RELAYD_CONFIG, else the embedded default)")
    qsub = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    qlist = qsub.add_parser("list", help="every queued message: id, state, age, size, "
                                         "sender, recipients, attempts, next retry, last error")
    qlist.add_argument("--json", action="store_true", help="one JSON object per line")
    qshow = qsub.add_parser("show", help="one message")
    qshow.add_argument("id")
    qshow.add_argument("--json", action="store_true")
    for name, text in (("flush", "try deferred messages now (all when no ID is given)"),
                       ("hold", "keep messages from delivery until released"),
                       ("release", "release held messages"),
                       ("delete", "remove messages without notice"),
                       ("bounce", "return messages to their senders (DSN)")):
        p = qsub.add_parser(name, help=text)
        p.add_argument("ids", nargs="*", metavar="ID")
        p.add_argument("--all", action="store_true", help="every message in the queue")
        p.add_argument("--sender", metavar="PATTERN",
                       help="messages whose envelope sender matches (* wildcards)")
    dkim = sub.add_parser("dkim", help="DKIM keys")
    dkim_sub = dkim.add_subparsers(dest="dkim_command", metavar="ACTION", required=True)
    keygen = dkim_sub.add_parser(
        "keygen", help="write a new private key (0600, never overwritten) and print its DNS "
                       "TXT record as a zone-file line")
    keygen.add_argument("--domain", required=True)
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--out", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    if args.command == "dkim":
        from relayd.dkim.keygen import keygen as run_keygen

        return run_keygen(args.domain, args.selector, args.algorithm, args.bits, args.out)
    config_option = getattr(args, "sub_config", None) or args.config
    if args.command == "check-config":
        return _check_config(config_option)
    if args.command == "queue":
        return _queue(config_option, args)
    if args.command == "drain":
        return _drain(config_option, args.cancel)
    if args.command == "address":
        return _address(config_option, args)
    return _run(config_option, getattr(args, "sub_log_format", None) or args.log_format)


def _address(config_option: str | None, args: argparse.Namespace) -> int:
    from twisted.internet.task import Clock

    from relayd.address import DomainError, domain_key
    from relayd.errors import SMTPReply
    from relayd.routing import Context, explain
    from relayd.smtpd.address import AddressSyntaxError, parse_path, split_address
    from relayd.tables import RoutingTables
    from relayd.tap import load_config

    try:
        config = load_config(config_option)
        tables = RoutingTables(config, Clock())
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    listeners = {lc.name: lc for lc in config.listeners}
    listener = listeners.get(args.listener or config.listeners[0].name)
    if listener is None:
        print(f"relayd address: no listener named {args.listener!r} (there are: "
              f"{', '.join(listeners)})", file=sys.stderr)
        return 1
    ctx = Context(sender=args.sender, listener=listener.name, route=listener.route,
                  user=args.user, client=args.client)
    status = 0
    for text in args.addresses:
        try:
            address, rest = parse_path(f"<{text}>")
            _, domain = split_address(address)
            if rest or not address:
                raise AddressSyntaxError("not one address")
            if domain is not None:
                domain_key(domain)
        except (AddressSyntaxError, DomainError) as e:
            print(f"relayd address: {text!r} cannot be parsed as an address: {e}",
                  file=sys.stderr)
            status = 1
            continue
        try:
            result = tables.resolve(address, ctx)
        except SMTPReply as reply:
            print("\n".join(explain(address, reply)))
            continue
        print("\n".join(explain(address, result)))
    return status


def _drain(config_option: str | None, cancel: bool = False) -> int:
    from relayd.admin import AdminError, drain
    from relayd.tap import load_config

    try:
        drain(load_config(config_option), cancel=cancel)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except AdminError as e:
        print(f"relayd drain: {e}", file=sys.stderr)
        return 1
    if cancel:
        print("relayd is accepting mail again")
        return 0
    print("relayd is draining: no new SMTP connections; queued mail is still delivered")
    return 0


def _queue(config_option: str | None, args: argparse.Namespace) -> int:
    from relayd.admin import AdminError, run
    from relayd.tap import load_config

    try:
        config = load_config(config_option)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    command = args.queue_command
    ids = [args.id] if command == "show" else list(getattr(args, "ids", []) or [])
    everything = bool(getattr(args, "all", False)) or (command == "flush" and not ids
                                                        and not getattr(args, "sender", None))
    if command in ("hold", "release", "delete", "bounce") and not (
        ids or everything or args.sender
    ):
        print(f"relayd queue {command}: name queue ids, --all or --sender PATTERN",
              file=sys.stderr)
        return 2
    try:
        return run(config, command, ids, everything, getattr(args, "sender", None),
                   bool(getattr(args, "json", False)))
    except AdminError as e:
        print(f"relayd queue {command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
