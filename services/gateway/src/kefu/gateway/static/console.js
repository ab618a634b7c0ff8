/*
 * kefu agent console. Sign in (POST /v1/agent/login, or an agent token), then WS /v1/agent/ws?token=...:
 * server frames queue, handoff, accepted, visitor_message, sent, released, error; client frames accept,
 * reply, release. Everything the visitor or the bot wrote is shown as text, never as HTML.
 */
(() => {
  "use strict";

  const STRINGS = {
    en: {
      loginTitle: "Agent console", loginHint: "Sign in with the account your administrator created.",
      tenant: "Tenant", agentId: "Agent ID", password: "Password", signIn: "Sign in", signingIn: "Signing in…",
      useToken: "Sign in with an agent token instead", agentToken: "Agent token", useThisToken: "Use this token",
      consoleTitle: "Agent console", signOut: "Sign out", waiting: "Waiting for a person", mine: "My conversations",
      noneWaiting: "No one is waiting.", noneMine: "Take over a conversation to reply.",
      pick: "Pick a conversation from the queue.", takeOver: "Take over", handBack: "Hand back to the bot",
      summary: "Handoff summary", suggested: "The bot's suggested answer", useThis: "Use this",
      replyPlaceholder: "Write your reply to the visitor…", enterHint: "Enter to send, Shift+Enter for a new line",
      send: "Send", online: "Connected", connecting: "Connecting…", reconnecting: "Reconnecting…",
      visitor: "Visitor", bot: "Bot", agent: "Agent", you: "You", sources: "Sources", imageText: "Text in an image",
      takenBy: "taken by {agent}", waitingSince: "waiting {ago}", justNow: "just now", minutes: "{n} min ago",
      hours: "{n} h ago", conversation: "Conversation", noSummary: "No summary.", sending: "sending…",
      failed: "not sent", released: "Handed back to the bot.", accepted: "You took over this conversation.",
      newMessage: "New message", expired: "Your session has expired. Please sign in again.",
      badLogin: "Wrong agent ID or password.", loginUnavailable: "Password sign-in is not available on this gateway: use an agent token.",
      tooMany: "Too many attempts. Please wait a moment.", networkError: "Cannot reach the gateway.",
      lastMessage: "Last message",
      keys: { reason: "Reason", asked: "Asked", known: "Known", "bot's last evidence": "Bot's last evidence",
              "bot's last outcome": "Bot's last outcome" },
      reasons: { asked: "the visitor asked for a person", upset: "the visitor is upset",
                 repeated_failure: "the bot could not answer twice in a row" },
    },
    zh: {
      loginTitle: "客服工作台", loginHint: "请使用管理员为您创建的账号登录。",
      tenant: "租户", agentId: "客服账号", password: "密码", signIn: "登录", signingIn: "正在登录…",
      useToken: "改用客服令牌登录", agentToken: "客服令牌", useThisToken: "使用此令牌",
      consoleTitle: "客服工作台", signOut: "退出登录", waiting: "等待人工", mine: "我的会话",
      noneWaiting: "暂无等待中的访客。", noneMine: "接入会话后即可回复。",
      pick: "请从左侧队列选择一个会话。", takeOver: "接入会话", handBack: "交还机器人",
      summary: "转人工摘要", suggested: "机器人建议回答", useThis: "使用此回答",
      replyPlaceholder: "输入回复内容…", enterHint: "Enter 发送，Shift+Enter 换行",
      send: "发送", online: "已连接", connecting: "正在连接…", reconnecting: "正在重连…",
      visitor: "访客", bot: "机器人", agent: "客服", you: "我", sources: "来源", imageText: "图片中的文字",
      takenBy: "{agent} 已接入", waitingSince: "等待 {ago}", justNow: "刚刚", minutes: "{n} 分钟前",
      hours: "{n} 小时前", conversation: "会话", noSummary: "暂无摘要。", sending: "发送中…",
      failed: "发送失败", released: "已交还机器人。", accepted: "您已接入此会话。",
      newMessage: "新消息", expired: "登录已过期，请重新登录。",
      badLogin: "客服账号或密码错误。", loginUnavailable: "此网关暂不支持密码登录，请使用客服令牌。",
      tooMany: "尝试次数过多，请稍后再试。", networkError: "无法连接到网关。",
      lastMessage: "最后一条消息",
      keys: { reason: "原因", asked: "访客问题", known: "已知信息", "bot's last evidence": "机器人最后依据",
              "bot's last outcome": "机器人最后结果" },
      reasons: { asked: "访客要求转人工", upset: "访客情绪不满", repeated_failure: "机器人连续未能回答" },
    },
  };
  const LANG_KEY = "kefu-console-lang";
  const SESSION_KEY = "kefu-console-session";
  let lang = localStorage.getItem(LANG_KEY) ||
    ((navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en");
  const t = (key, vars) => {
    let s = STRINGS[lang][key] ?? STRINGS.en[key] ?? key;
    for (const [k, v] of Object.entries(vars || {})) s = s.replace(`{${k}}`, v);
    return s;
  };
  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function applyLang() {
    document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
    document.title = `kefu · ${t("consoleTitle")}`;
    for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
    for (const node of document.querySelectorAll("[data-i18n-placeholder]")) {
      node.placeholder = t(node.dataset.i18nPlaceholder);
    }
    for (const b of document.querySelectorAll(".lang-toggle")) b.textContent = lang === "zh" ? "English" : "中文";
    setConn();
    renderLists();
    renderConv();
  }

  // ---- session ----
  let session = null;
  try { session = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null"); } catch (_) { session = null; }

  function saveSession() {
    if (session) sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
    else sessionStorage.removeItem(SESSION_KEY);
  }

  async function login(form) {
    const err = $("login-error");
    err.textContent = "";
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    button.textContent = t("signingIn");
    const body = { tenant: form.tenant.value.trim(), agent_id: form.agent_id.value.trim(), password: form.password.value };
    try {
      const resp = await fetch("/v1/agent/login", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      const json = await resp.json().catch(() => null);
      if (!resp.ok) {
        const code = json && json.error && json.error.code;
        err.textContent = resp.status === 401 ? t("badLogin") : resp.status === 429 ? t("tooMany")
          : resp.status === 404 && code !== "unknown_tenant" && code !== "unknown_agent" ? t("loginUnavailable")
            : (json && json.error && json.error.message) || resp.statusText;
        return;
      }
      form.password.value = "";
      session = {
        token: json.agent_token, tenant: json.tenant || body.tenant, agent_id: json.agent_id || body.agent_id,
        name: json.name || json.agent_id || body.agent_id, role: json.role || "agent",
        expires_at: json.expires_in ? Date.now() + json.expires_in * 1000 : 0,
      };
      saveSession();
      enterDesk();
    } catch (_) {
      err.textContent = t("networkError");
    } finally {
      button.disabled = false;
      button.textContent = t("signIn");
    }
  }

  function tokenLogin(form) {
    const token = form.token.value.trim();
    if (!token) return;
    form.token.value = "";
    session = { token, tenant: form.tenant.value.trim(), agent_id: "", name: "", role: "agent", expires_at: 0 };
    saveSession();
    enterDesk();
  }

  function logout(message) {
    session = null;
    saveSession();
    if (ws) {
      const s = ws;
      ws = null;
      s.close();
    }
    clearTimeout(retryTimer);
    convs.clear();
    selected = null;
    $("desk").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
  }

  // ---- conversations ----
  // cid -> {cid, tenant, summary, last_text, since_ms, agent_id, status: waiting|mine|taken, turns, suggestion,
  //         loaded, unread}
  const convs = new Map();
  let selected = null;
  const actions = []; // what the socket has yet to answer, in order: accepted / sent / released / error
  let ws = null;
  let wsOpen = false;
  let retries = 0;
  let retryTimer = 0;

  function me() {
    return session && session.agent_id;
  }

  function upsertNotice(n) {
    const c = convs.get(n.conversation_id) || {
      cid: n.conversation_id, turns: [], suggestion: null, loaded: false, unread: 0, status: "waiting",
    };
    Object.assign(c, { tenant: n.tenant, summary: n.summary, last_text: n.last_text, since_ms: n.since_ms,
                       agent_id: n.agent_id || "" });
    if (c.status !== "mine") c.status = !c.agent_id ? "waiting" : c.agent_id === me() ? "mine" : "taken";
    convs.set(c.cid, c);
    return c;
  }

  function ago(ms) {
    if (!ms) return "";
    const min = Math.floor((Date.now() - ms) / 60000);
    if (min < 1) return t("justNow");
    if (min < 60) return t("minutes", { n: min });
    return t("hours", { n: Math.floor(min / 60) });
  }

  function shortId(cid) {
    return cid.length > 10 ? `${cid.slice(0, 8)}…` : cid;
  }

  function renderLists() {
    const waiting = $("waiting");
    const mine = $("mine");
    waiting.replaceChildren();
    mine.replaceChildren();
    const all = [...convs.values()].sort((a, b) => (a.since_ms || 0) - (b.since_ms || 0));
    let nw = 0;
    let nm = 0;
    for (const c of all) {
      const li = el("li", "conv-item");
      li.dataset.cid = c.cid;
      li.tabIndex = 0;
      li.setAttribute("role", "button");
      if (c.cid === selected) li.classList.add("active");
      if (c.status === "taken") li.classList.add("taken");
      const top = el("div", "conv-item-top");
      top.appendChild(el("span", "conv-item-title", c.last_text || shortId(c.cid)));
      if (c.unread) top.appendChild(el("span", "unread", String(c.unread)));
      li.appendChild(top);
      const reason = /^reason: (.+)$/m.exec(c.summary || "");
      const sub = el("div", "conv-item-sub");
      sub.appendChild(el("span", "", [c.tenant, reason ? (STRINGS[lang].reasons[reason[1]] || reason[1]) : ""]
        .filter(Boolean).join(" · ")));
      sub.appendChild(el("span", "", c.status === "taken" ? t("takenBy", { agent: c.agent_id })
        : t("waitingSince", { ago: ago(c.since_ms) })));
      li.appendChild(sub);
      li.addEventListener("click", () => select(c.cid));
      li.addEventListener("keydown", (ev) => { if (ev.key === "Enter") select(c.cid); });
      if (c.status === "mine") { mine.appendChild(li); nm += 1; } else { waiting.appendChild(li); nw += 1; }
    }
    $("waiting-count").textContent = String(nw);
    $("mine-count").textContent = String(nm);
    $("waiting-empty").hidden = nw > 0;
    $("mine-empty").hidden = nm > 0;
  }

  function select(cid) {
    selected = cid;
    const c = convs.get(cid);
    if (c) c.unread = 0;
    renderLists();
    renderConv();
    // Our own conversation after a reload: taking it over again brings its history back.
    if (c && c.status === "mine" && !c.loaded) act({ type: "accept", conversation_id: cid });
  }

  function renderSummary(c) {
    const dl = $("summary");
    dl.replaceChildren();
    const lines = (c.summary || "").split("\n").filter((l) => l.trim());
    if (!lines.length) {
      dl.appendChild(el("dd", "muted", t("noSummary")));
      return;
    }
    const keys = STRINGS[lang].keys;
    for (const line of lines) {
      const m = /^([^:]{1,40}?)(?: \(([^)]*)\))?: (.*)$/.exec(line);
      if (!m) {
        dl.appendChild(el("dd", "", line));
        continue;
      }
      const value = m[1] === "reason" ? (STRINGS[lang].reasons[m[3]] || m[3]) : m[3];
      dl.append(el("dt", "", keys[m[1]] || m[1]), el("dd", "", value));
    }
  }

  function renderTurn(turn) {
    if (turn.role === "visitor" && turn.source === "ocr") {
      const r = el("div", "msg visitor");
      r.appendChild(el("div", "msg-label", `${t("visitor")} · ${t("imageText")}`));
      r.appendChild(el("div", "bubble ocr", turn.text));
      return r;
    }
    const kind = turn.role === "agent" ? "agent" : turn.role === "visitor" ? "visitor" : "bot";
    const r = el("div", `msg ${kind}`);
    r.dataset.role = kind;
    let label = t(kind);
    if (kind === "agent" && turn.agent_id) label = `${t("agent")} · ${turn.agent_id}`;
    if (kind === "bot" && turn.source) label = `${t("bot")} · ${turn.source}`;
    r.appendChild(el("div", "msg-label", label));
    const b = el("div", "bubble", turn.text);
    r.appendChild(b);
    if (turn.citations && turn.citations.length) {
      r.appendChild(el("div", "msg-cites", `${t("sources")}: ${turn.citations.join(", ")}`));
    }
    if (turn.pending || turn.failed) {
      r.appendChild(el("div", `msg-state${turn.failed ? " failed" : ""}`, turn.failed ? t("failed") : t("sending")));
    }
    return r;
  }

  function renderConv() {
    const c = selected && convs.get(selected);
    $("placeholder").hidden = Boolean(c);
    $("conv").hidden = !c;
    if (!c) return;
    $("conv-title").textContent = c.last_text || `${t("conversation")} ${shortId(c.cid)}`;
    $("conv-meta").textContent = [c.tenant, c.cid, c.since_ms ? t("waitingSince", { ago: ago(c.since_ms) }) : ""]
      .filter(Boolean).join(" · ");
    const mine = c.status === "mine";
    $("accept").hidden = mine || c.status === "taken";
    $("release").hidden = !mine;
    $("reply-form").hidden = !mine;
    renderSummary(c);
    const tr = $("transcript");
    tr.replaceChildren();
    if (!c.loaded && c.last_text) {
      const r = el("div", "msg visitor");
      r.appendChild(el("div", "msg-label", `${t("visitor")} · ${t("lastMessage")}`));
      r.appendChild(el("div", "bubble", c.last_text));
      tr.appendChild(r);
    }
    for (const turn of c.turns) tr.appendChild(renderTurn(turn));
    tr.scrollTop = tr.scrollHeight;
    const s = mine && c.suggestion;
    $("suggestion").hidden = !s;
    if (s) {
      $("suggestion-text").textContent = s.text;
      const cites = $("suggestion-cites");
      cites.replaceChildren();
      if (s.citations && s.citations.length) {
        cites.appendChild(el("span", "muted", `${t("sources")}:`));
        for (const id of s.citations) cites.appendChild(el("span", "cite", id));
      }
    }
  }

  function toast(text, error) {
    const box = $("toast");
    box.textContent = text;
    box.className = error ? "toast error" : "toast";
    box.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { box.hidden = true; }, 4000);
  }

  // ---- socket ----
  function setConn() {
    const box = $("conn");
    box.classList.toggle("wait", !wsOpen);
    $("conn-text").textContent = wsOpen ? t("online") : retries ? t("reconnecting") : t("connecting");
  }

  function connect() {
    if (!session || ws) return;
    const url = new URL("/v1/agent/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("token", session.token);
    const sock = new WebSocket(url.href);
    ws = sock;
    sock.onopen = () => {
      wsOpen = true;
      retries = 0;
      setConn();
    };
    sock.onmessage = (ev) => {
      let f;
      try { f = JSON.parse(ev.data); } catch (_) { return; }
      onFrame(f);
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      wsOpen = false;
      retries += 1;
      if (ev.code === 4401) { // the account was removed or its tokens revoked: signing in again is the way back
        logout(t("expired"));
        return;
      }
      // What was asked and not answered is lost with the socket; the queue comes again on reconnect.
      for (const a of actions.splice(0)) if (a.turn) { a.turn.pending = false; a.turn.failed = true; }
      for (const c of convs.values()) c.loaded = false;
      setConn();
      renderConv();
      if (session && session.expires_at && Date.now() > session.expires_at) {
        logout(t("expired"));
        return;
      }
      const delay = Math.min(30000, 500 * 2 ** Math.min(retries - 1, 6)) * (0.75 + Math.random() * 0.5);
      retryTimer = setTimeout(connect, delay);
    };
  }

  function act(frame, turn) {
    if (!ws || !wsOpen) {
      toast(t("reconnecting"), true);
      if (turn) { turn.pending = false; turn.failed = true; }
      return false;
    }
    actions.push({ type: frame.type, cid: frame.conversation_id, turn });
    ws.send(JSON.stringify(frame));
    return true;
  }

  function onFrame(f) {
    if (!session) return; // signed out while the frame was on its way
    switch (f.type) {
      case "queue": {
        // A pasted token says nothing of itself: the socket tells who and where we are.
        if (f.agent_id && !session.agent_id) session.agent_id = f.agent_id;
        if (f.tenant && !session.tenant) session.tenant = f.tenant;
        if (!session.name) session.name = f.agent_id || "";
        saveSession();
        $("me-name").textContent = session.name || session.agent_id;
        $("me-tenant").textContent = session.tenant || "";
        $("me-tenant").hidden = !session.tenant;
        const ids = new Set();
        for (const n of f.conversations || []) ids.add(upsertNotice(n).cid);
        for (const cid of [...convs.keys()]) if (!ids.has(cid)) convs.delete(cid);
        if (selected && !convs.has(selected)) selected = null;
        break;
      }
      case "handoff": {
        upsertNotice(f);
        toast(`${t("waiting")}: ${f.last_text || shortId(f.conversation_id)}`);
        break;
      }
      case "accepted": {
        actions.shift();
        const st = f.state || {};
        const c = convs.get(f.conversation_id) || { cid: f.conversation_id, unread: 0 };
        Object.assign(c, {
          status: "mine", loaded: true, tenant: st.tenant || c.tenant, agent_id: me(),
          summary: st.handoff_summary || c.summary || "", suggestion: f.suggestion || null,
          turns: (st.turns || []).map((x) => ({ ...x })),
        });
        convs.set(c.cid, c);
        if (!selected) selected = c.cid;
        break;
      }
      case "visitor_message": {
        const c = convs.get(f.conversation_id);
        if (!c) break;
        c.turns.push({ role: "visitor", text: f.text, seq: f.seq });
        c.last_text = f.text;
        c.suggestion = f.suggestion || null; // the suggestion answers the latest message, or there is none
        if (c.cid !== selected || document.hidden) c.unread += 1;
        break;
      }
      case "sent": {
        const a = actions.shift();
        if (a && a.turn) { a.turn.pending = false; a.turn.seq = f.seq; }
        break;
      }
      case "released": {
        actions.shift();
        convs.delete(f.conversation_id);
        if (selected === f.conversation_id) selected = null;
        toast(t("released"));
        break;
      }
      case "error": {
        const a = actions.shift();
        if (a && a.turn) { a.turn.pending = false; a.turn.failed = true; }
        toast(f.message || f.code, true);
        break;
      }
      default:
        return;
    }
    renderLists();
    renderConv();
  }

  function sendReply() {
    const c = selected && convs.get(selected);
    const box = $("reply-text");
    const text = box.value.trim();
    if (!c || !text) return;
    const turn = { role: "agent", text, agent_id: me(), pending: true };
    c.turns.push(turn);
    if (act({ type: "reply", conversation_id: c.cid, text }, turn)) box.value = "";
    renderConv();
  }

  function enterDesk() {
    $("login").hidden = true;
    $("desk").hidden = false;
    $("me-name").textContent = session.name || session.agent_id || "";
    $("me-tenant").textContent = session.tenant || "";
    $("me-tenant").hidden = !session.tenant;
    retries = 0;
    setConn();
    renderLists();
    renderConv();
    connect();
  }

  // ---- wiring ----
  const form = $("login-form");
  form.addEventListener("submit", (ev) => { ev.preventDefault(); login(form); });
  $("token-login").addEventListener("click", () => tokenLogin(form));
  $("logout").addEventListener("click", () => logout(""));
  $("accept").addEventListener("click", () => selected && act({ type: "accept", conversation_id: selected }));
  $("release").addEventListener("click", () => selected && act({ type: "release", conversation_id: selected }));
  $("use-suggestion").addEventListener("click", () => {
    const c = selected && convs.get(selected);
    if (!c || !c.suggestion) return;
    const box = $("reply-text");
    box.value = c.suggestion.text;
    box.focus();
  });
  $("reply-form").addEventListener("submit", (ev) => { ev.preventDefault(); sendReply(); });
  $("reply-text").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); sendReply(); }
  });
  for (const b of document.querySelectorAll(".lang-toggle")) {
    b.addEventListener("click", () => {
      lang = lang === "zh" ? "en" : "zh";
      localStorage.setItem(LANG_KEY, lang);
      applyLang();
    });
  }
  setInterval(renderLists, 30000); // "waiting 3 min" stays true

  const params = new URLSearchParams(location.search);
  if (params.get("lang") === "zh" || params.get("lang") === "en") lang = params.get("lang");
  if (params.get("tenant")) form.tenant.value = params.get("tenant");
  applyLang();
  if (session && session.token) enterDesk();
  else $("login").hidden = false;
})();
