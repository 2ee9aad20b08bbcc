"""write_now on real loopback TCP connections (in a child process: the test
process never starts a global reactor)."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r'''
import json, sys
from twisted.internet import defer, protocol, task
from relayd.netio import write_now

def main(reactor):
    done = defer.Deferred()
    facts = {}

    class Server(protocol.Protocol):
        def connectionMade(self):
            t = self.transport
            # Nothing queued: sent at once, no writer registered.
            write_now(t, b"220 ready\r\n")
            facts["immediate"] = (not t._tempDataBuffer and t.offset == len(t.dataBuffer)
                                  and t not in reactor.getWriters())
            # Something queued by Twisted: it must go first.
            t.write(b"A" * 1000)
            write_now(t, b"B" * 1000)
            facts["queued_kept_order"] = t in reactor.getWriters()
            # More than the socket takes at once: the rest is queued.
            reactor.callLater(0.05, self.big)

        def big(self):
            write_now(self.transport, b"C" * (8 * 1024 * 1024))
            write_now(self.transport, b"END")
            self.transport.loseConnection()

    class Client(protocol.Protocol):
        def __init__(self):
            self.got = []
        def dataReceived(self, data):
            self.got.append(data)
        def connectionLost(self, reason):
            done.callback(b"".join(self.got))

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Server), interface="127.0.0.1")
    protocol.ClientCreator(reactor, Client).connectTCP("127.0.0.1", port.getHost().port)

    def check(data):
        expected = b"220 ready\r\n" + b"A" * 1000 + b"B" * 1000 + b"C" * (8 * 1024 * 1024) + b"END"
        facts["identical"] = data == expected
        facts["length"] = len(data)
        print(json.dumps(facts))
        return port.stopListening()

    return done.addCallback(check)

task.react(main)
'''


def test_write_now_sends_at_once_and_keeps_order_with_queued_and_partial_writes() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {"immediate": True, "queued_kept_order": True, "identical": True,
                     "length": 11 + 2000 + 8 * 1024 * 1024 + 3}
