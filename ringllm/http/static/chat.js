// ringllm chat page. Talks to this peer only: /v1/chat/completions (stream=true),
// /v1/models and /ringllm/v1/ring. Model output and peer names are untrusted: they are
// inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "ringllm.chat.v1";      // localStorage: the conversation and the settings
const FIELDS = ["system", "temperature", "top_p", "max_tokens", "seed", "api_key"];
const RING_POLL_MS = 3000;            // the ring view's refresh; each poll asks every peer once

const chat = { messages: [], controller: null, model: null };  // model: known once /v1/models answered

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function save() {
  const s = { messages: chat.messages };
  for (const f of FIELDS) if (f !== "api_key") s[f] = $(f).value;
  try { localStorage.setItem(STORE, JSON.stringify(s)); } catch (e) { /* private mode: not kept */ }
}

function load() {
  let s = null;
  try { s = JSON.parse(localStorage.getItem(STORE) || "null"); } catch (e) { s = null; }
  if (!s) return;
  for (const f of FIELDS) if (typeof s[f] === "string") $(f).value = s[f];
  if (Array.isArray(s.messages)) {
    chat.messages = s.messages.filter((m) => m && typeof m.content === "string" &&
                                              (m.role === "user" || m.role === "assistant"));
  }
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  div.append(who, body);
  $("messages").append(div);
  scrollDown();
  return div;
}

function note(div, text, isError) {
  const n = document.createElement("div");
  n.className = "note" + (isError ? " error" : "");
  n.textContent = text;
  div.append(n);
}

function scrollDown() { const m = $("messages"); m.scrollTop = m.scrollHeight; }

function render() {
  $("messages").replaceChildren();
  for (const m of chat.messages) bubble(m.role, m.content);
}

function setBusy(busy, status) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = status;
}

// The sampling fields; an empty field is left to the server's default.
function sampling() {
  const out = {};
  for (const [f, parse] of [["temperature", parseFloat], ["top_p", parseFloat], ["max_tokens", parseInt],
                            ["seed", parseInt]]) {
    const v = $(f).value.trim();
    if (v === "") continue;
    const x = parse(v, 10);
    if (Number.isNaN(x)) throw new Error(f + " must be a number, got " + JSON.stringify(v));
    out[f] = x;
  }
  return out;
}

async function errorText(resp) {
  const text = await resp.text();
  try { return JSON.parse(text).error.message; } catch (e) { return "HTTP " + resp.status + ": " + text.slice(0, 300); }
}

function speed(tokens, first, last, total) {
  // Decode speed: the text pieces after the first over the time since the first arrived.
  // `total` (the server's usage count, with an end-of-generation token) is only shown.
  const rate = tokens > 1 && last > first ? ((tokens - 1) * 1000 / (last - first)).toFixed(1) : "-";
  return (total ?? tokens) + " tokens, " + rate + " tokens/s";
}

// Reads the server-sent events of one streaming chat completion, calling onChunk per JSON object.
async function readEvents(resp, onChunk) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        onChunk(obj);
      }
    }
  }
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || chat.controller) return;
  let params;
  try { params = sampling(); } catch (e) { $("status").textContent = e.message; return; }
  $("input").value = "";
  chat.messages.push({ role: "user", content: text });
  bubble("user", text);
  const div = bubble("assistant", "");
  const body = div.querySelector(".body");
  body.classList.add("streaming");
  const system = $("system").value.trim();
  const request = { model: "ringllm", stream: true, stream_options: { include_usage: true }, ...params,
                    messages: (system ? [{ role: "system", content: system }] : []).concat(chat.messages) };
  const controller = new AbortController();
  chat.controller = controller;
  setBusy(true, "waiting for the first token...");
  let reply = "", tokens = 0, first = 0, last = 0, finish = null, usage = null, failed = null;
  const t0 = performance.now();
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                       body: JSON.stringify(request), signal: controller.signal });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readEvents(resp, (obj) => {
      if (obj.usage) usage = obj.usage;
      for (const ch of obj.choices || []) {
        const piece = ch.delta && ch.delta.content;
        if (piece) {
          last = performance.now();
          if (!tokens) first = last;
          tokens += 1;
          reply += piece;
          body.textContent = reply;
          $("speed").textContent = speed(tokens, first, last);
          $("status").textContent = "streaming: " + speed(tokens, first, last);
          scrollDown();
        }
        if (ch.finish_reason) finish = ch.finish_reason;
      }
    });
  } catch (e) {
    failed = e;
  }
  body.classList.remove("streaming");
  chat.controller = null;
  const stats = speed(tokens, first, last, usage ? usage.completion_tokens : null) +
                (tokens ? ", first after " + Math.round(first - t0) + " ms" : "");
  let status;
  if (failed && failed.name === "AbortError") {
    status = "stopped: " + stats;
    note(div, "stopped", false);
  } else if (failed) {
    status = "error: " + failed.message;
    note(div, failed.message, true);
    div.classList.add("error");
  } else {
    status = "done (" + (finish || "?") + "): " + stats;
    note(div, stats, false);
  }
  if (reply) {
    chat.messages.push({ role: "assistant", content: reply });
  } else {
    chat.messages.pop();  // nothing came back: the question leaves the conversation
    note(div, "(not kept in the conversation)", false);
    if (!$("input").value) $("input").value = text;
  }
  save();
  setBusy(false, status);
}

function peerRow(p, self) {
  const li = document.createElement("li");
  const name = document.createElement("span");
  name.textContent = "rank " + p.rank + (p.rank === self ? " (this page)" : "");
  const state = document.createElement("span");
  const s = String(p.status);
  state.className = "state " + (s === "ok" ? "ok" : s === "down" || s === "failed" ? "down" : "other");
  state.textContent = s;
  const detail = document.createElement("span");
  detail.className = "detail";
  const bits = [String(p.address)];
  if (p.running != null) bits.push("running " + p.running + ", queue " + p.queue);
  if (p.error) bits.push(String(p.error));
  if (p.last_error) bits.push("last error: " + p.last_error);
  detail.textContent = bits.join(" | ");
  li.append(name, state, detail);
  return li;
}

async function pollRing() {
  try {
    const resp = await fetch("/ringllm/v1/ring", { headers: headers() });
    if (!resp.ok) throw new Error(await errorText(resp));
    const ring = await resp.json();
    $("peers").replaceChildren(...ring.peers.map((p) => peerRow(p, ring.self)));
    if (!chat.model) showModel();  // the page was opened while the peer was starting
  } catch (e) {
    const li = document.createElement("li");
    li.className = "down";
    li.textContent = "ring view unavailable: " + e.message;
    $("peers").replaceChildren(li);
  }
}

async function showModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) throw new Error(await errorText(resp));
    const models = await resp.json();
    chat.model = models.data[0].id;
    $("model").textContent = "model: " + chat.model;
  } catch (e) {
    chat.model = null;
    $("model").textContent = "model: ? (" + e.message + ")";
  }
}

function init() {
  load();
  render();
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => { if (chat.controller) chat.controller.abort(); });
  $("reset").addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
    chat.messages = [];
    save();
    render();
    setBusy(false, "new chat");
  });
  for (const f of FIELDS) $(f).addEventListener("change", () => { save(); if (f === "api_key") { showModel(); pollRing(); } });
  showModel();
  pollRing();
  setInterval(pollRing, RING_POLL_MS);
  $("input").focus();
}

document.addEventListener("DOMContentLoaded", init);
