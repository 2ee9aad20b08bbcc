"""The Debian package, built and proven on a clean Debian 12.

Builds two .debs of this tree with packaging/deb/build.sh: an "earlier" one
(version ~earlier1, with a different conffile, as a real earlier release
would have) and the current one (lintian errors fail its build), then runs
packaging/deb/prove.py: a debootstrapped bookworm root, ``apt install`` of the
earlier build, relayd run from it relaying mail, then the upgrade to the
current build, which must keep a changed conffile and the queued mail.

Needs root, debootstrap and the Debian mirror.  About 1.5 minutes with the
cache in /var/cache/relayd-test/ warm, about 2.5 cold (measured on the 2-core
CI machines).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import relayd

ROOT = Path(__file__).resolve().parents[2]
DEB = ROOT / "packaging" / "deb"

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, mount, chroot)")
    for tool in ("debootstrap", "dpkg-buildpackage", "lintian", "dh_python3"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.skip(f"{tool} is not installed (tests/run installs it)")


def build(top: Path, out: Path, *args: str) -> Path:
    result = subprocess.run(["bash", str(top / "packaging/deb/build.sh"), "-o", str(out), *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"build.sh failed:\n{result.stderr[-6000:]}"
    return Path(result.stdout.strip().splitlines()[-1])


def copy_tree(dest: Path) -> None:
    """The files build.sh would take from this checkout, copied to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def test_deb_installs_relays_and_upgrades(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    earlier_tree = tmp_path / "earlier"
    copy_tree(earlier_tree)
    conffile = earlier_tree / "packaging/deb/relayd.toml"
    conffile.write_text(conffile.read_text() + "# (the earlier build's conffile)\n")
    earlier = build(earlier_tree, out, "--no-lintian",
                    "--version", f"{relayd.__version__}-1~earlier1")
    current = build(ROOT, out)
    assert current.name == f"relayd_{relayd.__version__}-1_all.deb"

    result = subprocess.run(["/usr/bin/python3", str(DEB / "prove.py"), "--earlier",
                             str(earlier), str(current)],
                            capture_output=True, text=True, timeout=1200)
    print(result.stdout)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert "proof passed" in result.stdout
