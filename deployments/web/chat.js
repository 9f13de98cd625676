// The chat page: one WebSocket to /v1/chat/ws per tab, one turn at a time
// (protocol: docs/websocket.md). Replies stream in as Markdown; each shows its
// priority class, time to first token and tokens per second when done.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), prompt: $("prompt"), composer: $("composer"), send: $("send"), stop: $("stop"),
    newChat: $("new-chat"), system: $("system-prompt"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
    connection: $("connection"), model: $("model"),
  };
  const state = {
    socket: null,
    history: [],   // the conversation sent with each turn: {role, content}
    reply: null,   // the running turn: {element, text, sentAt, firstAt, userIndex}
    queued: null,  // a start message waiting for the socket to open
    turns: 0,      // start messages sent on this socket: the server numbers its turns the same way
  };

  // --- the socket --------------------------------------------------------------

  function socketUrl() {
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/chat/ws";
  }

  function connect() {
    const socket = new WebSocket(socketUrl());
    state.socket = socket;
    setConnection("connecting…");
    state.turns = 0;
    socket.onopen = () => {
      setConnection("connected");
      const queued = state.queued;
      state.queued = null;
      if (queued) sendMessage(queued);
      setBusy(Boolean(state.reply));
    };
    socket.onmessage = (event) => onMessage(JSON.parse(event.data));
    socket.onclose = () => {
      if (state.socket !== socket) return;
      state.socket = null;
      setConnection("disconnected; reconnects on the next message");
      if (state.reply) finishReply("error", "the connection closed before the reply ended");
      setBusy(false);
    };
  }

  function sendMessage(message) {
    const socket = state.socket;
    if (socket && socket.readyState === WebSocket.OPEN) {
      if (message.type === "start" && state.reply) state.reply.turn = ++state.turns;
      socket.send(JSON.stringify(message));
    } else if (message.type === "start") {
      state.queued = message;
      if (!socket || socket.readyState > WebSocket.OPEN) connect();
    }
  }

  function onMessage(message) {
    const reply = state.reply;
    if (message.type === "error" && message.turn === null) {
      // A message the server could not read. From this page only a start can be refused so (too large,
      // not valid text): no turn was counted for it.
      if (reply && reply.firstAt === null) {
        state.turns -= 1;
        finishReply("error", `Error ${message.status}: ${message.message}`);
      } else {
        showNotice(`Error ${message.status}: ${message.message}`);
      }
      return;
    }
    if (!reply || message.turn !== reply.turn) return; // a late message of a turn already closed here
    if (message.type === "delta") {
      if (reply.firstAt === null) reply.firstAt = performance.now();
      reply.text += message.content;
      scheduleRender(reply);
    } else if (message.type === "done") {
      reply.done = message;
      finishReply(message.finish_reason === "stopped" ? "stopped" : "done");
    } else if (message.type === "error") {
      finishReply("error", `Error ${message.status}: ${message.message}`);
    }
  }

  // --- turns -------------------------------------------------------------------

  function start(text) {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    state.history.push({ role: "user", content: text });
    const request = { messages: messages.concat(state.history) };
    const maxTokens = parseInt(ui.maxTokens.value, 10);
    if (maxTokens > 0) request.max_tokens = maxTokens;
    const message = { type: "start", request };
    if (ui.apiKey.value) message.api_key = ui.apiKey.value;

    addBubble("user", text);
    const element = addBubble("assistant", "");
    element.dataset.status = "waiting";
    state.reply = { element, text: "", sentAt: performance.now(), firstAt: null, userIndex: state.history.length - 1,
                    done: null, frame: 0, turn: null };
    setBusy(true);
    sendMessage(message);
  }

  function finishReply(status, errorText) {
    const reply = state.reply;
    state.reply = null;
    cancelAnimationFrame(reply.frame);
    render(reply);
    reply.element.dataset.status = status;
    const meta = reply.element.querySelector(".meta");
    if (status === "error") {
      state.history.splice(reply.userIndex); // a refused turn stays on screen, out of the conversation
      reply.element.classList.add("error");
      reply.element.querySelector(".error-text").textContent = errorText;
      meta.textContent = "";
    } else {
      if (reply.text) state.history.push({ role: "assistant", content: reply.text });
      meta.textContent = describe(reply, status);
    }
    setBusy(false);
    ui.prompt.focus();
  }

  // "high · TTFT 412 ms · 23.1 tok/s · 57 tokens". The TTFT is the page's own (what the user waited);
  // tokens per second are the router's, which a busy page (its events queued behind other work, then
  // handled in one burst) cannot distort. The router's TTFT and queue wait are in the tooltip.
  function describe(reply, status) {
    const done = reply.done || {};
    const router = done.router || {};
    const parts = [router.class || "?"];
    if (reply.firstAt !== null) {
      parts.push(`TTFT ${Math.round(reply.firstAt - reply.sentAt)} ms`);
      if (done.tokens_per_s) parts.push(`${done.tokens_per_s.toFixed(1)} tok/s`);
      parts.push(`${done.tokens || 0} tokens`);
    }
    if (status === "stopped") parts.push("stopped");
    else if (done.finish_reason === "length") parts.push("cut at max tokens");
    reply.element.querySelector(".meta").title =
      `router: TTFT ${done.ttft_ms} ms, ${done.tokens_per_s} tok/s, queue wait ${router.queue_wait_ms} ms, ` +
      `prompt ${router.prompt_tokens} tokens, pool ${router.pool}, request ${done.request_id}`;
    reply.element.dataset.cls = router.class || "";
    return parts.join(" · ");
  }

  function stop() {
    if (state.reply) sendMessage({ type: "stop" });
  }

  function newChat() {
    stop();
    if (state.reply) finishReply("stopped");
    state.history = [];
    ui.messages.replaceChildren();
    ui.prompt.focus();
  }

  // --- rendering ---------------------------------------------------------------

  function addBubble(role, text) {
    const element = document.createElement("article");
    element.className = `message ${role}`;
    const content = document.createElement("div");
    content.className = "content";
    if (role === "user") content.textContent = text;
    element.append(content);
    if (role === "assistant") {
      const error = document.createElement("div");
      error.className = "error-text";
      const meta = document.createElement("div");
      meta.className = "meta";
      element.append(error, meta);
    }
    ui.messages.append(element);
    scrollDown();
    return element;
  }

  // At most one Markdown render per animation frame, however fast deltas come.
  function scheduleRender(reply) {
    reply.element.dataset.status = "streaming";
    if (!reply.frame) reply.frame = requestAnimationFrame(() => { reply.frame = 0; render(reply); });
  }

  function render(reply) {
    reply.element.querySelector(".content").innerHTML = window.renderMarkdown(reply.text); // escaped inside
    scrollDown();
  }

  function scrollDown() {
    const nearBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 120;
    if (nearBottom) window.scrollTo(0, document.body.scrollHeight);
  }

  function showNotice(text) {
    const element = addBubble("notice", "");
    element.querySelector(".content").textContent = text;
  }

  function setBusy(busy) {
    document.body.dataset.state = busy ? "streaming" : "idle";
    ui.stop.disabled = !busy;
    ui.send.disabled = busy;
  }

  function setConnection(text) {
    ui.connection.textContent = text;
  }

  async function showModel() {
    try {
      const models = await (await fetch("/v1/models")).json();
      ui.model.textContent = models.data.map((m) => m.id).join(", ");
    } catch (_) { /* the name is decoration; chat works without it */ }
  }

  // --- wiring ------------------------------------------------------------------

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.prompt.value.trim();
    if (!text || state.reply) return;
    ui.prompt.value = "";
    start(text);
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);

  setBusy(false);
  connect();
  showModel();
})();
