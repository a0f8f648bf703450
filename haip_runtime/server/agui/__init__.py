"""The AG-UI door: ``POST /ag-ui/{agent}`` takes AG-UI 1.0's ``RunAgentInput`` and answers with its
events over SSE: ``mapping`` turns HAIP events into AG-UI ones (docs/protocol-guide.md has it as a
table, event by event), ``endpoint`` is the route.

It is another door onto the same transactions, not a parallel system. AG-UI's ``threadId`` is the
transaction id: the first run on a thread starts the transaction (through the hub's ``begin``,
as TRANSACTION_START does), later runs continue it, and HAIP members who join it see the AG-UI
user's messages and the agent's answers live. The AG-UI user takes part as an ``AguiMember``, one
per thread and user, a member of the transaction like a session: it is handed every event
(``deliver``) and turns those of its open run into AG-UI events. A message goes in through
``Transaction.user_message``, as a HAIP MESSAGE does; approvals and input requests end the AG-UI
run with an interrupt outcome, and the next run's ``resume`` answers them through the tool proxy,
as a member's TOOL_UPDATE does (the HAIP run waits meanwhile).

Beyond AG-UI: every event has an SSE ``id`` (a per-thread counter), and a POST to the same thread
with ``Last-Event-ID`` gets what came after it, then the rest of the run live.
"""

from haip_runtime.server.agui.endpoint import AguiDoor

__all__ = ["AguiDoor"]
