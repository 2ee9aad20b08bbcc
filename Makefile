# Build artefacts only; the tests run with `bash tests/run` (see README.md).

.PHONY: deb prove-deb

# relayd_<version>_all.deb in dist/, built with dpkg-buildpackage in a scratch
# copy of the tree, and checked with lintian (errors fail the build).
deb:
	packaging/deb/build.sh -o dist

# Install that .deb on a clean Debian 12 root (debootstrap; run as root) and
# relay a message through it.  tests/system/test_deb_package.py also proves upgrades.
prove-deb:
	packaging/deb/prove.py "$$(packaging/deb/build.sh -o dist | tail -n 1)"
