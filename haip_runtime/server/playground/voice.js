// Hold-to-talk for the playground: the microphone as AUDIO_CHUNKs, spoken answers played as they come.
// Kept apart from playground.js: it only needs the page's state ({client, tx}) and the log element.
//
// While the button is held, a MediaRecorder cuts the microphone into 250 ms pieces of one WebM/Opus
// file; each goes out as an AUDIO_CHUNK of one message_id (seq_in_message counting), the last with
// final: true. An agent with `speech` answers: its transcript of you comes back as your MESSAGE
// (marked spoken: shown so), its spoken answer as AUDIO_CHUNKs (one WAV per
// sentence, AUDIO_OUT) that are played in order and kept as an audio player under the message.
// Pressing the button again, INFO speech.interrupted, or the end of a run cancelled (the Stop button) or
// failed stops what is playing (of that run).

const SLICE_MS = 250;

/** Add the hold-to-talk button to the composer and play agents' speech; returns what tests look at. */
export function attachVoice(state, client) {
  const voice = { sent: 0, recording: false, players: new Map(), queue: [], playing: null };
  voice.changed = () => state.onPlaying?.(); // (the page shows Stop while an answer plays: playground.js)
  voice.stop = () => stopPlaying(voice);
  state.voice = voice;
  const composer = document.getElementById("composer");
  if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === "undefined") return voice;
  const button = document.createElement("button");
  button.type = "button";
  button.id = "talk";
  button.className = "talk";
  button.textContent = "● Hold to talk";
  button.title = "Hold to speak to the agent; release to send";
  button.hidden = true; // shown in a conversation with an agent that hears audio (playground.js)
  composer.append(button);

  let recorder = null;
  let opening = false;
  const press = async (event) => {
    event.preventDefault();
    if (!state.tx || recorder || opening) return;
    stopPlaying(voice);
    // Listen for the release now: the microphone may take a moment to open (the browser asks the user
    // first), and a release meanwhile must not leave it recording (a tester's find: it went on sending).
    let stopped = false;
    let release = () => { stopped = true; };
    const released = () => release();
    window.addEventListener("pointerup", released, { once: true });
    window.addEventListener("pointercancel", released, { once: true });
    let stream;
    opening = true;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (error) {
      note(`Microphone: ${error.message || error}`);
      return;
    } finally {
      opening = false;
    }
    if (stopped) { // let go before the microphone opened: nothing to send
      for (const track of stream.getTracks()) track.stop();
      note("Hold the button while you speak, and let go when you are done.");
      return;
    }
    const tx = state.tx;
    const messageId = crypto.randomUUID();
    const mime = MediaRecorder.isTypeSupported("audio/webm;codecs=opus") ? "audio/webm;codecs=opus" : "";
    recorder = new MediaRecorder(stream, mime ? { mimeType: mime } : {});
    let seq = 0;
    const pieces = []; // kept for this page's own player of the recording (the server sends it to the others)
    let sending = Promise.resolve(); // pieces go out in order, though each is read asynchronously
    recorder.addEventListener("dataavailable", (e) => {
      pieces.push(e.data);
      const last = stopped && e.target.state === "inactive"; // the piece stop() flushes
      const type = e.data.type || e.target.mimeType || "audio/webm";
      const reading = blobToBase64(e.data);
      sending = sending.then(async () => {
        const payload = { message_id: messageId, mime: type, seq_in_message: seq++, data: await reading };
        if (last) payload.final = true;
        client.send("AUDIO_CHUNK", payload, { transaction: tx, channel: "AUDIO_IN" });
        voice.sent += 1;
      });
    });
    recorder.addEventListener("stop", () => {
      for (const track of stream.getTracks()) track.stop();
      recorder = null;
      voice.recording = false;
      button.classList.remove("recording");
      const recorded = new Blob(pieces, { type: pieces[0]?.type || mime || "audio/webm" });
      if (recorded.size) state.showRecording?.(messageId, recorded);
    });
    recorder.start(SLICE_MS);
    voice.recording = true;
    button.classList.add("recording");
    release = () => {
      stopped = true;
      if (recorder?.state === "recording") recorder.stop(); // the last dataavailable comes before "stop"
    };
  };
  button.addEventListener("pointerdown", press);

  client.addEventListener("envelope", (e) => {
    const env = e.detail;
    const p = env.payload && typeof env.payload === "object" ? env.payload : {};
    if (env.transaction !== state.tx) return;
    // What this page's join brought back (the history) is shown, not played by itself.
    const live = !(Number(env.tseq) <= state.historyUpTo);
    // A spoken answer's sentences (their text beside them); other audio is a player of its own (playground.js).
    if (env.type === "AUDIO_CHUNK" && env.channel === "AUDIO_OUT" && typeof p.text === "string") {
      return hear(voice, p, live, env.run_id);
    }
    if (env.type === "INFO" && p.event === "speech.interrupted") return stopPlaying(voice);
    // A cancelled run stops speaking, but what it sent already is queued here (a voice tester's find: after
    // Stop the answer played on); its end says so.
    const ended = (env.type === "RUN_FINISHED" && p.status === "CANCELLED") || env.type === "RUN_ERROR";
    if (ended && env.run_id) return stopPlaying(voice, env.run_id);
    if (env.type === "MESSAGE" && p.spoken) {
      queueMicrotask(() => {
        const shown = document.querySelector(`.msg[data-message-id="${CSS.escape(p.message_id)}"]`);
        shown?.classList.add("spoken");
      });
    }
  });
  return voice;
}

function hear(voice, p, live = true, runId = "") {
  if (!p.data) return;
  const bytes = Uint8Array.from(atob(p.data), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: p.mime || "audio/wav" }));
  let player = voice.players.get(p.message_id);
  if (!player) {
    player = document.createElement("div");
    player.className = "speech";
    player.dataset.messageId = p.message_id;
    voice.players.set(p.message_id, player);
    const message = document.querySelector(`.msg[data-message-id="${CSS.escape(p.message_id)}"]`);
    (message || document.getElementById("log")).append(player);
  }
  if (p.duration_ms === 0) return; // the end of an answer whose last sentence already came
  const audio = document.createElement("audio");
  audio.controls = true;
  audio.src = url;
  audio.title = p.text || "";
  audio.dataset.seq = p.seq_in_message ?? "";
  audio.dataset.run = runId || "";
  player.append(audio);
  if (!live) return;
  voice.queue.push(audio);
  if (!voice.playing) playNext(voice);
}

function playNext(voice) {
  const audio = voice.queue.shift();
  voice.playing = audio || null;
  voice.changed?.();
  if (!audio) return;
  // Only while it is still the one playing (a reviewer's find: one stopped with its play() pending
  // rejected, and moved the queue on a second time).
  const next = () => { if (voice.playing === audio) playNext(voice); };
  audio.addEventListener("ended", next, { once: true });
  audio.play().catch(next); // autoplay refused: the player stays for a click
}

/** Stop what is playing and drop what waits: all of it, or only ``runId``'s. */
function stopPlaying(voice, runId = null) {
  if (runId !== null) {
    voice.queue = voice.queue.filter((audio) => audio.dataset.run !== runId);
    if (voice.playing?.dataset.run !== runId) return;
    voice.playing.pause();
    return playNext(voice);
  }
  voice.playing?.pause();
  voice.playing = null;
  voice.queue.length = 0;
  voice.changed?.();
}

function note(text) {
  const log = document.getElementById("log");
  const div = document.createElement("div");
  div.className = "note error";
  div.textContent = text;
  log.append(div);
}

function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
