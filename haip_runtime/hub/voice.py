"""Agents that listen and answer aloud (``agents.<name>.speech``; PROTOCOL.md section 9).

``SpeechDesk`` sits between members' audio and the transaction:

- ``hear``: a member's audio message (one ``AUDIO``, or ``AUDIO_CHUNK``s of one ``message_id``
  ending with ``final: true``; their bytes are joined) is transcribed by the provider of the first
  speech agent in the transaction, in a task of the hub, and published as that member's
  ``MESSAGE {text, spoken: true, audio_message_id}`` (the author gets it too); the agents answer it
  as any message. New audio from a member stops whatever the agents are speaking in that
  transaction (``INFO speech.interrupted``). ``RUN_CANCEL`` naming the audio message id, or the end
  of the transaction, stops its transcription.
- Speaking: the desk watches each transaction's events. A run of a speech agent that answers a
  spoken message (or any run, with ``reply_audio``), while some member accepts audio, gets a
  ``Speaker``: the run's message text is cut into sentences as it streams, each spoken and
  published as an ``AUDIO_CHUNK`` on ``AUDIO_OUT`` whose ``message_id`` is the text message's,
  with ``seq_in_message``, the sentence as ``text``, and ``final: true`` on the message's last.
  A cancelled run stops speaking.
"""

from __future__ import annotations

import base64
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from haip_runtime.agents.registry import AgentSpec
from haip_runtime.config.models import HaipConfig
from haip_runtime.conversation.transaction import Transaction
from haip_runtime.exceptions import ProtocolError, SpeechError
from haip_runtime.protocol.codec import AUDIO_MESSAGE_FRAMES
from haip_runtime.protocol.envelope import Event, new_id
from haip_runtime.protocol.errors import error_body
from haip_runtime.protocol.events import Channel, ErrorCode, EventType, RunOutcome, SpeechErrorCode
from haip_runtime.session.session import Session
from haip_runtime.speech import create_speech_providers
from haip_runtime.speech.provider import SpeechProvider, pcm_wav, wav_pieces
from haip_runtime.speech.sentences import SentenceSplitter

logger = logging.getLogger(__name__)

#: Audio messages one session may have half-sent (chunks without their final one) at once.
OPEN_CLIPS_PER_SESSION = 4
#: Transcript message ids remembered, so the runs answering them (perhaps after a wait) are spoken.
SPOKEN_REMEMBERED = 1024
#: What a member's client must accept to hear an answer (else it is not synthesized at all).
_AUDIO = frozenset({EventType.AUDIO, EventType.AUDIO_CHUNK})
#: The end of a spoken answer whose last sentence already went out: a WAV of no frames.
_EMPTY_WAV = pcm_wav(b"", 16_000)


#: What a spoken answer's envelope holds besides its base64 audio and its sentence (ids, seqs, fields).
SPOKEN_ENVELOPE_ROOM = 2048
#: Messages dropped (too long, cancelled) remembered at most per session (their later chunks are let go).
MAX_DROPPED = 64
#: How far ahead of a listener playing it from its first chunk an answer is spoken: past it, the next
#: sentence waits. The engine speaks much faster than real time, and a long answer sent whole at once
#: filled a session's replay window with audio in seconds: a drop of 3 s could no longer be resumed
#: (a voice tester's find). It also leaves less spoken for nothing when the listener talks over it.
SPEAK_AHEAD_SECONDS = 10.0


@dataclass
class _Clip:
    transaction: str
    mime: str
    data: bytearray


def _logged_message(transaction: Transaction, field: str, value: str) -> dict[str, Any] | None:
    """The payload of the latest ``MESSAGE`` of the transaction's recent log whose ``field`` is ``value``."""
    for event in reversed(transaction.recent()):
        body = event.payload if isinstance(event.payload, dict) else {}
        if event.type == EventType.MESSAGE and body.get(field) == value:
            return body
    return None


def speech_desk(config: HaipConfig, agents: Mapping[str, AgentSpec], spawn: Callable[..., None]) -> SpeechDesk | None:
    """The desk of the agents that use speech (with a provider per ``[speech.<id>]``), or ``None`` if none does."""
    if not any(spec.config.speech for spec in agents.values()):
        return None
    providers = create_speech_providers(config.speech)
    return SpeechDesk(agents, providers, spawn, config.server.max_frame_bytes)


class SpeechDesk:
    def __init__(
        self,
        agents: Mapping[str, AgentSpec],
        providers: Mapping[str, SpeechProvider],
        spawn: Callable[..., None],
        max_frame_bytes: int,
    ) -> None:
        self.providers = providers
        #: The largest envelope clients are told of (``HAI``): a spoken sentence is cut to fit it.
        self.max_frame_bytes = max_frame_bytes
        self.voices = {name: providers[spec.config.speech] for name, spec in agents.items() if spec.config.speech}
        self.always = {name for name, spec in agents.items() if spec.config.speech and spec.config.reply_audio}
        self.max_clip_bytes = max_frame_bytes * AUDIO_MESSAGE_FRAMES
        self._spawn = spawn
        #: Whether a transcript answers a question its speaker was asked in words (the hub sets it).
        self.answered: Callable[[Session, Transaction, str, str], bool] | None = None
        self._clips: dict[tuple[str, str], _Clip] = {}  # (session id, audio message id)
        #: Per session, its messages dropped (too long, or cancelled) whose last chunk has not come: their
        #: later chunks are let go (a tester's find: they began a new clip, and the tail was heard as the
        #: member's words). Per session, so that one session's many cannot push out another's.
        self._dropped: dict[str, OrderedDict[str, None]] = {}
        self._hearing: dict[str, tuple[str, anyio.CancelScope]] = {}  # audio message id -> (transaction, scope)
        self._spoken: OrderedDict[str, None] = OrderedDict()  # transcript message ids
        #: (transaction id, audio message id) -> its transcript's message id (``RUN_CANCEL`` naming the audio
        #: after it was heard; the same id sent again).
        self._transcripts: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._speakers: dict[str, dict[str, Speaker]] = {}  # transaction id -> run id -> speaker
        #: Speakers that sent all their answer, until a listener has played it: transaction id -> run id ->
        #: (speaker, when it ends, ``time.monotonic``).
        self._playing: dict[str, dict[str, tuple[Speaker, float]]] = {}

    async def load(self) -> None:
        """Load the models of the providers agents use (at start-up, in the background, off the event loop)."""
        for provider in {id(p): p for p in self.voices.values()}.values():
            try:
                await provider.load()
            except SpeechError as exc:  # said again to each member whose audio it cannot hear
                logger.warning("speech %r cannot load: %s", provider.id, exc.message)

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()

    def attach(self, transaction: Transaction) -> None:
        transaction.watchers.append(lambda event: self._watch(transaction, event))

    # --- hearing ---------------------------------------------------------------------------------

    def provider_for(self, transaction: Transaction) -> SpeechProvider | None:
        return next((self.voices[name] for name in transaction.agents if name in self.voices), None)

    def hear(
        self,
        transaction: Transaction,
        session: Session,
        *,
        message_id: str,
        mime: str,
        data: bytes,
        whole: bool,
        related_id: str,
        alone: bool = False,
    ) -> bool:
        """Take a piece of a member's audio message; ``False`` if no agent in the transaction listens.
        ``whole``: the message ends with it; ``alone``: it is the whole message (an ``AUDIO``), never the
        rest of one dropped before under its id."""
        provider = self.provider_for(transaction)
        if provider is None:
            return False
        key = (session.id, message_id)
        dropped = self._dropped.get(session.id)
        if alone and dropped is not None:  # (a whole message under the id of one dropped: heard)
            dropped.pop(message_id, None)
        clip = self._clips.get(key)
        if clip is None and not data:  # a last chunk ending nothing open (a voice tester's find: dropped silently)
            raise ProtocolError(
                ErrorCode.INVALID_PAYLOAD,
                f"audio message {message_id!r} has no audio: no chunk with data came before its final one",
                related_id=related_id,
                detail={"where": "/payload/data"},
            )
        if clip is None:
            if self._heard(transaction, message_id) or transaction.message_id_taken(message_id):
                # (a voice tester's find: the same AUDIO sent twice was heard, and answered, twice; one under a
                # typed message's id took its place in the history)
                raise ProtocolError(
                    ErrorCode.INVALID_PAYLOAD,
                    f"message_id {message_id!r} is already used in this transaction: a new audio message needs"
                    " a new one",
                    related_id=related_id,
                    detail={"where": "/payload/message_id"},
                )
            if not whole and sum(1 for sid, _ in self._clips if sid == session.id) >= OPEN_CLIPS_PER_SESSION:
                # Refused whole, as one too large is: its later chunks are let go, and it interrupts nothing
                # (a voice tester's find: its tail, heard later as a message of its own, was answered).
                self._drop_rest(key)
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    f"at most {OPEN_CLIPS_PER_SESSION} audio messages may be open at once: end one with final: true;"
                    f" none of {message_id} is heard",
                    related_id=related_id,
                    detail={"limit": "open_audio_messages"},
                )
            self.interrupt(transaction, session.user)
            clip = _Clip(transaction.id, mime, bytearray())
        if len(clip.data) + len(data) > self.max_clip_bytes:
            self._clips.pop(key, None)
            if not whole:
                self._drop_rest(key)
            raise ProtocolError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"audio message {message_id} exceeds {self.max_clip_bytes} bytes; it was dropped",
                related_id=related_id,
                detail={"where": "/payload/data", "limit": self.max_clip_bytes},
            )
        clip.data += data
        if not whole:
            self._clips[key] = clip
            return True
        self._clips.pop(key, None)
        scope = anyio.CancelScope()
        self._hearing[message_id] = (transaction.id, scope)
        self._spawn(self._transcribe, transaction, session, provider, bytes(clip.data), clip.mime, message_id, scope)
        return True

    def cancel(self, transaction: Transaction, session: Session, message_id: str) -> bool:
        """Stop transcribing an audio message, or collecting one of ``session``'s; ``False`` if there is none."""
        hearing = self._hearing.get(message_id)
        if hearing is not None and hearing[0] == transaction.id:
            hearing[1].cancel()
            return True
        key = (session.id, message_id)
        clip = self._clips.get(key)
        if clip is not None and clip.transaction == transaction.id:
            del self._clips[key]
            self._drop_rest(key)  # (chunks of it still on their way are not a new message: a tester's find)
            return True
        return False

    def let_go(self, session: Session, message_id: str, *, final: bool, seq: int | None) -> bool:
        """Whether an ``AUDIO_CHUNK`` is the rest of a message of ``session`` dropped before (refused,
        cancelled, too large): then it is let go, neither heard nor passed on to members or ``on_audio``
        agents (a voice tester's find: a refused message's tail reached both). Its final chunk ends that. A
        chunk numbered 0 starts the message anew: a client sending it again (a voice tester's find: the
        retry of a refused message was swallowed whole as its rest)."""
        dropped = self._dropped.get(session.id)
        if dropped is None or message_id not in dropped:
            return False
        if final or seq == 0:
            del dropped[message_id]
        return seq != 0

    @staticmethod
    def _said_aloud(transaction: Transaction, message_id: str) -> bool:
        """Whether the recent log has ``message_id`` as a member's spoken message (heard on another node)."""
        return bool((_logged_message(transaction, "message_id", message_id) or {}).get("spoken"))

    def holds(self, transaction: Transaction, message_id: str) -> bool:
        """Whether ``message_id`` is an audio message's in ``transaction``: open, being heard, or heard."""
        if any(key[1] == message_id and clip.transaction == transaction.id for key, clip in self._clips.items()):
            return True
        return self._heard(transaction, message_id)

    def _heard(self, transaction: Transaction, message_id: str) -> bool:
        """Whether ``message_id`` is an audio message's in ``transaction`` being heard, or heard."""
        if self._hearing.get(message_id, ("", None))[0] == transaction.id:
            return True
        return self.transcript_of(transaction, message_id) is not None

    def transcript_of(self, transaction: Transaction, audio_message_id: str) -> str | None:
        """The message id of the transcript of a member's audio message, once it was heard: here, or (in a
        cluster) by the node that heard it, as the transaction's log says (a reviewer's find: a cancel, or
        the same audio again, through another node found nothing)."""
        found = self._transcripts.get((transaction.id, audio_message_id))
        if found is not None:
            return found
        body = _logged_message(transaction, "audio_message_id", audio_message_id)
        return None if body is None else str(body.get("message_id", "")) or None

    def _drop_rest(self, key: tuple[str, str]) -> None:
        """The chunks of this message still to come are let go, up to its last (``final``)."""
        dropped = self._dropped.setdefault(key[0], OrderedDict())
        dropped[key[1]] = None
        while len(dropped) > MAX_DROPPED:
            dropped.popitem(last=False)

    def forget_session(self, session_id: str) -> None:
        """A session left: drop its half-sent audio."""
        for key in [key for key in self._clips if key[0] == session_id]:
            del self._clips[key]
        self._dropped.pop(session_id, None)

    async def _transcribe(
        self,
        transaction: Transaction,
        session: Session,
        provider: SpeechProvider,
        data: bytes,
        mime: str,
        audio_message_id: str,
        scope: anyio.CancelScope,
    ) -> None:
        try:
            if ahead := provider.waiting():  # (a tester's find: a recording waited minutes, without a word)
                waiting = {"event": "speech.waiting", "message_id": audio_message_id, "ahead": ahead}
                session.send(EventType.INFO, waiting, transaction=transaction.id)
            with scope:
                text = await provider.transcribe(data, mime)
            if scope.cancel_called or transaction.ended:
                return
            if not text:
                raise SpeechError(SpeechErrorCode.SPEECH_NOT_UNDERSTOOD, "no words were heard in that audio")
            if self.answered is not None and self.answered(session, transaction, text, audio_message_id):
                return  # a yes or no to a question asked in words: an answer, not a message to the agent
            message_id = new_id()
            payload = {"message_id": message_id, "spoken": True, "audio_message_id": audio_message_id}
            self._remember(message_id)
            transaction.user_message(session, text, payload, audio_message_id, session.traceparent, echo=True)
            # Once taken (a reviewer's find: recorded before, a message refused for room could not be sent again)
            self._transcripts[(transaction.id, audio_message_id)] = message_id
            while len(self._transcripts) > SPOKEN_REMEMBERED:
                self._transcripts.popitem(last=False)
        except SpeechError as exc:
            logger.info("speech %r: %s: %s", provider.id, exc.code, exc.message)
            body = error_body(exc.code, exc.message, related_id=audio_message_id)
            session.send(EventType.ERROR, body, transaction=transaction.id)
        except ProtocolError as exc:  # no room for the runs (RUN_LIMIT_EXCEEDED)
            session.send_error(exc, transaction=transaction.id)
        finally:
            self._hearing.pop(audio_message_id, None)

    def _remember(self, message_id: str) -> None:
        self._spoken[message_id] = None
        while len(self._spoken) > SPOKEN_REMEMBERED:
            self._spoken.popitem(last=False)

    # --- speaking --------------------------------------------------------------------------------

    def interrupt(self, transaction: Transaction, by: str) -> None:
        """Stop every answer being spoken in ``transaction`` (a member spoke)."""
        for speaker in list(self._speakers.get(transaction.id, {}).values()):
            speaker.interrupt(by)
        now = time.monotonic()
        for speaker, until in self._playing.pop(transaction.id, {}).values():  # sent whole, still playing
            if until > now:
                speaker.interrupted(by)

    def silence(self, transaction: Transaction, named: str, by: str) -> bool:
        """Stop speaking the answer of a run that has finished writing it (``RUN_CANCEL`` naming the run, the
        message it answers, or that message's audio); ``False`` if none is being spoken. A voice tester's
        find: the text done, its speech went on for a minute and nothing stopped it."""
        answers = {named, self.transcript_of(transaction, named) or named}
        found = [
            speaker
            for speaker in self._speakers.get(transaction.id, {}).values()
            if speaker.run_id == named or speaker.answers in answers
        ]
        for speaker in found:
            speaker.interrupt(by)
        # All sent, not all played yet (up to SPEAK_AHEAD_SECONDS): the listeners are told to stop (a reviewer's
        # find: the last seconds of every answer, a short one whole, could not be stopped).
        now, played = time.monotonic(), self._playing.get(transaction.id, {})
        for run_id, (speaker, until) in list(played.items()):
            if until <= now:
                del played[run_id]
            elif speaker not in found and (run_id == named or speaker.answers in answers):
                del played[run_id]
                found.append(speaker)
                speaker.interrupted(by)
        return bool(found)

    def _watch(self, transaction: Transaction, event: Event) -> None:
        kind = event.type
        payload: dict[str, Any] = event.payload if isinstance(event.payload, dict) else {}
        speakers = self._speakers.get(transaction.id)
        if kind == EventType.RUN_STARTED:
            agent = str(payload.get("agent"))
            voice = self.voices.get(agent)
            shared = transaction.shared
            if shared is not None and not shared.owner:
                return  # the node running the turns speaks their answers, once (a reviewer's find: every node did)
            message_id = str(payload.get("message_id", ""))
            wanted = agent in self.always or message_id in self._spoken or self._said_aloud(transaction, message_id)
            # Someone may listen: here, or (in a cluster) a member on another node (whose accepted events are
            # theirs to know: the answer is spoken for them, as for one here).
            listening = any(_AUDIO & m.accepted for m in transaction.members.values())
            listening = listening or (shared is not None and bool(shared.users_elsewhere))
            if voice is not None and wanted and listening:
                speaker = Speaker(transaction, str(payload["run_id"]), agent, voice, self.max_frame_bytes)
                speaker.answers = str(payload.get("message_id", ""))
                self._speakers.setdefault(transaction.id, {})[speaker.run_id] = speaker
                self._spawn(self._speak, speaker)
        elif kind == EventType.TRANSACTION_END:
            for speaker in list((speakers or {}).values()):
                speaker.stop()
            self._playing.pop(transaction.id, None)  # (its answers still playing: nobody stops them now)
            # Its half-sent audio goes (a voice tester's find: it stayed counted against its sessions' open
            # messages, with no way left to end it, and chunked audio was refused in every other conversation).
            for key in [key for key, clip in self._clips.items() if clip.transaction == transaction.id]:
                del self._clips[key]
            for tid, scope in list(self._hearing.values()):
                if tid == transaction.id:
                    scope.cancel()
        elif speakers and event.run_id in speakers:
            speaker = speakers[event.run_id]
            if kind in (EventType.MESSAGE_START, EventType.MESSAGE_PART, EventType.MESSAGE_END):
                speaker.follow(kind, payload)
            elif kind == EventType.RUN_FINISHED and payload.get("status") == RunOutcome.CANCELLED:
                speaker.stop()
            elif kind in (EventType.RUN_FINISHED, EventType.RUN_ERROR):
                speaker.close()

    async def _speak(self, speaker: Speaker) -> None:
        try:
            await speaker.run()
        finally:
            speakers = self._speakers.get(speaker.transaction.id, {})
            speakers.pop(speaker.run_id, None)
            if not speakers:
                self._speakers.pop(speaker.transaction.id, None)
            until = speaker.played_until()
            if until is not None and not speaker.scope.cancel_called:  # sent whole: still playing a while
                playing = self._playing.setdefault(speaker.transaction.id, {})
                playing[speaker.run_id] = (speaker, until)
                for run_id in [run for run, (_, end) in playing.items() if end <= time.monotonic()]:
                    del playing[run_id]


class Speaker:
    """Speaks one run's messages, sentence by sentence, in order."""

    def __init__(
        self, transaction: Transaction, run_id: str, agent: str, voice: SpeechProvider, max_frame_bytes: int
    ) -> None:
        self.transaction = transaction
        self.max_frame_bytes = max_frame_bytes
        self.run_id = run_id
        self.agent = agent
        self.voice = voice
        self.scope = anyio.CancelScope()
        self._queue: deque[tuple[str, str | None]] = deque()  # (message id, sentence; None: its end)
        self._splitters: dict[str, SentenceSplitter] = {}
        self._seq: dict[str, int] = {}
        self._finals: set[str] = set()
        self._wake = anyio.Event()
        self._closed = False
        self._speaking: str | None = None
        #: The message the run answers (a cancel naming it stops the speech of an answer written already).
        self.answers = ""
        #: When the first audio was sent (``time.monotonic``), and how much audio has been sent since.
        self._since: float | None = None
        self._sent_ms = 0

    def follow(self, kind: str, payload: dict[str, Any]) -> None:
        if self._closed:
            return
        message_id = str(payload.get("message_id", ""))
        splitter = self._splitters.setdefault(message_id, SentenceSplitter())
        if kind == EventType.MESSAGE_PART:
            self._put(message_id, splitter.feed(str(payload.get("text", ""))))
        elif kind == EventType.MESSAGE_END:
            self._put(message_id, [*splitter.flush(), None])
            del self._splitters[message_id]

    def _put(self, message_id: str, sentences: Sequence[str | None]) -> None:
        if sentences:
            self._queue.extend((message_id, sentence) for sentence in sentences)
            self._wake.set()

    def close(self) -> None:
        """The run ended: speak what is queued, then stop."""
        self._closed = True
        self._wake.set()

    def stop(self) -> None:
        """Stop at once (the run was cancelled, the transaction ended)."""
        self._closed = True
        self._queue.clear()
        self.scope.cancel()

    def interrupt(self, by: str) -> None:
        if self._closed and not self._queue and self._speaking is None:
            return
        unfinished = [message_id for message_id in self._seq if message_id not in self._finals]
        message_id = self._speaking or (self._queue[0][0] if self._queue else None) or next(iter(unfinished), None)
        self.stop()
        self.interrupted(by, message_id)

    def played_until(self) -> float | None:
        """When a listener who began with its first chunk has played all it was sent (``time.monotonic``)."""
        return None if self._since is None else self._since + self._sent_ms / 1000

    def interrupted(self, by: str, message_id: str | None = None) -> None:
        """Tell the listeners to stop playing this run's answer."""
        if message_id is None and self._seq:
            message_id = next(reversed(self._seq))
        info: dict[str, Any] = {"event": "speech.interrupted", "run_id": self.run_id, "agent": self.agent, "by": by}
        if message_id is not None:
            info["message_id"] = message_id
        self.transaction.publish(Event(EventType.INFO, info, channel=Channel.AUDIO_OUT, run_id=self.run_id))

    async def run(self) -> None:
        with self.scope:
            while True:
                if not self._queue:
                    if self._closed:
                        return
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                message_id, sentence = self._queue.popleft()
                if sentence is None:
                    if message_id in self._seq and message_id not in self._finals:
                        self._send(message_id, _EMPTY_WAV, 0, "", final=True)
                    continue
                self._speaking = message_id
                try:
                    await self._pace()
                    speech = await self.voice.synthesize(sentence)
                except SpeechError as exc:
                    logger.warning("speech %r: %s: %s", self.voice.id, exc.code, exc.message)
                    failed = {
                        "event": "speech.failed",
                        "run_id": self.run_id,
                        "message_id": message_id,  # (the answer not spoken: a client waiting for it stops)
                        "code": exc.code,
                        "message": exc.message,
                    }
                    self.transaction.publish(
                        Event(EventType.INFO, failed, channel=Channel.AUDIO_OUT, run_id=self.run_id)
                    )
                    return
                finally:
                    self._speaking = None
                final = bool(self._queue) and self._queue[0] == (message_id, None)
                if final:
                    self._queue.popleft()
                pieces = self._pieces(speech.data, speech.duration_ms, sentence)
                for index, (data, duration_ms) in enumerate(pieces):
                    last = index == len(pieces) - 1
                    self._send(message_id, data, duration_ms, sentence if index == 0 else "", final=final and last)

    async def _pace(self) -> None:
        """Wait while what was sent is more than ``SPEAK_AHEAD_SECONDS`` ahead of a listener playing it."""
        if self._since is None:
            return
        ahead = self._sent_ms / 1000 - (time.monotonic() - self._since)
        if ahead > SPEAK_AHEAD_SECONDS:
            await anyio.sleep(ahead - SPEAK_AHEAD_SECONDS)

    def _pieces(self, data: bytes, duration_ms: int, sentence: str) -> list[tuple[bytes, int]]:
        """The sentence's WAV as whole WAVs that each fit an envelope of ``max_frame_bytes`` as base64 (a
        voice tester's find: a long sentence, or a slow voice, made frames past the size the ``HAI``
        gives, which a client sizing its buffer by it refuses)."""
        room = self.max_frame_bytes - SPOKEN_ENVELOPE_ROOM - 2 * len(sentence.encode())
        most = max(room, 4096) * 3 // 4
        if len(data) <= most:
            return [(data, duration_ms)]
        return wav_pieces(data, most)

    def _send(self, message_id: str, data: bytes, duration_ms: int, text: str, *, final: bool) -> None:
        if self._since is None:
            self._since = time.monotonic()
        self._sent_ms += duration_ms
        seq = self._seq.get(message_id, 0)
        self._seq[message_id] = seq + 1
        if final:
            self._finals.add(message_id)
        payload: dict[str, Any] = {
            "message_id": message_id,
            "mime": "audio/wav",
            "data": base64.b64encode(data).decode("ascii"),
            "author": self.agent,
            "duration_ms": duration_ms,
            "seq_in_message": seq,
            "final": final,
            "text": text,
        }
        self.transaction.publish(Event(EventType.AUDIO_CHUNK, payload, channel=Channel.AUDIO_OUT, run_id=self.run_id))
