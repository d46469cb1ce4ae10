"""The assistant page keeps a conversation on one version during a canary (`--sticky conversation`).

The page sends an `X-Lawtune-Conversation` id with every question: the same id for the turns of
one conversation, a new one after "New conversation". Real chromium and the chart-rendered gateway,
with test_assistant_page.py's stand-in upstream (the answer does not matter here).
"""

from __future__ import annotations

from tests.shared.serve.test_assistant_page import _page_values, browser, page_gateway, stand_in, tabs  # noqa: F401

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("auth", ["loopback", "pasteKey"])
def test_each_conversation_sends_one_id_and_a_new_chat_another(page_gateway, stand_in, tabs, auth):
    from tests.shared.serve.test_assistant_page import KEY

    tab = tabs(page_gateway.start(_page_values(auth=auth)) + "/")
    sent: list[str | None] = []
    tab.page.on("request", lambda r: sent.append(r.headers.get("x-lawtune-conversation")) if "/chat/completions" in r.url else None)
    if auth == "pasteKey":
        tab.page.get_by_label("API key").fill(KEY)
        tab.page.keyboard.press("Enter")
    tab.ask("What is a contract?")
    tab.wait_answers(1)
    tab.ask("And a lease?")
    tab.wait_answers(2)
    tab.page.locator("#new-chat").click()
    tab.ask("Something else")
    tab.wait_answers(1)
    assert len(sent) == 3 and all(s and len(s) == 24 for s in sent), sent
    assert sent[0] == sent[1] != sent[2], "one id per conversation"
    # The gateway passes it on (the canary hashes it: files/canary.js).
    assert len(stand_in.requests) == 3
