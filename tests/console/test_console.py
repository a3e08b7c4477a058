"""The web console in headless Chromium against a real 3-node cluster (one cluster and one browser for the
module; each test its own page). Every wait is bounded: Playwright's expect/wait_for with timeouts.

The tests run in file order and the last one stops a node.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from node.client import open_client
from node.wire.protocol import Reason
from raft.commands import person_channel_id
from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.conftest import free_port
from tests.console.conftest import wait_for_number

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")  # PySyncObj's journal in child processes

expect: Any = None  # playwright.sync_api.expect, imported once Chromium is known to be there


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Cluster]:
    """n1..n3 with the audit plugin (a handler to switch), every send traced (the latency chart), and a
    webhook to a port nobody listens on, tried once: every message ends as a dead letter to look at. n4 is
    configured but never joins (a non-member, as in the example config)."""
    global expect
    from playwright.sync_api import expect as playwright_expect

    expect = playwright_expect
    folder = tmp_path_factory.mktemp("console")
    config = write_cluster_toml(folder / "cluster.toml", nodes=4, initial=3, tuning={"trace_sample_every": 1})
    with config.open("a") as out:
        out.write(
            "\n[[plugins]]\n"
            'handler = "node.plugins.examples.audit:audit"\n'
            'options = { words = ["forbidden"] }\n'
            "\n[webhook]\n"
            f'url = "http://127.0.0.1:{free_port()}/hook"\n'
            'events = ["msg.notify"]\n'
            "attempts = 1\n"
            "backoff_initial_s = 0.05\n"
            "timeout_s = 1.0\n"
        )
    running = Cluster(config)
    try:
        running.start_all()
        yield running
    finally:
        running.stop_all()


def call(cluster: Cluster, node_id: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{cluster.http(node_id)}{path}", data=data, method=method)
    request.add_header("token", MANAGER_TOKEN)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def send_http(
    cluster: Cluster, node_id: str, sender: str, channel_id: str, channel_type: int, text: str
) -> Any:
    payload = base64.b64encode(json.dumps({"content": text, "type": 1}).encode()).decode()
    body = {"from_uid": sender, "channel_id": channel_id, "channel_type": channel_type, "payload": payload}
    return call(cluster, node_id, "POST", "/message/send", body)


def log_in(page: Any, cluster: Cluster, node_id: str = "n1", token: str = MANAGER_TOKEN) -> None:
    page.goto(f"{cluster.http(node_id)}/console/")
    page.fill("#token", token)
    page.click("#login-form button")


class Traffic:
    """alice on n1 sends to bob on n2 over the binary protocol until stopped (a thread running trio)."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._stop = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the traffic thread did not stop"

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by the test that waits on the charts
            self.error = exc

    async def _main(self) -> None:
        (h1, p1), (h2, p2) = self._cluster.tcp("n1"), self._cluster.tcp("n2")
        async with (
            open_client(h1, p1, "traffic-a") as alice,
            open_client(h2, p2, "traffic-b") as bob,
            trio.open_nursery() as nursery,
        ):

            async def drain() -> None:
                while True:
                    await bob.recv(timeout_s=3600)

            nursery.start_soon(drain)
            while not self._stop.is_set():
                ack = await alice.send("traffic-b", 1, b'{"content":"load","type":1}')
                assert ack.reason_code == Reason.SUCCESS
                self.sent += 1
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()


# -- tests, in order ---------------------------------------------------------------------------------------
def test_a_wrong_token_gets_a_clear_message(cluster: Cluster, page: Any) -> None:
    page.goto(f"{cluster.http('n1')}/console/")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#tabs")).to_be_hidden()  # no tab to click before login (issue 21)
    log_in(page, cluster, token="not-the-token")
    expect(page.locator("#login-message")).to_contain_text("Wrong token")
    expect(page.locator("#app")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 1  # kept in the tab's session only
    assert page.evaluate("localStorage.length") == 0


def test_login_shows_three_members_and_a_leader(cluster: Cluster, page: Any) -> None:
    log_in(page, cluster)
    rows = page.locator("#members tbody tr")
    expect(rows).to_have_count(4)
    expect(page.locator("#members tr[data-role=leader]")).to_have_count(1)
    expect(page.locator("#members tr[data-role=follower]")).to_have_count(2)
    expect(page.locator("#members tr.leader .star")).to_have_count(1)
    expect(page.locator("#overview-message")).to_contain_text("3 members, leader n")
    expect(page.locator("#whoami")).to_have_text("served by n1")
    # n4 is configured and not a member: said so, not styled as a fault (issue 21).
    outsider = page.locator("#members tr[data-node=n4]")
    expect(outsider).to_have_attribute("data-role", "not a member")
    expect(outsider).to_have_class("not-member")
    expect(page.locator("#overview-message")).not_to_have_attribute("data-kind", "error")
    color = outsider.locator("td").first.evaluate("td => getComputedStyle(td).color")
    assert color != "rgb(185, 28, 28)", color  # not the fault red (--bad) of a member that is down
    # The tab shown is the tab highlighted.
    expect(page.locator("#tabs button.active")).to_have_attribute("data-tab", "overview")
    expect(page.locator("section.tab:visible")).to_have_attribute("id", "overview")
    # Nothing was sent yet: an empty chart says so instead of showing bare axes.
    expect(page.locator("#chart-latency text.empty")).to_have_text("no samples yet")


def test_log_out_is_no_error_and_forgets_the_token(cluster: Cluster, page: Any) -> None:
    log_in(page, cluster)
    expect(page.locator("#app")).to_be_visible()
    page.click("#logout")
    expect(page.locator("#login-message")).to_have_text("Logged out.")
    expect(page.locator("#login-message")).to_have_attribute("data-kind", "info")
    expect(page.locator("#token")).to_have_value("")
    assert page.evaluate("sessionStorage.length") == 0


def test_charts_move_while_messages_flow(cluster: Cluster, page: Any) -> None:
    log_in(page, cluster)
    with Traffic(cluster) as traffic:
        # Sends acknowledged on n1, RECVs written on n2, and sampled send → SENDACK times.
        wait_for_number(page, "Number(document.querySelector('#chart-sends').dataset.last)", 0)
        wait_for_number(page, "Number(document.querySelector('#chart-deliveries').dataset.last)", 0)
        wait_for_number(page, "Number(document.querySelector('#chart-latency').dataset.max)", 0)
        points = int(page.locator("#chart-sends").get_attribute("data-points") or 0)
        wait_for_number(page, "Number(document.querySelector('#chart-sends').dataset.points)", points)
        expect(page.locator("#chart-sends g.series")).to_have_count(3)  # one line per member
        expect(page.locator("#chart-lag g.series")).to_have_count(3)
        expect(page.locator("#chart-latency text.empty")).to_have_count(0)
    assert traffic.error is None, traffic.error
    assert traffic.sent > 0
    # Idle seconds have no latency sample: the line stops there, and starts again with the next traffic
    # rather than drawing a straight line across the idle time (issue 21).
    n1_latency = page.locator(N1_P99)
    before = n1_latency.count()
    wait_for_number(
        page,
        IDLE_SECONDS_AFTER_THE_LAST_LATENCY,
        1,
    )
    with Traffic(cluster) as again:
        wait_for_number(page, "state.series.n1.at(-1).ack_p99_ms ?? -1", 0)
        wait_for_number(
            page,
            f"document.querySelectorAll('{N1_P99}').length",
            before,
        )
    assert again.error is None, again.error


def test_a_channel_lookup_finds_the_message_the_test_sent(cluster: Cluster, page: Any) -> None:
    body = {"channel_id": "console-g1", "channel_type": 2, "subscribers": ["alice", "bob"]}
    assert call(cluster, "n2", "POST", "/channel", body)[0] == 200
    assert call(cluster, "n2", "POST", "/channel/blacklist_add", {**body, "uids": ["mallory"]})[0] == 200
    status, sent = send_http(cluster, "n3", "alice", "console-g1", 2, "probe 7f3a from the test")
    assert status == 200, sent
    log_in(page, cluster)
    page.click("#tabs button[data-tab=lookup]")
    page.fill("#channel-id", "console-g1")
    page.click("#channel-form button")
    row = page.locator(f"#channel-messages tr[data-seq='{sent['message_seq']}']")
    expect(row).to_contain_text("probe 7f3a from the test")
    expect(row.locator("pre.json")).to_contain_text('"content": "probe 7f3a from the test"')  # shown as JSON
    expect(row).to_contain_text("alice")
    expect(page.locator("#channel-subscribers")).to_contain_text("alice")
    expect(page.locator("#channel-subscribers")).to_contain_text("bob")
    expect(page.locator("#channel-blacklist")).to_contain_text("mallory")
    # The user: bob has the group as a conversation with the message unread.
    page.fill("#user-uid", "bob")
    page.click("#user-form button")
    expect(page.locator("#user-conversations tr[data-channel='console-g1'] .unread")).to_have_text("1")
    expect(page.locator("#user-message")).to_contain_text("bob: offline")


N1_P99 = "#chart-latency g.series[data-node=n1][data-key=ack_p99_ms] polyline"  # n1's p99 line segments
# n1's samples without a latency (no traced send that second) since its last one with a latency.
IDLE_SECONDS_AFTER_THE_LAST_LATENCY = (
    "(() => { const rows = state.series.n1; const last = rows.findLast((r) => r.ack_p99_ms !== null);"
    " return rows.filter((r) => last && r.t > last.t && r.ack_p99_ms === null).length; })()"
)


def test_a_person_channel_is_found_by_its_two_uids_in_either_order(cluster: Cluster, page: Any) -> None:
    status, sent = send_http(cluster, "n1", "pc-alice", "pc-bob", 1, "person probe 41c2")
    assert status == 200, sent
    stored = person_channel_id("pc-alice", "pc-bob")
    first, _, second = stored.partition("@")
    log_in(page, cluster)
    page.click("#tabs button[data-tab=lookup]")
    expect(page.locator("#lookup .hint")).to_contain_text("either order")
    for name in (stored, f"{second}@{first}"):  # as stored, and the other way round
        page.fill("#channel-id", name)
        page.select_option("#channel-type", "1")
        page.click("#channel-form button")
        expect(page.locator("#channel-message")).to_have_text(f"{stored}: 1 messages.")
        expect(page.locator("#channel-messages")).to_contain_text("person probe 41c2")


def test_an_empty_group_reads_as_empty_not_as_the_end_of_paging(cluster: Cluster, page: Any) -> None:
    body = {"channel_id": "console-empty", "channel_type": 2, "subscribers": ["alice"]}
    assert call(cluster, "n1", "POST", "/channel", body)[0] == 200
    log_in(page, cluster)
    page.click("#tabs button[data-tab=lookup]")
    page.fill("#channel-id", "console-empty")
    page.click("#channel-form button")
    expect(page.locator("#channel-result")).to_be_visible()
    expect(page.locator("#channel-message")).to_have_text("console-empty: 0 messages.")
    expect(page.locator("#msg-range")).to_have_text("no messages yet")
    page.click("#msg-older")  # paging from nothing finds nothing, and says so only then
    page.click("#msg-newer")
    expect(page.locator("#channel-message")).to_have_text("No more messages that way.")


def test_lookup_placeholders_are_not_cut_off(cluster: Cluster, page: Any) -> None:
    log_in(page, cluster)
    page.click("#tabs button[data-tab=lookup]")
    for selector in ("#channel-id", "#channel-login", "#user-uid", "#conn-uid"):
        if selector == "#conn-uid":
            page.click("#tabs button[data-tab=connections]")
        fits = page.locator(selector).evaluate(
            """input => {
                const style = getComputedStyle(input);
                const context = document.createElement('canvas').getContext('2d');
                context.font = `${style.fontSize} ${style.fontFamily}`;
                const padding = parseFloat(style.paddingLeft) + parseFloat(style.paddingRight);
                const room = input.clientWidth - padding;
                return [context.measureText(input.placeholder).width, room];
            }"""
        )
        assert fits[0] <= fits[1], (selector, fits)


def test_an_unknown_channel_gets_a_clear_message(cluster: Cluster, page: Any) -> None:
    log_in(page, cluster)
    page.click("#tabs button[data-tab=lookup]")
    page.fill("#channel-id", "no-such-channel")
    page.click("#channel-form button")
    message = page.locator("#channel-message")
    expect(message).to_contain_text("Unknown channel: no channel 'no-such-channel' of type 2")
    expect(page.locator("#channel-result")).to_be_hidden()


def test_a_handler_switched_off_and_on_takes_effect_on_every_node(cluster: Cluster, page: Any) -> None:
    log_in(page, cluster, node_id="n2")
    page.click("#tabs button[data-tab=handlers]")
    row = page.locator("#handler-table tr[data-handler=audit]")
    expect(row.locator(".state.on")).to_have_count(3)
    # Built-in steps are counted, not timed: said so instead of a p99 of 0 (issue 21); plugins are timed.
    permission = page.locator("#handler-table tr[data-handler=permission][data-event=send]")
    expect(permission.locator("td.p99")).to_have_text("not timed")
    expect(row.locator("td.p99")).not_to_have_text("not timed")
    distribute = page.locator("#handler-table tr[data-handler=distribute]")
    expect(distribute).to_contain_text("runs only while a plugin is on this chain")
    expect(page.locator("#handlers-message")).not_to_have_attribute("data-kind", "error")  # n4: no error
    assert send_http(cluster, "n1", "alice", "bob", 1, "forbidden words")[0] == 400  # the audit refuses it
    row.locator("button.toggle").click()
    expect(row.locator(".state.off")).to_have_count(3)
    expect(page.locator("#handlers-message")).to_contain_text("audit disabled through Raft")
    for node_id in ("n1", "n2", "n3"):
        status, handlers = call(cluster, node_id, "GET", "/admin/handlers")
        assert status == 200 and "audit" in handlers["disabled"], (node_id, handlers)
        assert send_http(cluster, node_id, "alice", "bob", 1, f"forbidden, via {node_id}")[0] == 200
    row.locator("button.toggle").click()
    expect(row.locator(".state.on")).to_have_count(3)
    for node_id in ("n1", "n2", "n3"):
        status, answer = send_http(cluster, node_id, "alice", "bob", 1, f"forbidden again, via {node_id}")
        assert status == 400, (node_id, answer)


def test_the_playground_sends_and_the_other_pane_receives_live_then_kick(cluster: Cluster, page: Any) -> None:
    log_in(page, cluster)
    page.click("#tabs button[data-tab=playground]")
    a, b = page.locator("#pane-a"), page.locator("#pane-b")
    expect(b.locator(".node option")).to_have_count(3)
    a.locator(".uid").fill("play-alice")
    b.locator(".uid").fill("play-bob")
    a.locator(".connect").click()
    b.locator(".connect").click()
    expect(a.locator(".state")).to_contain_text("online as play-alice on node #1, encrypted")
    expect(b.locator(".state")).to_contain_text("online as play-bob on node #2, encrypted")  # another node
    a.locator(".text").fill("hello from the console")
    a.locator(".send").click()
    expect(a.locator(".log .ack")).to_contain_text("committed: seq 1")
    expect(b.locator(".log .in")).to_contain_text("← play-alice: hello from the console")
    b.locator(".text").fill("and back")
    b.locator(".send").click()
    expect(a.locator(".log .in")).to_contain_text("← play-bob: and back")
    # The two clients are real connections: the connections tab lists them, and a kick ends one.
    page.click("#tabs button[data-tab=connections]")
    # n4 is configured, not a member: not asked about, and no red "not answering" (issue 21).
    expect(page.locator("#conn-message")).to_have_text("2 connections on 3 members.")
    expect(page.locator("#conn-message")).not_to_have_attribute("data-kind", "error")
    row = page.locator("#conn-table tr[data-uid=play-bob]")
    expect(row).to_contain_text("n2")
    expect(row).to_contain_text("v5")
    expect(page.locator("#conn-table tr[data-uid=play-alice]")).to_contain_text("n1")
    row.locator("button.kick").click()
    expect(page.locator("#conn-message")).to_contain_text("Kicked play-bob")
    expect(row).to_have_count(0)
    page.click("#tabs button[data-tab=playground]")
    expect(b.locator(".state")).to_contain_text("DISCONNECT reason 12: kicked by an operator")


def test_the_playground_streams_an_answer_word_by_word(cluster: Cluster, page: Any) -> None:
    log_in(page, cluster)
    page.click("#tabs button[data-tab=playground]")
    a, b = page.locator("#pane-a"), page.locator("#pane-b")
    expect(b.locator(".node option")).to_have_count(3)
    a.locator(".uid").fill("stream-bot")
    b.locator(".uid").fill("stream-reader")
    a.locator(".connect").click()
    b.locator(".connect").click()
    expect(b.locator(".state")).to_contain_text("online as stream-reader on node #2")  # another node
    a.locator(".stream").click()
    # The reader's pane shows the answer grow from EVENT packets, then the finish.
    answer = b.locator(".log li.stream")
    expect(answer).to_contain_text("← stream-bot: Streams grow word by word")
    expect(answer).to_contain_text("the whole answer from messagesync.  (closed)", timeout=30_000)
    expect(a.locator(".log .ack")).to_contain_text("finish committed as event seq 1")


def test_dead_letters_are_listed_and_replayed(cluster: Cluster, page: Any) -> None:
    log_in(page, cluster, node_id="n3")
    page.click("#tabs button[data-tab=deadletters]")
    # Every committed message became a msg.notify event the unreachable webhook refused once.
    page.locator("#dl-refresh").click()
    expect(page.locator("#dl-table tbody tr").first).to_contain_text("msg.notify", timeout=30_000)
    expect(page.locator("#dl-dropped")).to_contain_text(
        "0 dropped (oldest first; at most 10000 kept per stream)"
    )
    page.locator("#replay").click()
    expect(page.locator("#dl-message")).to_contain_text("Replayed on n", timeout=60_000)
    expect(page.locator("#dl-message")).to_contain_text("0 delivered")


def test_an_open_console_leaves_the_node_logs_quiet_at_info(cluster: Cluster, page: Any) -> None:
    """Issue 21: the Connections tab's polling logged an httpx line per node-to-node call at INFO (about 4
    a second on every node). The nodes run at INFO; library loggers only speak from WARNING."""
    log_in(page, cluster, node_id="n2")
    page.evaluate(  # count the console's /connz polls as they complete
        "window.connzPolls = 0; const original = window.fetch; window.fetch = (...args) =>"
        " original(...args).finally(() => { if (String(args[0]).includes('connz')) window.connzPolls += 1; })"
    )
    page.click("#tabs button[data-tab=connections]")
    wait_for_number(page, "window.connzPolls", 3)  # every member's /connz three times, via n2's fan-out
    for node_id in ("n1", "n2", "n3"):
        noisy = [
            line
            for line in cluster.log(node_id).splitlines()
            if any(name in line for name in (" httpx:", " httpcore", " hypercorn", "HTTP Request:"))
        ]
        assert not noisy, (node_id, noisy[:3])
        assert "INFO" in cluster.log(node_id)  # the log is at INFO: the node's own lines are there


def test_a_stopped_node_is_shown_down_and_the_page_keeps_working(cluster: Cluster, page: Any) -> None:
    log_in(page, cluster)
    expect(page.locator("#members tbody tr")).to_have_count(4)
    followers = page.locator("#members tr[data-role=follower]")
    expect(followers).to_have_count(2)
    victim = str(followers.last.get_attribute("data-node"))
    cluster.procs[victim].terminate()
    cluster.procs[victim].wait(timeout=15)
    expect(page.locator(f"#members tr[data-node={victim}]")).to_have_attribute("data-role", "down")
    expect(page.locator("#overview-message")).to_contain_text(f"{victim} is down")
    expect(page.locator("#members tr[data-role=leader]")).to_have_count(1)
    # The rest of the console still works.
    page.click("#tabs button[data-tab=lookup]")
    page.fill("#channel-id", "console-g1")
    page.click("#channel-form button")
    expect(page.locator("#channel-messages")).to_contain_text("probe 7f3a from the test")
    page.click("#tabs button[data-tab=handlers]")
    expect(page.locator("#handler-table tr[data-handler=audit] .state")).to_have_count(2)
    expect(page.locator("#handlers-message")).to_contain_text(f"{victim}: down")
