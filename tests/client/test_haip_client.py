"""``HaipClient`` as front-end developers use it: the README's example, run as written, and a stalled line."""

from __future__ import annotations

import contextlib
import io
import re
import textwrap

import anyio
import pytest

from haip_runtime.client import HaipClient
from tests.support.serving import ROOT, live_server, make_config

pytestmark = pytest.mark.anyio


async def test_the_readmes_client_example_prints_the_answer_after_a_greeting() -> None:
    """An author's find: the example stopped at an agent's greeting, whose RUN_FINISHED came first."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"```python\nfrom haip_runtime.client import HaipClient\n\n(.*?)```", readme, re.S)
    assert found is not None
    example = found.group(1).replace("ws://127.0.0.1:8080/haip/websocket", "{url}")
    config = make_config({"agents": {"storyteller": {"plugin": "tests.support.agents:GreeterAgent"}}})
    with live_server(config) as live:
        code = "async def main(HaipClient, token, url):\n" + textwrap.indent(example.replace('"{url}"', "url"), "    ")
        space: dict[str, object] = {}
        exec(compile(code, "README.md", "exec"), space)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            await space["main"](HaipClient, live.token("ann"), live.ws_url)  # type: ignore[operator]
    # the answer (this agent says its history, the greeting first), not the greeting alone
    assert printed.getvalue() == "agent:hello ann, params=[] | user:a dragon"


async def test_a_stalled_line_is_noticed_by_the_servers_heartbeat_and_the_session_resumes() -> None:
    """A flaky-network tester's find: a line that stalls (no FIN, no RST) closes nothing; the client went
    on writing into it until the websockets library's own keepalive gave up (about 50 s). The runtime's
    HAI says how often it PINGs: twice that and 5 s of silence drop the line, and the client resumes."""
    from tests.support.netcut import netcut

    config = make_config({"session": {"heartbeat_interval_seconds": 1, "heartbeat_timeout_seconds": 1}})
    states: list[str] = []
    noticed = anyio.Event()

    def told(state: str) -> None:
        states.append(state)
        if state == "reconnecting":
            noticed.set()

    with live_server(config) as live, netcut(live.port) as line:
        url = f"ws://127.0.0.1:{line.port}/haip/websocket"
        async with HaipClient(url, token=live.token("ann"), on_connection=told) as client:
            tx = await client.start_transaction("echo")
            line.cut("hang")
            await client.send_text(tx, "typed on the stalled line")
            with anyio.fail_after(20):  # (the library's own keepalive takes about 40 s)
                await noticed.wait()
            line.heal()
            answer = await client.wait_for(lambda e: e.type == "MESSAGE_PART", timeout=20)
    assert answer.get("text") == "you said: typed on the stalled line" and states[-1] in ("resumed", "restarted")


async def test_a_handshake_that_stalls_costs_one_socket_not_a_reconnect_loop() -> None:
    """A re-tester's find: a reconnect whose socket opened and then heard nothing (the line stalled in the
    handshake) was given up after the client's timeout but never closed; when it ended later, it woke the
    newer connection's end, and the client reconnected without end: 1,800 sockets in 20 s. A server of a few
    lines stands in for the runtime: its second connection says nothing at all."""
    import json

    from websockets.asyncio.server import ServerConnection, serve

    connections: list[int] = []
    sent: list[int] = []  # (one per frame of the session "s1": its seq)
    states: list[str] = []
    settled, again = anyio.Event(), anyio.Event()

    async def handler(ws: ServerConnection) -> None:
        connections.append(len(connections) + 1)
        number = len(connections)
        if number == 2:  # the stalled line: not a byte, until the client lets it go
            await ws.wait_closed()
            return

        async def send(type: str, payload: dict[str, object], session: str = "s1") -> None:
            if session == "s1":  # the session's numbering goes on across its connections
                sent.append(1)
            seq = len(sent) if session == "s1" else 1
            envelope = {"id": f"s{number}-{seq}", "session": session, "seq": str(seq), "ts": "1", "channel": "SYSTEM"}
            await ws.send(json.dumps({**envelope, "transaction": None, "type": type, "payload": payload}))

        capabilities = {"heartbeat_interval_seconds": 1}
        hai_payload: dict[str, object] = {"haip_version": "1.1.2", "accept_major": [1], "capabilities": capabilities}
        await send("HAI", hai_payload, "s1" if number == 1 else f"p{number}")  # (a later socket's: provisional)
        hai = json.loads(await ws.recv())
        resumed = "last_rx_seq" in hai["payload"]
        await send("INFO", {"event": "session.ready", "user": "ann", "resumed": resumed, "epoch": "e"})
        if number == 1:
            ws.transport.abort()  # the line drops (no close frame)
            return
        while True:  # a healthy line: PINGs as the runtime sends them, until the client goes
            await anyio.sleep(0.5)
            await send("PING", {"nonce": str(len(sent))})

    def told(state: str) -> None:
        states.append(state)
        if state == "resumed":
            settled.set()
        if state == "reconnecting" and settled.is_set():
            again.set()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with HaipClient(f"ws://127.0.0.1:{port}", timeout=2, reconnect=30, on_connection=told):
            with anyio.fail_after(20):
                await settled.wait()  # the third socket: resumed
            with anyio.move_on_after(9):  # past the stalled socket's own silence limit (2 x 1 + 5 s)
                await again.wait()
    assert not again.is_set() and len(connections) == 3, (connections, states)
