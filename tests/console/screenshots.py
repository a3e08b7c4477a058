"""Make the README's console screenshots: a 3-node cluster on random ports in a temp dir, under
`imnode bench`, photographed in headless Chromium.

    .venv/bin/python -m tests.console.screenshots   # tests/console/console-{overview,playground}.png
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.console.conftest import CHROMIUM, CHROMIUM_ARGS, wait_for_number

HERE = Path(__file__).resolve().parent


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        config = write_cluster_toml(Path(folder) / "cluster.toml", nodes=3, initial=3)
        cluster = Cluster(config)
        bench = None
        try:
            cluster.start_all()
            bench = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "node.tools.cli",
                    "bench",
                    "--config",
                    str(config),
                    "--clients",
                    "20",
                    "--rate",
                    "300",
                    "--duration",
                    "90",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
                )
                page = browser.new_page(viewport={"width": 1400, "height": 1050})
                page.set_default_timeout(60_000)
                page.goto(f"{cluster.http('n1')}/console/")
                page.fill("#token", MANAGER_TOKEN)
                page.click("#login-form button")
                expect(page.locator("#members tr[data-role=leader]")).to_have_count(1)
                # A minute of charts under load.
                points = "Number(document.querySelector('#chart-sends').dataset.points)"
                wait_for_number(page, points, 3 * 45 - 1, timeout_s=90)
                page.screenshot(path=str(HERE / "console-overview.png"))
                page.click("#tabs button[data-tab=playground]")
                a, b = page.locator("#pane-a"), page.locator("#pane-b")
                a.locator(".connect").click()
                b.locator(".connect").click()
                expect(b.locator(".state")).to_contain_text("online")
                for pane, text in (
                    (a, "hi bob, this went through Raft"),
                    (b, "and back, from another node"),
                    (a, "ünïcödé survives the AES too"),
                ):
                    pane.locator(".text").fill(text)
                    pane.locator(".send").click()
                    other = b if pane == a else a
                    expect(other.locator(".log .in").last).to_contain_text(text)
                page.screenshot(path=str(HERE / "console-playground.png"))
                browser.close()
        finally:
            if bench is not None:
                bench.terminate()
                bench.wait(timeout=30)
            cluster.stop_all()


if __name__ == "__main__":
    main()
