"""Assembling a log into messages as people read them, and paging through them without overlap."""

from __future__ import annotations

from typing import Any

from haip_runtime.conversation.transcript import Transcript, summary
from haip_runtime.protocol.envelope import Event


class Log:
    """A transaction log built event by event, numbered as a transaction numbers them."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def add(self, type: str, payload: dict[str, Any], channel: str = "AGENT", run_id: str | None = None) -> Event:
        event = Event(type, payload, channel=channel, transaction="t", run_id=run_id, tseq=len(self.events) + 1)
        self.events.append(event)
        return event

    def user(self, text: str, author: str = "ann") -> None:
        self.add("MESSAGE", {"message_id": f"u{len(self.events)}", "author": author, "text": text}, channel="USER")

    def answer(self, run: str, message_id: str, *parts: str, agent: str = "bot", **end: Any) -> None:
        self.add("MESSAGE_START", {"message_id": message_id, "author": agent}, run_id=run)
        for part in parts:
            self.add("MESSAGE_PART", {"message_id": message_id, "text": part}, run_id=run)
        self.add("MESSAGE_END", {"message_id": message_id, **end}, run_id=run)


def read(events: list[Event], limit: int = 100) -> Transcript:
    transcript = Transcript(limit)
    for event in events:
        transcript.feed(event)
    return transcript


def test_a_streamed_answer_is_one_message_with_its_tool_calls_and_stop_reason() -> None:
    log = Log()
    log.user("add 2 and 3")
    log.add("RUN_STARTED", {"run_id": "r1", "agent": "bot"}, run_id="r1")
    log.add(
        "TOOL_CALL", {"call_id": "c1", "tool": "demo.add", "params": {"a": 2, "b": 3}, "caller": "bot"}, run_id="r1"
    )
    log.add("TOOL_UPDATE", {"call_id": "c1", "status": "RUNNING"}, run_id="r1")
    log.add("TOOL_DONE", {"call_id": "c1", "status": "OK", "result": {"content": [{"type": "text", "text": "5"}]}})
    log.answer("r1", "m1", "It is ", "5, and ", "that is", stop_reason="length")
    log.add("RUN_FINISHED", {"run_id": "r1", "status": "OK"}, run_id="r1")
    items = read(log.events).items
    assert [(i["role"], i["author"], i["text"], i["state"]) for i in items] == [
        ("user", "ann", "add 2 and 3", "complete"),
        ("agent", "bot", "", "complete"),  # the call came before any text of its run
        ("agent", "bot", "It is 5, and that is", "complete"),
    ]
    (call,) = items[1]["tool_calls"]
    assert call == {
        "call_id": "c1",
        "tool": "demo.add",
        "arguments": {"a": 2, "b": 3},
        "caller": "bot",
        "status": "OK",
        "result": "5",
    }
    assert items[2]["stop_reason"] == "length" and "stop_reason" not in items[0]
    assert items[0]["time"] == int(log.events[0].ts) and items[0]["tseq"] == 1


def test_a_call_after_text_joins_that_message_and_a_failed_call_keeps_its_error() -> None:
    log = Log()
    log.add("RUN_STARTED", {"run_id": "r1", "agent": "bot"}, run_id="r1")
    log.answer("r1", "m1", "Let me look.")
    log.add("TOOL_CALL", {"call_id": "c1", "tool": "demo.fail", "params": None, "caller": "bot"}, run_id="r1")
    log.add("TOOL_DONE", {"call_id": "c1", "status": "ERROR", "error": {"code": "TOOL_ERROR", "message": "boom"}})
    (item,) = read(log.events).items
    assert item["text"] == "Let me look."
    assert item["tool_calls"][0]["status"] == "ERROR" and item["tool_calls"][0]["error"] == {
        "code": "TOOL_ERROR",
        "message": "boom",
    }


def test_a_member_s_direct_call_an_edit_and_a_run_stopped_before_it_wrote() -> None:
    log = Log()
    log.add("TOOL_CALL", {"call_id": "c1", "tool": "demo.pid", "params": {}, "caller": "ann"}, channel="USER")
    log.user("hello")
    log.add("MESSAGE_UPDATE", {"message_id": "u1", "text": "hello there"}, channel="USER")
    log.add("RUN_STARTED", {"run_id": "r2", "agent": "slow"}, run_id="r2")
    log.add("RUN_FINISHED", {"run_id": "r2", "status": "CANCELLED"}, run_id="r2")
    log.add("RUN_STARTED", {"run_id": "r3", "agent": "bad"}, run_id="r3")
    log.answer("r3", "m3", "half")
    log.add("RUN_ERROR", {"run_id": "r3", "code": "LLM_AUTH_FAILED", "message": "bad key"}, run_id="r3")
    direct, hello, stopped, failed = read(log.events).items
    assert direct["role"] == "user" and direct["author"] == "ann" and direct["tool_calls"][0]["status"] == "RUNNING"
    assert hello["text"] == "hello there" and hello["edited"] is True
    assert stopped["author"] == "slow" and stopped["text"] == "" and stopped["run"] == {"status": "CANCELLED"}
    assert failed["text"] == "half" and failed["run"] == {
        "status": "ERROR",
        "error": {"code": "LLM_AUTH_FAILED", "message": "bad key"},
    }


def test_a_message_still_streaming_says_so() -> None:
    log = Log()
    log.add("MESSAGE_START", {"message_id": "m1", "author": "bot"}, run_id="r1")
    log.add("MESSAGE_PART", {"message_id": "m1", "text": "Once"}, run_id="r1")
    transcript = read(log.events)
    assert transcript.items[0]["state"] == "streaming" and not transcript.complete


def test_pages_complete_their_messages_and_never_overlap() -> None:
    log = Log()
    log.add("RUN_STARTED", {"run_id": "r1", "agent": "bot"}, run_id="r1")
    log.add("MESSAGE_START", {"message_id": "m1", "author": "bot"}, run_id="r1")
    log.user("interrupting")  # a second item starts while the first still streams
    log.add("MESSAGE_PART", {"message_id": "m1", "text": "one"}, run_id="r1")
    log.add("MESSAGE_END", {"message_id": "m1"}, run_id="r1")
    log.add("RUN_FINISHED", {"run_id": "r1", "status": "CANCELLED"}, run_id="r1")
    log.user("last")
    first = read(log.events, limit=1)
    assert [i["text"] for i in first.items] == ["one"] and first.items[0]["run"] == {"status": "CANCELLED"}
    assert first.next_after == 2 and first.complete
    second = read([e for e in log.events if e.tseq and e.tseq > (first.next_after or 0)], limit=1)
    assert [i["text"] for i in second.items] == ["interrupting"] and second.next_after == 6
    third = read([e for e in log.events if e.tseq and e.tseq > (second.next_after or 0)], limit=1)
    assert [i["text"] for i in third.items] == ["last"] and third.next_after is None


def test_the_summary_titles_by_the_first_user_message_and_previews_the_latest() -> None:
    log = Log()
    log.add("TRANSACTION_START", {"agent": "bot"}, channel="SYSTEM")
    assert summary(log.events, log.events) == {"title": None, "preview": "", "last_activity": int(log.events[0].ts)}
    log.user("Tell me   a story\nabout a very long journey across the sea and over the mountains to the end")
    log.answer("r1", "m1", "Once upon a time")
    described = summary(log.events, log.events, title_chars=20)
    assert described["title"] == "Tell me a story abo…" and described["preview"] == "Once upon a time"
    assert summary([], []) == {"title": None, "preview": "", "last_activity": None}


def test_audio_is_a_message_with_its_clip_described_not_its_bytes() -> None:
    log = Log()
    log.add("RUN_STARTED", {"run_id": "r1", "agent": "tone"}, run_id="r1")
    clip = {"message_id": "a1", "mime": "audio/wav", "data": "UklGRg==", "author": "tone", "duration_ms": 500}
    log.add("AUDIO_CHUNK", clip, channel="AUDIO_OUT", run_id="r1")
    (item,) = read(log.events).items
    assert item["author"] == "tone" and item["role"] == "agent"
    assert item["audio"] == {"message_id": "a1", "mime": "audio/wav", "duration_ms": 500}


def test_a_time_that_is_not_a_number_is_none_not_an_error() -> None:
    log = Log()
    log.user("hello")
    log.events[0].ts = "yesterday"
    assert read(log.events).items[0]["time"] is None
    assert summary(log.events, log.events)["last_activity"] is None


def test_a_spoken_exchange_is_two_messages_however_many_chunks_it_came_in() -> None:
    """A clip in chunks and its transcript are one message; a spoken answer's sentences belong to its text."""
    log = Log()
    for seq in range(3):
        chunk = {"message_id": "a1", "mime": "audio/webm", "data": "AAAA", "author": "ann", "seq_in_message": seq}
        log.add("AUDIO_CHUNK", {**chunk, "final": seq == 2}, channel="AUDIO_IN")
    spoken = {"message_id": "u1", "author": "ann", "text": "what time is it", "spoken": True, "audio_message_id": "a1"}
    log.add("MESSAGE", spoken, channel="USER")
    log.add("RUN_STARTED", {"run_id": "r1", "agent": "bot", "message_id": "u1"}, run_id="r1")
    log.answer("r1", "m1", "It is noon. ", "Have fun.")
    for seq, sentence in enumerate(["It is noon.", "Have fun."]):
        chunk = {"message_id": "m1", "mime": "audio/wav", "data": "AAAA", "duration_ms": 500, "text": sentence}
        log.add("AUDIO_CHUNK", {**chunk, "seq_in_message": seq, "final": seq == 1}, channel="AUDIO_OUT", run_id="r1")
    log.add("RUN_FINISHED", {"run_id": "r1", "status": "OK"}, run_id="r1")
    items = read(log.events).items
    assert [(item["role"], item["text"]) for item in items] == [
        ("user", "what time is it"),
        ("agent", "It is noon. Have fun."),
    ]
    assert items[0]["spoken"] and items[0]["audio"] == {"message_id": "a1", "mime": "audio/webm"}
    assert items[0]["message_id"] == "u1"  # (a voice tester's find: a typed message's item has its id, this had none)
    assert items[1]["audio"] == {"message_id": "m1", "mime": "audio/wav", "duration_ms": 1000}


def test_an_edit_applies_to_its_authors_message_and_a_reused_id_takes_nothing_over() -> None:
    """What a log written before message ids were checked may hold (a hostile probe's find): adm's
    message under ann's id, adm's "edit" of it, and ann's own edit."""
    from haip_runtime.conversation.history import history_from_events

    log = Log()
    log.add("MESSAGE", {"message_id": "m-ann", "author": "ann", "text": "ann wrote"}, channel="USER")
    log.add("MESSAGE", {"message_id": "m-ann", "author": "adm", "text": "adm wrote"}, channel="USER")
    log.add("MESSAGE_UPDATE", {"message_id": "m-ann", "author": "adm", "text": "adm edits"}, channel="USER")
    log.add("MESSAGE_UPDATE", {"message_id": "m-ann", "author": "ann", "text": "ann edits"}, channel="USER")
    items = read(log.events).items
    assert [(i["author"], i["text"], i.get("edited", False)) for i in items] == [
        ("ann", "ann edits", True),
        ("adm", "adm wrote", False),
    ]
    assert [(h.author, h.text) for h in history_from_events(log.events)] == [("ann", "ann edits"), ("adm", "adm wrote")]
