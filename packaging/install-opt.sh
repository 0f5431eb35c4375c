#!/usr/bin/env bash
# Install inferd without a package: a self-contained venv under /opt/inferd with the versions in constraints.txt,
# the systemd unit, account and folders, and the docs where the unit's Documentation= points. The .deb
# (make deb, docs/operations.md) does the same and can be upgraded and removed cleanly: prefer it.
# Usage: sudo packaging/install-opt.sh [EXTRAS]   e.g. openvino,litert
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
prefix=/opt/inferd
python3 -m venv "$prefix"
"$prefix/bin/pip" install --quiet --upgrade pip
"$prefix/bin/pip" install --quiet -c constraints.txt ".${extras:+[$extras]}"
install -D -m 0644 README.md /usr/share/doc/inferd/README.md
install -d -m 0755 /usr/share/doc/inferd/docs
install -m 0644 docs/*.md docs/openapi.yaml /usr/share/doc/inferd/docs/
install -D -m 0644 systemd/inferd.service /etc/systemd/system/inferd.service
install -D -m 0644 systemd/inferd.sysusers.conf /usr/lib/sysusers.d/inferd.conf
install -D -m 0644 systemd/inferd.tmpfiles.conf /usr/lib/tmpfiles.d/inferd.conf
systemd-sysusers inferd.conf
systemd-tmpfiles --create inferd.conf
[ -f /etc/inferd/inferd.yaml ] || install -m 0640 -g inferd systemd/inferd.yaml /etc/inferd/inferd.yaml
systemctl daemon-reload
echo "installed under $prefix; edit /etc/inferd/inferd.yaml, place keys in /etc/inferd/keys, then:"
echo "  systemctl enable --now inferd"
