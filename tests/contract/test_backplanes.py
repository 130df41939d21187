"""The backplane contract: what a hub subscriber may rely on, on any backplane."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from realtime.hub import Envelope, Hub
from realtime.protocol import Outgoing
from tests.contract.conftest import run


class Recorder:
    def __init__(self) -> None:
        self.got: list[Outgoing] = []
        self.arrived = asyncio.Event()

    def deliver(self, out: Outgoing) -> None:
        self.got.append(out)
        self.arrived.set()

    async def wait_for(self, n: int, timeout: float = 3.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.got) < n:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), max(0.01, deadline - loop.time()))


def test_envelope_round_trip_keeps_what_subscribers_filter_on() -> None:
    out = Outgoing({"type": "op", "rev": 7, "op": [1, "é😀"], "client": "c-abcd"}, seq=7, client="c-abcd")
    env = Envelope.unpack(Envelope.of("node-a", "doc:x", out).pack())
    assert tuple(env) == ("node-a", "doc:x", "op", 7, "c-abcd", out.text)
    back = env.outgoing()
    assert (back.kind, back.seq, back.client, back.text, back.data) == ("op", 7, "c-abcd", out.text, out.data)
    assert back.obj == out.obj and back.frame == out.frame
    plain = Envelope.unpack(Envelope.of("n", "chat:r", Outgoing({"type": "typing"})).pack())
    assert (plain.kind, plain.seq, plain.client) == ("typing", None, None)


def test_a_subscriber_gets_what_is_published_after_subscribe_returns(backplane: Any) -> None:
    async def main() -> None:
        async with backplane() as nodes:
            hub: Hub = await nodes.hub()
            a, b = Recorder(), Recorder()
            await hub.subscribe("chat:r", a)
            await hub.subscribe("chat:r", b)
            for i in range(1, 51):
                hub.publish("chat:r", {"type": "message", "seq": i}, seq=i)
            hub.publish("chat:other", {"type": "message", "seq": 1}, seq=1)
            await a.wait_for(50)
            await b.wait_for(50)
            assert [o.seq for o in a.got] == list(range(1, 51))  # in publish order, each once
            assert [o.obj["seq"] for o in b.got] == list(range(1, 51))
            assert hub.subscribers("chat:r") == 2

    run(main())


def test_concurrent_first_subscribers_both_wait_for_the_subscription(backplane: Any) -> None:
    async def main() -> None:
        async with backplane() as nodes:
            hub = await nodes.hub()
            a, b = Recorder(), Recorder()
            await asyncio.gather(hub.subscribe("t", a), hub.subscribe("t", b))
            hub.publish("t", {"type": "x"})
            await a.wait_for(1)
            await b.wait_for(1)

    run(main())


def test_unsubscribe_stops_delivery_and_forgets_the_topic(backplane: Any) -> None:
    async def main() -> None:
        async with backplane() as nodes:
            hub = await nodes.hub()
            a, b = Recorder(), Recorder()
            await hub.subscribe("t", a)
            await hub.subscribe("t", b)
            hub.unsubscribe("t", a)
            hub.publish("t", {"type": "x", "n": 1})
            await b.wait_for(1)
            hub.unsubscribe("t", b)
            assert hub.topics == 0 and hub.subscribers("t") == 0
            far = Recorder()
            if nodes.multi_node:
                await (await nodes.hub()).subscribe("t", far)
            hub.publish("t", {"type": "x", "n": 2})
            if nodes.multi_node:  # it went round the backplane: what could reach b has come back by now
                await far.wait_for(1)
            assert [o.obj["n"] for o in b.got] == [1] and a.got == []
            hub.unsubscribe("t", b)  # twice: harmless

    run(main())


@pytest.mark.expect_error_log
def test_a_failing_subscriber_does_not_stop_the_others(backplane: Any, caplog: Any) -> None:
    class Broken:
        def deliver(self, out: Outgoing) -> None:
            raise RuntimeError("bug")

    async def main() -> None:
        async with backplane() as nodes:
            hub = await nodes.hub()
            good = Recorder()
            await hub.subscribe("t", Broken())
            await hub.subscribe("t", good)
            hub.publish("t", {"type": "x"})
            await good.wait_for(1)

    run(main())
    assert "subscriber" in caplog.text


def test_every_node_gets_every_message_once(backplane: Any) -> None:
    async def main() -> None:
        async with backplane() as nodes:
            if not nodes.multi_node:
                hubs = [await nodes.hub()]
            else:
                hubs = [await nodes.hub() for _ in range(3)]
            subs = [Recorder() for _ in hubs]
            for hub, sub in zip(hubs, subs):
                await hub.subscribe("chat:r", sub)
            for i in range(30):
                hubs[i % len(hubs)].publish("chat:r", {"type": "message", "from": i % len(hubs), "i": i},
                                            seq=i + 1)
            for sub in subs:
                await sub.wait_for(30)
            for sub in subs:
                assert sorted(o.seq for o in sub.got if o.seq is not None) == list(range(1, 31))
                for origin in range(len(hubs)):  # each node's messages in the order it sent them
                    mine = [o.obj["i"] for o in sub.got if o.obj["from"] == origin]
                    assert mine == sorted(mine)

    run(main())
