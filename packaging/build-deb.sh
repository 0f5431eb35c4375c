#!/usr/bin/env bash
# Build dist/inferd_<version>_<arch>.deb: a self-contained venv in /opt/inferd made from constraints.txt (the versions
# the tests ran with), the systemd unit, sysusers and tmpfiles files, /etc/inferd/inferd.yaml as a conffile,
# /usr/bin/inferd, a man page and the docs in /usr/share/doc/inferd.
#
# Usage: packaging/build-deb.sh            (make deb [EXTRAS=onnxruntime,openvino])
#   EXTRAS      runtimes and features to bundle, comma-separated: onnxruntime (always), openvino, litert, grpc, batch
#   OUT         where the .deb goes (default dist)
#   DEB_PYTHON  the interpreter the venv is built on and the package depends on (default /usr/bin/python3.11: the
#               Python constraints.txt was made with)
#   DEB_REVISION, DEB_MAINTAINER, DEB_COMPRESSION (gzip, xz or none; default gzip: xz makes it a quarter smaller
#               but takes minutes on 200 MB of venv; zstd is faster still, but lintian calls a zstd .deb malformed)
#   DEB_COMPRESSION_LEVEL  dpkg-deb's -z (default: dpkg-deb's, 9 for gzip; the tests build at 1: faster, 10% larger)
#
# The venv is built in a staging folder and then relocated: every text file under bin/ (shebangs, activate scripts)
# and pyvenv.cfg get /opt/inferd instead of the staging path, and the byte-code is compiled with /opt/inferd as its
# source path. The build fails if the staging path is left anywhere in the package.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
umask 022

extras="${EXTRAS:-onnxruntime}"
out="${OUT:-dist}"
python="${DEB_PYTHON:-/usr/bin/python3.11}"
revision="${DEB_REVISION:-1}"
maintainer="${DEB_MAINTAINER:-inferd developers <inferd-dev@example.org>}"
compression="${DEB_COMPRESSION:-gzip}"
level="${DEB_COMPRESSION_LEVEL:-}"
prefix=/opt/inferd

for tool in dpkg-deb gzip; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool is missing (make deps-deb installs it)" >&2; exit 1; }
done
[ -x "$python" ] || { echo "build-deb: $python is missing: apt-get install python3.11-venv" >&2; exit 1; }
# the Python constraints.txt was made with: the Makefile's PINNED_PY, else what the file's header says
pinned="${PINNED_PY:-$(sed -n 's/.*(pip freeze of the dev venv, Python \([0-9.]*\)).*/\1/p' constraints.txt)}"
[ -n "$pinned" ] || { echo "build-deb: set PINNED_PY to the Python constraints.txt was made with" >&2; exit 1; }
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$pyver" != "$pinned" ]; then
    echo "build-deb: $python is Python $pyver but constraints.txt pins versions for Python $pinned" >&2
    exit 1
fi

# onnxruntime is a base dependency; the others are pyproject extras
pip_extras=""
for e in ${extras//,/ }; do
    case "$e" in
        onnxruntime) ;;
        openvino|litert|grpc|batch) pip_extras="${pip_extras:+$pip_extras,}$e" ;;
        *) echo "build-deb: unknown extra '$e' (onnxruntime, openvino, litert, grpc, batch)" >&2; exit 1 ;;
    esac
done

nextpy=$("$python" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
debversion="$version-$revision"
arch=$(dpkg --print-architecture)
started=$(date +%s)

work=$(mktemp -d "${TMPDIR:-/tmp}/inferd-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
venv="$root$prefix"

echo "build-deb: inferd $debversion ($arch) with ${extras} on $python"
"$python" -m venv "$venv"
PYTHON="$venv/bin/python" packaging/build-wheel.sh "$work/wheel" >/dev/null
wheel=$(ls "$work"/wheel/inferd-*.whl)
"$venv/bin/python" -m pip install --quiet --no-compile --disable-pip-version-check -c constraints.txt \
    "$wheel${pip_extras:+[$pip_extras]}"
# the venv's seed (pip, and setuptools on Python < 3.12) goes unless something needs it: the package is no place
# to pip install into, and constraints.txt does not pin the seed
seed=pip
if "$venv/bin/python" -m pip show setuptools 2>/dev/null | grep -qx 'Required-by: *'; then
    seed="$seed setuptools"
fi
# shellcheck disable=SC2086 # one word per package
"$venv/bin/python" -m pip uninstall --quiet --yes $seed
rm -rf "$venv"/lib/python*/site-packages/inferd-*.dist-info/direct_url.json  # names the build folder's wheel
sed -i '/direct_url.json/d' "$venv"/lib/python*/site-packages/inferd-*.dist-info/RECORD
# nothing under site-packages is run directly: shared objects and modules are loaded, so none needs an exec bit
find "$venv"/lib/python*/site-packages -type f -perm /0111 -exec chmod a-x {} +

# relocate: shebangs, activate scripts and pyvenv.cfg name the staging path
grep -rlI --null -F "$venv" "$venv/bin" "$venv/pyvenv.cfg" | xargs -0 -r sed -i "s|$venv|$prefix|g"
"$venv/bin/python" -m compileall -q -j 0 -s "$root" -p / "$venv/lib" >/dev/null
if grep -rlI -F "$work" "$venv" | grep -q .; then
    echo "build-deb: the staging path is still in:" >&2
    grep -rlI -F "$work" "$venv" >&2
    exit 1
fi

# the unit, the account, the folders, the config, the command
install -D -m 0644 systemd/inferd.service "$root/lib/systemd/system/inferd.service"
install -D -m 0644 systemd/inferd.sysusers.conf "$root/usr/lib/sysusers.d/inferd.conf"
install -D -m 0644 systemd/inferd.tmpfiles.conf "$root/usr/lib/tmpfiles.d/inferd.conf"
install -D -m 0644 systemd/inferd.yaml "$root/etc/inferd/inferd.yaml"
mkdir -p "$root/usr/bin"
ln -s "$prefix/bin/inferd" "$root/usr/bin/inferd"

# docs: README.md and docs/ keep their layout, so their relative links work
doc="$root/usr/share/doc/inferd"
install -D -m 0644 README.md "$doc/README.md"
install -D -m 0644 config.example.yaml "$doc/config.example.yaml"
install -d -m 0755 "$doc/docs"
install -m 0644 docs/*.md docs/openapi.yaml "$doc/docs/"
install -m 0644 packaging/debian/copyright "$doc/copyright"
# the unit's optional drop-ins (e.g. tpm-credentials.conf), for /etc/systemd/system/inferd.service.d/
for dropin in systemd/*.conf; do
    case "$dropin" in
        systemd/inferd.sysusers.conf|systemd/inferd.tmpfiles.conf) ;;
        *) install -D -m 0644 "$dropin" "$doc/examples/$(basename "$dropin")" ;;
    esac
done
install -D -m 0644 packaging/debian/lintian-overrides "$root/usr/share/lintian/overrides/inferd"
when=$(git log -1 --format=%cD 2>/dev/null || date -R)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
cat > "$work/changelog" <<CHANGELOG
inferd ($debversion) unstable; urgency=medium

  * Built from the inferd source tree at commit $commit.
  * Bundled runtimes: $extras.

 -- $maintainer  $when
CHANGELOG
gzip -9n -c "$work/changelog" > "$doc/changelog.Debian.gz"
install -d -m 0755 "$root/usr/share/man/man1"
(cd / && COLUMNS=100 "$venv/bin/python" "$repo/packaging/manpage.py") | gzip -9n > "$root/usr/share/man/man1/inferd.1.gz"

# control
install -d -m 0755 "$root/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$root/DEBIAN/$script"
done
echo /etc/inferd/inferd.yaml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: inferd
Version: $debversion
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: python$pyver, python3 (>= $pyver~), python3 (<< $nextpy~), libc6 (>= 2.28), libgcc-s1, libstdc++6, adduser
Section: net
Priority: optional
Description: model-serving daemon for encrypted models (KServe V2, MQTT)
 inferd serves ONNX Runtime, OpenVINO and LiteRT models, kept encrypted at rest
 and decrypted only in memory, over the KServe V2 (Open Inference Protocol)
 HTTP API, its gRPC API and MQTT, with per-model queues, dynamic batching and
 load shedding.
 .
 This package holds a self-contained Python $pyver virtual environment in
 /opt/inferd with the dependency versions inferd was tested with; bundled
 runtimes: $extras.
CONTROL

mkdir -p "$out"
deb="$out/inferd_${debversion}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compression" ${level:+-z"$level"} --build "$root" "$deb" >/dev/null
echo "build-deb: $deb ($(du -h "$deb" | cut -f1), $(( $(date +%s) - started ))s)"
