"""A breaking signature change through a real daemon (issue #11, requirement 3): an update whose inputs differ from
the active version's is refused, journaled and left unserved, unless that model, and only that one, says
``allow_breaking: true``."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
from conftest import KeySet, Site
from httpclient import infer, request
from support.accepted import wait_until
from support.registry import RawServer, Threaded
from support.update_models import build_lookup
from support.updates import FAST_PROBATION, audited

from daemon import artifact, keys, registry_publish
from daemon.store import Store

STRICT, BREAKABLE = "strict", "breakable"


def pack(keyset: KeySet, name: str, version: str, input_name: str = "idx") -> bytes:
    """Version ``version`` of ``name`` (answers ``float(version)``), its one input called ``input_name``."""
    ref_in = np.array([0, 1], dtype=np.int64)
    files = {"model.onnx": build_lookup(float(version), input_name=input_name),
             **artifact.smoke_files({input_name: ref_in}, {"y": np.full((2, 2), float(version), np.float32)})}
    return artifact.pack(files, name=name, version=version, runtime="onnxruntime", kek=keyset.kek,
                         signing_key=keyset.signing_key)


def body(input_name: str) -> dict[str, Any]:
    return {"inputs": [{"name": input_name, "shape": [2], "datatype": "INT64", "data": [0, 1]}]}


def activate(url: str, name: str, version: str) -> Any:
    return request(f"{url}/admin/models/{name}/activate", "POST", {"version": version})


def test_a_breaking_change_needs_allow_breaking_on_that_model(site: Site, keyset: KeySet, start_daemon: Any) -> None:
    for name in (STRICT, BREAKABLE):
        site.install(pack(keyset, name, "1"))
        site.install(pack(keyset, name, "2", input_name="index"), activate=False)  # input 'idx' renamed: breaking
    common = {"runtime": "onnxruntime", "threads": 1, "max_batch_size": 0, "probation": FAST_PROBATION}
    site.models = [{"name": STRICT, **common}, {"name": BREAKABLE, "allow_breaking": True, **common}]
    site.extra = {"audit": {"path": str(site.root / "audit.log")}}
    d = start_daemon(site.write_config())

    refused = activate(d.url, STRICT, "2")
    assert refused.status == 409, refused.body
    error = refused.json()["error"]
    assert "not compatible with 1" in error and "input 'idx' is gone" in error and "allow_breaking" in error
    line = d.wait_for("update_refused")
    assert (line["model"], line["version"], line["level"]) == (STRICT, "2", "error")
    assert "input 'idx' is gone" in line["event"]
    state = Store(site.state_dir).state(STRICT)
    assert (state.active, state.pending, state.probation, state.quarantined) == ("1", None, None, [])
    last = state.history[-1]
    assert (last["event"], last["version"]) == ("refused", "2") and last["reason"].startswith("incompatible: ")
    served = infer(d.url, STRICT, body("idx"))
    assert served.status == 200 and served.json()["model_version"] == "1"
    assert infer(d.url, STRICT, body("idx"), version="2").status == 404  # drained again, never served
    wait_until(lambda: [(r["model"], r["result"]) for r in audited(site) if r["action"] == "admin.activate"]
               == [(STRICT, "refused")], 10, "the refusal audited")

    accepted = activate(d.url, BREAKABLE, "2")
    assert accepted.status == 200, accepted.body
    assert accepted.json()["serving"] == "2"
    reply = infer(d.url, BREAKABLE, body("index"))
    assert reply.status == 200 and reply.json()["model_version"] == "2"
    assert reply.json()["outputs"][0]["data"][0] == 2.0
    assert infer(d.url, BREAKABLE, body("idx")).status == 400  # the break is real: the old input is gone
    assert d.wait_for("committed", timeout=30)["model"] == BREAKABLE
    state = Store(site.state_dir).state(BREAKABLE)
    assert (state.active, state.previous) == ("2", "1")

    again = activate(d.url, STRICT, "2")  # the other model's allow_breaking changes nothing here
    assert again.status == 409 and "allow_breaking" in again.json()["error"]
    assert infer(d.url, STRICT, body("idx")).json()["model_version"] == "1"


def test_a_breaking_version_from_the_registry_is_not_loaded_again_until_the_config_allows_it(
        tmp_path: Path, site: Site, keyset: KeySet, start_daemon: Any) -> None:
    """The registry offers an incompatible version once; later polls do not load it again while the model's config
    says the same (each would load and drop it), and it goes through once ``allow_breaking: true`` is reloaded."""
    central = tmp_path / "central"
    central.mkdir()
    keys.generate_signing_key(central / "index.key")
    for version, input_name in (("1", "idx"), ("2", "index")):
        path = central / f"{version}.inferd"
        path.write_bytes(pack(keyset, STRICT, version, input_name=input_name))
        registry_publish.publish(path, central / "registry", keys.load_signing_key(central / "index.key"),
                                 channels=["stable"])
    files = {str(p.relative_to(central / "registry")): p.read_bytes() for p in (central / "registry").rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    site.install(pack(keyset, STRICT, "1"))
    site.models = [{"name": STRICT, "runtime": "onnxruntime", "threads": 1, "max_batch_size": 0,
                    "probation": FAST_PROBATION}]
    with Threaded(RawServer(files)) as server:
        site.extra = {"registry": {"url": server.url, "poll_interval_s": 3600, "min_free_bytes": 0,
                                   "index_keys": [{"path": str(central / "index.key.pub")}]}}
        d = start_daemon(site.write_config())
        assert d.wait_for("update_refused")["version"] == "2"  # the start-up poll: downloaded, offered, refused
        sync = request(d.url + "/admin/registry/sync", "POST")
        assert sync.status == 200, sync.body
        (refusal,) = sync.json()["refused"]
        assert refusal["version"] == "2" and "refused before" in refusal["message"]
        store = Store(site.state_dir)
        assert [h["event"] for h in store.state(STRICT).history if h.get("version") == "2"] == [
            "installed", "offered", "refused"]  # offered once: the second poll loaded nothing
        assert infer(d.url, STRICT, body("idx")).json()["model_version"] == "1"

        site.models[0]["allow_breaking"] = True
        site.write_config()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("reloaded")
        assert request(d.url + "/admin/registry/sync", "POST").status == 200
        wait_until(lambda: infer(d.url, STRICT, body("index")).status == 200, 30, "version 2 served")
    assert infer(d.url, STRICT, body("index")).json()["model_version"] == "2"
