#!/usr/bin/env bash
# Build relayd_<version>_all.deb with dpkg-buildpackage, in a scratch copy of
# the tree: dpkg-buildpackage wants debian/ at the source root and writes its
# results into the parent directory, and neither belongs in the checkout.
#
# Usage: packaging/deb/build.sh [-o OUTDIR] [--version DEBIAN_VERSION] [--no-lintian]
#   -o OUTDIR      where the .deb goes (default: dist/ at the top of the tree)
#   --version V    build as Debian version V (a changelog entry is added in the
#                  scratch copy only; the upgrade test uses it)
#   --no-lintian   skip lintian (it takes a while; `make deb` runs it)
# Prints the path of the .deb on the last line of stdout.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
top="$(cd "$here/../.." && pwd)"
out="$top/dist"
version=""
lintian=1
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --no-lintian) lintian=""; shift ;;
    *) echo "usage: $0 [-o OUTDIR] [--version V] [--no-lintian]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"

for unit in systemd/relayd.service systemd/relayd@.service; do
  [ -f "$top/$unit" ] || { echo "$0: $unit is missing: the package installs the units from systemd/" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/relayd-deb.XXXXXX")"
trap 'rm -rf "$work"' EXIT
src="$work/relayd"
mkdir "$src"

# What git would ship: tracked and new files, not ignored ones (no .venv,
# no twisted/plugins/dropin.cache, no build/), and not files deleted in the
# working tree.  Outside a git checkout (a release tarball): everything but
# the usual local artefacts.
if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$top" && git ls-files -z --cached --others --exclude-standard) |
    while IFS= read -r -d '' f; do
      if [ -e "$top/$f" ]; then printf '%s\0' "$f"; fi
    done |
    (cd "$top" && tar --null -T - -cf -) | tar -xf - -C "$src"
else
  tar -C "$top" --exclude=./.git --exclude='./.venv*' --exclude=./dist --exclude=./build \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=dropin.cache \
    --exclude=./relayd-data --exclude='./.*_cache' --exclude=./.hypothesis -cf - . |
    tar -xf - -C "$src"
fi
cp -r "$here/debian" "$src/debian"

if [ -n "$version" ]; then
  # A changelog entry on top, so dpkg-buildpackage builds that version.
  {
    printf 'relayd (%s) bookworm; urgency=medium\n\n  * Local build %s.\n\n' "$version" "$version"
    printf ' -- relayd maintainers <relayd@example.org>  %s\n\n' "$(date -R)"
    cat "$here/debian/changelog"
  } > "$src/debian/changelog"
fi

echo "== dpkg-buildpackage in $src" >&2
# Debian's own python3 and tools only: a pyenv or venv python earlier in PATH
# would build the package against the wrong interpreter (or fail to).
if ! (cd "$src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b) \
    > "$out/relayd-build.log" 2>&1; then
  tail -n 60 "$out/relayd-build.log" >&2
  echo "$0: dpkg-buildpackage failed; full log: $out/relayd-build.log" >&2
  exit 1
fi

debs=("$work"/relayd_*_all.deb)
deb="$out/$(basename "${debs[0]}")"
cp "${debs[0]}" "$deb"

if [ -n "$lintian" ]; then
  echo "== lintian $(basename "$deb")" >&2
  # --fail-on error: warnings are printed, errors fail the build.
  lintian --fail-on error --info "$deb" >&2
fi
echo "$deb"
