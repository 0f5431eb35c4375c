#!/usr/bin/env bash
# Install inferd as a self-contained venv under /opt/inferd with the systemd unit, account and folders.
# Usage: sudo packaging/install-opt.sh [EXTRAS]   e.g. EXTRAS=openvino,litert
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
prefix=/opt/inferd
python3 -m venv "$prefix"
"$prefix/bin/pip" install --quiet --upgrade pip
"$prefix/bin/pip" install --quiet ".${extras:+[$extras]}"
install -D -m 0644 README.md "$prefix/share/doc/inferd/README.md"
install -D -m 0644 systemd/inferd.service /etc/systemd/system/inferd.service
install -D -m 0644 systemd/inferd.sysusers.conf /usr/lib/sysusers.d/inferd.conf
install -D -m 0644 systemd/inferd.tmpfiles.conf /usr/lib/tmpfiles.d/inferd.conf
systemd-sysusers /usr/lib/sysusers.d/inferd.conf
systemd-tmpfiles --create /usr/lib/tmpfiles.d/inferd.conf
[ -f /etc/inferd/inferd.yaml ] || install -m 0640 -g inferd systemd/inferd.yaml /etc/inferd/inferd.yaml
systemctl daemon-reload
echo "installed under $prefix; edit /etc/inferd/inferd.yaml, place keys in /etc/inferd/keys, then:"
echo "  systemctl enable --now inferd"
