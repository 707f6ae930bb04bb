#!/bin/sh
# Install the console from this bundle, with no package registry: sh install.sh [DEST] (default
# /opt/appliance-console, where the systemd units expect it). Into a DEST that holds an install
# already it upgrades it instead (upgrade.py: backup first, rolled back if a step fails).
# Then: cd DEST && make run (or the systemd units, see the README)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=${1:-/opt/appliance-console}
cd "$HERE"
sha256sum --quiet -c SHA256SUMS || { echo "the bundle is damaged (SHA256SUMS do not match)"; exit 1; }

# Debian packages the console runs with, those not installed already.
missing=""
for deb in debs/*.deb; do
  [ -e "$deb" ] || continue
  dpkg -s "$(dpkg-deb -f "$deb" Package)" >/dev/null 2>&1 || missing="$missing $deb"
done
if [ -n "$missing" ]; then dpkg -i $missing; fi

PYTHON=$(command -v python3.11 || command -v python3)
if [ -f "$DEST/manage.py" ] && [ -x "$DEST/.venv/bin/python" ]; then
  exec "$PYTHON" upgrade.py "$HERE" "$DEST"
fi
mkdir -p "$DEST"
tar -xf source.tar -C "$DEST"
[ -x "$DEST/.venv/bin/python" ] || "$PYTHON" -m venv "$DEST/.venv"
"$DEST/.venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --find-links wheels \
  -r "$DEST/requirements.txt"
touch "$DEST/.venv/.installed"  # make run: installed already

# Engine runtime packages stay on the box: "Install the engine" installs from them, offline.
if [ -d engines ]; then
  mkdir -p "$DEST/var/wheels"
  cp -r engines/. "$DEST/var/wheels/"
fi
mkdir -p "$DEST/var/release"  # what upgrade.py puts back if a later upgrade fails
cp source.tar VERSION "$DEST/var/release/"
echo "installed $(cat VERSION) into $DEST: cd $DEST && make run"
