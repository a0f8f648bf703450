// haip-client.js: a HAIP client for browsers, in one ES module with no dependencies.
// Copy it into your front-end. docs/protocol-guide.md explains every message it sends and receives.
//
//   import { HaipClient } from "./haip-client.js";
//   const client = new HaipClient("ws://127.0.0.1:8080/haip/websocket", { token });
//   client.addEventListener("envelope", (e) => console.log(e.detail.type, e.detail.payload));
//   await client.connect();                      // resolves on INFO session.ready
//   const tx = await client.startTransaction("echo");
//   client.sendText(tx, "hello");
//
// What it does for you:
// - the handshake (server HAI, then ours with the token and the events we accept);
// - numbering: our envelopes carry seq "1", "2", ... for the whole session; every envelope we
//   receive is delivered once, in seq order (duplicates are dropped, a gap is asked for again
//   with REPLAY_REQUEST after 500 ms);
// - PING -> PONG;
// - reconnect and resume: when the socket drops, it reconnects with back-off and sends a HAI
//   naming the old session and the last seq it received; the server re-sends what we missed,
//   and we re-send what the server had not acknowledged (it drops duplicates). Envelopes sent
//   while disconnected wait and go out after the resume.
//
// - after a server restart (the old session is gone: ERROR RESUME_FAILED), it carries on in the new
//   session and rejoins its conversations from the last transaction seq (`tseq`) it saw, so with a
//   durable store the conversation reads on without a gap; what the person sent that the old
//   session never acknowledged is sent again after the rejoin.
//
// Events (EventTarget): "envelope" (detail: the envelope, once, in order), "state" (detail:
// {state, reason}; reason "resumed" or "restarted" after a reconnect), "restarted" (the session
// was lost and the conversations rejoined; detail: the transaction ids).

/** Every event type this client understands; the runtime only sends types listed here. */
export const ACCEPT_EVENTS = [
  "HAI", "PING", "PONG", "ERROR", "INFO", "FLOW_UPDATE", "REPLAY_REQUEST",
  "TRANSACTION_START", "TRANSACTION_END", "TRANSACTION_JOIN", "MESSAGE", "MESSAGE_UPDATE",
  "TOOL_LIST", "TOOL_SCHEMA", "RUN_STARTED", "RUN_FINISHED", "RUN_ERROR", "RUN_CANCEL",
  "MESSAGE_START", "MESSAGE_PART", "MESSAGE_END", "TOOL_CALL", "TOOL_UPDATE", "TOOL_DONE", "TOOL_CANCEL",
  "AUDIO", "AUDIO_CHUNK", // inline (base64): this client does not ask for binary frames
];

const GAP_GRACE_MS = 500;
const REQUEST_TIMEOUT_MS = 10000;
/** PROTOCOL.md section 2's default frame limit, until the server's HAI says its own. */
const DEFAULT_MAX_FRAME_BYTES = 1024 * 1024;
/** Close codes after which reconnecting cannot help (authentication, version, policy). */
const FATAL_CLOSE_CODES = new Set([1002, 1008]);
/** The server closes a socket whose HAI it never got 1008 "no HAI received": on a line that stalled, not a refusal. */
const NO_HAI = "no HAI received";
/** How long a new socket may take to be ready (the server waits 10 s for a HAI): past it, it is let go. */
const HANDSHAKE_MS = 15000;
/** What a person sent that is worth sending again in a new session (not session mechanics). */
const RESENT_AFTER_RESTART = new Set(["MESSAGE", "MESSAGE_UPDATE", "TOOL_CALL", "TOOL_UPDATE", "TOOL_CANCEL", "RUN_CANCEL"]);
const HANDSHAKE_ERRORS = new Set(["AUTHENTICATION_FAILED", "VERSION_INCOMPATIBLE", "HANDSHAKE_REQUIRED", "INVALID_MESSAGE"]);

export class HaipError extends Error {
  constructor(code, message, envelope = null) {
    super(`${code}: ${message}`);
    this.code = code;
    this.envelope = envelope;
  }
}

/** A random UUID v4 (crypto.randomUUID exists only on secure origins). */
export function uuid() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export class HaipClient extends EventTarget {
  /**
   * @param {string} url  ws(s)://host/haip/websocket
   * @param {{token?: string, acceptEvents?: string[], reconnect?: boolean, maxBackoffMs?: number}} options
   */
  constructor(url, { token = "", acceptEvents = ACCEPT_EVENTS, reconnect = true, maxBackoffMs = 5000 } = {}) {
    super();
    this.url = url;
    this.token = token;
    this.acceptEvents = acceptEvents;
    this.reconnect = reconnect;
    this.maxBackoffMs = maxBackoffMs;
    this.state = "idle"; // idle | connecting | open | reconnecting | closed
    this.sessionId = null; // the server's id for our session, from its first HAI
    this.user = null;
    this.lastRxSeq = 0; // highest seq delivered in order
    this.serverHai = null;
    this._txSeq = 1; // our last seq: our HAI is always "1"
    this.transactions = new Map(); // transaction id -> the last tseq seen: where to rejoin after a restart
    this._restarted = false;
    this._orphans = []; // unacknowledged messages of a session that is gone: sent again after the rejoin
    this._unacked = []; // [{seq, frame}] sent (or waiting to be sent) and not yet acknowledged
    this._early = new Map(); // seq -> envelope received past a gap
    this._gapTimer = null;
    this._ws = null;
    this._ready = false; // session.ready seen on this socket
    this._connectionHai = null; // the server HAI of the current socket
    this._attempt = 0;
    this._closing = false;
    this._waiters = new Set();
  }

  // --- connection ---------------------------------------------------------------------------------

  /** Connect and handshake; resolves with the INFO session.ready payload. */
  connect() {
    this._closing = false;
    const ready = this.waitFor((e) => {
      if (e.type === "ERROR" && HANDSHAKE_ERRORS.has(e.payload?.code)) {
        return new HaipError(e.payload.code, e.payload.message, e);
      }
      return e.type === "INFO" && e.payload?.event === "session.ready";
    }, 0);
    this._open();
    return ready.then((e) => e.payload);
  }

  /** Close for good (no reconnect). */
  close() {
    this._closing = true;
    clearInterval(this._watchdog);
    clearTimeout(this._handshakeTimer);
    clearTimeout(this._reconnectTimer); // (a reviewer's find: a connect() after it met the old backoff's socket)
    this._setState("closed", "closed by the page");
    this._ws?.close(1000, "bye");
  }

  /** Drop the socket as a network failure would; the client reconnects and resumes. */
  dropConnection() {
    this._ws?.close(4000, "dropped on purpose");
  }

  _open() {
    clearTimeout(this._reconnectTimer);
    this._setState(this.sessionId ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url);
    this._ws = ws;
    this._ready = false;
    this._connectionHai = null;
    ws.onmessage = (m) => {
      this._heardAt = Date.now();
      this._onFrame(m.data);
    };
    ws.onclose = (e) => this._onClose(ws, e);
    // A failed connection's close follows its error, and reconnects; with no handler Node's `ws` threw the
    // error out of the process (a front-end developer's find: ECONNREFUSED while the server restarted).
    ws.onerror = () => {};
    this._heardAt = Date.now();
    clearInterval(this._watchdog);
    this._watchdog = setInterval(() => this._checkSilence(ws), 1000);
    clearTimeout(this._handshakeTimer);
    this._handshakeTimer = setTimeout(() => {
      if (ws === this._ws && !this._ready && !this._closing) this._letGo(ws, 4002, `not ready in ${HANDSHAKE_MS / 1000} s`);
    }, HANDSHAKE_MS);
  }

  /** Let ``ws`` go as a failure would (a line that stalled: its close may never come), and reconnect. */
  _letGo(ws, code, reason) {
    ws.onmessage = ws.onclose = null; // (onerror stays: a late error must not throw)
    try {
      ws.close(code, "given up");
    } catch {
      // (closing a socket that cannot close: it is let go all the same)
    }
    this._onClose(ws, { code, reason });
  }

  /** A line that stalls (a phone between cells) closes nothing, and a browser's socket never says so: the
   * runtime PINGs every heartbeat_interval_seconds (its HAI says so), so twice that (and 5 s) without a
   * frame means the line is dead. Dropped then, as a failure would: the client reconnects and resumes.
   * A browser tells of whole frames only, so the wait also allows the largest frame time to come at
   * 32 KB/s (a slow line is not a dead one: dropped mid-frame, it would be sent that frame again). */
  _checkSilence(ws) {
    const caps = this._connectionHai?.payload?.capabilities || {};
    const interval = caps.heartbeat_interval_seconds;
    if (ws !== this._ws || this._closing) return clearInterval(this._watchdog);
    const allowed = 2 * interval + 5 + (caps.max_frame_bytes || 0) / 32768;
    if (!interval || Date.now() - this._heardAt <= allowed * 1000) return;
    this._letGo(ws, 4001, `nothing heard from the server for ${Math.round(allowed)} s`);
  }

  _onClose(ws, event) {
    if (ws !== this._ws) return;
    clearInterval(this._watchdog); // (a reviewer's find: left running, it reopened a connection closed for good)
    clearTimeout(this._handshakeTimer);
    this._ready = false;
    if (this._closing) return;
    // (A re-tester's find: a line that stalled in the handshake got the server's 1008 for a HAI it never had.)
    if (!this.reconnect || (FATAL_CLOSE_CODES.has(event.code) && event.reason !== NO_HAI)) {
      this._setState("closed", event.reason || `closed (${event.code})`);
      this._failWaiters(new HaipError("CLOSED", event.reason || `connection closed (${event.code})`));
      return;
    }
    const delay = Math.min(this.maxBackoffMs, 200 * 2 ** this._attempt) * (0.75 + Math.random() / 2);
    this._attempt += 1;
    this._setState("reconnecting", `connection lost (${event.code}); retrying in ${Math.round(delay)} ms`);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._closing || this._open(), delay);
  }

  _setState(state, reason = "") {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, reason } }));
  }

  // --- receiving ----------------------------------------------------------------------------------

  _onFrame(text) {
    let env;
    try {
      env = JSON.parse(text);
    } catch {
      return; // the runtime only sends JSON; ignore anything else
    }
    if (this._connectionHai === null) return this._onServerHai(env);
    if (env.session === this._connectionHai.session && env.session !== this.sessionId) {
      // We asked to resume but the server started a new session (ERROR RESUME_FAILED): adopt it,
      // numbered afresh from its HAI (seq 1 both ways); the conversations are rejoined once it is ready.
      this.sessionId = env.session;
      this.lastRxSeq = 1;
      this._txSeq = 1;
      this._orphans = this._unacked.filter((u) => RESENT_AFTER_RESTART.has(u.type)); // typed while away
      this._unacked = [];
      this._early.clear();
      this._restarted = true;
    }
    const seq = Number(env.seq);
    if (!Number.isSafeInteger(seq) || seq <= this.lastRxSeq) return; // a duplicate: we have it
    if (seq > this.lastRxSeq + 1) {
      this._early.set(seq, env);
      this._watchGap();
      return;
    }
    this._deliver(env);
    while (this._early.has(this.lastRxSeq + 1)) {
      const next = this._early.get(this.lastRxSeq + 1);
      this._early.delete(this.lastRxSeq + 1);
      this._deliver(next);
    }
  }

  _onServerHai(env) {
    this._connectionHai = env;
    this.serverHai = env.payload;
    const resuming = this.sessionId !== null;
    if (!resuming) {
      this.sessionId = env.session;
      this.lastRxSeq = Number(env.seq);
    }
    const payload = { haip_version: "1.1.2", accept_major: [1], accept_events: this.acceptEvents };
    if (this.token) payload.auth = { token: `Bearer ${this.token}` };
    if (resuming) payload.last_rx_seq = String(this.lastRxSeq);
    // Always seq 1: a fresh session numbers from it, a resumed one drops it as already seen.
    this._ws.send(JSON.stringify(this._envelope("HAI", payload, { seq: 1 })));
    if (!resuming) this._emit(env);
  }

  _deliver(env) {
    this.lastRxSeq = Number(env.seq);
    // Why the last resume failed ("restarted", "too_old", "unknown"...): what a "restarted" event follows.
    if (env.type === "ERROR" && env.payload?.code === "RESUME_FAILED") this.resumeFailure = env.payload.detail?.reason || null;
    if (env.transaction && env.tseq !== undefined) this.transactions.set(env.transaction, Number(env.tseq));
    if (env.ack !== undefined) this._acknowledged(Number(env.ack));
    if (env.type === "PING") this.send("PONG", { nonce: env.payload?.nonce });
    if (env.type === "REPLAY_REQUEST") {
      const { from_seq: from, to_seq: to } = env.payload;
      this._resend(Number(from), to === undefined ? Infinity : Number(to));
    }
    if (env.type === "INFO" && env.payload?.event === "session.ready") {
      this.user = env.payload.user;
      this._ready = true;
      clearTimeout(this._handshakeTimer);
      this._attempt = 0;
      const restarted = this._restarted;
      this._restarted = false;
      this._setState("open", env.payload.resumed ? "resumed" : restarted ? "restarted" : "connected");
      this._resend(1, Infinity); // whatever waited while we were away, and what the server may have missed
      if (restarted) this._rejoin();
    }
    this._emit(env);
  }

  _rejoin() {
    const rejoined = [...this.transactions.keys()];
    for (const [transaction, tseq] of this.transactions) {
      this.send("TRANSACTION_JOIN", { since: String(tseq) }, { transaction });
    }
    const orphans = this._orphans;
    this._orphans = [];
    for (const { type, payload, options } of orphans) this.send(type, payload, options);
    this.dispatchEvent(new CustomEvent("restarted", { detail: rejoined }));
  }

  _emit(env) {
    for (const waiter of [...this._waiters]) waiter.check(env);
    this.dispatchEvent(new CustomEvent("envelope", { detail: env }));
  }

  _acknowledged(ack) {
    while (this._unacked.length && this._unacked[0].seq <= ack) this._unacked.shift();
  }

  _resend(fromSeq, toSeq) {
    for (const { seq, frame } of this._unacked) {
      if (seq >= fromSeq && seq <= toSeq && this._ws.readyState === WebSocket.OPEN) this._ws.send(frame);
    }
  }

  _watchGap() {
    if (this._gapTimer) return;
    this._gapTimer = setTimeout(() => {
      this._gapTimer = null;
      if (!this._early.size) return;
      const to = Math.min(...this._early.keys()) - 1;
      this.send("REPLAY_REQUEST", { from_seq: String(this.lastRxSeq + 1), to_seq: String(to) });
    }, GAP_GRACE_MS);
  }

  // --- sending ------------------------------------------------------------------------------------

  _envelope(type, payload, { seq, transaction = null, channel = "SYSTEM", id = uuid() }) {
    const env = {
      id, session: this.sessionId || "", transaction, seq: String(seq), ts: String(Date.now()),
      channel, type, payload,
    };
    if (this.lastRxSeq) env.ack = String(this.lastRxSeq);
    return env;
  }

  /**
   * Send one envelope; returns its id. While disconnected it waits and goes out after the resume.
   * @param {{transaction?: string|null, channel?: string, id?: string}} options
   */
  send(type, payload, options = {}) {
    const env = this._envelope(type, payload, { ...options, seq: this._txSeq + 1 });
    const frame = JSON.stringify(env);
    this._checkSize(type, frame);
    this._txSeq += 1;
    this._unacked.push({ seq: this._txSeq, frame, type, payload, options });
    if (this._ready && this._ws.readyState === WebSocket.OPEN) this._ws.send(frame);
    return env.id;
  }

  /**
   * Throws `HaipError` MESSAGE_TOO_LARGE for a frame over the server's limit (its HAI's
   * `capabilities.max_frame_bytes`): refused here, not sent, so it is never re-sent after a reconnect
   * either (a WebSocket frame far over the limit closes the connection with 1009).
   */
  _checkSize(type, frame) {
    const limit = this.serverHai?.capabilities?.max_frame_bytes ?? DEFAULT_MAX_FRAME_BYTES;
    if (frame.length * 3 <= limit) return; // UTF-8 takes at most 3 bytes per UTF-16 unit
    const size = new TextEncoder().encode(frame).length;
    if (size > limit) {
      throw new HaipError("MESSAGE_TOO_LARGE", `${type} of ${size} bytes is over the server's limit of ${limit}; not sent`);
    }
  }

  /** The first envelope from now on for which `match(envelope)` is true (0 = no time limit). */
  waitFor(match, timeoutMs = REQUEST_TIMEOUT_MS) {
    return new Promise((resolve, reject) => {
      const waiter = {
        check: (env) => {
          let result;
          try {
            result = match(env);
          } catch (error) {
            result = error;
          }
          if (!result) return;
          this._waiters.delete(waiter);
          clearTimeout(waiter.timer);
          if (result instanceof Error) reject(result);
          else resolve(env);
        },
        fail: (error) => {
          clearTimeout(waiter.timer);
          reject(error);
        },
      };
      if (timeoutMs) {
        waiter.timer = setTimeout(() => {
          this._waiters.delete(waiter);
          reject(new HaipError("TIMEOUT", "no answer from the server"));
        }, timeoutMs);
      }
      this._waiters.add(waiter);
    });
  }

  _failWaiters(error) {
    for (const waiter of [...this._waiters]) waiter.fail(error);
    this._waiters.clear();
  }

  /** Send a request; resolve with the answer `match` picks, reject on the ERROR that answers it. */
  request(type, payload, options, match) {
    const id = options.id || uuid();
    const answer = this.waitFor((env) => {
      if (env.type === "ERROR" && env.payload?.related_id === (options.reference || id)) {
        return new HaipError(env.payload.code, env.payload.message, env);
      }
      return match(env);
    });
    this.send(type, payload, { ...options, id });
    return answer;
  }

  // --- conversations ------------------------------------------------------------------------------

  /** The agents this user may start: [{name, description}] (TOOL_LIST outside a transaction). */
  async listAgents() {
    const env = await this.request("TOOL_LIST", {}, {}, (e) => e.type === "TOOL_LIST" && !e.transaction);
    return env.payload.tools;
  }

  /** Start a conversation with `agent`; resolves with the transaction id. */
  async startTransaction(agent, params = {}) {
    const reference = uuid();
    const env = await this.request(
      "TRANSACTION_START",
      { toolName: agent, params },
      { transaction: reference, reference },
      (e) => e.type === "TRANSACTION_START" && e.payload?.referenceId === reference,
    );
    return env.transaction;
  }

  /** Join a conversation by id (the user's own, from another tab or device). */
  join(transaction) {
    return this.request("TRANSACTION_JOIN", {}, { transaction },
      (e) => e.type === "TRANSACTION_JOIN" && e.transaction === transaction);
  }

  /** Send a message; returns its id, which is also its message_id: sent again after a restart (what the
   * lost session had not acknowledged), the runtime takes it once. */
  sendText(transaction, text) {
    const id = uuid();
    return this.send("MESSAGE", { text, message_id: id }, { transaction, channel: "USER", id });
  }

  /** {name, description, inputSchema, outputSchema?} of an MCP tool of the transaction. */
  async toolSchema(transaction, tool) {
    const env = await this.request("TOOL_SCHEMA", { tool }, { transaction },
      (e) => e.type === "TOOL_SCHEMA" && e.payload?.tool === tool);
    return env.payload.schema;
  }

  /** Call an MCP tool directly (no agent in between); returns the call_id of its TOOL_* events. */
  callTool(transaction, tool, params) {
    const callId = uuid();
    this.send("TOOL_CALL", { call_id: callId, tool, params }, { transaction });
    return callId;
  }

  cancelTool(transaction, callId, reason = "cancelled by the user") {
    return this.send("TOOL_CANCEL", { call_id: callId, reason }, { transaction });
  }

  /** Answer AWAITING_APPROVAL: decision "approve" or "reject". */
  decide(transaction, callId, decision, reason) {
    const payload = { call_id: callId, decision };
    if (reason) payload.reason = reason;
    return this.send("TOOL_UPDATE", payload, { transaction });
  }

  /** Answer INPUT_REQUIRED with the values asked for (or decline with `input = null`). */
  answerInput(transaction, callId, input) {
    const payload = input === null ? { call_id: callId, decision: "decline" } : { call_id: callId, input };
    return this.send("TOOL_UPDATE", payload, { transaction });
  }

  cancelRun(transaction, runId) {
    return this.send("RUN_CANCEL", { run_id: runId }, { transaction });
  }

  endTransaction(transaction, reason) {
    return this.send("TRANSACTION_END", reason ? { reason } : {}, { transaction });
  }
}
