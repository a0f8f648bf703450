// The playground page: renders what a HaipClient receives, and turns clicks into HAIP messages.
// All protocol work is in haip-client.js; this file is only UI.

import { HaipClient, HaipError } from "./haip-client.js";
import { renderMarkdown } from "./markdown.js";
import { attachVoice } from "./voice.js";

const $ = (id) => document.getElementById(id);

/** Create an element: el("div", {class: "x", onclick: f}, child, "text", ...). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const state = {
  client: null,
  user: null,
  tx: null, // the transaction shown
  agent: null,
  members: new Set(),
  token: null,
  messages: new Map(), // message_id -> element of its text
  raw: new Map(), // message_id -> its text as written (Markdown), rendered once it is whole
  calls: new Map(), // call_id -> {card, ...parts}
  runs: new Map(), // run_id -> agent
  queued: new Set(), // message ids waiting for a turn (INFO run.queued): Stop takes them out too
  clips: new Map(), // a recording's message_id -> {parts, player, ...}: one player however many chunks
  historyUpTo: 0, // the tseq this page's join was answered at: what is not later is history, not played by itself
  delivered: [], // seqs of every envelope delivered, for the tests and the curious
  onPlaying: () => showRuns(), // voice.js: an answer began or stopped playing (Stop shows while one plays)
};
window.playground = state;

// --- connection ------------------------------------------------------------------------------------

function start() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (!token) {
    $("login").hidden = false;
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      params.set("token", $("token").value.trim());
      history.replaceState(null, "", `?${params}`);
      $("login").hidden = true;
      connect(params.get("token"));
    }, { once: true });
    return;
  }
  connect(token);
}

async function connect(token) {
  state.token = token;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const client = new HaipClient(`${scheme}://${location.host}/haip/websocket`, { token });
  state.client = client;
  client.addEventListener("state", (e) => showConnection(e.detail));
  client.addEventListener("envelope", (e) => {
    state.delivered.push(Number(e.detail.seq));
    render(e.detail);
  });
  client.addEventListener("restarted", () => {
    // (A re-tester's find: a resume refused for an absence past the replay window was said as a restart.)
    const why = client.resumeFailure === "restarted" ? "The server restarted"
      : client.resumeFailure === "too_old" ? "You were away longer than this session keeps what it sends"
      : "This session could not be resumed";
    note(`${why}: new session, conversation rejoined.`);
  });
  $("drop").addEventListener("click", () => client.dropConnection());
  attachVoice(state, client);
  try {
    const ready = await client.connect();
    state.user = ready.user;
    showAgents(await client.listAgents());
    window.addEventListener("hashchange", route);
    await route();
    refreshConversations();
  } catch (error) {
    fail(error);
    if (error.code === "AUTHENTICATION_FAILED") $("login").hidden = false;
  }
}

function showConnection({ state: connection, reason }) {
  $("connection").dataset.state = connection;
  const user = state.client.user ? ` as ${state.client.user}` : "";
  const text = {
    connecting: "connecting…",
    open: `connected${user}${reason === "resumed" || reason === "restarted" ? ` (${reason})` : ""}`,
    reconnecting: "reconnecting…",
    closed: `disconnected: ${reason}`,
  }[connection] || connection;
  $("connection-text").textContent = text;
  $("connection").title = reason;
}

// --- agents, conversations ---------------------------------------------------------------------------

function showAgents(agents) {
  state.hearing = new Set(agents.filter((agent) => agent.annotations?.hearsAudio).map((agent) => agent.name));
  const list = $("agents");
  list.replaceChildren();
  for (const agent of agents) {
    list.append(el("li", { class: "agent", dataset: { agent: agent.name }, onclick: () => startConversation(agent.name) },
      el("div", { class: "name" }, agent.name),
      el("div", { class: "desc" }, renderMarkdown(agent.description || ""))));
  }
  if (!agents.length) list.append(el("li", { class: "muted" }, "no agents you may start"));
}

function resetConversation() {
  state.tx = null;
  if ($("talk")) $("talk").hidden = true; // until a conversation with an agent that hears opens
  state.messages.clear();
  state.raw.clear();
  state.calls.clear();
  state.runs.clear();
  state.queued.clear();
  state.members.clear();
  for (const clip of state.clips.values()) if (clip.player.src) URL.revokeObjectURL(clip.player.src);
  state.clips.clear();
  state.historyUpTo = 0;
  $("log").replaceChildren();
  showRuns();
  $("tools").replaceChildren(el("li", { class: "muted" }, "start a conversation to see its tools"));
  $("text").disabled = $("send").disabled = true;
}

async function startConversation(agent) {
  if (!mayLeave()) return;
  resetConversation();
  for (const item of document.querySelectorAll("#agents li")) item.classList.toggle("active", item.dataset.agent === agent);
  try {
    state.tx = await state.client.startTransaction(agent);
  } catch (error) {
    fail(error);
    return;
  }
  openConversation(agent, [agent]);
  showInUrl(state.tx);
  refreshConversations();
}

/** Hold-to-talk only where an agent hears audio (a newcomer's find: the button sat under every agent). */
function showTalk(agents) {
  const talk = $("talk");
  if (talk) talk.hidden = !state.tx || !agents.some((name) => state.hearing?.has(name));
}

function openConversation(agent, agents) {
  state.agent = agent;
  showTalk(agents);
  $("conversation-head").textContent = "";
  $("conversation-head").append(
    `Talking to ${agent} · conversation `, el("code", { id: "transaction-id" }, state.tx));
  $("text").disabled = $("send").disabled = false;
  showSidebar(false);
  markActive();
  $("text").focus();
}

/** Open conversation `id` (the user's own, or one a role lets them join): its history, then live. */
async function joinConversation(id) {
  resetConversation();
  state.tx = id; // set first: the history follows the reply at once
  try {
    const reply = await state.client.join(id);
    openConversation(reply.payload.agents.join(", "), reply.payload.agents);
  } catch (error) {
    state.tx = null;
    fail(error);
    showInUrl(null);
  }
}

$("join").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = $("join-id").value.trim();
  if (id && state.client) goTo(id);
});

// --- where you are: the open conversation in the URL (#/c/<id>), the list of yours -----------------------

function conversationInUrl() {
  const match = location.hash.match(/^#\/c\/([^/?#]+)$/);
  return match ? decodeURIComponent(match[1]) : null;
}

function showInUrl(id) {
  const hash = id ? `#/c/${encodeURIComponent(id)}` : "#/";
  if (location.hash !== hash) history.pushState(null, "", `${location.pathname}${location.search}${hash}`);
}

/** Follow the URL: reload, back and forward, and a shared link land on the conversation they name. */
async function route() {
  const id = conversationInUrl();
  if (id === state.tx) return;
  if (!mayLeave()) { showInUrl(state.tx); return; }
  if (id) await joinConversation(id);
  else newConversation();
}

function goTo(id) {
  if (id === state.tx) { showSidebar(false); return; }
  if (!mayLeave()) return;
  state.leaving = true; // asked already: route() must not ask again
  showInUrl(id);
  route().finally(() => { state.leaving = false; });
}

/** A tool waiting for this person's answer would be left waiting: ask before leaving it. */
function mayLeave() {
  if (state.leaving || !state.tx) return true;
  const waiting = [...state.calls.values()].filter((parts) =>
    ["INPUT_REQUIRED", "AWAITING_APPROVAL"].includes(parts.card.dataset.status));
  if (!waiting.length) return true;
  const tools = waiting.map((parts) => parts.card.dataset.tool).join(", ");
  return confirm(`${tools} is waiting for your answer in this conversation. Leave it unanswered?`);
}

function newConversation() {
  resetConversation();
  state.agent = null;
  $("conversation-head").textContent = "Pick an agent to start a conversation.";
  for (const item of document.querySelectorAll("#agents li")) item.classList.remove("active");
  markActive();
}

$("new-conversation").addEventListener("click", () => {
  if (!mayLeave()) return;
  state.leaving = true;
  showInUrl(null);
  newConversation();
  state.leaving = false;
  showSidebar(true); // the agents are there
});

async function refreshConversations() {
  let listing;
  try {
    const response = await fetch("/haip/transactions?limit=30", { headers: { Authorization: `Bearer ${state.token}` } });
    listing = await response.json();
    if (!response.ok) throw new Error(listing.error?.message || response.status);
  } catch (error) {
    $("conversations").replaceChildren(el("li", { class: "note error" }, `cannot list conversations: ${error.message}`));
    return;
  }
  const list = $("conversations");
  list.replaceChildren();
  for (const item of listing.transactions) {
    const when = new Date(item.last_activity).toLocaleString([], { dateStyle: "short", timeStyle: "short" });
    list.append(el("li", { class: "conversation", dataset: { id: item.id }, title: item.preview || "", onclick: () => goTo(item.id) },
      el("div", { class: "title" }, item.title || "(nothing said yet)"),
      el("div", { class: "desc" }, `${item.agents.join(", ")} · ${when}${item.state === "ended" ? " · ended" : ""}`)));
  }
  if (!listing.transactions.length) list.append(el("li", { class: "muted" }, "none yet"));
  markActive();
}

function markActive() {
  for (const item of document.querySelectorAll("#conversations li.conversation")) {
    item.classList.toggle("active", item.dataset.id === state.tx);
  }
}

// --- the sidebar on a narrow screen: behind the ☰ button -----------------------------------------------

function showSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("menu").setAttribute("aria-expanded", String(open));
}
$("menu").addEventListener("click", () => showSidebar(!document.body.classList.contains("sidebar-open")));

// --- the composer --------------------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text || !state.tx) return;
  let id;
  try {
    id = state.client.sendText(state.tx, text);
  } catch (error) {
    note(describe(error), "error"); // (too large: the text stays in the composer)
    return;
  }
  addMessage(id, state.user || "you", text, { mine: true });
  $("text").value = "";
});
$("text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => {
  // The waiting messages first (a RUN_CANCEL naming one takes it out of the queue), so none starts as
  // the running turns end.
  for (const messageId of state.queued) state.client.cancelRun(state.tx, messageId);
  for (const runId of state.runs.keys()) state.client.cancelRun(state.tx, runId);
  // An answer written already may still be spoken (a voice tester's find: nothing stopped it): its run is
  // asked to stop speaking, and what this page holds of it stops now.
  const spoken = state.voice?.playing?.dataset.run;
  if (spoken && !state.runs.has(spoken)) state.client.cancelRun(state.tx, spoken);
  state.voice?.stop?.();
  $("run-text").textContent = "stopping…";
});

// --- rendering what arrives ----------------------------------------------------------------------------

function render(env) {
  const p = env.payload && typeof env.payload === "object" ? env.payload : {};
  // RESUME_FAILED is the client's business: it carries on in a new session and rejoins ("restarted").
  if (env.type === "ERROR") return p.code === "RESUME_FAILED" || note(`${p.code}: ${p.message}`, "error");
  if (env.transaction !== state.tx || state.tx === null) return; // another conversation, or session-level
  switch (env.type) {
    case "TOOL_LIST": return showTools(p.tools || []);
    case "TRANSACTION_JOIN":
      if (p.omitted !== undefined) state.historyUpTo = Number(p.tseq) || 0; // this page's join: the history follows
      if (Number(p.omitted) > 0) markSkipped(Number(p.omitted));
      return showMembers(p);
    case "TRANSACTION_END": return note(`The conversation ended: ${p.reason || ""}`);
    case "MESSAGE_START": return addMessage(p.message_id, p.author || "agent", "", { streaming: true });
    case "MESSAGE_PART": return appendMessage(p.message_id, p.text || "");
    case "MESSAGE_END": return endMessage(p);
    case "MESSAGE":
      if (typeof env.payload === "string") return addMessage(env.id, env.channel === "AGENT" ? "agent" : "someone", env.payload);
      return addMessage(p.message_id || env.id, p.author || "someone", p.text || "",
        { mine: env.channel === "USER" && p.author === state.user });
    case "MESSAGE_UPDATE":
      if (state.messages.has(p.message_id)) {
        state.raw.set(p.message_id, p.text || "");
        state.messages.get(p.message_id).replaceChildren(renderMarkdown(p.text || ""));
      }
      return;
    case "AUDIO":
    case "AUDIO_CHUNK": return addAudio(env, p);
    case "RUN_STARTED":
      state.runs.set(p.run_id, p.agent);
      state.queued.delete(p.message_id);
      return showRuns();
    case "RUN_FINISHED": {
      const agent = state.runs.get(p.run_id);
      state.runs.delete(p.run_id);
      showRuns();
      if (p.status === "CANCELLED") note(`${agent || "the agent"}'s turn was stopped`, "stopped");
      return refreshConversations();
    }
    case "RUN_ERROR":
      state.runs.delete(p.run_id);
      showRuns();
      refreshConversations();
      return note(`${p.code}: ${p.message}`, "error");
    case "TOOL_CALL": return toolCall(p);
    case "TOOL_UPDATE": return toolUpdate(p);
    case "TOOL_DONE": return toolDone(p);
    case "INFO":
      if (p.event === "run.queued") {
        state.queued.add(p.message_id);
        showRuns();
      } else if (p.event === "run.unqueued") {
        state.queued.delete(p.message_id);
        showRuns();
        if (p.reason) note(`a message was not answered: ${p.reason}`, "stopped");
      } else if (p.event === "mcp.server" && p.tools_changed) {
        note(`MCP server ${p.server} changed its tools`);  // connected all along: the new list follows
      } else if (p.event === "mcp.server") {
        note(`MCP server ${p.server}: ${p.state}${p.error ? ` (${p.error})` : ""}`);
      } else if (p.event === "member.left" && p.user !== state.user) {
        state.members.delete(p.user);
        note(`${p.user} left the conversation`);
      } else if (p.event === "audio.unheard") {
        note(`Nobody heard that: ${p.reason}`, "error");
      } else if (p.event === "speech.waiting") {
        note(`Your recording waits to be heard: ${p.ahead} ahead of it`);
      } else if (p.event === "speech.failed") {
        note(`The answer could not be spoken: ${p.code}: ${p.message}`, "error");
      }
      return;
    default:
  }
}

function note(text, kind = "") {
  $("log").append(el("div", { class: `note ${kind}` }, text));
  scrollDown();
}

function scrollDown() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

/** Show a failed request, unless it was an ERROR envelope (render() shows those). */
function fail(error) {
  if (!error.envelope) note(describe(error), "error");
}

function describe(error) {
  return error instanceof HaipError ? error.message : `Error: ${error.message || error}`;
}

function addMessage(id, author, text, { mine = false, streaming = false } = {}) {
  const body = el("div", { class: "text" }, streaming ? text : renderMarkdown(text));
  const cls = ["msg", mine ? "mine" : "", streaming ? "streaming" : ""].join(" ").trim();
  $("log").append(el("div", { class: cls, dataset: { messageId: id, author } }, el("span", { class: "author" }, author), body));
  state.messages.set(id, body);
  state.raw.set(id, text);
  scrollDown();
}

/** A rejoin that replayed only the latest events (``omitted`` more: a long time away, a long answer): an
 * answer still streaming here misses its middle, so it says so where the gap is, and the note says how
 * to see all (a tester's find: the answer read on as if nothing were missing). */
function markSkipped(omitted) {
  for (const [id, body] of state.messages) {
    const message = body.closest(".msg");
    if (!message.classList.contains("streaming")) continue;
    message.dataset.gap = "true";
    state.raw.set(id, `${state.raw.get(id) || ""} [… missed while away …] `);
    body.textContent = state.raw.get(id);
  }
  note(`${omitted} events were not replayed when this conversation was rejoined: reload the page to read it whole.`);
}

/** While it streams a message is plain text; whole, it is rendered as Markdown. */
function appendMessage(id, text) {
  if (!state.messages.has(id)) addMessage(id, "agent", "", { streaming: true });
  const raw = (state.raw.get(id) || "") + text;
  state.raw.set(id, raw);
  state.messages.get(id).textContent = raw;
  scrollDown();
}

function endMessage({ message_id: id, stop_reason: stopReason }) {
  const body = state.messages.get(id);
  if (!body) return;
  body.closest(".msg").classList.remove("streaming");
  body.replaceChildren(renderMarkdown(state.raw.get(id) || ""));
  if (stopReason) body.closest(".msg").dataset.stopReason = stopReason; // "length": the text ends with the cut marker
  scrollDown();
}

/** A recording is one player however many chunks it came in (a chunk of WebM after the first does not
 * play alone): its chunks' bytes are joined, and the player takes them anew as each comes. */
function addAudio(env, p) {
  if (!p.data) return; // two-frame audio is not asked for by this page
  if (env.channel === "AUDIO_OUT" && typeof p.text === "string") return; // a spoken answer's sentence: voice.js plays it
  const author = p.author || (env.channel === "AUDIO_OUT" ? "agent" : "someone");
  const clip = clipOf(p.message_id || env.id, author, p.mime || "audio/wav");
  if (typeof p.duration_ms === "number") clip.ms += p.duration_ms;
  addToClip(clip, Uint8Array.from(atob(p.data), (c) => c.charCodeAt(0)));
}

/** The player of recording `id` (made, under the log, with its first piece). */
function clipOf(id, author, mime) {
  let clip = state.clips.get(id);
  if (!clip) {
    clip = { parts: [], mime, ms: 0, player: el("audio", { controls: true, preload: "metadata" }),
      seconds: el("span", { class: "muted" }) };
    state.clips.set(id, clip);
    $("log").append(el("div", { class: `msg audio${author === state.user ? " mine" : ""}`, dataset: { author, messageId: id } },
      el("span", { class: "author" }, author), clip.player, clip.seconds));
  }
  return clip;
}

function addToClip(clip, piece) {
  clip.parts.push(piece);
  if (clip.player.src) URL.revokeObjectURL(clip.player.src);
  clip.player.src = URL.createObjectURL(new Blob(clip.parts, { type: clip.mime }));
  clip.seconds.textContent = clip.ms ? ` ${(clip.ms / 1000).toFixed(1)} s` : "";
  scrollDown();
}

/** Your own recording, as the others see it (voice.js: the server does not send it back to you). */
state.showRecording = (id, blob) => {
  const clip = clipOf(id, state.user, blob.type || "audio/webm");
  if (!clip.parts.length) addToClip(clip, blob);
};

/** This page's own join or start lists who is there; someone else's join announces them. */
function showMembers({ members = [], agents = [], joined }) {
  state.members = new Set(members);
  if (agents.length) showTalk(agents); // (an agent added meanwhile may hear)
  $("conversation-head").dataset.members = members.join(",");
  if (joined && joined !== state.user) note(`${joined} joined the conversation`);
  else note(`Members: ${members.join(", ")} · agents: ${agents.join(", ")}`);
}

function showRuns() {
  const speaking = Boolean(state.voice?.playing);
  $("run").hidden = state.runs.size === 0 && state.queued.size === 0 && !speaking;
  const waiting = state.queued.size ? ` (${state.queued.size} message${state.queued.size > 1 ? "s" : ""} waiting)` : "";
  const idle = speaking ? "speaking…" : "waiting…";
  const working = state.runs.size ? `${[...new Set(state.runs.values())].join(", ")} is working…` : idle;
  if (!$("run").hidden) $("run-text").textContent = working + waiting;
}

// --- MCP tools ----------------------------------------------------------------------------------------

function showTools(tools) {
  const list = $("tools");
  list.replaceChildren();
  if (!tools.length) list.append(el("li", { class: "muted" }, "no MCP tools in this conversation"));
  for (const tool of tools) {
    const details = el("details", {}, el("summary", {}, "schema and direct call"));
    details.addEventListener("toggle", () => details.open && loadSchema(tool.name, details), { once: true });
    list.append(el("li", { class: "tool", dataset: { tool: tool.name } },
      el("div", { class: "name" }, tool.name),
      el("div", { class: "desc" }, renderMarkdown(tool.description || "")),
      details));
  }
}

async function loadSchema(name, details) {
  try {
    const schema = await state.client.toolSchema(state.tx, name);
    const form = schemaForm(schema.inputSchema || {}, "Call", (params) => state.client.callTool(state.tx, name, params));
    details.append(el("pre", {}, JSON.stringify(schema.inputSchema, null, 2)), form);
  } catch (error) {
    details.append(el("div", { class: "note error" }, describe(error)));
  }
}

/** A form for a JSON Schema object: one field per property; `onSubmit(values)` with typed values. */
function schemaForm(schema, submitLabel, onSubmit, ...extraButtons) {
  const properties = schema.properties || {};
  const required = new Set(schema.required || []);
  const form = el("form", { class: "schema-form" });
  const fields = [];
  for (const [key, raw] of Object.entries(properties)) {
    const prop = raw.anyOf ? raw.anyOf.find((s) => s.type !== "null") || {} : raw;
    const type = prop.type || "string";
    const label = raw.title || prop.title || key;
    let input;
    if (prop.enum) {
      input = el("select", { name: key }, ...prop.enum.map((v) => el("option", { value: v, selected: v === raw.default }, String(v))));
    } else if (type === "boolean") {
      input = el("input", { type: "checkbox", name: key, checked: raw.default === true });
    } else {
      const numeric = type === "number" || type === "integer";
      input = el("input", {
        name: key, type: numeric ? "number" : "text", step: type === "integer" ? "1" : numeric ? "any" : null,
        required: required.has(key), value: raw.default ?? null, placeholder: raw.description || prop.description || null,
      });
    }
    fields.push({ key, type, input, optional: !required.has(key) });
    const caption = el("span", { class: required.has(key) ? "required" : "" }, label);
    form.append(type === "boolean" ? el("label", { class: "check" }, input, caption) : el("label", {}, caption, input));
  }
  const submit = el("button", { type: "submit", class: "primary" }, submitLabel);
  form.append(el("div", { class: "actions" }, submit, ...extraButtons));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const values = {};
    for (const { key, type, input, optional } of fields) {
      if (type === "boolean") values[key] = input.checked;
      else if (input.value === "" && optional) continue;
      else if (type === "integer") values[key] = parseInt(input.value, 10);
      else if (type === "number") values[key] = Number(input.value);
      else values[key] = input.value;
    }
    onSubmit(values, form);
  });
  return form;
}

// --- tool call cards ------------------------------------------------------------------------------------

function toolCall({ call_id: callId, tool, params, caller }) {
  if (state.calls.has(callId)) return;
  const parts = {
    status: el("span", { class: "status" }, "QUEUED"),
    fill: el("div", { class: "fill" }),
    progress: el("div", { class: "progress-text" }),
    actions: el("div", { class: "actions" }),
    result: el("div", { class: "result" }),
  };
  parts.bar = el("div", { class: "bar indeterminate" }, parts.fill);
  parts.cancel = el("button", { type: "button", class: "danger cancel", onclick: () => {
    state.client.cancelTool(state.tx, callId);
    parts.cancel.disabled = true;
    parts.cancel.textContent = "cancelling…";
  } }, "Cancel");
  parts.card = el("div", { class: "card", dataset: { callId, tool, status: "QUEUED" } },
    el("div", { class: "top" },
      el("span", { class: "tool-name" }, tool),
      el("span", { class: "caller" }, caller ? `called by ${caller}` : ""),
      parts.status, parts.cancel),
    el("div", { class: "params" }, JSON.stringify(params || {})),
    parts.bar, parts.progress, parts.actions, parts.result);
  state.calls.set(callId, parts);
  $("log").append(parts.card);
  scrollDown();
}

function setStatus(parts, status) {
  parts.card.dataset.status = status;
  parts.status.textContent = status.replace("_", " ");
}

function toolUpdate(p) {
  const parts = state.calls.get(p.call_id);
  if (!parts) return;
  setStatus(parts, p.status);
  if (typeof p.progress === "number") {
    const total = typeof p.total === "number" && p.total > 0 ? p.total : null;
    parts.bar.classList.toggle("indeterminate", total === null);
    if (total !== null) parts.fill.style.width = `${Math.min(100, (100 * p.progress) / total)}%`;
    parts.card.dataset.progress = total !== null ? `${p.progress}/${total}` : `${p.progress}`;
    parts.progress.textContent = [p.message, total !== null ? `${p.progress} of ${total}` : `${p.progress}`]
      .filter(Boolean).join(" · ");
  } else if (!parts.card.dataset.progress) {
    parts.progress.textContent = p.message || "";
  }
  parts.actions.replaceChildren();
  if (p.status === "AWAITING_APPROVAL") askApproval(p.call_id, parts);
  if (p.status === "INPUT_REQUIRED") askInput(p.call_id, parts, p.request || {});
}

function askApproval(callId, parts) {
  const reason = el("input", { class: "reason", placeholder: "reason (optional)" });
  const decide = (decision) => () => {
    state.client.decide(state.tx, callId, decision, reason.value.trim());
    parts.actions.replaceChildren(el("span", { class: "muted" }, `${decision === "approve" ? "approved" : "rejected"} by you`));
  };
  parts.actions.append(
    el("span", {}, "This tool needs your approval:"),
    el("button", { type: "button", class: "primary approve", onclick: decide("approve") }, "Approve"),
    el("button", { type: "button", class: "danger reject", onclick: decide("reject") }, "Reject"),
    reason);
}

function askInput(callId, parts, request) {
  const decline = el("button", { type: "button", class: "decline", onclick: () => {
    state.client.answerInput(state.tx, callId, null);
    parts.actions.replaceChildren(el("span", { class: "muted" }, "declined"));
  } }, "Decline");
  const form = schemaForm(request.schema || {}, "Send", (values) => {
    state.client.answerInput(state.tx, callId, values);
    parts.actions.replaceChildren(el("span", { class: "muted" }, "answered"));
  }, decline);
  parts.actions.append(el("div", { class: "question" }, request.message || "The tool asks for input:"), form);
}

function toolDone(p) {
  const parts = state.calls.get(p.call_id);
  if (!parts) return;
  setStatus(parts, p.status);
  parts.cancel.remove();
  parts.actions.replaceChildren();
  parts.bar.classList.remove("indeterminate");
  if (!parts.card.dataset.progress) parts.progress.textContent = "";
  if (p.status === "OK") parts.fill.style.width = "100%";
  if (p.status === "OK") {
    const texts = (p.result?.content || []).filter((b) => b.type === "text").map((b) => b.text);
    parts.result.textContent = texts.length ? texts.join("\n") : JSON.stringify(p.result?.structuredContent ?? p.result);
  } else {
    parts.result.classList.add("error");
    parts.result.textContent = p.error ? `${p.error.code}: ${p.error.message}` : p.status;
  }
}

start();
