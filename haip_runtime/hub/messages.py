"""Handlers of what members say: MESSAGE (a turn for every agent, or the answer to a question asked in
words), MESSAGE_UPDATE (an author's edit), RUN_CANCEL (of a turn, or of a message still waiting)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pydantic import BaseModel

from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.context import HubContext
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import ENVELOPE_ROOM, parse_payload
from haip_runtime.protocol.envelope import Envelope, Event
from haip_runtime.protocol.events import Channel, ErrorCode, EventType
from haip_runtime.session.questions import Question
from haip_runtime.session.session import Session, may_answer

logger = logging.getLogger(__name__)


async def message(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    transaction = ctx.open_transaction(session, envelope)  # (its size was checked by the router: check_forwardable)
    message = checked_message(envelope, [slot.instance.input_schema for slot in transaction.agents.values()])
    if answered_if_asked(ctx, session, transaction, message.text, envelope.id):
        return
    if message.message_id is not None and ctx.speech is not None and ctx.speech.holds(transaction, message.message_id):
        raise ProtocolError(  # an audio message's id (a voice tester's find: a cancel naming it was then ambiguous)
            ErrorCode.INVALID_PAYLOAD,
            f"message_id {message.message_id!r} is already used in this transaction (by an audio message)",
            related_id=envelope.id,
            detail={"where": "/payload/message_id"},
        )
    if message.message_id is not None and transaction.message_id_taken(message.message_id):
        if transaction.said_before(session.user, message.message_id, message.text):
            logger.info("transaction %s: message %s came again; taken once", transaction.id, message.message_id)
            return  # (a tester's find: a client re-sending after a restart had the agent answer it twice)
        # (An edit goes by message_id: another's id would let its author edit, or seem to edit, theirs.)
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            f"message_id {message.message_id!r} is already used in this transaction",
            related_id=envelope.id,
            detail={"where": "/payload/message_id"},
        )
    # A client's trace, continued by the runs: the envelope's own, else that of the request that opened the stream.
    traceparent = (envelope.model_extra or {}).get("traceparent") or session.traceparent
    trace = traceparent if isinstance(traceparent, str) else None
    transaction.user_message(session, message.text, envelope.payload_dict, envelope.id, trace)


def check_forwardable(envelope: Envelope, max_bytes: int) -> None:
    """``MESSAGE_TOO_LARGE`` for an envelope whose frame leaves no room for the one it is forwarded or
    stored in (the author, the runtime's ids and seqs): the other members' clients take frames up to
    ``server.max_frame_bytes`` and close on a larger one, at every join and resume again, the event
    being in the log (the AG-UI door's case, a prober's find; a frame at the limit was this one). The
    router checks every envelope but audio's (``AUDIO`` has limits of its own): an edit's text, an
    end's reason and a tool call's arguments were forwarded past the limit too (a prober's find)."""
    limit = max_bytes - ENVELOPE_ROOM
    if envelope.size > limit:
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"a {envelope.type} is at most {limit} bytes (server.max_frame_bytes less room for the envelope it"
            " is forwarded in)",
            related_id=envelope.id,
            detail={"where": "frame", "limit": limit},
        )


#: The fields of a plain message's object form (PROTOCOL.md section 5): with only these, it is the text form.
PLAIN_MESSAGE = frozenset({"text", "author", "message_id"})


def structured(payload: object) -> bool:
    """Whether a MESSAGE payload carries fields of its own, which an agent's ``input_schema`` checks. Plain
    text, as a string or as ``{"text", "author"?, "message_id"?}``, is not: a client that names its message
    (to edit it later, or to know the runs that answer it) must not have it refused where the string passes."""
    return isinstance(payload, dict) and not payload.keys() <= PLAIN_MESSAGE


def checked_message(envelope: Envelope, schemas: Iterable[type[BaseModel] | None]) -> p.Message:
    """A MESSAGE's payload as a message, checked against the agents' input schemas (those that have one)
    when it carries fields of its own; ``ProtocolError`` (``INVALID_PAYLOAD``, the field's JSON pointer)
    if it does not fit one. Such a payload may leave out ``text`` (its fields are the message): the
    turn's ``text`` is then ``""``. The harness (``haip_runtime.testing``) checks with this too."""
    declared = [schema for schema in schemas if schema is not None]
    payload = envelope.payload
    if declared and isinstance(payload, dict) and structured(payload):
        for schema in declared:
            parse_payload(envelope, schema)
        if "text" not in payload:
            envelope = envelope.model_copy(update={"payload": {**payload, "text": ""}})
    return parse_payload(envelope, p.Message)


def answered_if_asked(ctx: HubContext, session: Session, transaction: Transaction, text: str, related_id: str) -> bool:
    """Whether ``text`` (typed, or the transcript of what the member said) answers a question they were
    asked in words; if so it is taken as the answer and is not a message to the agent."""
    question = session.questions.first(transaction.id)
    if question is None or not may_answer(session.principal):
        return False  # (asked before a resume with a token whose roles may not answer: words, not an answer)
    return answered_in_words(ctx, session, transaction, question, text, related_id)


def answered_in_words(
    ctx: HubContext, session: Session, transaction: Transaction, question: Question, text: str, related_id: str
) -> bool:
    """The member was asked in words (PROTOCOL.md section 12): their MESSAGE answers, and is not passed to
    the agent; text that is no answer gets a MESSAGE saying how to answer. ``False``: the call has moved
    on meanwhile, so the text is an ordinary message."""
    answer = question.read(text)
    if isinstance(answer, str):
        session.send(EventType.MESSAGE, answer, transaction=transaction.id, channel=Channel.AGENT)
        return True
    if ctx.tools is None:
        session.questions.close(question)
        return False
    try:
        ctx.answer_call(transaction, question.call_id, session.user, answer, related_id)
    except ProtocolError as refused:
        where = str((refused.detail or {}).get("where", ""))
        if where.startswith("/payload/input"):  # it does not fit the request's schema: asked again, in words
            field = where.removeprefix("/payload/input").strip("/") or "the answer"
            why = refused.message.rpartition(": ")[2].removesuffix("; the request still waits")
            again = f"{field}: {why}. Answer again, or say decline."
            session.send(EventType.MESSAGE, again, transaction=transaction.id, channel=Channel.AGENT)
            return True
        session.questions.close(question)
        return False  # answered by someone else, timed out or cancelled since
    session.questions.close(question)
    return True


async def message_update(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    transaction = ctx.member_transaction(session, envelope)
    update = parse_payload(envelope, p.MessageUpdate)
    if not transaction.edit_message(session.user, update.message_id, update.text):
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            f"no message {update.message_id!r} of yours to edit (you can only edit your own messages)",
            related_id=envelope.id,
            detail={"where": "/payload/message_id"},
        )
    update_payload = {**update.dump(), "author": session.user}
    transaction.publish(
        Event(EventType.MESSAGE_UPDATE, update_payload, channel=Channel.USER, exclude=frozenset({session.id}))
    )


def answered(transaction: Transaction, named: str) -> bool:
    """Whether the recent log shows ``named`` as a run, or a message a run answered (``named``: it, or its audio)."""
    return any(
        event.type == EventType.RUN_STARTED
        and named in (event.run_id, event.payload.get("message_id") if isinstance(event.payload, dict) else None)
        for event in transaction.recent()
    )


async def run_cancel(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    transaction = ctx.member_transaction(session, envelope)
    request = parse_payload(envelope, p.RunCancel)
    if ctx.speech is not None and ctx.speech.cancel(transaction, session, request.run_id):
        return  # an audio message still being transcribed
    # An audio message heard already: its transcript's turns (a voice tester's find: a client knows only the
    # audio's id until the transcript reaches it, and "stop" right after speaking was refused).
    heard = ctx.speech.transcript_of(transaction, request.run_id) if ctx.speech is not None else None
    if heard is not None and transaction.cancel_run(heard, session.user):
        return
    if transaction.cancel_run(request.run_id, session.user):
        return
    if ctx.speech is not None and ctx.speech.silence(transaction, request.run_id, session.user):
        return
    shared = transaction.shared
    asked = heard or request.run_id  # (an audio message's: the message its transcript is)
    if ctx.speech is not None and shared is not None and not shared.owner and answered(transaction, asked):
        # The node running the turns speaks their answers: it is asked to stop (a reviewer's find: a cancel
        # through another node of an answer written already was refused, and its speech went on).
        shared.control("silence", run_id=request.run_id, by=session.user)
        return
    raise ProtocolError(
        ErrorCode.INVALID_PAYLOAD,
        f"no running run or waiting message {request.run_id!r}",
        related_id=envelope.id,
        detail={"where": "/payload/run_id"},
    )
