"""Which installed versions of a model are loaded beside its active one (``version_policy`` in each model's config):
the active one only (the default), the newest N, or listed ones. Requests naming ``versions/{v}`` reach any loaded
version; unversioned requests go to the active one. Quarantined versions are never loaded.
"""

from __future__ import annotations

import asyncio
import logging

from daemon.config_updates import VersionPolicy
from daemon.errors import InferdError
from daemon.models import ModelManager
from daemon.store import ModelState, Store

log = logging.getLogger("inferd.updater")


def wanted(policy: VersionPolicy, version: str, installed: list[str], quarantined: list[str]) -> bool:
    """Whether ``policy`` keeps ``version`` loaded beside the active one (``installed`` in the store's order)."""
    if version in quarantined:
        return False
    if policy.specific is not None:
        return version in policy.specific
    if policy.latest is not None:
        return version in [v for v in installed if v not in quarantined][-policy.latest:]
    return False


async def apply(manager: ModelManager, store: Store, name: str) -> None:
    """Load what the policy wants and is not loaded (failures logged, never raised: the active version serves
    regardless); drain the loaded versions it does not want, except the active one."""
    entry = manager.entry(name)
    policy = entry.config.version_policy
    loop = asyncio.get_running_loop()
    state: ModelState = await loop.run_in_executor(None, store.state, name)
    installed: list[str] = await loop.run_in_executor(None, store.versions, name)
    for version in policy.specific or ():  # a typo or a version not synced yet: say so, keep serving
        if version not in installed or version in state.quarantined:
            why = "quarantined" if version in installed else "not installed"
            log.warning("%s:%s is listed in version_policy.specific but %s: not loaded", name, version, why,
                        extra={"event_kind": "policy_version_missing", "model": name, "version": version})
    for version in installed:
        if version not in entry.versions and wanted(policy, version, installed, state.quarantined):
            try:
                await manager.load_version(name, version)
            except InferdError as exc:
                log.error("%s:%s (version_policy) failed to load: %s", name, version, exc,
                          extra={"event_kind": "policy_load_failed", "model": name, "version": version})
    for version, loaded in list(entry.versions.items()):
        if loaded is entry.active or loaded.state != "ready":
            continue
        if not wanted(policy, version, installed, state.quarantined):
            await manager.retire(name, version)
