"""``threads: 0`` (the default) through ``inferd serve``: the CPUs this process may use (its affinity mask, capped by
a cgroup CPU quota such as systemd's ``CPUQuota=``) shared among the models' workers (docs/runtimes.md, "Threads and
workers"). The daemon runs under a real affinity mask and in a real cgroup with a quota; model metadata reports the
threads it chose (``parameters.threads``)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KeySet, Site, pack_model
from httpclient import request

CPU_V1 = Path("/sys/fs/cgroup/cpu")  # cgroup v1's cpu controller, where this project's machines mount it


def threads_of(url: str, model: str) -> int:
    return int(request(f"{url}/v2/models/{model}").json()["parameters"]["threads"])


def serve(site: Site, keyset: KeySet, mlp_onnx: bytes, workers: dict[str, int]) -> Path:
    for name in workers:
        site.install(pack_model(keyset, mlp_onnx, name=name))
    site.models = [{"name": name, "runtime": "onnxruntime", "threads": 0, "workers": w} for name, w in workers.items()]
    return site.write_config()


def test_the_usable_cpus_are_shared_among_all_models_workers(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                             start_daemon) -> None:
    cpus = len(os.sched_getaffinity(0))  # the daemon inherits this process's mask
    daemon = start_daemon(serve(site, keyset, mlp_onnx, {"a": 1, "b": 2}))
    assert threads_of(daemon.url, "a") == threads_of(daemon.url, "b") == max(1, cpus // 3)
    assert daemon.stop() == 0


def test_the_affinity_mask_bounds_the_threads(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs a machine with two CPUs to restrict the daemon to one")
    config = serve(site, keyset, mlp_onnx, {"a": 1})
    free = start_daemon(config)
    assert threads_of(free.url, "a") == len(cpus)  # alone, one worker: every usable CPU
    assert free.stop() == 0
    pinned = start_daemon(config, wrapper=["taskset", "-c", str(cpus[0])])
    assert threads_of(pinned.url, "a") == 1
    assert pinned.stop() == 0


@pytest.fixture
def one_cpu_cgroup() -> Iterator[Path]:
    """A cgroup v1 cpu group with a quota of one CPU (cfs_quota_us = cfs_period_us), removed after the test; the
    daemon enters it before it starts (see ``wrapper`` below). Needs root and a writable cpu controller."""
    if os.geteuid() != 0 or not os.access(CPU_V1 / "cgroup.procs", os.W_OK):
        pytest.skip("needs root and cgroup v1's cpu controller at /sys/fs/cgroup/cpu to set a CPU quota")
    group = CPU_V1 / f"inferd-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        period = int((group / "cpu.cfs_period_us").read_text())
        (group / "cpu.cfs_quota_us").write_text(str(period))
        yield group
    finally:
        group.rmdir()  # the daemon inside was reaped by start_daemon's teardown, which runs first


def entering(group: Path) -> list[str]:
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]


def test_a_cgroup_cpu_quota_caps_the_threads(one_cpu_cgroup: Path, site: Site, keyset: KeySet, mlp_onnx: bytes,
                                            start_daemon) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a machine with two CPUs for a one-CPU quota to matter")
    daemon = start_daemon(serve(site, keyset, mlp_onnx, {"a": 1}), wrapper=entering(one_cpu_cgroup))
    assert (one_cpu_cgroup / "cgroup.procs").read_text().split() == [str(daemon.proc.pid)]  # it runs in the group
    assert threads_of(daemon.url, "a") == 1
    assert daemon.stop() == 0


@pytest.mark.parametrize(("layout", "expected"), [
    ("v2", 1), ("v2-parent", 1), ("v2-none", None), ("v1", 2), ("v1-unseen", 3), ("none", None),
])
def test_the_quota_of_the_process_own_cgroup_and_its_ancestors_applies(tmp_path: Path, layout: str,
                                                                       expected: int | None) -> None:
    """cgroup files as the kernel lays them out, in a folder: the quota read is the tightest on the path from the
    process's own cgroup (from /proc/self/cgroup) up to the root, not the root's alone."""
    from adapters.cpus import cgroup_quota

    root, me = tmp_path / "cgroup", tmp_path / "self"
    service = "system.slice/inferd.service"
    if layout.startswith("v2"):
        (root / service).mkdir(parents=True)
        (root / "cgroup.controllers").write_text("cpu memory\n")
        (root / "cpu.max").write_text("max 100000\n")
        if layout == "v2":
            (root / service / "cpu.max").write_text("50000 100000\n")  # CPUQuota=50%
        elif layout == "v2-parent":
            (root / "system.slice" / "cpu.max").write_text("100000 100000\n")
            (root / service / "cpu.max").write_text("max 100000\n")
        me.write_text(f"0::/{service}\n")
    elif layout.startswith("v1"):
        cpu = root / "cpu"
        (cpu / service).mkdir(parents=True)
        (cpu / "cpu.cfs_quota_us").write_text("300000\n")
        (cpu / "cpu.cfs_period_us").write_text("100000\n")
        (cpu / service / "cpu.cfs_quota_us").write_text("200000\n")
        (cpu / service / "cpu.cfs_period_us").write_text("100000\n")
        path = service if layout == "v1" else "not/visible/here"  # another cgroup namespace: the root is ours
        me.write_text(f"4:memory:/x\n1:cpu:/{path}\n0::/\n")
    else:
        root.mkdir()
        me.write_text("0::/\n")
    quota = cgroup_quota(root, me)
    assert (None if quota is None else int(quota + 0.999)) == expected
