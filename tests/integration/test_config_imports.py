"""The config package stays pure: importing it in a fresh interpreter (a
process, hence not a unit test) pulls in neither Twisted nor the socket module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_module_imports_neither_twisted_nor_dns() -> None:
    code = (
        "import sys, relayd.config\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('twisted', 'socket')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
