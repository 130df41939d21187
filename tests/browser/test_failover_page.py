"""The chat page behind nginx survives the death of its node (real Chromium).

Two nodes on one Redis, conf/nginx.conf.example in front (TLS, tests/cluster/nginx.py).
Alice's node is killed with SIGKILL: her page (static/js/client.js: reconnect with jittered
backoff) comes back through nginx on the other node, resumes the room without reloading
it, and what she writes reaches Bob once.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import PageHandle
from tests.browser.test_chat_page import assert_clean, assert_no_duplicates, messages, open_chat, say
from tests.cluster.nginx import Nginx, require_nginx
from tests.cluster.nodes import Node
from tests.redis_server import RedisServer

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips (or, under CI, fails) these tests
    expect = None  # type: ignore[assignment]

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Nginx, list[Node]]]:
    require_nginx()
    redis = RedisServer(str(tmp_path / "redis")).start()
    nodes: list[Node] = []
    proxy: Nginx | None = None
    try:
        nodes = [Node(tmp_path, i, redis.url).start() for i in range(2)]
        proxy = Nginx(str(tmp_path / "nginx"), [n.port for n in nodes]).start()
        yield proxy, nodes
    finally:
        if proxy is not None:
            proxy.stop()
        for node in nodes:
            node.stop()
        redis.stop()


def wait_for(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for %s" % fn)


def test_the_chat_page_survives_its_node_dying_behind_nginx(cluster: tuple[Nginx, list[Node]],
                                                            make_page: Callable[..., PageHandle]) -> None:
    proxy, nodes = cluster
    alice = open_chat(make_page, proxy.url, "alice", ignore_https_errors=True)
    # Alice's socket is the only one yet: her node is the one holding a connection.
    home = wait_for(lambda: next((n for n in nodes if n.connections() == 1), None))
    bob = open_chat(make_page, proxy.url, "bob", ignore_https_errors=True)
    a, b = alice.page, bob.page
    say(a, "before the crash")
    expect(messages(b, "before the crash")).to_have_count(1)

    states: list[str] = []
    a.expose_function("noteState", lambda state: states.append(state))
    a.evaluate("""() => new MutationObserver(() => window.noteState(document.querySelector('#conn-state')
        .dataset.state)).observe(document.querySelector('#conn-state'), {attributes: true})""")
    home.signal(signal.SIGKILL)
    survivor = next(n for n in nodes if n is not home)
    wait_for(lambda: survivor.connections() == 2, 20)  # both pages are on the node that is left
    expect(a.locator("#conn-state")).to_have_attribute("data-state", "open")
    expect(a.locator("#chat")).to_have_attribute("data-joined", "true")
    assert "reconnecting" in states, states  # the page saw its connection drop, and came back

    say(a, "after the crash")
    expect(messages(b, "after the crash")).to_have_count(1)
    expect(a.locator("#messages .msg.own").filter(has_text="after the crash")).not_to_have_class(
        re.compile(r"\bpending\b"))
    say(b, "welcome back")
    expect(messages(a, "welcome back")).to_have_count(1)
    for page in (a, b):
        for text in ("before the crash", "after the crash", "welcome back"):
            expect(messages(page, text)).to_have_count(1)
        assert_no_duplicates(page)
        # The same Redis, the same epoch: the room was resumed, not reloaded.
        expect(page.locator("#notices")).not_to_contain_text("reloaded")
    assert_clean(alice, bob)
