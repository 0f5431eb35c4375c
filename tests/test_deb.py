"""The .deb (packaging/build-deb.sh, what `make deb` runs), built once for this module: its name, control fields,
file list, conffiles and maintainer scripts, lintian, and, as root, a real install, upgrade, remove and purge into a
throwaway root with dpkg, and the packaged inferd run from the installed tree at /opt/inferd.

Built as make deb builds it, but at gzip level 1 (make deb: 9; the level changes the size only, and saves ~12 s
here). lintian (~25 s) starts as soon as the package is built and checks it while the other tests run."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import mlp_reference
from httpclient import request

REPO = Path(__file__).resolve().parents[1]
VERSION = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]
ROOT = os.geteuid() == 0
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run(*argv: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)
    if check:
        assert res.returncode == 0, f"{argv} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not shutil.which("dpkg-deb"):
        pytest.skip("dpkg-deb is missing: the .deb is built on Debian and its derivatives only")
    if ROOT:
        run("make", "-s", "deps-deb", cwd=REPO)  # lintian, shellcheck, the system Python's venv module
    out = tmp_path_factory.mktemp("deb")
    run(str(REPO / "packaging/build-deb.sh"), cwd=REPO,
        env={**os.environ, "OUT": str(out), "EXTRAS": "onnxruntime", "DEB_COMPRESSION_LEVEL": "1"})
    (built,) = out.glob("*.deb")
    lintian = None
    if shutil.which("lintian"):
        lintian = subprocess.Popen(["lintian", "--fail-on", "error,warning", "--tag-display-limit", "0", str(built)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _LINTIAN["proc"] = lintian
    try:
        yield built
    finally:
        _LINTIAN.clear()
        if lintian is not None and lintian.poll() is None:
            lintian.kill()
        if lintian is not None:
            lintian.communicate()


#: the lintian run the ``deb`` fixture started (checked by the last test)
_LINTIAN: dict[str, subprocess.Popen[str]] = {}


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("unpacked")
    run("dpkg-deb", "-R", str(deb), str(tree))
    return tree


def arch() -> str:
    return run("dpkg", "--print-architecture").stdout.strip()


def test_name_and_control_fields(deb: Path) -> None:
    assert deb.name == f"inferd_{VERSION}-1_{arch()}.deb"
    fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", run("dpkg-deb", "-f", str(deb)).stdout, re.M))
    assert fields["Package"] == "inferd" and fields["Version"] == f"{VERSION}-1" and fields["Architecture"] == arch()
    depends = [d.strip() for d in fields["Depends"].split(",")]
    # the venv's interpreter is /usr/bin/python3.11 (constraints.txt's Python): that one, and no other python3
    assert {"python3.11", "python3 (>= 3.11~)", "python3 (<< 3.12~)", "adduser"} <= set(depends)
    assert re.fullmatch(r".+ <[^@\s]+@[^@\s]+>", fields["Maintainer"])
    assert fields["Description"] and "self-contained" in run("dpkg-deb", "-f", str(deb), "Description").stdout
    assert int(fields["Installed-Size"]) > 10_000


def test_file_list_holds_the_venv_the_unit_the_config_and_the_docs(deb: Path, unpacked: Path) -> None:
    listing = run("dpkg-deb", "-c", str(deb)).stdout
    links = dict(re.findall(r"^l\S+ \S+ +\d+ \S+ \S+ \./(\S+) -> (\S+)$", listing, re.M))
    assert links["usr/bin/inferd"] == "/opt/inferd/bin/inferd"
    assert links["opt/inferd/bin/python3.11"] == "/usr/bin/python3.11"
    for path in ["opt/inferd/bin/inferd", "opt/inferd/pyvenv.cfg", "usr/share/man/man1/inferd.1.gz",
                 "usr/share/doc/inferd/copyright", "usr/share/doc/inferd/changelog.Debian.gz",
                 "usr/share/doc/inferd/README.md", "usr/share/doc/inferd/config.example.yaml",
                 "usr/share/doc/inferd/docs/operations.md", "usr/share/doc/inferd/docs/store.md",
                 "usr/share/doc/inferd/examples/tpm-credentials.conf", "usr/share/lintian/overrides/inferd"]:
        assert (unpacked / path).is_file(), path
    for packaged, source in [("lib/systemd/system/inferd.service", "systemd/inferd.service"),
                             ("usr/lib/sysusers.d/inferd.conf", "systemd/inferd.sysusers.conf"),
                             ("usr/lib/tmpfiles.d/inferd.conf", "systemd/inferd.tmpfiles.conf"),
                             ("etc/inferd/inferd.yaml", "systemd/inferd.yaml")]:
        assert (unpacked / packaged).read_bytes() == (REPO / source).read_bytes(), packaged
    assert not (unpacked / "opt/inferd/bin/pip").exists()  # nothing installs into the packaged venv afterwards
    # relocated: the scripts run on /opt/inferd's interpreter, and no staging path is left anywhere
    assert (unpacked / "opt/inferd/bin/inferd").read_text().startswith("#!/opt/inferd/bin/python\n")
    assert "/opt/inferd" in (unpacked / "opt/inferd/pyvenv.cfg").read_text()
    left = run("grep", "-rlI", "-F", "inferd-deb.", str(unpacked / "opt"), check=False)
    assert left.returncode == 1 and not left.stdout, left.stdout


def test_the_venv_holds_exactly_the_pinned_versions(unpacked: Path) -> None:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    pins = {_norm(k): v for k, v in pins.items()}
    (site,) = (unpacked / "opt/inferd/lib").glob("python3.*/site-packages")
    installed = {}
    for info in site.glob("*.dist-info"):
        name, version = info.name[: -len(".dist-info")].rsplit("-", 1)
        installed[_norm(name)] = version
    assert installed.pop("inferd") == VERSION
    assert {"onnxruntime", "numpy", "aiohttp", "pydantic"} <= set(installed)
    assert {name: v for name, v in installed.items() if pins.get(name) != v} == {}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_conffiles_and_maintainer_scripts(unpacked: Path) -> None:
    control = unpacked / "DEBIAN"
    assert (control / "conffiles").read_text() == "/etc/inferd/inferd.yaml\n"
    config = (unpacked / "etc/inferd/inferd.yaml").read_text()
    assert "host: 127.0.0.1" in config and "required: null" in config  # loopback only; auth as soon as it is not
    for script in ("postinst", "prerm", "postrm"):
        path = control / script
        assert path.read_bytes() == (REPO / "packaging/debian" / script).read_bytes()
        assert path.stat().st_mode & 0o755 == 0o755
        run("sh", "-n", str(path))
    if shutil.which("shellcheck"):
        run("shellcheck", *(str(control / s) for s in ("postinst", "prerm", "postrm")),
            *(str(p) for p in sorted((REPO / "packaging").glob("*.sh"))))
    else:
        assert not ROOT, "make deps-deb installs shellcheck"


def test_install_upgrade_remove_and_purge_in_a_throwaway_root(deb: Path, tmp_path: Path, mlp_onnx: bytes,
                                                              start_daemon) -> None:
    """dpkg --root with the maintainer scripts run outside a chroot (DPKG_ROOT): the account, the folders and the
    enablement land in the tree, and nothing touches this machine's systemd."""
    if not ROOT:
        pytest.skip("installing with dpkg --root needs root")
    for tool in ("systemd-sysusers", "systemd-tmpfiles", "systemctl", "unshare"):
        assert shutil.which(tool), f"{tool} is missing (make deps-system installs systemd)"
    root = tmp_path / "root"
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()

    def dpkg(*args: str) -> str:
        # the tree has no python3.11 package: it runs on this machine's (the unshare below)
        res = run("dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends", "--force-confold",
                  *args, stdin=subprocess.DEVNULL)
        return res.stdout + res.stderr

    dpkg("--install", str(deb))
    assert re.search(r"^inferd:x:\d+:\d+:", (root / "etc/passwd").read_text(), re.M)
    gid = int(re.search(r"^inferd:x:(\d+):", (root / "etc/group").read_text(), re.M).group(1))  # type: ignore[union-attr]
    etc = (root / "etc/inferd").stat()
    assert (etc.st_mode & 0o7777, etc.st_gid) == (0o750, gid)
    assert (root / "etc/inferd/keys").stat().st_mode & 0o7777 == 0o700
    wants = root / "etc/systemd/system/multi-user.target.wants/inferd.service"
    assert wants.is_symlink()  # enabled on install

    # the installed tree, at the path it was built for: /opt/inferd (in a mount namespace of its own); its own
    # runtime and crypto pack (with the load check in ONNX Runtime) and verify a model
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.onnx").write_bytes(mlp_onnx)
    serve_config = work / "serve.yaml"
    serve_config.write_text(yaml.safe_dump({
        "state_dir": str(work / "state"), "server": {"host": "127.0.0.1", "port": 0},
        "keys": {"kek": [{"path": str(work / "site.kek")}], "signers": [{"path": str(work / "release.key.pub")}]},
        "logging": {"format": "json", "level": "info"}, "models": [{"name": "m", "runtime": "onnxruntime"}]}))
    inferd = f"{root}/usr/bin/inferd"
    mount = f"mount -t tmpfs none /opt && mkdir /opt/inferd && mount --bind {root}/opt/inferd /opt/inferd"
    script = (f"{mount} && {inferd} --version && /opt/inferd/bin/inferd check-config {root}/etc/inferd/inferd.yaml && "
              f"cd {work} && {inferd} keygen --out site.kek && {inferd} keygen --signing --out release.key && "
              f"{inferd} model pack model.onnx --name m --version 1 --runtime onnxruntime --kek site.kek "
              "--signing-key release.key -o m.inferd && "
              f"{inferd} model verify m.inferd --kek site.kek --signer release.key.pub && "
              f"{inferd} model install m.inferd --config {serve_config}")
    ran = run("unshare", "--mount", "sh", "-c", script)
    lines = ran.stdout.splitlines()
    assert lines[0] == f"inferd {VERSION}", ran.stdout
    assert f"{root}/etc/inferd/inferd.yaml: OK (0 model(s)" in ran.stdout  # the credentials' checks: skipped
    assert any(ln.startswith("OK: m:1 (onnxruntime)") for ln in lines), ran.stdout
    assert lines[-1] == "installed m:1 (active)", ran.stdout

    # and the packaged daemon serves it: `python -m daemon` becomes the installed /opt/inferd/bin/inferd
    wrapper = ["unshare", "--mount", "sh", "-c", f'{mount} && shift 3 && exec /opt/inferd/bin/inferd "$@"', "sh"]
    daemon = start_daemon(serve_config, wrapper=wrapper)
    assert os.readlink(f"/proc/{daemon.proc.pid}/exe") == "/usr/bin/python3.11"  # Debian's, not the test venv's
    maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
    assert "/opt/inferd/lib/python3.11/site-packages/onnxruntime/" in maps
    x = np.full((2, 4), 0.25, np.float32)
    res = request(daemon.url + "/v2/models/m/infer", "POST", {"inputs": [
        {"name": "input", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert res.status == 200
    np.testing.assert_allclose(res.json()["outputs"][0]["data"], mlp_reference(x).ravel(), rtol=1e-5, atol=1e-6)
    assert daemon.stop() == 0

    # an upgrade (the same version again runs the same scripts): the operator's config edit survives
    config = root / "etc/inferd/inferd.yaml"
    config.write_text(config.read_text().replace("port: 8080", "port: 8181"))
    dpkg("--install", str(deb))
    assert "port: 8181" in config.read_text()

    # remove keeps the config, the keys and the model store; purge deletes them
    (root / "etc/inferd/keys/site.kek").write_bytes(b"k" * 32)
    store = root / "var/lib/inferd/models/m/1"
    store.mkdir(parents=True)
    (store / "artifact.inferd").write_bytes(b"artifact")
    dpkg("--remove", "inferd")
    assert not (root / "opt/inferd/bin/inferd").exists() and not (root / "usr/bin/inferd").is_symlink()
    assert config.is_file() and (root / "etc/inferd/keys/site.kek").is_file() and (store / "artifact.inferd").is_file()
    dpkg("--purge", "inferd")
    assert not (root / "etc/inferd").exists() and not (root / "var/lib/inferd").exists()
    assert not wants.is_symlink() and not (root / "opt/inferd").exists()
    assert re.search(r"^inferd:", (root / "etc/passwd").read_text(), re.M)  # system accounts stay (Debian's rule)


def test_the_man_page_lists_every_command(unpacked: Path) -> None:
    page = gzip.decompress((unpacked / "usr/share/man/man1/inferd.1.gz").read_bytes()).decode()
    for command in ("serve", "check\\-config", "keygen", "model pack", "model install", "batch"):
        assert f".SS inferd {command}" in page, command


def test_lintian_is_clean(deb: Path) -> None:
    """Last in this module: lintian has been checking the package since it was built."""
    if not shutil.which("lintian"):
        assert not ROOT, "make deps-deb installs lintian"
        pytest.skip("lintian is missing (make deps-deb installs it, as root)")
    proc = _LINTIAN["proc"]
    output, _ = proc.communicate(timeout=600)
    tags = [ln for ln in output.splitlines() if re.match(r"[EW]: ", ln)]
    assert proc.returncode == 0 and tags == [], output[-3000:]
