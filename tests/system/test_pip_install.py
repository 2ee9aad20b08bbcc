"""A plain, non-editable ``pip install .`` into a fresh venv works (issue
13.7): the .deb and users install that way, so the package list found by
setup.cfg must hold every module, the twistd plugin and no tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.relay import ROOT


def test_pip_install_gives_a_working_relayd(tmp_path: Path) -> None:
    python = shutil.which("python3", path="/usr/bin")
    if python is None:
        pytest.skip("no /usr/bin/python3")
    venv = tmp_path / "venv"
    # Debian's Twisted & co. from the system: no index needed, and the
    # install is relayd's own files only.
    subprocess.run([python, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "*.egg-info", "build", "__pycache__", "dropin.cache"))
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps",
                    "--no-build-isolation", str(src)], check=True, cwd=tmp_path, timeout=300)
    shutil.rmtree(src)  # nothing may come from the source tree any more

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120)

    version = run(str(venv / "bin" / "relayd"), "--version")
    assert version.returncode == 0 and version.stdout.startswith("relayd "), version.stderr
    checked = run(str(venv / "bin" / "relayd"), "check-config")
    assert checked.returncode == 0 and "[[listener]]" in checked.stdout, checked.stderr
    plugins = run(str(venv / "bin" / "python"), "-c",
                  "from twisted.plugin import getPlugins; "
                  "from twisted.application.service import IServiceMaker; "
                  "import relayd; print(relayd.__file__); "
                  "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))")
    assert plugins.returncode == 0, plugins.stderr
    where, names = plugins.stdout.splitlines()[-2:]
    assert str(venv) in where, where  # the installed copy, not a checkout
    assert "'relayd'" in names, names
    tests = run(str(venv / "bin" / "python"), "-c", "import tests.relay")
    assert tests.returncode != 0  # the tests are not installed
