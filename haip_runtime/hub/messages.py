"""Handlers of what members say: MESSAGE (a turn for every agent), MESSAGE_UPDATE (an author's edit), RUN_CANCEL."""

from __future__ import annotations

from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.context import HubContext
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import parse_payload
from haip_runtime.protocol.envelope import Envelope, Event
from haip_runtime.protocol.events import Channel, ErrorCode, EventType
from haip_runtime.session.session import Session


async def message(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    transaction = ctx.open_transaction(session, envelope)
    message = parse_payload(envelope, p.Message)
    for slot in transaction.agents.values():
        schema = slot.instance.input_schema
        if schema is not None and isinstance(envelope.payload, dict):
            parse_payload(envelope, schema)
    transaction.admit_runs(session, len(transaction.agents), envelope.id)
    # A client's trace, continued by the runs: the envelope's own, else that of the request that opened the stream.
    traceparent = (envelope.model_extra or {}).get("traceparent") or session.traceparent
    transaction.user_message(
        session, message.text, envelope.payload_dict, traceparent if isinstance(traceparent, str) else None
    )


async def message_update(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    transaction = ctx.member_transaction(session, envelope)
    update = parse_payload(envelope, p.MessageUpdate)
    if not transaction.edit_message(session, update.message_id, update.text):
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            "you can only edit your own messages",
            related_id=envelope.id,
            detail={"where": "/payload/message_id"},
        )
    update_payload = {**update.dump(), "author": session.user}
    transaction.publish(
        Event(EventType.MESSAGE_UPDATE, update_payload, channel=Channel.USER, exclude=frozenset({session.id}))
    )


async def run_cancel(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    transaction = ctx.member_transaction(session, envelope)
    request = parse_payload(envelope, p.RunCancel)
    if not transaction.cancel_run(request.run_id):
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            f"no running run {request.run_id!r}",
            related_id=envelope.id,
            detail={"where": "/payload/run_id"},
        )
