// The chat page: talks to this server's own /v1/chat/completions, streamed, from the browser.
// Conversations, settings and the API key stay in this browser's localStorage. Model text is
// rendered as markdown with raw HTML escaped, then sanitized (DOMPurify): it never runs.
"use strict";

const STORE = "qwen3-moe-serve.";
const $ = (id) => document.getElementById(id);

const state = {
  conversations: load("conversations", []),
  current: load("current", null),
  settings: load("settings", { system: "", temperature: 0.7, maxTokens: "", thinking: true }),
  apiKey: localStorage.getItem(STORE + "api-key") || "",
  model: null,
  running: null, // { controller, message element } while a reply streams
};

function load(name, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(STORE + name));
    return value === null ? fallback : value;
  } catch {
    return fallback;
  }
}

function save() {
  localStorage.setItem(STORE + "conversations", JSON.stringify(state.conversations));
  localStorage.setItem(STORE + "current", JSON.stringify(state.current));
  localStorage.setItem(STORE + "settings", JSON.stringify(state.settings));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.apiKey) h.Authorization = "Bearer " + state.apiKey;
  return h;
}

function notice(text) {
  const box = $("notice");
  box.textContent = text || "";
  box.hidden = !text;
}

function askForKey(message) {
  $("api-key-row").hidden = false;
  $("settings").open = true;
  notice(message);
  $("api-key").focus();
}

// -- markdown ---------------------------------------------------------------------------------

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function setupMarkdown() {
  // Raw HTML in model text is shown as text, never parsed as markup.
  marked.use({ gfm: true, breaks: true, renderer: { html: (token) => escapeHtml(token.text) } });
}

function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text), { USE_PROFILES: { html: true } });
}

// -- conversations ----------------------------------------------------------------------------

function currentConversation() {
  return state.conversations.find((c) => c.id === state.current) || null;
}

function newConversation() {
  const conversation = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [] };
  state.conversations.unshift(conversation);
  state.current = conversation.id;
  save();
  return conversation;
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conversation of state.conversations) {
    const item = document.createElement("li");
    item.className = conversation.id === state.current ? "current" : "";
    const title = document.createElement("span");
    title.textContent = conversation.title;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.title = "Delete";
    remove.textContent = "×";
    remove.addEventListener("click", (event) => {
      event.stopPropagation();
      if (state.running) return;
      state.conversations = state.conversations.filter((c) => c.id !== conversation.id);
      if (state.current === conversation.id) state.current = state.conversations[0]?.id || null;
      save();
      renderAll();
    });
    item.append(title, remove);
    item.addEventListener("click", () => {
      if (state.running) return;
      state.current = conversation.id;
      save();
      renderAll();
    });
    list.append(item);
  }
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const conversation = currentConversation();
  for (const message of conversation ? conversation.messages : []) {
    box.append(messageElement(message));
  }
  box.scrollTop = box.scrollHeight;
}

function renderAll() {
  renderConversations();
  renderMessages();
}

// -- one message --------------------------------------------------------------------------------

function messageElement(message) {
  const element = document.createElement("article");
  element.className = "message " + message.role;
  element.dataset.role = message.role;
  element.dataset.state = message.state || "done";
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role === "user" ? "you" : state.model?.id || "assistant";
  element.append(role);
  if (message.role === "user") {
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = message.content;
    element.append(content);
    return element;
  }
  const parts = {
    thinking: document.createElement("details"),
    reasoning: document.createElement("div"),
    content: document.createElement("div"),
    tools: document.createElement("div"),
    footer: document.createElement("div"),
  };
  parts.thinking.className = "thinking";
  parts.thinking.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Thinking";
  parts.reasoning.className = "reasoning";
  parts.thinking.append(summary, parts.reasoning);
  parts.content.className = "content";
  parts.tools.className = "tools";
  element.append(parts.thinking, parts.content, parts.tools, parts.footer);
  element.update = (streaming) => updateAssistant(element, parts, message, streaming);
  element.update(false);
  return element;
}

function updateAssistant(element, parts, message, streaming) {
  element.dataset.state = message.state || "done";
  if (message.reasoning) {
    parts.thinking.hidden = false;
    parts.reasoning.textContent = message.reasoning;
    // Open while the model thinks, folded once the answer starts.
    parts.thinking.open = streaming && !message.content;
  }
  renderMarkdown(parts.content, message.content || "");
  parts.tools.replaceChildren();
  for (const call of message.toolCalls || []) {
    const block = document.createElement("div");
    block.className = "tool-call";
    block.textContent = "tool call: " + (call.name || "");
    const args = document.createElement("pre");
    args.textContent = call.arguments || "";
    block.append(args);
    parts.tools.append(block);
  }
  parts.footer.replaceChildren();
  if (message.error) {
    parts.footer.className = "error";
    parts.footer.textContent = message.error;
  } else if (message.timings) {
    parts.footer.className = "timings";
    parts.footer.textContent = timingsText(message.timings, message.state === "stopped");
  } else if (message.state === "stopped") {
    parts.footer.className = "timings";
    parts.footer.textContent = "stopped";
  }
}

function timingsText(t, stopped) {
  const ttft = (t.queue_ms || 0) + (t.prompt_ms || 0);
  const text = `time to first token ${ttft.toFixed(0)} ms · ${t.predicted_per_second.toFixed(1)} tokens/s · ${t.predicted_n} tokens · prompt ${t.prompt_n} (+${t.cache_n} cached)`;
  return stopped ? "stopped · " + text : text;
}

// -- the request --------------------------------------------------------------------------------

function requestBody(conversation) {
  const s = state.settings;
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of conversation.messages) {
    if (m.role === "user") messages.push({ role: "user", content: m.content });
    else if (m.state !== "error") messages.push({ role: "assistant", content: m.content || "" });
  }
  const body = {
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(s.temperature),
    chat_template_kwargs: { enable_thinking: Boolean(s.thinking) },
  };
  if (state.model) body.model = state.model.id;
  if (String(s.maxTokens).trim()) body.max_tokens = Number(s.maxTokens);
  return body;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function applyDelta(message, delta) {
  const reasoning = delta.reasoning_content ?? delta.reasoning;
  if (reasoning) message.reasoning = (message.reasoning || "") + reasoning;
  if (delta.content) message.content = (message.content || "") + delta.content;
  for (const call of delta.tool_calls || []) {
    message.toolCalls = message.toolCalls || [];
    const slot = (message.toolCalls[call.index] = message.toolCalls[call.index] || { name: "", arguments: "" });
    if (call.function?.name) slot.name += call.function.name;
    if (call.function?.arguments) slot.arguments += call.function.arguments;
  }
}

async function readStream(response, message, element) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    const events = buffered.split("\n\n");
    buffered = events.pop();
    for (const event of events) {
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "the server ended the stream with an error");
        const choice = chunk.choices?.[0];
        if (choice?.delta) applyDelta(message, choice.delta);
        if (chunk.timings) message.timings = chunk.timings;
      }
    }
    element.update(true);
  }
}

async function send(text) {
  if (state.running || !text.trim()) return;
  notice("");
  const conversation = currentConversation() || newConversation();
  if (!conversation.messages.length) conversation.title = text.trim().slice(0, 48);
  conversation.messages.push({ role: "user", content: text });
  const message = { role: "assistant", content: "", state: "streaming" };
  conversation.messages.push(message);
  save();
  renderAll();
  const element = $("messages").lastElementChild;
  const controller = new AbortController();
  state.running = { controller, element };
  setRunning(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody(conversation)),
      signal: controller.signal,
    });
    if (response.status === 401) {
      conversation.messages.splice(-2, 2);
      renderAll();
      $("prompt").value = text;
      askForKey(await errorText(response));
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    await readStream(response, message, element);
    message.state = "done";
  } catch (error) {
    if (controller.signal.aborted) {
      message.state = "stopped";
    } else {
      message.state = "error";
      message.error = String(error.message || error);
    }
  } finally {
    state.running = null;
    setRunning(false);
    save();
    element.update(false);
    renderConversations();
  }
}

function setRunning(running) {
  $("send").disabled = running;
  $("stop").disabled = !running;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      askForKey("This server needs an API key: enter it under Settings.");
      return;
    }
    if (!response.ok) {
      notice(await errorText(response));
      return;
    }
    const card = (await response.json()).data[0];
    state.model = card;
    $("model-id").textContent = card.id;
    $("model-ctx").textContent = String(card.context_length);
    notice("");
  } catch (error) {
    notice("The server cannot be reached: " + error.message);
  }
}

// -- wiring ---------------------------------------------------------------------------------

function bindSettings() {
  const s = state.settings;
  const fields = [
    ["system-prompt", "system", "value"],
    ["temperature", "temperature", "value"],
    ["max-tokens", "maxTokens", "value"],
    ["thinking", "thinking", "checked"],
  ];
  for (const [id, key, property] of fields) {
    const input = $(id);
    input[property] = s[key];
    input.addEventListener("input", () => {
      s[key] = input[property];
      save();
    });
  }
  const key = $("api-key");
  key.value = state.apiKey;
  $("api-key-row").hidden = !state.apiKey;
  key.addEventListener("change", () => {
    state.apiKey = key.value.trim();
    if (state.apiKey) localStorage.setItem(STORE + "api-key", state.apiKey);
    else localStorage.removeItem(STORE + "api-key");
    loadModel();
  });
}

function start() {
  setupMarkdown();
  bindSettings();
  $("new-chat").addEventListener("click", () => {
    if (state.running) return;
    newConversation();
    renderAll();
    $("prompt").focus();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.running?.controller.abort());
  // A reply cut short by a closed tab is kept as it stood.
  for (const conversation of state.conversations) {
    for (const m of conversation.messages) if (m.state === "streaming") m.state = "stopped";
  }
  if (!currentConversation()) state.current = state.conversations[0]?.id || null;
  save();
  renderAll();
  loadModel();
}

document.addEventListener("DOMContentLoaded", start);
