"""Moderation as a person in the chat page sees it (token mode, real Chromium): a moderator's
tombstone replaces the message live and in every later read, and a removed member is told so."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.sync.client import connect

from tests.browser.conftest import PageHandle
from tests.servers import ServerProcess, free_port

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips (or, under CI, fails) these tests
    expect = None  # type: ignore[assignment]

SECRET = "moderation-" + "s" * 40


def mint(sub: str, *roles: str) -> str:
    return jwt.encode({"sub": sub, "name": sub.capitalize(), "roles": list(roles), "exp": time.time() + 300},
                      SECRET, algorithm="HS256")


@pytest.fixture
def chat_server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(free_port(), tmp_path / "data", "--auth=token", "--jwt_secret=" + SECRET,
                        "--simulated_sensors=", "--host_metrics=False", log_path=tmp_path / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Person:
    """A chat client outside the browser (websockets' sync client), joined to the lobby."""

    def __init__(self, opened: ExitStack, srv: ServerProcess, sub: str, *roles: str) -> None:
        self.ws = opened.enter_context(connect("ws://127.0.0.1:%d/ws/chat?token=%s" % (srv.port, mint(sub, *roles))))
        assert self.next("welcome")["user"]["id"] == sub
        self.ws.send(json.dumps({"type": "join", "room": "lobby"}))
        self.next("joined")

    def next(self, mtype: str) -> dict[str, Any]:
        while True:
            msg = json.loads(self.ws.recv(timeout=10))
            if msg["type"] in (mtype, "error"):
                assert msg["type"] == mtype, msg
                return msg

    def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.ws.send(json.dumps(msg))
        return self.next("ack")


def test_a_tombstone_replaces_the_message_on_the_page_and_a_removal_is_told(
        chat_server: ServerProcess, make_page: Callable[..., PageHandle]) -> None:
    with ExitStack() as opened:
        check_moderation(make_page(), Person(opened, chat_server, "bob"),
                         Person(opened, chat_server, "mo", "moderator"), chat_server.url)


def check_moderation(handle: PageHandle, bob: Person, mod: Person, base: str) -> None:
    page = handle.page
    page.goto(base + "/chat?token=" + mint("ann"))
    expect(page.locator("#chat")).to_have_attribute("data-joined", "true")
    bob.ask({"type": "say", "room": "lobby", "text": "nice day", "cid": "b1"})
    spam = bob.ask({"type": "say", "room": "lobby", "text": "buy cheap pills", "cid": "b2"})["seq"]
    texts = page.locator("#messages .msg .msg-text")
    expect(texts).to_have_text(["nice day", "buy cheap pills"])
    assert mod.ask({"type": "delete", "room": "lobby", "seq": spam})["target"] == spam
    # Live: the message is replaced in place, not appended to or left as it was.
    expect(texts).to_have_text(["nice day", "Message deleted"])
    expect(page.locator("#messages .msg.deleted")).to_have_count(1)
    # A later read (the page loaded again: history from the server) shows it deleted too.
    page.reload()
    expect(page.locator("#chat")).to_have_attribute("data-joined", "true")
    expect(texts).to_have_text(["nice day", "Message deleted"])
    assert "buy cheap pills" not in page.content()
    # Removed from the room by the moderator: the page says so and leaves it.
    mod.ask({"type": "remove_member", "room": "lobby", "user": "ann"})
    expect(page.locator("#notices .notice-text").filter(has_text="You were removed from #lobby")).to_have_count(1)
    assert not handle.page_errors, handle.page_errors
