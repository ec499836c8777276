// polargrid-local playground: the public HTTP API only, no framework, no build step, nothing from other origins.
// Everything shown goes in as text (textContent, never innerHTML), so model output and errors cannot inject markup.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "polargrid-local-key";
let apiKey = sessionStorage.getItem(KEY_STORE) || "";
let conversation = [];
let chatAbort = null;

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

class ApiError extends Error {}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || body.message || response.statusText;
  } catch (_) {
    return response.statusText || `HTTP ${response.status}`;
  }
}

// fetch with the key; a 401 asks for the key and throws.
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    askForKey(await errorMessage(response));
    throw new ApiError("this server needs an API key");
  }
  if (!response.ok) throw new ApiError(await errorMessage(response));
  return response;
}

async function apiJson(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  return (await api(path, options)).json();
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = apiKey ? message : "";
  $("api-key").focus();
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  sessionStorage.setItem(KEY_STORE, apiKey);
  $("key-form").hidden = true;
  await start();
});

// -- health and models --------------------------------------------------------------------

async function showHealth() {
  try {
    const health = await (await fetch("/health")).json();
    const info = (health.backend && health.backend.info) || {};
    $("health").textContent = [health.status, info.name && `${info.name} ${info.version}`, health.runtime]
      .filter(Boolean).join(" · ");
  } catch (error) {
    $("health").textContent = `server unreachable: ${error.message}`;
  }
}

async function refreshModels() {
  const info = $("models-info");
  info.textContent = "loading…";
  const [list, status] = await Promise.all([apiJson("/v1/models"), apiJson("/v1/models/status")]);
  const loaded = new Map((status.models || []).map((m) => [m.model, m]));
  const models = list.data.filter((m) => !m.parent);
  const chatModels = models.filter((m) => m.pg_model_type === "chat" && !m.pg_remote);
  const select = $("chat-model");
  const chosen = select.value;
  select.replaceChildren(...chatModels.map((m) => el("option", m.id)));
  if (chosen && chatModels.some((m) => m.id === chosen)) select.value = chosen;
  const rows = models.map((m) => {
    const entry = loaded.get(m.id);
    const row = el("tr");
    row.dataset.model = m.id;
    row.append(el("td", m.id), el("td", entry ? entry.kind : (m.pg_model_type || "audio")));
    row.append(el("td", entry ? "loaded" : (m.pg_remote ? `remote (${m.pg_remote.status})` : "not loaded"),
                  entry ? "state-loaded" : ""));
    row.append(el("td", entry ? `${entry.memory_mb} MB` : ""));
    const cell = el("td");
    if (!m.pg_remote) {
      const button = el("button", entry ? "Unload" : "Load", entry ? "secondary" : "");
      button.type = "button";
      button.addEventListener("click", () => loadOrUnload(m.id, !entry, button));
      cell.append(button);
    }
    row.append(cell);
    return row;
  });
  $("models-table").tBodies[0].replaceChildren(...rows);
  const total = [...loaded.values()].reduce((sum, m) => sum + m.memory_mb, 0);
  info.textContent = `${loaded.size} loaded, ${total} MB`;
}

async function loadOrUnload(model, load, button) {
  button.disabled = true;
  $("models-info").textContent = `${load ? "loading" : "unloading"} ${model}…`;
  try {
    const reply = await apiJson(load ? "/v1/models/load" : "/v1/models/unload", { model_name: model });
    await refreshModels();
    $("models-info").textContent = reply.message || "";
  } catch (error) {
    $("models-info").textContent = error.message;
    button.disabled = false;
  }
}

$("models-refresh").addEventListener("click", () => refreshModels().catch((e) => { $("models-info").textContent = e.message; }));

// -- chat -----------------------------------------------------------------------------------

function addMessage(who, text, className) {
  const node = el("div", undefined, `msg ${className || who}`);
  const body = el("span", text, "text");
  node.append(el("span", who, "who"), body);
  $("chat-log").append(node);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return body;
}

function number(id) {
  const value = parseFloat($(id).value);
  return Number.isFinite(value) ? value : undefined;
}

// Server-sent events from a fetch body: each "data: ..." line, parsed; [DONE] ends.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function sendChat(text) {
  const messages = [];
  const system = $("chat-system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  conversation.push({ role: "user", content: text });
  addMessage("you", text, "user");
  const answer = addMessage("assistant", "", "assistant");
  const stats = $("chat-stats");
  const request = {
    model: $("chat-model").value, messages: messages.concat(conversation), stream: true,
    stream_options: { include_usage: true }, temperature: number("chat-temperature"), top_p: number("chat-top-p"),
    max_tokens: number("chat-max-tokens"),
  };
  chatAbort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  stats.textContent = "waiting for the first token…";
  const started = performance.now();
  let first = null;
  let pieces = 0;
  let usage = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
      signal: chatAbort.signal });
    for await (const chunk of events(response)) {
      if (chunk.error) throw new ApiError(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (!piece) continue;
        if (first === null) first = performance.now();
        pieces += 1;
        answer.textContent += piece;
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      }
    }
    conversation.push({ role: "assistant", content: answer.textContent });
  } catch (error) {
    if (error.name !== "AbortError") addMessage("error", error.message, "error");
    conversation.pop();
  } finally {
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : pieces;
    const ttft = first === null ? null : (first - started) / 1000;
    const rate = first !== null && ended > first ? tokens / ((ended - first) / 1000) : null;
    stats.textContent = [ttft === null ? "no tokens" : `first token ${ttft.toFixed(2)} s`,
      rate === null ? null : `${rate.toFixed(1)} tokens/s`, `${tokens} tokens`].filter(Boolean).join(" · ");
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
    chatAbort = null;
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || chatAbort) return;
  $("chat-input").value = "";
  sendChat(text);
});
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
});
$("chat-stop").addEventListener("click", () => chatAbort && chatAbort.abort());
$("chat-clear").addEventListener("click", () => { conversation = []; $("chat-log").replaceChildren(); $("chat-stats").textContent = ""; });

// -- speak ----------------------------------------------------------------------------------

let audioUrl = null;
$("speak-go").addEventListener("click", async () => {
  const info = $("speak-info");
  const format = $("speak-format").value;
  info.textContent = "synthesising…";
  $("speak-go").disabled = true;
  const started = performance.now();
  try {
    const response = await api("/v1/audio/speech", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("speak-model").value, input: $("speak-input").value,
                             voice: $("speak-voice").value, response_format: format, speed: number("speak-speed") }) });
    const blob = await response.blob();
    if (audioUrl) URL.revokeObjectURL(audioUrl);
    audioUrl = URL.createObjectURL(blob);
    const audio = $("speak-audio");
    audio.src = audioUrl;
    const link = $("speak-download");
    link.href = audioUrl;
    link.download = `speech.${format}`;
    link.hidden = false;
    info.textContent = `${(blob.size / 1024).toFixed(1)} KB of ${format} in ${((performance.now() - started) / 1000).toFixed(2)} s`;
    audio.play().catch(() => {});  // a browser may want a click first; the controls are there
  } catch (error) {
    info.textContent = error.message;
  } finally {
    $("speak-go").disabled = false;
  }
});

// -- transcribe -----------------------------------------------------------------------------

async function transcribe(blob, name) {
  const info = $("transcribe-info");
  const form = new FormData();
  form.append("file", blob, name);
  form.append("model", $("transcribe-model").value);
  form.append("response_format", "json");
  const language = $("transcribe-language").value.trim();
  if (language) form.append("language", language);
  info.textContent = `transcribing ${name}…`;
  const started = performance.now();
  try {
    const result = await (await api("/v1/audio/transcriptions", { method: "POST", body: form })).json();
    $("transcript").textContent = result.text;
    info.textContent = `${name}: ${((performance.now() - started) / 1000).toFixed(2)} s`;
  } catch (error) {
    info.textContent = error.message;
  }
}

$("transcribe-go").addEventListener("click", () => {
  const file = $("transcribe-file").files[0];
  if (!file) { $("transcribe-info").textContent = "choose an audio file first"; return; }
  transcribe(file, file.name);
});

let recorder = null;
$("record").addEventListener("click", async () => {
  if (recorder) { recorder.stop(); return; }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const parts = [];
    recorder = new MediaRecorder(stream);
    recorder.addEventListener("dataavailable", (event) => parts.push(event.data));
    recorder.addEventListener("stop", () => {
      stream.getTracks().forEach((track) => track.stop());
      const type = recorder.mimeType || "audio/webm";
      recorder = null;
      $("record").textContent = "Record";
      transcribe(new Blob(parts, { type }), type.includes("ogg") ? "recording.ogg" : "recording.webm");
    });
    recorder.start();
    $("record").textContent = "Stop recording";
    $("transcribe-info").textContent = "recording… press again to stop";
  } catch (error) {
    $("transcribe-info").textContent = `microphone: ${error.message}`;
  }
});

// -- start ----------------------------------------------------------------------------------

async function start() {
  await showHealth();
  try {
    await refreshModels();
  } catch (error) {
    if (!(error instanceof ApiError)) $("models-info").textContent = error.message;
  }
}

start();
