"""RegistryClient.run(), the poll loop itself: the wait after each poll (jittered, doubled after failures up to the cap,
back to the interval after a success) and a sync request cutting a long wait short. Real polls against a real server
on loopback; only the dice and the sleep are the test's, so an hour of backoff takes no time at all."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeySet
from support.registry import Central, RawServer
from support.registry_box import box_config, index_pub, make_central, served_files

from daemon import keys
from daemon.config import KeySource
from daemon.registry import RegistryClient
from daemon.store import Store

DEADLINE_S = 20.0
#: the registry's answer to each poll: True serves the registry, False answers 404 (``unavailable``)
PLAN = [False, False, False, False, True, False]
#: the waits before jitter that PLAN must give with a 10 s interval and a 60 s cap
DELAYS = [20.0, 40.0, 60.0, 60.0, 10.0, 20.0]


@pytest.fixture
def central(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> Central:
    central = make_central(tmp_path, keyset, mlp_onnx)
    central.publish("1")
    return central


def test_waits_back_off_to_the_cap_reset_after_a_success_and_are_jittered(tmp_path: Path, keyset: KeySet,
                                                                         central: Central) -> None:
    files = served_files(central)
    server = RawServer({})
    waits: list[float] = []
    seen: list[tuple[int, int]] = []  # (polls, failures) at each wait
    signers = keys.load_signers([KeySource(path=keyset.public_path)])
    Store(tmp_path / "box").ensure()

    async def scenario() -> RegistryClient:
        done = asyncio.get_running_loop().create_future()

        async def rest(seconds: float) -> None:
            waits.append(seconds)
            seen.append((client.polls, sum(client.failures.values())))
            if len(waits) == len(PLAN):
                done.set_result(None)
                await asyncio.Event().wait()  # the last wait lasts until the test cancels run()
            server.files = dict(files) if PLAN[len(waits)] else {}

        async with server:
            config = box_config(tmp_path, keyset, server.url, [index_pub(central)], poll_interval_s=10,
                                backoff_max_s=60, jitter=0.5)
            client = RegistryClient(config, Store(config.state_dir), signers, rng=random.Random(7), rest=rest)
            await client.start()
            task = asyncio.create_task(client.run())
            try:
                await asyncio.wait_for(done, DEADLINE_S)
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await client.close()
        return client

    client = asyncio.run(scenario())
    assert seen == [(i + 1, sum(not ok for ok in PLAN[:i + 1])) for i in range(len(PLAN))]  # one poll per wait
    assert dict(client.failures) == {"unavailable": 5}
    dice = random.Random(7)
    assert waits == pytest.approx([d * dice.uniform(0.5, 1.5) for d in DELAYS])
    for wait, delay in zip(waits, DELAYS, strict=True):
        assert delay * 0.5 <= wait <= delay * 1.5
    assert len({round(w / d, 9) for w, d in zip(waits, DELAYS, strict=True)}) == len(DELAYS)  # each wait re-rolled


def test_a_sync_request_cuts_the_wait_short(tmp_path: Path, keyset: KeySet, central: Central) -> None:
    """The default wait (an hour here) ends as soon as a sync is asked for (HTTP, MQTT): the next poll follows."""
    server = RawServer(served_files(central))
    signers = keys.load_signers([KeySource(path=keyset.public_path)])
    Store(tmp_path / "box").ensure()

    async def until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)  # polling a condition with a deadline

    def index_requests() -> int:
        return sum(p == "index.json" for p, _ in server.requests)

    async def scenario() -> int:
        async with server:
            config = box_config(tmp_path, keyset, server.url, [index_pub(central)], poll_interval_s=3600)
            client = RegistryClient(config, Store(config.state_dir), signers)
            await client.start()
            task = asyncio.create_task(client.run())
            try:
                await until(lambda: client.polls == 1, "the first poll never started")
                client.request_sync()  # during the poll or after it: either way one more poll, not lost
                # the poll counter moves before the request goes out: wait for the registry to see the second one
                await until(lambda: index_requests() == 2, "a sync request did not cut the hour's wait short")
                return client.polls
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await client.close()

    assert asyncio.run(scenario()) == 2
