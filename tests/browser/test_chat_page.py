"""The chat page in real Chromium: two people, one server, a restart in between.

Each test uses its own server (fresh data_dir) and two browser contexts, i.e.
two people with separate cookies and localStorage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

from tests.browser.conftest import PageHandle
from tests.servers import ServerProcess

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips (or, under CI, fails) these tests
    expect = None  # type: ignore[assignment]

XSS = "<img src=x onerror=alert(1)>"


def open_chat(make_page: Callable[..., PageHandle], base: str, name: str, *, rename: bool = False,
              **ctx: Any) -> PageHandle:
    """Open /chat as ``name`` and wait until in the lobby.

    By default the name is already saved (a returning person); with ``rename``
    the page opens as a guest and the name is typed into the name field."""
    handle = make_page(**ctx)
    page = handle.page
    if not rename:
        page.add_init_script(
            "try { if (!localStorage.getItem('rt.chat.name'))"
            " localStorage.setItem('rt.chat.name', JSON.stringify(%s)); } catch (e) {}" % json.dumps(name))
    page.goto(base + "/chat")
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    if rename:
        expect(page.locator("#chat")).to_have_attribute("data-joined", "true")
        page.fill("#name-input", name)
        page.press("#name-input", "Enter")
    expect(page.locator("#member-list .member.self .member-name")).to_have_text(name)
    expect(page.locator("#chat")).to_have_attribute("data-joined", "true")
    expect(page.locator("#room-name")).to_have_text("lobby")
    return handle


def say(page: Any, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")
    expect(page.locator("#text")).to_have_value("")


def messages(page: Any, text: str) -> Any:
    """Message bubbles in the visible list whose text is exactly ``text``."""
    return page.locator("#messages .msg .msg-text").filter(has_text=re.compile("^%s$" % re.escape(text)))


def assert_clean(*handles: PageHandle) -> None:
    for h in handles:
        assert h.page_errors == [], h.page_errors
        assert h.csp_violations() == [], h.csp_violations()
        assert h.dialogs == [], h.dialogs


def assert_no_duplicates(page: Any) -> None:
    seqs = page.locator("#messages .msg[data-seq]").evaluate_all("els => els.map(e => e.dataset.seq)")
    assert len(seqs) == len(set(seqs)), "a message is shown twice: %r" % seqs
    assert seqs == sorted(seqs, key=int), "messages out of order: %r" % seqs


def test_message_presence_and_typing(server: str, make_page: Callable[..., PageHandle]) -> None:
    alice = open_chat(make_page, server, "alice")
    bob = open_chat(make_page, server, "bob")
    a, b = alice.page, bob.page

    # Presence: both see both, with the count.
    for page in (a, b):
        expect(page.locator("#member-list .member-name")).to_have_text(
            ["alice", "bob"] if page is a else ["bob", "alice"])
        expect(page.locator("#member-count")).to_have_text("2")
        expect(page.locator("#room-sub")).to_have_text("2 people here")

    # Typing shows on the other side only.
    b.locator("#text").press_sequentially("hel")
    expect(a.locator("#typing")).to_have_text(re.compile(r"bob is typing"))
    expect(b.locator("#typing")).to_have_text("")

    say(b, "hello from bob")
    expect(messages(a, "hello from bob")).to_have_count(1)
    mine = b.locator("#messages .msg.own").filter(has_text="hello from bob")
    expect(mine).to_have_count(1)
    expect(mine).not_to_have_class(re.compile(r"\bpending\b"))
    expect(mine).to_have_attribute("data-seq", "1")
    # The receiver shows it as someone else's, with the name; typing is cleared by it.
    theirs = a.locator("#messages .msg").filter(has_text="hello from bob")
    expect(theirs).not_to_have_class(re.compile(r"\bown\b"))
    expect(theirs.locator(".msg-name")).to_have_text("bob")
    expect(a.locator("#typing")).to_have_text("")

    # A reply from alice, and bob's second message groups under the first.
    say(a, "hi bob")
    expect(messages(b, "hi bob")).to_have_count(1)
    say(b, "how are you?")
    expect(messages(a, "how are you?")).to_have_count(1)
    expect(b.locator("#messages .msg.own")).to_have_count(2)
    for page in (a, b):
        assert_no_duplicates(page)
    assert_clean(alice, bob)


def test_user_text_is_never_html(server: str, make_page: Callable[..., PageHandle]) -> None:
    alice = open_chat(make_page, server, "alice")
    bob = open_chat(make_page, server, "bob")
    say(alice.page, XSS)
    for handle in (alice, bob):
        page = handle.page
        bubble = messages(page, XSS)
        expect(bubble).to_have_count(1)
        expect(bubble).to_have_text(XSS)
        assert page.locator("#messages img").count() == 0
    expect(alice.page.locator("#messages .msg.own")).not_to_have_class(re.compile(r"\bpending\b"))
    # Give a (wrongly) created image the moment it would need to fail and fire onerror.
    bob.page.evaluate("() => new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)))")
    assert_clean(alice, bob)


def test_reconnect_after_server_restart(server_process: ServerProcess,
                                        make_page: Callable[..., PageHandle]) -> None:
    base = server_process.url
    alice = open_chat(make_page, base, "alice")
    bob = open_chat(make_page, base, "bob")
    a, b = alice.page, bob.page
    say(a, "before the restart")
    expect(messages(b, "before the restart")).to_have_count(1)

    server_process.stop()
    for page in (a, b):
        expect(page.locator("#conn-state")).to_have_attribute("data-state", re.compile("reconnecting|offline"))
        expect(page.locator("#conn-state")).to_have_text(re.compile(r"Reconnecting|Offline"))

    # Written while the server is down: pending, kept, sent after the reconnect.
    say(a, "written while down")
    pending = a.locator("#messages .msg.own").filter(has_text="written while down")
    expect(pending).to_have_class(re.compile(r"\bpending\b"))

    server_process.start()
    for page in (a, b):
        expect(page.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=20_000)
        expect(page.locator("#conn-state")).to_have_text("Connected")
        expect(page.locator("#chat")).to_have_attribute("data-joined", "true")

    expect(pending).not_to_have_class(re.compile(r"\bpending\b"))
    expect(messages(b, "written while down")).to_have_count(1)

    say(b, "after the restart")
    expect(messages(a, "after the restart")).to_have_count(1)
    expect(b.locator("#messages .msg.own").filter(has_text="after the restart")).not_to_have_class(
        re.compile(r"\bpending\b"))
    for page in (a, b):
        expect(page.locator("#member-count")).to_have_text("2")
        for text in ("before the restart", "written while down", "after the restart"):
            expect(messages(page, text)).to_have_count(1)
        assert_no_duplicates(page)
        # Same store, same epoch: the history was resumed, not reloaded.
        expect(page.locator("#notices")).not_to_contain_text("reloaded")
    assert page.locator("#messages .msg").count() == 3
    assert alice.page_errors == [] and bob.page_errors == []
    assert alice.csp_violations() == [] and bob.csp_violations() == []


def test_history_reloaded_when_the_store_is_reset(server_process: ServerProcess,
                                                 make_page: Callable[..., PageHandle]) -> None:
    """A new epoch (fresh store) means the old sequence numbers mean nothing: the list
    is replaced by the server's history, with a notice, and nothing is doubled."""
    base = server_process.url
    alice = open_chat(make_page, base, "alice")
    a = alice.page
    say(a, "from the old store")
    expect(a.locator("#messages .msg[data-seq='1']")).to_have_count(1)
    server_process.stop()
    shutil.rmtree(server_process.data_dir)
    server_process.start()
    expect(a.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=20_000)
    expect(a.locator("#notices")).to_contain_text("History of #lobby reloaded")
    expect(messages(a, "from the old store")).to_have_count(0)
    say(a, "into the new store")
    expect(a.locator("#messages .msg[data-seq='1']")).to_have_text(re.compile("into the new store"))
    expect(a.locator("#messages .msg")).to_have_count(1)
    assert alice.page_errors == [] and alice.csp_violations() == []


def test_composer_keys_and_length_counter(server: str, make_page: Callable[..., PageHandle]) -> None:
    alice = open_chat(make_page, server, "alice")
    a = alice.page
    counter, send = a.locator("#counter"), a.locator("#send")
    expect(send).to_be_disabled()
    expect(counter).to_be_hidden()
    a.fill("#text", "x" * 1700)
    expect(counter).to_have_text("300 left")
    a.fill("#text", "x" * 2001)
    expect(counter).to_have_text("1 over the limit")
    expect(send).to_be_disabled()
    a.press("#text", "Enter")  # refused: still there
    expect(a.locator("#text")).to_have_value("x" * 2001)
    a.fill("#text", "")
    expect(counter).to_be_hidden()
    # Shift+Enter is a new line; Enter sends both lines as one message.
    a.locator("#text").press_sequentially("line one")
    a.press("#text", "Shift+Enter")
    a.locator("#text").press_sequentially("line two")
    a.press("#text", "Enter")
    bubble = a.locator("#messages .msg.own .msg-text")
    expect(bubble).to_have_count(1)
    assert bubble.inner_text() == "line one\nline two"
    assert_clean(alice)


def test_rooms_and_unread(server: str, make_page: Callable[..., PageHandle]) -> None:
    alice = open_chat(make_page, server, "alice")
    bob = open_chat(make_page, server, "bob")
    a, b = alice.page, bob.page
    for page in (a, b):
        page.fill("#join-input", "Design Team")
        page.press("#join-input", "Enter")
        expect(page.locator("#room-name")).to_have_text("design-team")
        expect(page.locator("#chat")).to_have_attribute("data-joined", "true")
    # Alice goes back to the lobby; bob's message in design-team shows as unread for her.
    a.locator("#room-list .room-btn").filter(has_text="lobby").click()
    expect(a.locator("#room-name")).to_have_text("lobby")
    say(b, "design review at 3")
    badge = a.locator("#room-list .room-item").filter(has_text="design-team").locator(".badge")
    expect(badge).to_have_text("1")
    expect(a).to_have_title(re.compile(r"^\(1\) "))
    a.locator("#room-list .room-btn").filter(has_text="design-team").click()
    expect(messages(a, "design review at 3")).to_have_count(1)
    expect(badge).to_have_count(0)
    # Joined rooms are remembered across a reload.
    a.reload()
    expect(a.locator("#room-list .room-label")).to_have_text(["lobby", "design-team"])
    expect(a.locator("#room-name")).to_have_text("design-team")
    expect(messages(a, "design review at 3")).to_have_count(1)
    assert_clean(alice, bob)


def test_rename_is_seen_by_others(server: str, make_page: Callable[..., PageHandle]) -> None:
    """Alice's own page follows her rename at once."""
    alice = open_chat(make_page, server, "alice")
    bob = open_chat(make_page, server, "bob", rename=True)  # typed into the name field
    b = bob.page
    expect(b.locator("#name-input")).to_have_value("bob")
    expect(b.locator("#me-avatar")).to_have_text("B")
    say(b, "renamed")
    expect(alice.page.locator("#messages .msg").filter(has_text="renamed").locator(".msg-name")).to_have_text("bob")
    # Speaking updates the member list on the other side too.
    expect(alice.page.locator("#member-list .member-name")).to_have_text(["alice", "bob"])
    assert_clean(alice, bob)


def test_rename_updates_presence_of_others(server: str, make_page: Callable[..., PageHandle]) -> None:
    alice = open_chat(make_page, server, "alice")
    open_chat(make_page, server, "bob", rename=True)
    expect(alice.page.locator("#member-list .member-name")).to_have_text(["alice", "bob"], timeout=3000)


def test_pages_render(server: str, make_page: Callable[..., PageHandle]) -> None:
    """The landing page links the three apps; unknown paths get the 404 page; no CSP errors.

    With BROWSER_SCREENSHOTS=<dir>, also saves screenshots of the pages there."""
    shots = os.environ.get("BROWSER_SCREENSHOTS")
    handle = make_page()
    page = handle.page
    page.goto(server + "/")
    for href in ("/chat", "/dashboard", "/edit/"):
        expect(page.locator(".apps a[href='%s']" % href)).to_have_count(1)
    expect(page.locator("#conn-state")).to_be_hidden()
    if shots:
        page.screenshot(path=os.path.join(shots, "index.png"), full_page=True)
    resp = page.goto(server + "/no/such/page")
    assert resp is not None and resp.status == 404
    expect(page.locator("h1")).to_have_text("This page isn't here")
    if shots:
        page.screenshot(path=os.path.join(shots, "404.png"))
        phone = make_page(viewport={"width": 390, "height": 760}, is_mobile=True, has_touch=True)
        phone.page.goto(server + "/")
        phone.page.screenshot(path=os.path.join(shots, "index-phone.png"), full_page=True)
    assert_clean(handle)


# The shared client (static/js/client.js) under a fake WebSocket: close codes and
# backoff in milliseconds, no server socket involved.
CLIENT_SCRIPT = """
async () => {
  const { RealtimeClient, socketURL } = await import('/static/js/client.js');
  const sockets = [];
  class FakeSocket {
    constructor(url) { this.url = url; this.readyState = 0; this.sent = []; sockets.push(this); }
    send(data) { this.sent.push(JSON.parse(data)); }
    close(code) { this.readyState = 3; this.closedWith = code; }
    accept() {
      this.readyState = 1;
      this.onopen && this.onopen({});
      this.onmessage && this.onmessage({ data: JSON.stringify({ type: 'welcome', user: { id: 'u1' } }) });
    }
    drop(code, reason = '') { this.readyState = 3; this.onclose && this.onclose({ code, reason }); }
  }
  Object.assign(FakeSocket, { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 });
  window.WebSocket = FakeSocket;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  // The longest backoff: a client that meant to reconnect has opened a socket within it.
  const MAX_DELAY = 120;
  const pastAnyRetry = () => sleep(2 * MAX_DELAY);
  const until = async (fn, ms = 2000) => {
    const end = Date.now() + ms;
    while (!fn()) { if (Date.now() > end) throw new Error('timed out: ' + fn); await sleep(5); }
  };
  const out = {};
  const states = [];
  let token = 't1';
  let refreshed = 0;
  const welcomes = [];
  const c = new RealtimeClient('/ws/test', {
    params: () => ({ name: 'a b', token, empty: '' }),
    onOpen: (w) => welcomes.push(w),
    onState: (s, d) => states.push(s),
    refreshToken: async () => { refreshed += 1; token = 't2'; },
    baseDelay: 20, maxDelay: MAX_DELAY, stableAfter: 10000,
  });
  out.sendBeforeOpen = c.send({ type: 'x' });
  c.connect();
  out.url = sockets[0].url;
  out.firstState = c.state;
  sockets[0].accept();
  out.afterWelcome = c.state;
  out.welcomeUser = welcomes[0].user.id;
  out.sendWhenOpen = c.send({ type: 'ping' });
  // 1006: reconnect with backoff; failures before open back off, capped by maxDelay.
  sockets[0].drop(1006);
  out.afterDrop = c.state;
  out.retryScheduled = c.detail.retryAt > Date.now() - 5;
  const delays = [];
  for (let i = 1; i <= 6; i++) {
    const t0 = Date.now();
    await until(() => sockets.length > i);
    delays.push(Date.now() - t0);
    if (i < 6) sockets[i].drop(1006);
  }
  out.maxDelay = Math.max(...delays);
  sockets[6].accept();
  out.reopened = c.state;
  // 4001: refresh the token, then reconnect at once with the new params.
  sockets[6].drop(4001, 'token expired');
  await until(() => sockets.length === 8);
  out.refreshed = refreshed;
  out.refreshedUrl = sockets[7].url;
  sockets[7].accept();
  // 1001 (server restart) reconnects; 4003 stops for good.
  sockets[7].drop(1001);
  await until(() => sockets.length === 9);
  sockets[8].accept();
  sockets[8].drop(4003, 'not allowed here');
  out.forbidden = { state: c.state, fatal: !!c.detail.fatal, message: c.detail.message };
  await pastAnyRetry();  // 4003: no retry at all
  out.socketsAfterForbidden = sockets.length;
  out.sendWhenClosed = c.send({ type: 'x' });
  // 1008 (flooding): a long pause, not a quick retry.
  const p = new RealtimeClient('/ws/test', { policyDelay: 60000, baseDelay: 20 });
  p.connect();
  sockets[sockets.length - 1].accept();
  sockets[sockets.length - 1].drop(1008, 'too many messages; slow down');
  out.policy = { state: p.state, wait: p.detail.retryAt - Date.now(), message: p.detail.message };
  const n = sockets.length;
  p.retryNow();
  out.retryNowOpened = sockets.length === n + 1;
  p.close();
  out.closedState = p.state;
  out.closedCode = sockets[sockets.length - 1].closedWith;
  await pastAnyRetry();  // closed by the page: no retry either
  out.socketsAfterClose = sockets.length - n - 1;
  out.states = states;
  out.wss = socketURL('/ws/x', { a: 1 }).startsWith('ws://');
  return out;
}
"""


def test_client_close_codes_and_backoff(server: str, make_page: Callable[..., PageHandle]) -> None:
    handle = make_page()
    page = handle.page
    page.goto(server + "/")
    r = page.evaluate(CLIENT_SCRIPT)
    host = server.split("//", 1)[1]
    assert r["url"] == "ws://%s/ws/test?close_codes=1&name=a+b&token=t1" % host
    assert r["sendBeforeOpen"] is False and r["sendWhenOpen"] is True and r["sendWhenClosed"] is False
    assert (r["firstState"], r["afterWelcome"], r["welcomeUser"]) == ("connecting", "open", "u1")
    assert r["afterDrop"] == "reconnecting" and r["retryScheduled"]
    assert r["maxDelay"] < 120 + 100, "backoff exceeded its cap: %r" % r["maxDelay"]
    assert r["reopened"] == "open"
    assert r["refreshed"] == 1 and r["refreshedUrl"].endswith("token=t2")
    assert r["forbidden"] == {"state": "closed", "fatal": True, "message": "Access denied: not allowed here"}
    assert r["socketsAfterForbidden"] == 9
    assert r["policy"]["state"] == "reconnecting" and r["policy"]["wait"] > 55_000
    assert "too many messages" in r["policy"]["message"]
    assert r["retryNowOpened"] is True
    assert (r["closedState"], r["closedCode"], r["socketsAfterClose"]) == ("closed", 1000, 0)
    assert r["wss"] is True
    assert "offline" not in r["states"]
    assert_clean(handle)
