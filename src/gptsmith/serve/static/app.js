// gptsmith web chat. Plain JS, no build step. Everything is stored on the server (/api/...);
// this page only renders it. Model output is untrusted: markdown goes through marked, then DOMPurify.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { convId: null, conv: null, info: null, controller: null, streaming: false, mode: "chat", battle: null };

// ------------------------------------------------------------------------------------------- server calls
async function api(path, options = {}) {
  const opts = { ...options, headers: { "Content-Type": "application/json", ...(options.headers || {}) } };
  if (opts.body && typeof opts.body !== "string") opts.body = JSON.stringify(opts.body);
  const res = await fetch(path, opts);
  if (res.status === 401) { location.href = "/login"; throw new Error("not logged in"); }
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try { message = (await res.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return res;
}
const getJSON = async (path, options) => (await api(path, options)).json();

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

// ------------------------------------------------------------------------------------------- rendering
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
});

function renderMarkdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(marked.parse(text || "", { gfm: true, breaks: true }),
                                    { FORBID_TAGS: ["style", "form", "input", "img"], FORBID_ATTR: ["style"] });
}

function button(label, cls, onClick, title) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = cls;
  if (title) b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

// ------------------------------------------------------------------------------------------- assistants
// An assistant's answer cites its retrieved passages as [1], [2]...: each number becomes a button that opens
// the passage (its citation and text) in a panel; the list under the answer shows every passage it was given.
function renderAnswer(el, text, sources) {
  renderMarkdown(el, text);
  if (sources && sources.length) linkCitations(el, sources);
}

function citeButton(src) {
  const b = button(`[${src.index}]`, "cite", () => showSource(src), src.citation);
  b.dataset.index = src.index;
  return b;
}

function linkCitations(el, sources) {
  const byIndex = new Map(sources.map((s) => [String(s.index), s]));
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  const nodes = [];
  while (walker.nextNode()) if (!walker.currentNode.parentElement.closest("pre, code")) nodes.push(walker.currentNode);
  for (const node of nodes) {
    const parts = node.textContent.split(/(\[\d+\])/);
    if (parts.length === 1) continue;
    const frag = document.createDocumentFragment();
    for (const part of parts) {
      const src = /^\[(\d+)\]$/.test(part) && byIndex.get(part.slice(1, -1));
      frag.append(src ? citeButton(src) : document.createTextNode(part));
    }
    node.replaceWith(frag);
  }
}

function sourcesElement(sources, dropped) {
  const box = document.createElement("div");
  box.className = "sources";
  for (const src of sources || []) {
    const row = document.createElement("div");
    row.className = "source";
    const where = document.createElement("span");
    where.className = "where";
    where.textContent = src.citation;
    row.append(citeButton(src), where);
    box.append(row);
  }
  const left = Object.entries(dropped || {}).filter(([, n]) => n);
  if (left.length) {
    const note = document.createElement("span");
    note.className = "note dropped";
    note.textContent = "left out to fit the context: " + left.map(([k, n]) => `${n} ${k.replace("_", " ")}`).join(", ");
    box.append(note);
  }
  box.hidden = !box.childElementCount;
  return box;
}

function reasoningElement(text) {
  const details = document.createElement("details");
  details.className = "reasoning";
  const summary = document.createElement("summary");
  summary.textContent = "Show reasoning";
  const body = document.createElement("div");
  body.className = "reasoning-text";
  body.textContent = text || "";
  details.append(summary, body);
  details.hidden = !text;
  return details;
}

function showSource(src) {
  $("#source-citation").textContent = `[${src.index}] ${src.citation}`;
  $("#source-meta").textContent = `score ${Number(src.score).toFixed(3)}`;
  $("#source-text").textContent = src.text;
  $("#source-panel").hidden = false;
}

function selectedModel() {
  const picker = $("#model-picker");
  return picker.value || (state.info && state.info.model) || null;
}

function showModel(name) {
  const models = (state.info && state.info.models) || [];
  const picker = $("#model-picker");
  if (name && models.some((m) => m.id === name)) picker.value = name;
  $("#model").textContent = selectedModel() || "";
}

function modelDefaults() {
  const models = (state.info && state.info.models) || [];
  const m = models.find((x) => x.id === selectedModel());
  return (m && m.defaults) || (state.info && state.info.defaults) || {};
}

// which version of the model wrote an answer (a registry's "v3", else the model folder's name and weights hash),
// from the model_version stored with it; shown at the right of the answer's name
function versionElement(m) {
  const el = document.createElement("span");
  el.className = "version";
  el.textContent = m.model_version || "";
  el.title = "the model version that wrote this answer";
  el.hidden = !m.model_version;
  return el;
}

function messageElement(m) {
  const div = document.createElement("div");
  div.className = `msg ${m.role}`;
  div.dataset.id = m.id;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = m.role === "user" ? "You" : m.role === "assistant" ? (m.model_name || "Assistant") : m.role;
  const content = document.createElement("div");
  content.className = "content";
  if (m.role === "assistant") renderAnswer(content, m.content, m.sources); else content.textContent = m.content;
  if (m.role === "assistant") div.append(versionElement(m));  // before the name: it floats right on its line
  div.append(role);
  if (m.role === "assistant") div.append(reasoningElement(m.reasoning));
  div.append(content);
  if (m.role === "assistant") div.append(sourcesElement(m.sources, m.dropped));
  if (m.role === "assistant" && m.reasoning && !m.content && m.finish_reason) {
    content.textContent = "(no answer: the model stopped while still reasoning; show the reasoning to read it)";
    content.classList.add("muted");
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  if (m.role === "user") {
    actions.append(button("Edit", "edit", () => startEdit(div, m)));
  } else if (m.role === "assistant") {
    const fb = m.feedback || {};
    const up = button("\u{1F44D} Good", "thumb-up", () => rate(m, fb.rating === 1 ? 0 : 1), "Good answer");
    const down = button("\u{1F44E} Bad", "thumb-down", () => rate(m, fb.rating === -1 ? 0 : -1), "Bad answer");
    up.setAttribute("aria-pressed", String(fb.rating === 1));
    down.setAttribute("aria-pressed", String(fb.rating === -1));
    actions.append(up, down,
      button("Comment", "comment", () => openFeedback(m, "comment")),
      button("Write a better answer", "correct", () => openFeedback(m, "correction")),
      button("Regenerate", "regenerate", () => regenerate(m)));
    if (m.siblings && m.siblings.length > 1) {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = `version ${m.siblings.indexOf(m.id) + 1} of ${m.siblings.length}`;
      actions.append(note);
    }
    if (m.finish_reason && m.finish_reason !== "stop") {
      const note = document.createElement("span");
      note.className = "note finish";
      note.textContent = { cancelled: "stopped", length: "cut at max tokens", error: "failed" }[m.finish_reason] || m.finish_reason;
      actions.append(note);
    }
    if (fb.comment) {
      const c = document.createElement("span");
      c.className = "note";
      c.textContent = `Comment: ${fb.comment}`;
      actions.append(c);
    }
    if (fb.correction) {
      const c = document.createElement("div");
      c.className = "correction";
      c.textContent = `Better answer: ${fb.correction}`;
      div.append(actions, c);
      return div;
    }
  }
  div.append(actions);
  return div;
}

function renderConversation() {
  const box = $("#messages");
  box.replaceChildren(...(state.conv ? state.conv.messages.filter((m) => m.role !== "system").map(messageElement) : []));
  box.scrollTop = box.scrollHeight;
  $("#title").textContent = (state.conv && state.conv.title) || "New chat";
  const s = (state.conv && state.conv.settings) || {};
  if (state.conv) showModel(s.model);
  const d = modelDefaults();
  $("#system-prompt").value = (state.conv && state.conv.system_prompt) || "";
  $("#temperature").value = s.temperature ?? d.temperature ?? "";
  $("#top-p").value = s.top_p ?? d.top_p ?? "";
  $("#max-tokens").value = s.max_tokens ?? d.max_tokens ?? "";
  for (const li of document.querySelectorAll("#conversations li")) li.classList.toggle("active", li.dataset.id === state.convId);
}

async function loadConversations() {
  const q = $("#search").value.trim();
  const convs = await getJSON(`/api/conversations?source=ui&q=${encodeURIComponent(q)}`);
  const list = $("#conversations");
  list.replaceChildren(...convs.map((c) => {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    li.classList.toggle("active", c.id === state.convId);
    const open = button(c.title || "Untitled", "open", () => openConversation(c.id));
    li.append(open,
      button("Rename", "rename", () => startRename(li, c)),
      button("Delete", "delete", () => deleteConversation(c.id)));
    return li;
  }));
}

async function openConversation(id) {
  if (state.streaming) stop();
  setMode("chat");
  state.convId = id;
  state.conv = id ? await getJSON(`/api/conversations/${id}`) : null;
  showError("");
  renderConversation();
}

async function refresh() {
  if (state.convId) state.conv = await getJSON(`/api/conversations/${state.convId}`);
  renderConversation();
  await loadConversations();
}

// ------------------------------------------------------------------------------------------- conversations
function currentSettings() {
  const num = (sel) => { const v = $(sel).value; return v === "" ? null : Number(v); };
  const s = { temperature: num("#temperature"), top_p: num("#top-p"), max_tokens: num("#max-tokens") };
  const out = Object.fromEntries(Object.entries(s).filter(([, v]) => v !== null && !Number.isNaN(v)));
  // the picked model or assistant, stored with the chat; a one-model server stores none (a renamed model dir
  // must not break the chats made before)
  const model = $("#model-picker").hidden ? null : selectedModel();
  return model ? { ...out, model } : out;
}

async function ensureConversation() {
  if (state.convId) return state.convId;
  const conv = await getJSON("/api/conversations", { method: "POST",
    body: { system_prompt: $("#system-prompt").value, settings: currentSettings() } });
  state.convId = conv.id;
  state.conv = { ...conv, messages: [] };
  return conv.id;
}

function startRename(li, c) {
  const input = document.createElement("input");
  input.value = c.title;
  input.className = "rename-input";
  li.replaceChildren(input);
  input.focus();
  const save = async () => {
    await api(`/api/conversations/${c.id}`, { method: "PATCH", body: { title: input.value.trim() } });
    if (c.id === state.convId) await refresh(); else await loadConversations();
  };
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") save(); if (e.key === "Escape") loadConversations(); });
  input.addEventListener("blur", save, { once: true });
}

async function deleteConversation(id) {
  await api(`/api/conversations/${id}`, { method: "DELETE" });
  if (id === state.convId) await openConversation(null);
  await loadConversations();
}

async function saveSettings() {
  if (!state.convId) return;
  await api(`/api/conversations/${state.convId}`, { method: "PATCH",
    body: { system_prompt: $("#system-prompt").value, settings: currentSettings() } });
}

// ------------------------------------------------------------------------------------------- chatting
async function send(body, pendingUser) {
  if (state.streaming) return;
  showError("");
  const convId = await ensureConversation();
  const box = $("#messages");
  if (pendingUser) box.append(messageElement({ role: "user", content: pendingUser, id: "" }));
  const answer = messageElement({ role: "assistant", content: "", id: "" });
  answer.classList.add("streaming");
  answer.querySelector(".actions").hidden = true;
  box.append(answer);
  box.scrollTop = box.scrollHeight;
  const content = answer.querySelector(".content");
  const reasoning = answer.querySelector("details.reasoning");
  let text = "", thought = "", sources = null, frame = 0;
  state.controller = new AbortController();
  setStreaming(true);
  try {
    const res = await api(`/api/conversations/${convId}/messages`, { method: "POST",
      body: { ...body, settings: currentSettings(), system_prompt: $("#system-prompt").value },
      signal: state.controller.signal });
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const ev = JSON.parse(line.slice(5));
        if (ev.type === "start") {
          answer.dataset.id = ev.assistant_message.id;
          answer.querySelector(".version").replaceWith(versionElement(ev.assistant_message));
          sources = ev.assistant_message.sources;
          answer.querySelector(".sources").replaceWith(sourcesElement(sources, ev.assistant_message.dropped));
        } else if (ev.type === "delta") {
          text += ev.text;
          if (!frame) frame = requestAnimationFrame(() => { frame = 0; renderAnswer(content, text, sources); box.scrollTop = box.scrollHeight; });
        } else if (ev.type === "reasoning") {
          thought += ev.text;
          reasoning.querySelector(".reasoning-text").textContent = thought;
          reasoning.hidden = false;
        } else if (ev.type === "error") showError(ev.error.message);
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
    // refused before it started (a 4xx): nothing was stored, so give the text back to fix and resend
    if (!answer.dataset.id && body.content && !body.edit_of && !$("#input").value) $("#input").value = body.content;
  } finally {
    state.controller = null;
    setStreaming(false);
    // the server has the final text (or the partial one, marked stopped): show what it stored
    setTimeout(() => refresh().catch((e) => showError(e.message)), state.stopped ? 300 : 0);
    state.stopped = false;
  }
}

function setStreaming(on) {
  state.streaming = on;
  $("#send").hidden = on;
  $("#stop").hidden = !on;
}

function stop() {
  state.stopped = true;
  if (state.controller) state.controller.abort();
}

function lastMessageId() {
  // the message a new one follows: the newest shown, unless that is a question without an answer (one the
  // server refused): then the new one goes beside it, never two user turns in a row
  const msgs = (state.conv && state.conv.messages) || [];
  const last = msgs[msgs.length - 1];
  if (!last) return null;
  return last.role === "user" ? last.parent_id : last.id;
}

function startEdit(div, m) {
  const area = document.createElement("textarea");
  area.className = "edit";
  area.value = m.content;
  const actions = div.querySelector(".actions");
  div.querySelector(".content").replaceChildren(area);
  actions.replaceChildren(
    button("Save and send", "save-edit", () => {
      if (!area.value.trim()) return;
      // everything after the edited message belongs to the old branch: drop it from view
      const idx = state.conv.messages.findIndex((x) => x.id === m.id);
      state.conv.messages = state.conv.messages.slice(0, idx);
      renderConversation();
      send({ content: area.value, edit_of: m.id }, area.value);
    }),
    button("Cancel", "cancel-edit", () => renderConversation()));
  area.focus();
}

function regenerate(m) {
  const idx = state.conv.messages.findIndex((x) => x.id === m.id);
  state.conv.messages = state.conv.messages.slice(0, idx);
  renderConversation();
  send({ regenerate_of: m.id });
}

async function rate(m, rating) {
  await api(`/api/messages/${m.id}/feedback`, { method: "POST", body: { rating } });
  await refresh();
}

function openFeedback(m, field) {
  const dialog = $("#feedback-dialog");
  $("#feedback-title").textContent = field === "correction" ? "Write a better answer" : "Comment on this answer";
  const area = $("#feedback-text");
  area.value = (m.feedback && m.feedback[field]) || (field === "correction" ? m.content : "");
  dialog.dataset.messageId = m.id;
  dialog.dataset.field = field;
  dialog.showModal();
  area.focus();
}

$("#feedback-dialog").addEventListener("close", async () => {
  const dialog = $("#feedback-dialog");
  if (dialog.returnValue !== "save") return;
  try {
    await api(`/api/messages/${dialog.dataset.messageId}/feedback`, { method: "POST",
      body: { [dialog.dataset.field]: $("#feedback-text").value } });
    await refresh();
  } catch (e) { showError(e.message); }
});

// ------------------------------------------------------------------------------------------- arena
// Two anonymous models answer the same message, side by side as "Model A" and "Model B"; the server names
// them only in its answer to the vote.
function setMode(mode) {
  if (state.mode === mode) return;
  if (state.streaming) stop();
  state.mode = mode;
  for (const m of ["chat", "arena", "leaderboard"]) $(`#mode-${m}`).setAttribute("aria-pressed", String(m === mode));
  $("#messages").hidden = mode !== "chat";
  $("#arena").hidden = mode !== "arena";
  $("#leaderboard").hidden = mode !== "leaderboard";
  $("#composer").hidden = mode === "leaderboard";
  for (const sel of ["#settings-toggle", "#model", "#model-picker"]) $(sel).classList.toggle("off", mode !== "chat");
  if (mode !== "chat") $("#settings").hidden = true;
  $("#title").textContent = mode === "arena" ? "Arena" : mode === "leaderboard" ? "Leaderboard"
    : (state.conv && state.conv.title) || "New chat";
  showError("");
  if (mode === "leaderboard") loadLeaderboard().catch((e) => showError(e.message));
}

async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut).trim();
      buf = buf.slice(cut + 2);
      if (line.startsWith("data:")) onEvent(JSON.parse(line.slice(5)));
    }
  }
}

function arenaSide(side) { return $(`#arena-${side}`); }

function showArenaAnswer(side, answer) {
  const el = arenaSide(side);
  renderMarkdown(el.querySelector(".content"), answer.content);
  const reason = answer.finish_reason;
  el.querySelector(".finish").textContent = !reason || reason === "stop" ? ""
    : { cancelled: "stopped", length: "cut at max tokens", error: "failed" }[reason] || reason;
  el.classList.toggle("streaming", !reason);
}

function resetArena(question) {
  state.battle = null;
  $("#arena-question").hidden = false;
  $("#arena-question .content").textContent = question;
  for (const side of ["a", "b"]) {
    const el = arenaSide(side);
    el.hidden = false;
    el.classList.remove("winner");
    el.querySelector(".role").textContent = `Model ${side.toUpperCase()}`;
    showArenaAnswer(side, { content: "", finish_reason: null });
  }
  $("#arena-vote").hidden = true;
  $("#arena-result").hidden = true;
  for (const b of document.querySelectorAll("#arena-vote button")) { b.disabled = false; b.setAttribute("aria-pressed", "false"); }
}

async function startBattle(question) {
  if (state.streaming) return;
  showError("");
  resetArena(question);
  const texts = { a: "", b: "" };
  let frame = 0;
  state.controller = new AbortController();
  setStreaming(true);
  try {
    const res = await api("/api/arena/battles", { method: "POST", body: { content: question },
                                                  signal: state.controller.signal });
    await readEvents(res, (ev) => {
      if (ev.type === "start") state.battle = { id: ev.battle_id };
      else if (ev.type === "delta") {
        texts[ev.side] += ev.text;
        if (!frame) frame = requestAnimationFrame(() => {
          frame = 0;
          for (const side of ["a", "b"]) renderMarkdown(arenaSide(side).querySelector(".content"), texts[side]);
        });
      } else if (ev.type === "error") showError(`Model ${ev.side.toUpperCase()}: ${ev.error.message}`);
    });
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
    if (!state.battle && !$("#input").value) $("#input").value = question;  // refused: give the text back
  } finally {
    state.controller = null;
    setStreaming(false);
    if (frame) cancelAnimationFrame(frame);
    // what the server stored is what is voted on (a stopped answer is saved a moment after the stop)
    if (state.battle) setTimeout(() => loadBattle().catch((e) => showError(e.message)), state.stopped ? 300 : 0);
    else for (const side of ["a", "b"]) arenaSide(side).hidden = true;
    state.stopped = false;
  }
}

async function loadBattle() {
  const battle = await getJSON(`/api/arena/battles/${state.battle.id}`);
  state.battle = battle;
  for (const side of ["a", "b"]) if (battle[side]) showArenaAnswer(side, battle[side]);
  if (battle.winner) showVerdict(battle);
  else $("#arena-vote").hidden = false;
}

const VERDICTS = { a: "A is better", b: "B is better", tie: "Tie", both_bad: "Both bad" };

async function vote(winner) {
  if (!state.battle || state.battle.winner) return;
  for (const b of document.querySelectorAll("#arena-vote button")) b.disabled = true;
  try {
    const battle = await getJSON(`/api/arena/battles/${state.battle.id}/vote`, { method: "POST", body: { winner } });
    state.battle = battle;
    showVerdict(battle);
  } catch (e) {
    showError(e.message);
    for (const b of document.querySelectorAll("#arena-vote button")) b.disabled = false;
  }
}

function showVerdict(battle) {
  for (const side of ["a", "b"]) {
    const el = arenaSide(side);
    el.querySelector(".role").textContent = `Model ${side.toUpperCase()}: ${battle[`model_${side}`]}`;
    el.classList.toggle("winner", battle.winner === side);
  }
  for (const b of document.querySelectorAll("#arena-vote button")) {
    b.disabled = true;
    b.setAttribute("aria-pressed", String(b.dataset.winner === battle.winner));
  }
  $("#arena-vote").hidden = false;
  const result = $("#arena-result");
  result.textContent = `You voted "${VERDICTS[battle.winner]}". A was ${battle.model_a}, B was ${battle.model_b}. `
    + "Send another message for a new battle.";
  result.hidden = false;
}

async function loadLeaderboard() {
  const board = await getJSON("/api/leaderboard");
  const fmt = (x) => Math.round(x).toString();
  const interval = (ci) => (ci ? `${fmt(ci[0])} to ${fmt(ci[1])}` : "");
  $("#leaderboard-summary").textContent = board.votes
    ? `${board.votes} vote${board.votes === 1 ? "" : "s"}. Ratings on the Elo scale (a model 400 points above `
      + "another is expected to win 10 times out of 11); intervals are 95% bootstrap intervals."
    : "No votes yet: compare two models in the Arena.";
  $("#leaderboard-table tbody").replaceChildren(...board.models.map((r, i) => {
    const tr = document.createElement("tr");
    for (const v of [i + 1, r.name, fmt(r.bt), interval(r.bt_ci), fmt(r.elo), interval(r.elo_ci), r.votes, r.wins,
                     r.ties, r.losses]) {
      const td = document.createElement("td");
      td.textContent = String(v);
      tr.append(td);
    }
    return tr;
  }));
  $("#leaderboard-table").hidden = !board.models.length;
}

// ------------------------------------------------------------------------------------------- wiring
$("#composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("#input").value;
  if (!text.trim() || state.streaming) return;
  $("#input").value = "";
  if (state.mode === "arena") startBattle(text);
  else send({ content: text, parent_id: lastMessageId() }, text);
});
for (const m of ["chat", "arena", "leaderboard"]) $(`#mode-${m}`).addEventListener("click", () => setMode(m));
for (const b of document.querySelectorAll("#arena-vote button")) b.addEventListener("click", () => vote(b.dataset.winner));
$("#input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#composer").requestSubmit(); }
});
$("#stop").addEventListener("click", stop);
$("#source-close").addEventListener("click", () => { $("#source-panel").hidden = true; });
$("#model-picker").addEventListener("change", () => {
  $("#model").textContent = selectedModel() || "";
  const d = modelDefaults();  // the new model's own defaults, unless this chat set its own
  const s = (state.conv && state.conv.settings) || {};
  $("#temperature").value = s.temperature ?? d.temperature ?? "";
  $("#top-p").value = s.top_p ?? d.top_p ?? "";
  $("#max-tokens").value = s.max_tokens ?? d.max_tokens ?? "";
  saveSettings().catch((e) => showError(e.message));
});
$("#new-chat").addEventListener("click", () => openConversation(null).then(() => $("#input").focus()));
let searchTimer = 0;
$("#search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(loadConversations, 200); });
$("#settings-toggle").addEventListener("click", () => {
  const s = $("#settings");
  s.hidden = !s.hidden;
  $("#settings-toggle").setAttribute("aria-expanded", String(!s.hidden));
});
for (const sel of ["#system-prompt", "#temperature", "#top-p", "#max-tokens"]) {
  $(sel).addEventListener("change", () => saveSettings().catch((e) => showError(e.message)));
}

(async function init() {
  try {
    state.info = await getJSON("/api/info");
    const picker = $("#model-picker");
    picker.replaceChildren(...(state.info.models || []).map((m) => {
      const o = document.createElement("option");
      o.value = m.id;
      o.textContent = m.assistant ? `${m.id} (assistant)` : m.id;
      return o;
    }));
    picker.hidden = (state.info.models || []).length < 2;
    showModel(state.info.model);
    $("#logout-form").hidden = !state.info.auth;
    renderConversation();
    await loadConversations();
  } catch (e) { showError(e.message); }
})();
