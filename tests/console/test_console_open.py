"""A node without a manager token (the single-node default): the console opens without a login and says
that anyone reaching the port can use it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import NodeProcess

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")  # PySyncObj's journal in the child


def test_without_a_manager_token_the_console_is_open_and_says_so(
    node_process: tuple[NodeProcess, dict[str, int]], page: Any
) -> None:
    from playwright.sync_api import expect

    proc, ports = node_process
    proc.start()
    page.goto(f"http://127.0.0.1:{ports['http']}/console/")
    expect(page.locator("#banner")).to_contain_text("No manager token is configured on this node")
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#logout")).to_be_hidden()
    expect(page.locator("#members tr[data-role=leader]")).to_have_count(1)
    expect(page.locator("#overview-message")).to_contain_text("1 member, leader n1")
