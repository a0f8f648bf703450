"""``server/mcp_relay.py`` between two relays whose bus is in this process, so that what Redis does
rarely can be made to happen: a notice lost, one sent twice, Redis refusing a publish, a slow client,
a serving app that fails, a cancel in the same batch of notices as its request. Over a real Redis,
behind nginx and under ``serve --workers 2``: tests/behaviour/test_cluster_mcp_door.py, test_workers.py.

The bus hands a notice to the named node's relay as the feed does (``notice`` per message, in
order), says ``False`` for a node that does not listen, and can fail chosen publishes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskGroup
from starlette.types import Message

from haip_runtime.exceptions import ClusterError
from haip_runtime.server import mcp_relay
from haip_runtime.server.mcp_relay import FORWARDED, McpRelay, tagged, untagged

pytestmark = pytest.mark.anyio

SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "POST",
    "path": "/mcp",
    "raw_path": b"/mcp",
    "query_string": b"",
    "scheme": "http",
    "http_version": "1.1",
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8080),
    "headers": [(b"mcp-session-id", b"abc~b"), (b"authorization", b"Bearer x")],
}


class Bus:
    """Node ``node_id``'s side of a bus shared by the relays in ``net``."""

    def __init__(self, net: dict[str, McpRelay], node: str, lose: Callable[[bytes], bool]) -> None:
        self.net, self.node_id, self.lose = net, node, lose
        self.told: list[bytes] = []
        #: Notices Redis takes and nobody gets (a subscription lost and remade meanwhile).
        self.vanish: Callable[[bytes], bool] = lambda notice: False
        #: Notices Redis says nobody listened to (the node resubscribing after Redis restarted).
        self.deaf: Callable[[bytes], bool] = lambda notice: False
        #: Notices delivered whose publish still failed (its answer lost): the sender cannot know.
        self.unanswered: Callable[[bytes], bool] = lambda notice: False
        self.nodes = self  # (``Presence``: a node of the net beats)

    async def alive_until(self, node: str) -> tuple[int, int]:
        return (2, 1) if node in self.net else (0, 1)

    async def tell(self, node: str, notice: bytes) -> bool:
        await anyio.lowlevel.checkpoint()  # (a publish lets others run)
        self.told.append(notice)
        if self.lose(notice):
            raise ClusterError("redis: tell failed: Connection refused")
        if self.vanish(notice):
            return True
        relay = self.net.get(node)
        if relay is None or self.deaf(notice):
            return False
        verb, _, rest = notice.partition(b" ")
        relay.notice(verb, rest)
        if self.unanswered(notice):
            raise ClusterError("redis: tell failed: Timeout reading from socket")  # (after it ran)
        return True


class Client:
    """The asking node's client: what it was sent, in an order uvicorn would accept."""

    def __init__(self, slow: float = 0.0) -> None:
        self.sent: list[Message] = []
        self.leaves = anyio.Event()
        self.slow = slow

    async def receive(self) -> Message:
        await self.leaves.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        started = any(m["type"] == "http.response.start" for m in self.sent)
        assert started == (message["type"] == "http.response.body"), f"{message['type']} after {self.sent}"
        assert not self.sent or self.sent[-1].get("more_body", True), "a message after the response ended"
        if self.slow and message.get("body"):
            await anyio.sleep(self.slow)
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's channel without a listener is taken for a dead node at once (but in the grace's test)."""
    monkeypatch.setattr(mcp_relay, "LISTEN_GRACE", 0.0)


def pair(tg: TaskGroup, app: Any, lose: Callable[[bytes], bool] = lambda notice: False) -> tuple[McpRelay, McpRelay]:
    """Node ``a`` (it asks) and node ``b`` (it serves with ``app``), their tasks in ``tg``."""
    net: dict[str, McpRelay] = {}
    net["a"] = McpRelay(Bus(net, "a", lose), app, tg.start_soon)  # type: ignore[arg-type]
    net["b"] = McpRelay(Bus(net, "b", lose), app, tg.start_soon)  # type: ignore[arg-type]
    return net["a"], net["b"]


@asynccontextmanager
async def relays(app: Any, lose: Callable[[bytes], bool] = lambda notice: False) -> AsyncIterator[McpRelay]:
    """``pair``, both serving, until the block ends; ``a`` yielded."""
    async with anyio.create_task_group() as tg:
        a, b = pair(tg, app, lose)
        async with a.serving(), b.serving():
            yield a
        tg.cancel_scope.cancel()


def events(count: int) -> Any:
    """An app answering an event stream of ``count`` events."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for n in range(count):
            await send({"type": "http.response.body", "body": f"data: event {n}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def stream_of(count: int) -> bytes:
    return b"".join(f"data: event {n}\n\n".encode() for n in range(count))


def test_a_session_id_names_its_node_and_only_a_node_id_counts_as_one() -> None:
    assert untagged(tagged("6f2c", "web-1.eu")) == ("6f2c", "web-1.eu")
    assert untagged("6f2c") == ("6f2c", None)
    assert untagged("~web-1") == ("~web-1", None)  # no session before it
    assert untagged("6f2c~") == ("6f2c~", None)
    assert untagged("6f2c~no such node") == ("6f2c~no such node", None)  # never published to
    assert untagged("6f2c~" + "n" * 65) == ("6f2c~" + "n" * 65, None)


async def test_the_serving_node_sees_the_request_as_its_client_sent_it_and_the_client_gets_the_stream() -> None:
    seen: list[tuple[dict[str, Any], bytes]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, (await receive())["body"]))
        await events(3)(scope, receive, send)

    client = Client()
    async with relays(app) as a:
        assert await a.forward("b", SCOPE, b'{"jsonrpc": "2.0"}', client.receive, client.send)
    scope, body = seen[0]
    assert body == b'{"jsonrpc": "2.0"}' and scope[FORWARDED] is True
    assert {k: scope[k] for k in SCOPE} == SCOPE
    assert client.status == 200 and client.body == stream_of(3)
    assert client.sent[0]["headers"] == [(b"content-type", b"text/event-stream")]


async def test_a_node_that_does_not_listen_is_said_so_and_nothing_is_sent() -> None:
    client = Client()
    async with relays(events(1)) as a:
        assert not await a.forward("gone", SCOPE, b"{}", client.receive, client.send)
    assert client.sent == []


async def test_a_lost_part_cuts_the_response_short_instead_of_leaving_a_hole() -> None:
    client = Client()
    async with relays(events(3), lose=lambda notice: b"event 1" in notice) as a:
        await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    assert client.status == 200 and client.body == stream_of(1)  # event 0, then the end: never 0 and 2


async def test_a_lost_start_is_a_502_node_lost_and_no_body_goes_first() -> None:
    client = Client()
    async with relays(events(2), lose=lambda notice: b'"status"' in notice) as a:
        await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    assert client.status == 502 and json.loads(client.body)["error"]["code"] == "NODE_LOST"


async def test_a_part_sent_twice_is_passed_on_once() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await events(3)(scope, receive, send)

    client = Client()
    async with relays(app) as a:
        original = a.notice

        def twice(verb: bytes, rest: bytes) -> None:  # a publish redis-py retried after it had run
            original(verb, rest)
            if verb == b"mcp<" and b"event 1" in rest:
                original(verb, rest)

        a.notice = twice  # type: ignore[method-assign]
        await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    assert client.body == stream_of(3)


async def test_an_app_that_fails_at_the_serving_node_is_a_500_at_once() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    client = Client()
    async with relays(app) as a:
        with anyio.fail_after(mcp_relay.PING_SECONDS):  # not the silence of a dead node
            await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    assert client.status == 500 and json.loads(client.body)["error"]["code"] == "INTERNAL_ERROR"


async def test_an_app_that_fails_mid_stream_ends_the_stream_there() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: event 0\n\n", "more_body": True})
        raise RuntimeError("boom")

    client = Client()
    async with relays(app) as a:
        with anyio.fail_after(mcp_relay.PING_SECONDS):
            await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    assert client.status == 200 and client.body == stream_of(1) and client.sent[-1]["more_body"] is False


async def test_a_slow_client_gets_every_part(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mcp_relay, "PING_SECONDS", 0.05)  # its writes take longer than the silence allowed
    client = Client(slow=0.2)
    async with relays(events(3)) as a:
        await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    assert client.body == stream_of(3)


async def test_a_body_is_carried_in_parts_of_bounded_size_and_reassembled() -> None:
    big = bytes(range(256)) * (3 * mcp_relay.PART_BYTES // 256 + 7)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": big, "more_body": False})

    client = Client()
    async with relays(app) as a:
        await a.forward("b", SCOPE, b"{}", client.receive, client.send)
        told = a._bus.net["b"]._bus.told  # type: ignore[attr-defined]
    assert client.body == big
    assert max(len(notice) for notice in told) < mcp_relay.PART_BYTES + 200


async def test_more_waiting_than_allowed_cuts_the_response_and_stops_the_serving_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mcp_relay, "MAX_WAITING_BYTES", 64)
    stopped = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        async with anyio.create_task_group() as tg:

            async def until_disconnected() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                stopped.set()
                tg.cancel_scope.cancel()

            tg.start_soon(until_disconnected)
            for n in range(1000):
                await send({"type": "http.response.body", "body": f"data: event {n}\n\n".encode(), "more_body": True})

    client = Client(slow=0.01)
    async with relays(app) as a:
        with anyio.fail_after(10):
            await a.forward("b", SCOPE, b"{}", client.receive, client.send)
            await stopped.wait()
    assert client.status == 200 and client.sent[-1]["more_body"] is False
    assert client.body.startswith(stream_of(1)) and len(client.body) < len(stream_of(1000))


async def test_a_cancel_in_the_same_batch_as_its_request_reaches_the_app() -> None:
    disconnected = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the body
        if (await receive())["type"] == "http.disconnect":
            disconnected.set()

    async with relays(app) as a:
        b = a._bus.net["b"]  # type: ignore[attr-defined]
        head = {"id": "r1", "from": "a", "scope": {"method": "GET", "headers": []}}
        b.notice(b"mcp>", json.dumps(head).encode() + b"\n")  # one read of the feed held both
        b.notice(b"mcp!", b"r1")
        with anyio.fail_after(mcp_relay.PING_SECONDS / 2):  # not the next ping's doing
            await disconnected.wait()


async def test_a_client_that_leaves_is_a_disconnect_at_the_serving_node() -> None:
    disconnected, started = anyio.Event(), anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        started.set()
        await receive()
        if (await receive())["type"] == "http.disconnect":
            disconnected.set()

    client = Client()
    async with relays(app) as a:
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.forward, "b", SCOPE, b"{}", client.receive, client.send)
            with anyio.fail_after(5):
                await started.wait()
            client.leaves.set()
            with anyio.fail_after(mcp_relay.PING_SECONDS / 2):
                await disconnected.wait()


async def test_redis_refusing_the_request_is_a_503() -> None:
    client = Client()
    async with relays(events(1), lose=lambda notice: notice.startswith(b"mcp>")) as a:
        assert await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    assert client.status == 503 and json.loads(client.body)["error"]["code"] == "STORAGE_UNAVAILABLE"


async def test_a_request_that_reaches_a_node_that_stopped_serving_is_sent_back_at_once() -> None:
    client = Client()
    async with anyio.create_task_group() as tg:
        a, b = pair(tg, events(1))
        async with b.serving():
            pass  # b stops serving /mcp, and still hears the bus (its node is on its way out)
        async with a.serving():
            with anyio.fail_after(mcp_relay.PING_SECONDS / 2):
                served = await a.forward("b", SCOPE, b"{}", client.receive, client.send)
        tg.cancel_scope.cancel()
    assert served is False and client.sent == []  # the door serves it: "Session not found"


async def test_a_node_that_stops_while_it_serves_says_so_at_once() -> None:
    asked, stop = anyio.Event(), anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        asked.set()
        await anyio.sleep_forever()

    async def serve_until_stopped(b: McpRelay) -> None:
        async with b.serving():
            await stop.wait()

    client = Client()
    async with anyio.create_task_group() as tg:
        a, b = pair(tg, app)
        tg.start_soon(serve_until_stopped, b)
        async with a.serving(), anyio.create_task_group() as asking:
            asking.start_soon(a.forward, "b", SCOPE, b"{}", client.receive, client.send)
            with anyio.fail_after(mcp_relay.PING_SECONDS / 2):
                await asked.wait()
                stop.set()  # b's node stops (SIGTERM)
        tg.cancel_scope.cancel()
    error = json.loads(client.body)["error"]
    assert client.status == 503 and error["code"] == "NODE_LOST" and "stopped while serving" in error["message"]


async def test_a_serving_node_that_died_is_found_gone_when_it_is_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mcp_relay, "PING_SECONDS", 0.05)
    asked, streamed = anyio.Event(), anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        asked.set()
        if scope["method"] == "GET":  # a stream that started, then its node was killed
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"data: event 0\n\n", "more_body": True})
            streamed.set()
        await anyio.sleep_forever()

    answered, stream = Client(), Client()
    async with relays(app) as a:
        net = a._bus.net  # type: ignore[attr-defined]
        b = net["b"]
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.forward, "b", SCOPE, b"{}", answered.receive, answered.send)
                tg.start_soon(a.forward, "b", {**SCOPE, "method": "GET"}, b"", stream.receive, stream.send)
                await asked.wait()
                await streamed.wait()
                del net["b"]  # SIGKILL: nobody listens on its channel
        net["b"] = b
    assert answered.sent == []  # nothing was answered: the door serves it ("Session not found")
    assert stream.status == 200 and stream.body == stream_of(1) and stream.sent[-1]["more_body"] is False


async def test_a_request_lost_on_its_way_is_found_out_when_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mcp_relay, "PING_SECONDS", 0.05)
    client = Client()
    async with relays(events(1)) as a:
        a._bus.vanish = lambda notice: notice.startswith(b"mcp>")  # type: ignore[attr-defined]
        with anyio.fail_after(5):
            await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    error = json.loads(client.body)["error"]
    assert client.status == 502 and error["code"] == "NODE_LOST" and "lost on its way" in error["message"]


async def test_a_part_that_got_there_though_its_publish_failed_ends_the_response_cleanly() -> None:
    client = Client()
    async with relays(events(3)) as a:
        b = a._bus.net["b"]  # type: ignore[attr-defined]
        b._bus.unanswered = lambda notice: b"event 0" in notice
        await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    assert client.status == 200 and client.body == stream_of(1) and client.sent[-1]["more_body"] is False


async def test_a_request_published_twice_is_served_once() -> None:
    served: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        served.append((await receive())["body"])
        await events(1)(scope, receive, send)

    client = Client()
    async with relays(app) as a:
        await a.forward("b", SCOPE, b"call", client.receive, client.send)
        request = next(notice for notice in a._bus.told if notice.startswith(b"mcp>"))  # type: ignore[attr-defined]
        verb, _, rest = request.partition(b" ")
        a._bus.net["b"].notice(verb, rest)  # type: ignore[attr-defined]  # redis-py sent it again
        await anyio.wait_all_tasks_blocked()
    assert served == [b"call"] and client.body == stream_of(1)


async def test_redis_failing_a_ping_or_a_probe_once_cuts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mcp_relay, "PING_SECONDS", 0.05)
    failed: list[bytes] = []

    def once(notice: bytes) -> bool:  # the first ping of each side fails
        side = notice.split(b" ")[-1]
        if notice.startswith(b"mcp?") and side not in failed:
            failed.append(side)
            return True
        return False

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(0.4)  # several quiet moments
        await events(2)(scope, receive, send)

    client = Client()
    async with relays(app, lose=once) as a:
        await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    assert sorted(failed) == [b"a", b"b"]
    assert client.status == 200 and client.body == stream_of(2)


async def test_many_small_parts_waiting_for_a_slow_client_are_not_cut() -> None:
    client = Client(slow=0.001)
    async with relays(events(300)) as a:  # 300 parts queue at once (the bus delivers as fast as it can)
        await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    assert client.body == stream_of(300)


async def test_a_node_resubscribing_after_a_redis_restart_is_not_taken_for_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mcp_relay, "LISTEN_GRACE", 2.0)
    unheard = [0]

    def resubscribing(notice: bytes) -> bool:  # its first two publishes reach nobody
        unheard[0] += notice.startswith(b"mcp>")
        return notice.startswith(b"mcp>") and unheard[0] <= 2

    client = Client()
    async with relays(events(1)) as a:
        a._bus.deaf = resubscribing  # type: ignore[attr-defined]
        assert await a.forward("b", SCOPE, b"{}", client.receive, client.send)
    assert unheard[0] == 3 and client.status == 200 and client.body == stream_of(1)
