"""A property of the session layer: whatever the interleaving of sends, reads, dropped connections,
resumes and replay requests, a client that resumes from the last seq it holds ends with every
envelope exactly once, in order."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from haip_runtime.auth.tokens import Principal
from haip_runtime.config.models import SessionConfig
from haip_runtime.protocol.events import ALL_EVENTS, CloseCode
from haip_runtime.session.negotiation import negotiate
from haip_runtime.session.session import Session
from haip_runtime.session.window import Outbox

OUTBOX_LIMIT = 16

Action = tuple[str, int, int]
actions = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 30), st.just(0)),
        st.tuples(st.just("read"), st.integers(1, 40), st.just(0)),
        st.tuples(st.just("drop"), st.just(0), st.just(0)),
        st.tuples(st.just("resume"), st.just(0), st.just(0)),
        st.tuples(st.just("replay"), st.integers(0, 200), st.integers(0, 50)),
    ),
    max_size=60,
)


@dataclass
class Client:
    """What a careful client does: keeps frames by seq, delivers them in order, resumes from the last."""

    delivered: list[int] = field(default_factory=list)
    ahead: dict[int, int] = field(default_factory=dict)

    @property
    def last(self) -> int:
        return len(self.delivered)

    def receive(self, frame: str) -> None:
        envelope = json.loads(frame)
        seq, index = int(envelope["seq"]), envelope["payload"]["index"]
        if seq > self.last:
            assert self.ahead.setdefault(seq, index) == index, "one seq, two different envelopes"
        while self.last + 1 in self.ahead:
            self.delivered.append(self.ahead.pop(self.last + 1))


async def run(script: list[Action]) -> tuple[list[int], int]:
    session = Session(Principal("u"), negotiate(ALL_EVENTS), SessionConfig())
    client = Client()
    first = Outbox(OUTBOX_LIMIT)
    session.attach(first)
    outbox: Outbox | None = first
    frames = first.frames()
    sent = 0

    async def read(count: int) -> None:
        assert outbox is not None
        for _ in range(min(count, outbox.backlog)):
            try:
                client.receive(await frames.__anext__())
            except StopAsyncIteration:
                return

    for kind, a, b in script:
        if outbox is not None and outbox.close_code == CloseCode.TRY_AGAIN_LATER:
            kind = "drop"  # the runtime closed it: the client sees a dropped connection
        if kind == "send":
            for _ in range(a):
                session.send("INFO", {"event": "e", "index": sent})
                sent += 1
        elif kind == "read" and outbox is not None:
            await read(a)
        elif kind == "drop" and outbox is not None:
            session.detach(outbox)
            outbox.discard()
            outbox = None
        elif kind == "resume" and outbox is None:
            outbox = Outbox(OUTBOX_LIMIT)
            session.attach(outbox, last_rx_seq=client.last)
            frames = outbox.frames()
        elif kind == "replay" and outbox is not None and session.last_seq:
            start = min(a, session.last_seq - 1) + 1
            session.replay(start, start + b, "r")
    # Finally the client comes back for good and reads everything.
    if outbox is not None:
        session.detach(outbox)
    outbox = Outbox(10**6)
    session.attach(outbox, last_rx_seq=client.last)
    frames = outbox.frames()
    await read(10**6)
    return client.delivered, sent


@settings(max_examples=300, deadline=None)
@given(actions)
def test_every_envelope_arrives_once_and_in_order_whatever_happens(script: list[Action]) -> None:
    delivered, sent = anyio.run(run, script)
    assert delivered == list(range(sent))
