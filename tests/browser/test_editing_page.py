"""The editing page (/edit/<doc>) in real Chromium: two people typing into one document at once.

Each test has its own server (fresh data_dir) and two browser contexts (two
people with separate cookies and localStorage).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from tests.browser.conftest import PageHandle
from tests.servers import ServerProcess

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips (or, under CI, fails) these tests
    expect = None  # type: ignore[assignment]

pytestmark = pytest.mark.browser

SEED = "· middle ·"


def open_editor(make_page: Callable[..., PageHandle], base: str, doc: str, name: str) -> PageHandle:
    handle = make_page()
    page = handle.page
    page.add_init_script("try { localStorage.setItem('rt.chat.name', JSON.stringify(%s)); } catch (e) {}"
                         % json.dumps(name))
    page.goto("%s/edit/%s" % (base, doc))
    expect(page.locator("#editor")).to_have_attribute("data-state", "ready")
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    expect(page.locator("#text")).to_be_enabled()
    return handle


def server_doc(base: str, doc: str) -> dict[str, Any]:
    with urllib.request.urlopen("%s/api/docs/%s" % (base, doc), timeout=5) as resp:
        return json.loads(resp.read())


def settled(*handles: PageHandle, timeout: float = 10_000) -> str:
    """Wait until every page is synchronized at the same rev with the same text; return it."""
    for h in handles:
        h.page.wait_for_function(
            "() => window.__editor.state === 'synchronized' && document.querySelector('#editor').dataset.sync"
            " === 'saved'", timeout=timeout)
    revs = [h.page.evaluate("window.__editor.rev") for h in handles]
    top = max(revs)
    for h in handles:
        h.page.wait_for_function("rev => window.__editor.rev === rev && window.__editor.state === 'synchronized'",
                                 arg=top, timeout=timeout)
    texts = [h.page.evaluate("window.__editor.text") for h in handles]
    values = [h.page.input_value("#text") for h in handles]
    assert texts[0] == values[0], "the textarea and the OT client disagree"
    assert len(set(texts + values)) == 1, texts + values
    return texts[0]


def no_errors(*handles: PageHandle) -> None:
    for h in handles:
        assert not h.page_errors, h.page_errors
        assert not h.csp_violations(), h.csp_violations()


def test_two_pages_type_at_once_and_end_identical(make_page, server):
    ada = open_editor(make_page, server, "plans", "Ada")
    grace = open_editor(make_page, server, "plans", "Grace")
    expect(ada.page.locator("#people .person-name")).to_have_text(["Ada", "Grace"])
    ada.page.click("#text")
    ada.page.keyboard.type(SEED)
    assert settled(ada, grace) == SEED

    # Ada types at the start, Grace at the end, chunks interleaved so that both
    # always have edits in flight: every op crosses one of the other's.
    ada.page.click("#text")
    ada.page.keyboard.press("Control+Home")
    grace.page.click("#text")
    grace.page.keyboard.press("Control+End")
    ada_chunks = ["Hello ", "😀 ", "from ", "Ada", " 👍🏽", " — ", "first!", "\n"]
    grace_chunks = ["\nAnd ", "Grace ", "👍🏽", " was ", "here ", "😀", " too", "."]
    for a, g in zip(ada_chunks, grace_chunks):
        ada.page.keyboard.type(a)
        grace.page.keyboard.type(g)

    final = settled(ada, grace)
    assert final == "".join(ada_chunks) + SEED + "".join(grace_chunks)
    doc = server_doc(server, "plans")
    assert doc["text"] == final and doc["rev"] == ada.page.evaluate("window.__editor.rev")
    crossings = sum(h.page.evaluate("window.__editor.stats.concurrent") for h in (ada, grace))
    assert crossings > 0, "the edits never overlapped: the test did not test concurrency"

    # Each sees the other's cursor, with a name.
    grace.page.keyboard.press("Shift+ArrowLeft")
    expect(ada.page.locator(".rcaret .rcaret-label", has_text="Grace")).to_be_visible()
    expect(ada.page.locator(".rsel")).to_have_count(1)
    ada.page.keyboard.press("ArrowRight")
    expect(grace.page.locator(".rcaret .rcaret-label", has_text="Ada")).to_be_visible()
    expect(ada.page.locator("#sync-state")).to_have_text("Saved")
    expect(ada.page.locator("#doc-rev")).to_contain_text("rev ")

    # Grace reloads: the same text comes back, and Ada sees her leave and return.
    grace.page.reload()
    expect(grace.page.locator("#editor")).to_have_attribute("data-state", "ready")
    expect(grace.page.locator("#text")).to_have_value(final)
    expect(ada.page.locator("#people .person")).to_have_count(2)
    no_errors(ada, grace)


def test_edits_survive_a_restart_and_the_page_resumes(make_page, server, server_process: ServerProcess):
    ada = open_editor(make_page, server, "journal", "Ada")
    bob = open_editor(make_page, server, "journal", "Bob")
    ada.page.click("#text")
    ada.page.keyboard.type("before the restart 😀")
    before = settled(ada, bob)
    client_id = ada.page.evaluate("window.__editor.client")

    # Bob closes his tab; Ada keeps typing; Bob comes back and catches up.
    bob.page.close()
    ada.page.keyboard.type(" …while Bob was away")
    settled(ada)
    bob = open_editor(make_page, server, "journal", "Bob")
    expect(bob.page.locator("#text")).to_have_value(before + " …while Bob was away")

    server_process.restart()
    # Both pages reconnect on their own (close 1001) and resume from their revision.
    for h in (ada, bob):
        expect(h.page.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=15_000)
        expect(h.page.locator("#editor")).to_have_attribute("data-sync", "saved")
    assert server_doc(server, "journal")["text"] == before + " …while Bob was away"
    ada.page.keyboard.type(" and after 👍🏽")
    final = settled(ada, bob)
    assert final == before + " …while Bob was away and after 👍🏽"
    assert server_doc(server, "journal")["text"] == final
    assert ada.page.evaluate("window.__editor.client") == client_id  # resumed as the same client
    assert ada.page.evaluate("window.__editor.stats.catchUps") >= 1
    no_errors(ada, bob)
