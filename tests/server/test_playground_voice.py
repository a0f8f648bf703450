"""Hold-to-talk in the playground, in Debian's Chromium with a fake microphone that plays a WAV file.

Chromium's fake media stream (``--use-file-for-fake-audio-capture``) plays espeak-ng's "what is two
plus three" (with silence around it) as the microphone; the page records it while the button is
held, sends it as AUDIO_CHUNKs (WebM/Opus), and shows the transcript as the member's spoken message
and the agent's spoken answer as audio players.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.server.conftest import CHROMIUM
from tests.server.test_playground import ARTIFACTS
from tests.support.serving import LiveServer, live_server, make_config
from tests.support.speech import espeak, wav

TIMEOUT_MS = 30_000
#: Pieces of 250 ms the page must have sent before the button is released: 2.5 s, the sentence and some silence.
PIECES = 10


@pytest.fixture(scope="module")
def voice_server() -> Iterator[LiveServer]:
    config = make_config(
        {
            "speech": {"local": {"kind": "local"}},
            "agents": {
                "echo": {"plugin": "echo", "speech": "local"},
                "deaf": {"plugin": "echo"},
                # (a story told slowly: its first sentences play while the rest is still being written)
                "teller": {
                    "plugin": "haip_runtime.demo.storyteller:Storyteller",
                    "options": {"words_per_second": 8},
                    "speech": "local",
                },
            },
        }
    )
    with live_server(config) as live:
        yield live


@pytest.fixture(scope="module")
def microphone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sentence with 0.3 s of silence before and 3 s after (the fake device plays it in a loop)."""
    sentence = espeak("what is two plus three")
    frames = sentence[44:]
    silence = bytes(2 * 22_050 * 3)
    path = tmp_path_factory.mktemp("mic") / "question.wav"
    path.write_bytes(wav(silence[: 2 * 6615] + frames + silence, 22_050))
    return path


@pytest.fixture(scope="module")
def browser(microphone: Path) -> Iterator[Browser]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, voice_server: LiveServer, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    context.grant_permissions(["microphone"])
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(f"{voice_server.http_url}/?token={voice_server.token('dev')}")
    expect(tab.locator("#connection")).to_have_attribute("data-state", "open")
    yield tab
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"))
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_holding_the_button_sends_speech_and_the_spoken_answer_plays(page: Page) -> None:
    page.click("li.agent[data-agent=echo]")
    expect(page.locator("#transaction-id")).to_be_visible()
    talk = page.locator("#talk")
    box = talk.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    expect(talk).to_have_class("talk recording")
    page.wait_for_function(f"window.playground.voice.sent >= {PIECES}")
    page.mouse.up()
    expect(talk).not_to_have_class("talk recording")
    mine = page.locator(".msg.spoken[data-author=dev]")
    expect(mine).to_have_count(1)
    heard = mine.locator(".text").inner_text().lower()
    assert "what is" in heard and ("2" in heard or "two" in heard) and ("3" in heard or "three" in heard), heard
    answer = page.locator(".msg[data-author=echo]")
    expect(answer).to_contain_text("you said:")
    player = answer.locator(".speech audio")
    expect(player).to_have_count(1)
    seconds = page.wait_for_function(
        "() => { const a = document.querySelector('.msg[data-author=echo] .speech audio');"
        " return a && a.readyState >= 1 && a.duration; }"
    ).json_value()
    assert 1.0 < float(seconds) < 8.0, seconds


def hold_to_talk(page: Page, pieces: int = PIECES) -> None:
    talk = page.locator("#talk")
    box = talk.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.wait_for_function(f"window.playground.voice.sent >= {pieces}")
    page.mouse.up()


def test_a_reopened_conversation_shows_its_speech_without_playing_it_and_a_recording_is_one_player(
    page: Page,
) -> None:
    """A voice tester's finds: reopening a spoken conversation played every earlier answer by itself,
    and a member's recording showed as one player per 250 ms chunk, all but the first broken."""
    page.click("li.agent[data-agent=echo]")
    expect(page.locator("#transaction-id")).to_be_visible()
    hold_to_talk(page)
    expect(page.locator(".msg[data-author=echo] .speech audio")).to_have_count(1)
    expect(page.locator(".msg.audio[data-author=dev] audio")).to_have_count(1)  # your own, live (a re-tester's find)
    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    expect(page.locator(".msg[data-author=echo] .speech audio")).to_have_count(1)
    expect(page.locator(".msg.audio[data-author=dev] audio")).to_have_count(1)  # one recording, one player
    assert page.evaluate("window.playground.voice.playing === null && window.playground.voice.queue.length === 0")
    duration = page.wait_for_function(
        "() => { const a = document.querySelector('.msg.audio[data-author=dev] audio');"
        " return a && a.readyState >= 1 && a.duration; }"
    ).json_value()
    assert float(duration) >= 2.0  # the whole recording plays, not its first 250 ms


def test_letting_go_before_the_microphone_opens_records_nothing(page: Page) -> None:
    """A voice tester's find: when the microphone took a moment to open (the browser asking first), a
    release meanwhile was missed, and it went on recording and sending until the next click."""
    page.click("li.agent[data-agent=echo]")
    expect(page.locator("#transaction-id")).to_be_visible()
    page.evaluate(
        """() => {
          const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
          navigator.mediaDevices.getUserMedia = async (asked) => {
            await new Promise((resolve) => { window.openMicrophone = resolve; });
            const stream = await real(asked);
            window.microphoneOpened = true;
            return stream;
          };
        }"""
    )
    talk = page.locator("#talk")
    box = talk.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.wait_for_function("typeof window.openMicrophone === 'function'")
    page.mouse.up()
    page.evaluate("window.openMicrophone()")
    page.wait_for_function("window.microphoneOpened === true")
    expect(page.locator(".note", has_text="Hold the button while you speak")).to_be_visible()
    assert page.evaluate("window.playground.voice.recording === false && window.playground.voice.sent === 0")
    expect(talk).not_to_have_class("talk recording")


def test_the_talk_button_is_there_only_for_agents_that_hear(page: Page) -> None:
    """A newcomer's find: the button sat under every agent, and holding it for one that cannot hear
    only got "Nobody heard that". The agents list says which hear (``annotations.hearsAudio``)."""
    talk = page.locator("#talk")
    expect(talk).to_be_hidden()  # no conversation yet
    page.click("li.agent[data-agent=deaf]")
    expect(page.locator("#transaction-id")).to_be_visible()
    expect(talk).to_be_hidden()
    page.click("#new-conversation")
    page.click("li.agent[data-agent=echo]")
    expect(page.locator("#transaction-id")).to_be_visible()
    expect(talk).to_be_visible()


def test_speaking_to_an_agent_that_cannot_hear_says_so(page: Page) -> None:
    """A voice tester's find: the server said INFO audio.unheard; the page showed nothing. (The page shows
    no button for such an agent now; a client may send audio even so, or an agent may leave: shown the same.)"""
    page.click("li.agent[data-agent=deaf]")
    expect(page.locator("#transaction-id")).to_be_visible()
    page.evaluate("document.getElementById('talk').hidden = false")
    hold_to_talk(page, pieces=2)
    expect(
        page.locator(".note.error", has_text="Nobody heard that: no agent in this conversation hears audio")
    ).to_be_visible()


def test_stop_silences_the_answer_being_spoken(page: Page) -> None:
    """A voice tester's find: Stop cancelled the run, but the sentences it had sent already played on."""
    page.click("li.agent[data-agent=teller]")
    expect(page.locator("#transaction-id")).to_be_visible()
    hold_to_talk(page)
    page.wait_for_function("window.playground.voice.playing !== null")
    page.evaluate("window.stopped = window.playground.voice.playing")
    page.click("#stop")
    page.wait_for_function("window.playground.voice.playing === null && window.playground.voice.queue.length === 0")
    assert page.evaluate("window.stopped.paused && !window.stopped.ended")  # cut short, not played to its end
    assert page.evaluate("[...document.querySelectorAll('.speech audio')].every((audio) => audio.paused)")


def test_stop_shows_and_silences_an_answer_written_already_that_still_plays(page: Page) -> None:
    """A voice tester's find: once the answer's text was complete its run ended, the run bar and Stop went,
    and the spoken answer played on, sentence after sentence, with nothing to stop it."""
    page.click("li.agent[data-agent=teller]")
    expect(page.locator("#transaction-id")).to_be_visible()
    hold_to_talk(page)
    page.wait_for_function("window.playground.voice.playing !== null")
    page.wait_for_function("window.playground.runs.size === 0", timeout=60_000)  # written, still spoken
    expect(page.locator("#run")).to_be_visible()
    expect(page.locator("#run-text")).to_have_text("speaking…")
    page.evaluate("window.stopped = window.playground.voice.playing")
    page.click("#stop")
    page.wait_for_function("window.playground.voice.playing === null && window.playground.voice.queue.length === 0")
    assert page.evaluate("window.stopped.paused && !window.stopped.ended")
    expect(page.locator("#run")).to_be_hidden()
