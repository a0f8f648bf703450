"""Audio from clients (PROTOCOL.md section 9): ``AUDIO`` and ``AUDIO_CHUNK``, inline or two-frame.

``receive_audio`` checks a clip (a transaction the sender is in; its bytes from the binary frame
the transport attached, or from base64 ``data``; at most ``server.max_frame_bytes``), forwards it
to the other members as ``AUDIO_CHUNK`` on ``AUDIO_IN`` (each client gets it as it accepts it:
``AUDIO`` or ``AUDIO_CHUNK``, two-frame or inline), hands it to the speech desk (``voice.py``:
agents with ``speech`` hear it as words) and starts an ``on_audio`` turn for each agent that has
one. It does not know transports.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from haip_runtime.agents.api import Agent, AudioClip
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ProtocolError
from haip_runtime.hub.context import HubContext
from haip_runtime.protocol import payloads as p
from haip_runtime.protocol.codec import ENVELOPE_ROOM, parse_payload
from haip_runtime.protocol.envelope import Envelope, Event, new_id
from haip_runtime.protocol.events import Channel, ErrorCode, EventType
from haip_runtime.session.session import Session


async def receive_audio(ctx: HubContext, session: Session, envelope: Envelope) -> None:
    transaction = ctx.open_transaction(session, envelope)
    audio = parse_payload(envelope, p.Audio)
    named = audio.message_id is not None and envelope.type == EventType.AUDIO_CHUNK
    final = bool(audio.final)
    if named and ctx.speech is not None and ctx.speech.let_go(session, str(audio.message_id), final=final,
                                                             seq=audio.seq_in_message):  # fmt: skip
        return  # the rest of a message dropped (refused, cancelled, too large): nothing of it goes on
    # The bytes of one chunk: as much as fits, base64, in the envelope a member without binary frames gets.
    data = clip_bytes(envelope, audio, (ctx.config.server.max_frame_bytes - ENVELOPE_ROOM) * 3 // 4)
    if named and not data:  # (none, or empty: a reviewer's find, an empty one started on_audio turns of nothing)
        if final:
            end_message(ctx, session, transaction, audio, envelope.id)
        return
    if not data:
        raise ProtocolError(  # (a voice tester's find: it was dropped without a word)
            ErrorCode.INVALID_PAYLOAD,
            "the audio is empty: an AUDIO (or an AUDIO_CHUNK without message_id) needs its bytes",
            related_id=envelope.id,
            detail={"where": "/payload/data"},
        )
    message_id = audio.message_id or new_id()
    forwarded: dict[str, Any] = {
        "message_id": message_id,
        "mime": audio.mime,
        "data": base64.b64encode(data).decode("ascii"),
        "author": session.user,
    }
    if audio.duration_ms is not None:
        forwarded["duration_ms"] = audio.duration_ms
    if audio.seq_in_message is not None:
        forwarded["seq_in_message"] = audio.seq_in_message
    if audio.final:
        forwarded["final"] = True
    whole = envelope.type == EventType.AUDIO or audio.final or audio.message_id is None  # an unnamed chunk stands alone
    listeners = [slot for slot in transaction.agents.values() if type(slot.instance).on_audio is not Agent.on_audio]
    transaction.admit_runs(session, len(listeners), envelope.id)  # before anything is heard or sent
    alone = envelope.type == EventType.AUDIO or audio.message_id is None
    heard = ctx.speech is not None and ctx.speech.hear(
        transaction,
        session,
        message_id=message_id,
        mime=audio.mime,
        data=data,
        whole=whole,
        related_id=envelope.id,
        alone=alone,
    )
    if whole and not heard and not listeners:  # the other members get it; the sender learns no agent did
        unheard = {"event": "audio.unheard", "message_id": message_id, "agents": sorted(transaction.agents)}
        unheard["reason"] = "no agent in this conversation hears audio: none has a speech provider or an on_audio hook"
        session.send(EventType.INFO, unheard, transaction=transaction.id)
    transaction.publish(
        Event(EventType.AUDIO_CHUNK, forwarded, channel=Channel.AUDIO_IN, exclude=frozenset({session.id}))
    )
    clip = AudioClip(data, audio.mime, message_id, session.user, audio.duration_ms)
    for slot in listeners:
        transaction.start_run(slot, session, "", {"audio": clip, "message_id": message_id}, "on_audio")


def end_message(ctx: HubContext, session: Session, transaction: Transaction, audio: p.Audio, related_id: str) -> None:
    """A last chunk with no audio (``data?``: it only ends its message): the speech desk hears the message
    now, and the other members are told it ended. No ``on_audio`` turn: there is nothing new to hear
    (a reviewer's find: agents got an empty clip, and it counted against the run limit)."""
    assert audio.message_id is not None, "clip_bytes: only a named message's last chunk has no data"
    if ctx.speech is not None:
        ctx.speech.hear(transaction, session, message_id=audio.message_id, mime=audio.mime, data=b"", whole=True,
                        related_id=related_id)  # fmt: skip
    ended: dict[str, Any] = {"message_id": audio.message_id, "mime": audio.mime, "author": session.user, "final": True}
    if audio.seq_in_message is not None:
        ended["seq_in_message"] = audio.seq_in_message
    transaction.publish(Event(EventType.AUDIO_CHUNK, ended, channel=Channel.AUDIO_IN, exclude=frozenset({session.id})))


def clip_bytes(envelope: Envelope, audio: p.Audio, limit: int) -> bytes | None:
    """The clip's bytes: the binary frame of a two-frame pair, else the base64 ``data``; ``None`` for a
    named message's last ``AUDIO_CHUNK`` that carries none (it only ends the message)."""
    if envelope.bin_len is not None:
        if envelope.binary is None:
            raise ProtocolError(
                ErrorCode.BINARY_FRAME_ERROR,
                "bin_len announces a binary frame, which only WebSocket carries; send data as base64",
                related_id=envelope.id,
                detail={"where": "/bin_len"},
            )
        data = envelope.binary
    elif audio.data is not None:
        try:
            data = base64.b64decode(audio.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                "audio data is not base64",
                related_id=envelope.id,
                detail={"where": "/payload/data"},
            ) from exc
    elif envelope.type == EventType.AUDIO_CHUNK and audio.final and audio.message_id is not None:
        return None  # a last chunk that only ends its message (``data?``: a tester's find, it was refused)
    else:
        raise ProtocolError(
            ErrorCode.INVALID_PAYLOAD,
            "audio needs data (base64) or bin_len and a binary frame (only a final AUDIO_CHUNK may leave both out)",
            related_id=envelope.id,
            detail={"where": "/payload/data"},
        )
    if len(data) > limit:
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"audio of {len(data)} bytes exceeds the limit of {limit}",
            related_id=envelope.id,
            detail={"where": "/payload/data", "limit": limit},
        )
    return data
