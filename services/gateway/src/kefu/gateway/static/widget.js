/*
 * kefu web widget. One script tag on any page, served by the gateway itself (nothing else is fetched):
 *
 *   <script src="http://GATEWAY/widget.js" data-tenant="shop" data-lang="auto"></script>
 *
 * data-tenant  the knowledge base / tenant to talk to (required)
 * data-lang    "auto" (the browser's language), "zh" or "en"
 * data-title   optional header title; data-color optional accent colour (CSS colour)
 *
 * It adds a chat button and a panel inside a shadow root (the page's CSS cannot reach in), starts a
 * conversation on first open (POST /v1/tenants/{tenant}/conversations), keeps its id and visitor token
 * in localStorage so a reload continues it (history from GET /v1/conversations/{cid}), and talks over
 * WS /v1/ws?token=..., reconnecting with backoff and passing last_seq where the gateway numbers frames.
 */
(() => {
  "use strict";

  const script = document.currentScript;
  if (!script || window.__kefuWidget) return; // one widget per page
  const GATEWAY = new URL(script.src, location.href);
  const ORIGIN = GATEWAY.origin;
  const TENANT = (script.dataset.tenant || "").trim();
  if (!TENANT) {
    console.error("kefu widget: add data-tenant=\"...\" to the script tag");
    return;
  }
  const STORE_KEY = `kefu:${ORIGIN}:${TENANT}`;
  const OPEN_KEY = `${STORE_KEY}:open`;
  const MAX_IMAGE_BYTES = 10 * 1024 * 1024;

  const STRINGS = {
    zh: {
      title: "在线客服", online: "在线", human: "人工客服已接入",
      connecting: "正在连接…", reconnecting: "正在重连…",
      greeting: "您好！我是智能客服，有什么可以帮您？",
      placeholder: "请输入您的问题…", send: "发送", talkToHuman: "转人工", talkToHumanText: "转人工",
      upload: "发送图片", open: "打开在线客服", close: "关闭", you: "我", bot: "智能客服", agent: "人工客服",
      sources: "来源", image: "图片", reading: "正在识别图片中的文字…", imageText: "图片中的文字：",
      imageEmpty: "这张图片中没有识别到文字。",
      errors: {
        generic: "抱歉，出了点问题，请稍后再试。", busy: "服务正忙，请稍后再试。",
        rate_limited: "您发送得有点快，请稍等片刻再试。", payload_too_large: "图片太大了，请发送 10 MB 以内的图片。",
        invalid_image: "只能发送 PNG 或 JPEG 格式的图片。", offline: "网络连接中断，恢复后会自动发送。",
        unknown_tenant: "该客服入口暂不可用。",
      },
    },
    en: {
      title: "Customer service", online: "Online", human: "Agent connected",
      connecting: "Connecting…", reconnecting: "Reconnecting…",
      greeting: "Hi! I'm the virtual assistant. How can I help you?",
      placeholder: "Type your question…", send: "Send", talkToHuman: "Talk to a human",
      talkToHumanText: "talk to a human", upload: "Send an image", open: "Open customer service chat",
      close: "Close", you: "You", bot: "Assistant", agent: "Agent", sources: "Sources", image: "Image",
      reading: "Reading the text in the image…", imageText: "Text in the image:",
      imageEmpty: "No text was found in this image.",
      errors: {
        generic: "Sorry, something went wrong. Please try again in a moment.",
        busy: "We are busy right now. Please try again in a moment.",
        rate_limited: "You are sending messages a little fast. Please wait a moment.",
        payload_too_large: "That image is too large. Please send one under 10 MB.",
        invalid_image: "Please send a PNG or JPEG image.",
        offline: "You are offline. Your message will be sent when the connection is back.",
        unknown_tenant: "This chat is not available.",
      },
    },
  };
  const wanted = (script.dataset.lang || "auto").toLowerCase();
  const LANG = wanted === "zh" || wanted === "en" ? wanted
    : ((navigator.languages && navigator.languages[0]) || navigator.language || "en").toLowerCase().startsWith("zh")
      ? "zh" : "en";
  const T = STRINGS[LANG];
  const ACCENT = script.dataset.color || "#1a5fd0";

  const CSS = `
:host { all: initial; }
* { box-sizing: border-box; }
.root { position: fixed; right: 20px; bottom: 20px; z-index: 2147483000; font-size: 14px; line-height: 1.5;
  color: #1c2430; font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", "PingFang SC", "Hiragino Sans GB",
  "Microsoft YaHei", "Noto Sans CJK SC", "WenQuanYi Micro Hei", Roboto, "Helvetica Neue", Arial, sans-serif;
  --accent: ${ACCENT}; }
button { font: inherit; cursor: pointer; }
.launcher { width: 58px; height: 58px; border-radius: 50%; border: 0; background: var(--accent); color: #fff;
  box-shadow: 0 6px 20px rgba(20, 40, 80, .28); display: flex; align-items: center; justify-content: center;
  transition: transform .15s ease; margin-left: auto; position: relative; }
.launcher:hover { transform: scale(1.05); }
.launcher svg { width: 28px; height: 28px; }
.badge { position: absolute; top: -2px; right: -2px; min-width: 20px; height: 20px; border-radius: 10px;
  background: #e5484d; color: #fff; font-size: 12px; font-weight: 600; padding: 0 6px; display: none;
  align-items: center; justify-content: center; border: 2px solid #fff; }
.badge.on { display: flex; }
.panel { width: 370px; height: min(600px, calc(100vh - 110px)); background: #fff; border-radius: 16px;
  box-shadow: 0 12px 48px rgba(20, 40, 80, .22); display: none; flex-direction: column; overflow: hidden;
  margin-bottom: 14px; border: 1px solid rgba(20, 40, 80, .08); }
.root.open .panel { display: flex; }
.root.open .launcher { display: none; }
.head { background: var(--accent); color: #fff; padding: 14px 14px 12px 16px; display: flex; align-items: center;
  gap: 10px; }
.avatar { width: 36px; height: 36px; border-radius: 50%; background: rgba(255, 255, 255, .2); display: flex;
  align-items: center; justify-content: center; flex: none; }
.avatar svg { width: 20px; height: 20px; }
.who { flex: 1; min-width: 0; }
.who b { display: block; font-size: 15px; font-weight: 600; }
.status { font-size: 12px; opacity: .9; display: flex; align-items: center; gap: 6px; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.dot { width: 8px; height: 8px; border-radius: 50%; background: #4ade80; flex: none; }
.status.wait .dot { background: #fbbf24; }
.human-btn { border: 1px solid rgba(255, 255, 255, .55); background: rgba(255, 255, 255, .12); color: #fff;
  border-radius: 999px; padding: 4px 11px; font-size: 12.5px; white-space: nowrap; }
.human-btn:hover { background: rgba(255, 255, 255, .24); }
.human-btn[disabled] { opacity: .55; cursor: default; }
.icon-btn { border: 0; background: transparent; color: inherit; width: 30px; height: 30px; border-radius: 8px;
  display: flex; align-items: center; justify-content: center; flex: none; }
.icon-btn:hover { background: rgba(255, 255, 255, .16); }
.icon-btn svg { width: 18px; height: 18px; }
.log { flex: 1; overflow-y: auto; padding: 16px 14px 8px; background: #f5f7fb; display: flex;
  flex-direction: column; gap: 10px; }
.row { display: flex; flex-direction: column; align-items: flex-start; max-width: 100%; }
.row.me { align-items: flex-end; }
.label { font-size: 11.5px; color: #6b7585; margin: 0 4px 3px; }
.bubble { max-width: 82%; padding: 9px 13px; border-radius: 14px; background: #fff; white-space: pre-wrap;
  word-wrap: break-word; overflow-wrap: anywhere; box-shadow: 0 1px 2px rgba(20, 40, 80, .08); }
.row.me .bubble { background: var(--accent); color: #fff; border-bottom-right-radius: 4px; }
.row.bot .bubble { border-bottom-left-radius: 4px; }
.row.agent .bubble { border-bottom-left-radius: 4px; background: #eaf6ee; border: 1px solid #cbe8d4; }
.row.agent .label { color: #1f7a44; font-weight: 600; }
.bubble.streaming::after { content: ""; display: inline-block; width: 7px; height: 14px; margin-left: 2px;
  vertical-align: -2px; background: currentColor; opacity: .45; animation: blink 1s steps(2) infinite; }
@keyframes blink { 50% { opacity: 0; } }
.typing { display: inline-flex; gap: 4px; padding: 4px 0; }
.typing i { width: 6px; height: 6px; border-radius: 50%; background: #9aa4b2; animation: hop 1.2s infinite; }
.typing i:nth-child(2) { animation-delay: .15s; } .typing i:nth-child(3) { animation-delay: .3s; }
@keyframes hop { 0%, 60%, 100% { transform: none; opacity: .5; } 30% { transform: translateY(-4px); opacity: 1; } }
.cites { display: flex; flex-wrap: wrap; gap: 4px; margin: 4px 4px 0; font-size: 11.5px; color: #6b7585;
  align-items: center; }
.cite { background: #e8edf5; color: #3a4658; border-radius: 6px; padding: 1px 7px; }
.note { align-self: center; text-align: center; font-size: 12.5px; color: #5b6575; background: #e9edf3;
  border-radius: 999px; padding: 4px 12px; max-width: 90%; }
.note.error { background: #fdecec; color: #b42318; }
.thumb { max-width: 180px; max-height: 160px; border-radius: 10px; display: block; }
.ocr { max-width: 82%; background: #fff; border: 1px dashed #c3ccd9; border-radius: 12px; padding: 8px 12px;
  white-space: pre-wrap; font-size: 13px; color: #394457; }
.ocr b { display: block; font-weight: 600; color: #6b7585; font-size: 12px; margin-bottom: 2px; }
.compose { display: flex; align-items: flex-end; gap: 6px; padding: 10px; border-top: 1px solid #e6eaf0;
  background: #fff; }
.compose textarea { flex: 1; resize: none; border: 1px solid #d5dbe5; border-radius: 12px; padding: 8px 12px;
  font: inherit; color: inherit; max-height: 120px; min-height: 38px; outline: none; background: #fff; }
.compose textarea:focus { border-color: var(--accent); box-shadow: 0 0 0 3px rgba(26, 95, 208, .15); }
.tool { border: 0; background: transparent; color: #5b6575; width: 38px; height: 38px; border-radius: 10px;
  display: flex; align-items: center; justify-content: center; flex: none; }
.tool:hover { background: #eef1f6; color: var(--accent); }
.tool svg { width: 21px; height: 21px; }
.send { border: 0; background: var(--accent); color: #fff; border-radius: 10px; height: 38px; padding: 0 14px;
  font-weight: 600; flex: none; }
.send[disabled] { opacity: .5; cursor: default; }
.foot { text-align: center; font-size: 11px; color: #9aa4b2; padding: 0 0 8px; background: #fff; }
input[type=file] { display: none; }
@media (max-width: 480px) {
  .root { right: 12px; bottom: 12px; }
  .root.open { right: 0; bottom: 0; left: 0; top: 0; }
  .root.open .panel { width: 100%; height: 100%; border-radius: 0; margin: 0; }
}`;

  const ICONS = {
    chat: '<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round"><path d="M21 12a8 8 0 0 1-11.6 7.1L4 20l1-4.4A8 8 0 1 1 21 12z"/><path d="M8.5 11.5h.01M12 11.5h.01M15.5 11.5h.01"/></svg>',
    close: '<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2.2" stroke-linecap="round"><path d="M6 6l12 12M18 6L6 18"/></svg>',
    image: '<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="1.9" stroke-linecap="round" stroke-linejoin="round"><rect x="3" y="4" width="18" height="16" rx="3"/><circle cx="9" cy="10" r="1.8"/><path d="M21 16l-5-5-9 9"/></svg>',
    headset: '<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round"><path d="M4 14v-2a8 8 0 0 1 16 0v2"/><rect x="3" y="14" width="4" height="6" rx="1.5"/><rect x="17" y="14" width="4" height="6" rx="1.5"/></svg>',
  };

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text; // always text: nothing a visitor or agent writes is HTML
    return node;
  }

  function icon(name) {
    const span = el("span");
    span.style.display = "contents";
    span.innerHTML = ICONS[name]; // our own constant SVG
    return span;
  }

  // ---- UI ----
  const host = document.createElement("div");
  host.setAttribute("data-kefu-widget", "");
  const shadow = host.attachShadow({ mode: "open" });
  if ("adoptedStyleSheets" in shadow && typeof CSSStyleSheet === "function" && "replaceSync" in CSSStyleSheet.prototype) {
    // A constructed sheet, not a <style> element: works under a host page's strict style-src CSP.
    const sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);
    shadow.adoptedStyleSheets = [sheet];
  } else {
    shadow.appendChild(el("style", "", CSS));
  }
  const root = el("div", "root");
  root.setAttribute("lang", LANG === "zh" ? "zh-CN" : "en");
  const panel = el("section", "panel");
  panel.setAttribute("role", "dialog");
  panel.setAttribute("aria-label", script.dataset.title || T.title);

  const head = el("header", "head");
  const avatar = el("div", "avatar");
  avatar.appendChild(icon("headset"));
  const who = el("div", "who");
  who.appendChild(el("b", "", script.dataset.title || T.title));
  const status = el("div", "status wait");
  status.appendChild(el("span", "dot"));
  const statusText = el("span", "", T.connecting);
  status.appendChild(statusText);
  who.appendChild(status);
  const humanBtn = el("button", "human-btn", T.talkToHuman);
  humanBtn.type = "button";
  humanBtn.dataset.action = "human";
  const closeBtn = el("button", "icon-btn");
  closeBtn.type = "button";
  closeBtn.setAttribute("aria-label", T.close);
  closeBtn.appendChild(icon("close"));
  head.append(avatar, who, humanBtn, closeBtn);

  const log = el("div", "log");
  log.setAttribute("role", "log");
  log.setAttribute("aria-live", "polite");

  const compose = el("form", "compose");
  const fileInput = el("input");
  fileInput.type = "file";
  fileInput.accept = "image/png,image/jpeg";
  const uploadBtn = el("button", "tool");
  uploadBtn.type = "button";
  uploadBtn.title = T.upload;
  uploadBtn.setAttribute("aria-label", T.upload);
  uploadBtn.appendChild(icon("image"));
  const input = el("textarea");
  input.rows = 1;
  input.placeholder = T.placeholder;
  input.setAttribute("aria-label", T.placeholder);
  input.maxLength = 4000;
  const sendBtn = el("button", "send", T.send);
  sendBtn.type = "submit";
  compose.append(fileInput, uploadBtn, input, sendBtn);
  const foot = el("div", "foot", "kefu");
  panel.append(head, log, compose, foot);

  const launcher = el("button", "launcher");
  launcher.type = "button";
  launcher.setAttribute("aria-label", T.open);
  launcher.appendChild(icon("chat"));
  const badge = el("span", "badge");
  launcher.appendChild(badge);
  root.append(panel, launcher);
  shadow.appendChild(root);

  // ---- conversation state ----
  let conv = load(); // {cid, token}
  let mode = "bot";
  let ws = null;
  let wsOpen = false;
  let retries = 0;
  let reconnectTimer = 0;
  // The highest seq of a bot reply or agent message on screen: on reconnect the gateway replays what
  // came after it (?last_seq=), so nothing said while the socket was down is lost.
  let lastSeq = 0;
  const seenReplies = new Set(); // visitor-message seqs whose reply is shown (a replayed frame is not shown twice)
  const seenAgent = new Set();
  const pending = []; // messages sent and not yet answered, oldest first: {text, cmid}
  const streams = new Map(); // visitor-message seq (0: unknown) -> the bubble its reply is streaming into
  let typing = null;
  let unread = 0;
  let lastNote = "";
  let started = null;

  function load() {
    try {
      const v = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
      return v && v.cid && v.token ? v : null;
    } catch (_) {
      return null;
    }
  }

  function save() {
    try {
      if (conv) localStorage.setItem(STORE_KEY, JSON.stringify(conv));
      else localStorage.removeItem(STORE_KEY);
    } catch (_) { /* private mode: the conversation lasts as long as the page */ }
  }

  function scroll() {
    log.scrollTop = log.scrollHeight;
  }

  function row(kind, label) {
    const r = el("div", `row ${kind}`);
    r.setAttribute("data-role", kind);
    if (label) r.appendChild(el("div", "label", label));
    log.appendChild(r);
    return r;
  }

  function bubble(kind, text, label) {
    clearTyping();
    const r = row(kind, label);
    const b = el("div", "bubble", text);
    r.appendChild(b);
    scroll();
    return r;
  }

  function note(text, error) {
    clearTyping();
    const n = el("div", error ? "note error" : "note", text);
    n.setAttribute("data-role", error ? "error" : "note");
    log.appendChild(n);
    lastNote = text;
    scroll();
    return n;
  }

  function citations(r, cites) {
    if (!cites || !cites.length) return;
    const c = el("div", "cites");
    c.appendChild(el("span", "", `${T.sources}:`));
    for (const id of cites) c.appendChild(el("span", "cite", id));
    r.appendChild(c);
  }

  function showTyping() {
    if (typing) return;
    typing = row("bot", T.bot);
    const b = el("div", "bubble");
    const dots = el("span", "typing");
    dots.append(el("i"), el("i"), el("i"));
    b.appendChild(dots);
    typing.appendChild(b);
    scroll();
  }

  function clearTyping() {
    if (typing) typing.remove();
    typing = null;
  }

  function takeStream(seq) {
    // The bubble streaming the reply to message ``seq``; a gateway without seqs has one stream at a time.
    const key = streams.has(seq) ? seq : streams.has(0) ? 0 : seq;
    const r = streams.get(key) || null;
    streams.delete(key);
    return r;
  }

  function botReply(reply, seq) {
    let r = takeStream(seq);
    if (reply.source === "handoff") {
      if (r) r.remove();
      setMode("human");
      // In human mode every visitor message is acknowledged the same way: once on screen is enough.
      if (reply.text !== lastNote) note(reply.text);
      clearTyping();
      return;
    }
    if (!r) r = bubble(reply.source === "agent" ? "agent" : "bot", "", reply.source === "agent" ? T.agent : T.bot);
    const b = r.querySelector(".bubble");
    b.classList.remove("streaming");
    b.textContent = reply.text; // the final text is authoritative (deltas are a preview of it)
    citations(r, reply.citations);
    clearTyping();
    scroll();
  }

  function setMode(m) {
    mode = m;
    humanBtn.disabled = m === "human";
    setStatus();
  }

  function setStatus() {
    status.classList.toggle("wait", !wsOpen);
    statusText.textContent = !wsOpen ? (retries ? T.reconnecting : T.connecting) : mode === "human" ? T.human : T.online;
  }

  function bump() {
    if (root.classList.contains("open")) return;
    unread += 1;
    badge.textContent = String(unread);
    badge.classList.add("on");
  }

  function errorText(code) {
    if (code === "unavailable" || code === "service_unavailable" || code === "deadline_exceeded" ||
        code === "model_timeout" || code === "internal" || code === "busy") return T.errors.busy;
    return T.errors[code] || T.errors.generic;
  }

  // ---- REST ----
  async function api(method, path, body, isForm) {
    const headers = {};
    if (conv && path.startsWith("/v1/conversations/")) headers.Authorization = `Bearer ${conv.token}`;
    let data;
    if (body !== undefined) {
      if (isForm) data = body;
      else {
        headers["Content-Type"] = "application/json";
        data = JSON.stringify(body);
      }
    }
    const resp = await fetch(ORIGIN + path, { method, headers, body: data, mode: "cors", credentials: "omit" });
    const text = await resp.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
    if (!resp.ok) {
      const err = new Error((json && json.error && json.error.message) || resp.statusText);
      err.status = resp.status;
      err.code = (json && json.error && json.error.code) || "";
      throw err;
    }
    return json;
  }

  async function startConversation() {
    const res = await api("POST", `/v1/tenants/${encodeURIComponent(TENANT)}/conversations`, {});
    conv = { cid: res.conversation_id, token: res.visitor_token };
    save();
  }

  function renderTurn(t) {
    if (t.role === "visitor" && t.source === "ocr") {
      ocrBox(t.text);
    } else if (t.role === "visitor") {
      bubble("me", t.text);
    } else if (t.role === "agent") {
      bubble("agent", t.text, T.agent);
      seenAgent.add(t.seq);
    } else if (t.source === "handoff") {
      if (t.text !== lastNote) note(t.text);
    } else {
      const r = bubble("bot", t.text, T.bot);
      citations(r, t.citations);
    }
  }

  function renderState(state) {
    let asked = 0;
    for (const t of state.turns || []) {
      renderTurn(t);
      // A reply frame names the visitor message it answers: the one before the bot turn.
      if (t.role === "visitor" && t.source !== "ocr") asked = t.seq;
      else if (t.role === "bot" && asked) { seenReplies.add(asked); asked = 0; }
    }
    lastSeq = Math.max(lastSeq, state.seq || 0);
    setMode(state.mode || "bot");
  }

  function resync(state) {
    // Too much was missed to replay: the state replaces what is on screen.
    for (const r of streams.values()) r.remove();
    streams.clear();
    log.replaceChildren();
    lastNote = "";
    note(T.greeting);
    renderState(state);
  }

  async function history() {
    try {
      renderState(await api("GET", `/v1/conversations/${encodeURIComponent(conv.cid)}`));
      return true;
    } catch (err) {
      if (err.status === 401 || err.status === 403 || err.status === 404) {
        conv = null; // expired or gone: a new conversation starts
        save();
        return false;
      }
      throw err;
    }
  }

  function ensure() {
    // One start at a time, however many clicks.
    if (!started) {
      started = (async () => {
        note(T.greeting);
        if (conv && !(await history())) log.replaceChildren(note(T.greeting));
        if (!conv) await startConversation();
        connect();
      })().catch((err) => {
        started = null;
        note(errorText(err.code), true);
      });
    }
    return started;
  }

  // ---- WebSocket ----
  function connect() {
    if (!conv || ws) return;
    const url = new URL("/v1/ws", ORIGIN);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("token", conv.token);
    if (lastSeq) url.searchParams.set("last_seq", String(lastSeq));
    const sock = new WebSocket(url.href);
    ws = sock;
    sock.onopen = () => {
      wsOpen = true;
      retries = 0;
      setStatus();
      // Unanswered messages go again with the same client_msg_id: answered once, never twice.
      for (const m of pending) sock.send(JSON.stringify({ type: "message", text: m.text, client_msg_id: m.cmid }));
    };
    sock.onmessage = (ev) => {
      let f;
      try { f = JSON.parse(ev.data); } catch (_) { return; }
      onFrame(f);
    };
    sock.onclose = () => {
      if (ws !== sock) return;
      ws = null;
      wsOpen = false;
      retries += 1;
      setStatus();
      // Backoff with jitter, up to 30 s: a restarted gateway is not stormed by every open page at once.
      const delay = Math.min(30000, 500 * 2 ** Math.min(retries - 1, 6)) * (0.75 + Math.random() * 0.5);
      clearTimeout(reconnectTimer);
      reconnectTimer = setTimeout(reconnect, delay);
    };
  }

  async function reconnect() {
    if (retries >= 3 && conv) {
      // Still failing: the token may have expired or the conversation gone; if so start a new one.
      try {
        await api("GET", `/v1/conversations/${encodeURIComponent(conv.cid)}`);
      } catch (err) {
        if (err.status === 401 || err.status === 403 || err.status === 404) {
          conv = null;
          save();
          lastSeq = 0;
          try { await startConversation(); } catch (_) { /* retried with the next backoff */ }
        }
      }
    }
    connect();
  }

  function onFrame(f) {
    // delta and reply: seq is the visitor message answered (reply_seq the reply's own); agent_message: its own.
    const seq = typeof f.seq === "number" ? f.seq : 0;
    switch (f.type) {
      case "delta": {
        if (seq && seenReplies.has(seq)) break;
        let r = streams.get(seq);
        if (!r) {
          clearTyping();
          r = bubble("bot", "", T.bot);
          r.querySelector(".bubble").classList.add("streaming");
          streams.set(seq, r);
        }
        r.querySelector(".bubble").textContent += f.text || "";
        scroll();
        break;
      }
      case "reply": {
        pending.shift();
        if (typeof f.reply_seq === "number") lastSeq = Math.max(lastSeq, f.reply_seq);
        if (seq && seenReplies.has(seq)) { // a replay of a reply already on screen
          const r = takeStream(seq);
          if (r) r.remove();
          break;
        }
        if (seq) seenReplies.add(seq);
        botReply(f.reply || { text: "", source: "kb", citations: [] }, seq);
        bump();
        break;
      }
      case "agent_message": {
        if (seq && seenAgent.has(seq)) break;
        if (seq) {
          seenAgent.add(seq);
          lastSeq = Math.max(lastSeq, seq);
        }
        setMode("human");
        bubble("agent", f.text || "", T.agent);
        bump();
        break;
      }
      case "resync": {
        if (f.state) resync(f.state);
        else { // the gateway could not read it just now: ask again shortly
          setTimeout(() => api("GET", `/v1/conversations/${encodeURIComponent(conv.cid)}`).then(resync)
            .catch(() => {}), 2000);
        }
        break;
      }
      case "error": {
        // The message that failed is not retried: it was refused, not lost.
        pending.shift();
        const r = takeStream(0);
        if (r) r.remove();
        note(errorText(f.code), true);
        break;
      }
      default:
        break;
    }
  }

  // ---- actions ----
  function cmid() {
    return (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`).replace(/-/g, "");
  }

  async function send(text) {
    text = text.trim();
    if (!text) return;
    await ensure();
    if (!conv) return;
    const m = { text, cmid: cmid() };
    pending.push(m);
    bubble("me", text);
    showTyping();
    if (wsOpen) ws.send(JSON.stringify({ type: "message", text: m.text, client_msg_id: m.cmid }));
    else if (!navigator.onLine) note(T.errors.offline);
  }

  function ocrBox(text) {
    const r = el("div", "ocr");
    r.setAttribute("data-role", "ocr");
    r.appendChild(el("b", "", text ? T.imageText : T.image));
    r.appendChild(document.createTextNode(text || T.imageEmpty));
    const wrap = row("bot");
    wrap.appendChild(r);
    scroll();
    return wrap;
  }

  async function upload(file) {
    if (!file) return;
    if (!/^image\/(png|jpeg)$/.test(file.type)) {
      note(T.errors.invalid_image, true);
      return;
    }
    if (file.size > MAX_IMAGE_BYTES) {
      note(T.errors.payload_too_large, true);
      return;
    }
    await ensure();
    if (!conv) return;
    const r = row("me");
    const img = el("img", "thumb");
    img.alt = T.image;
    img.src = URL.createObjectURL(file);
    img.onload = () => { URL.revokeObjectURL(img.src); scroll(); };
    r.appendChild(img);
    const wait = note(T.reading);
    const form = new FormData();
    form.append("file", file, file.name || "image");
    try {
      const res = await api("POST", `/v1/conversations/${encodeURIComponent(conv.cid)}/images`, form, true);
      wait.remove();
      ocrBox((res && res.text) || "");
      if (res && res.seq) lastSeq = Math.max(lastSeq, res.seq);
    } catch (err) {
      wait.remove();
      note(errorText(err.code), true);
    }
  }

  function open() {
    root.classList.add("open");
    unread = 0;
    badge.classList.remove("on");
    try { sessionStorage.setItem(OPEN_KEY, "1"); } catch (_) { /* fine */ }
    ensure();
    setTimeout(() => input.focus(), 0);
  }

  function close() {
    root.classList.remove("open");
    try { sessionStorage.removeItem(OPEN_KEY); } catch (_) { /* fine */ }
  }

  launcher.addEventListener("click", open);
  closeBtn.addEventListener("click", close);
  humanBtn.addEventListener("click", () => send(T.talkToHumanText));
  uploadBtn.addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => {
    const file = fileInput.files && fileInput.files[0];
    fileInput.value = "";
    upload(file);
  });
  compose.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value;
    input.value = "";
    input.style.height = "";
    send(text);
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { // Enter sends; not while an IME is composing
      ev.preventDefault();
      compose.requestSubmit();
    }
  });
  input.addEventListener("input", () => {
    input.style.height = "";
    input.style.height = `${Math.min(input.scrollHeight, 120)}px`;
  });
  window.addEventListener("online", () => { if (!ws && conv) connect(); });

  function mount() {
    document.body.appendChild(host);
    // A returning visitor's conversation goes on (agent messages arrive while the panel is closed);
    // a new visitor's starts only when the panel is first opened.
    let wasOpen = false;
    try { wasOpen = sessionStorage.getItem(OPEN_KEY) === "1"; } catch (_) { /* fine */ }
    if (wasOpen) open();
    else if (conv) ensure();
  }

  window.__kefuWidget = { open, close, send, tenant: TENANT, lang: LANG };
  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);
})();
