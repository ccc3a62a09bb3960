// zchat's page: one WebSocket to zchat-web, which holds this tab's zchat session.
//
// Rules this file keeps:
// - Text from anyone else (names, messages, addresses, reasons, topics) only
//   ever reaches the page as textContent, never as markup: see el().
// - The tab's name and token live in sessionStorage, so a reload resumes the
//   same session (zchat-web keeps it a moment for that) and the conversation
//   is replayed from the gateway's log.
// - Lines typed while offline wait in an outbox (sessionStorage too), shown
//   as pending, and go out after the reconnect with the same id: the gateway
//   answers a resent id from memory, so each goes out once.
"use strict";

(function () {
  const store = window.sessionStorage;
  const $ = (id) => document.getElementById(id);
  const ACTION = "/me ";
  const HELP = [
    ["TEXT", "say TEXT to the room; //TEXT if it starts with /"],
    ["/msg NAME TEXT", "a private message to NAME"],
    ["/me ACTION", "say what you are doing: * you ACTION"],
    ["/who, /names", "who is here, with their address"],
    ["/join ROOM", "enter ROOM (made if new) and switch to it"],
    ["/part [ROOM]", "leave ROOM (this one by default)"],
    ["/rooms", "the public rooms"],
    ["/topic TEXT", "set this room's topic"],
    ["/clear", "clear the screen"],
    ["/quit [REASON]", "leave"],
    ["/help", "this help"],
  ];
  const STATE_TEXT = {
    online: "online",
    reconnecting: "reconnecting…",
    offline: "offline, reconnecting…",
    ended: "disconnected",
  };

  let ws = null;
  let name = store.getItem("zchat.name") || "";
  let token = store.getItem("zchat.token") || "";
  let lastN = 0; // the last item of the gateway's log this page shows
  let welcomed = false;
  let ended = false;
  let backoff = 250;
  let me = "";
  let room = "lobby";
  let outbox = JSON.parse(store.getItem("zchat.outbox") || "[]");
  let counter = 0;
  const rooms = new Map(); // room -> {log element, unread, topic, members}
  const seen = new Set(); // "room/seq" of events shown

  // ------------------------------------------------------------ building text

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function stamp(ts) {
    const when = new Date(ts * 1000);
    const two = (n) => String(n).padStart(2, "0");
    return el("span", "ts", two(when.getHours()) + ":" + two(when.getMinutes()) + " ");
  }

  function nick(who, colour) {
    // <bdi> isolates a right-to-left name from what is around it.
    const node = el("bdi", "nick", who);
    if (typeof colour === "string" && /^#[0-9a-f]{6}$/.test(colour)) node.style.color = colour;
    return node;
  }

  function fold(text) {
    return String(text).toLowerCase();
  }

  function mentions(text, who) {
    if (!who) return false;
    const hay = fold(text);
    const needle = fold(who);
    let at = hay.indexOf(needle);
    while (at >= 0) {
      const before = at ? hay[at - 1] : " ";
      const after = hay[at + needle.length] || " ";
      if (!/[\p{L}\p{N}]/u.test(before) && !/[\p{L}\p{N}]/u.test(after)) return true;
      at = hay.indexOf(needle, at + 1);
    }
    return false;
  }

  // ------------------------------------------------------------ rooms and lines

  function roomOf(nameOfRoom) {
    let entry = rooms.get(nameOfRoom);
    if (!entry) {
      const log = el("div", "roomlog");
      log.dataset.room = nameOfRoom;
      log.hidden = nameOfRoom !== room;
      $("log").appendChild(log);
      // members: folded name -> {name, addr, colour}
      entry = { log: log, unread: 0, topic: "", members: new Map() };
      rooms.set(nameOfRoom, entry);
      drawRooms();
    }
    return entry;
  }

  function drawRooms() {
    const list = $("rooms");
    list.replaceChildren();
    for (const [key, entry] of rooms) {
      const item = el("li", key === room ? "current" : "", "#" + key);
      item.dataset.room = key;
      if (entry.unread && key !== room) item.appendChild(el("span", "unread", entry.unread));
      item.addEventListener("click", () => switchRoom(key));
      list.appendChild(item);
    }
  }

  function switchRoom(key) {
    room = key;
    for (const [other, entry] of rooms) entry.log.hidden = other !== key;
    const entry = roomOf(key);
    entry.unread = 0;
    $("room-title").textContent = "#" + key;
    $("topic").textContent = entry.topic;
    drawRooms();
    drawMembers();
    scrollDown(true);
  }

  function scrollDown(force) {
    const log = $("log");
    if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 80) {
      log.scrollTop = log.scrollHeight;
    }
  }

  function addLine(node, inRoom, counts) {
    const entry = roomOf(inRoom || room);
    const log = $("log");
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
    entry.log.appendChild(node);
    if (counts && (inRoom || room) !== room) {
      entry.unread += 1;
      drawRooms();
    }
    if (atBottom) log.scrollTop = log.scrollHeight;
    return node;
  }

  function info(text, cls) {
    const line = el("div", "line " + (cls || "info"));
    line.append(stamp(Date.now() / 1000), el("span", "text", "-!- " + text));
    return addLine(line);
  }

  function showItem(item, live) {
    const type = item.type;
    const line = el("div", "line " + type);
    if (typeof item.seq === "number") {
      const key = item.room + "/" + item.seq;
      if (seen.has(key)) return;
      seen.add(key);
      line.dataset.seq = item.seq;
      dropPending(item.room, item.seq);
    }
    line.appendChild(stamp(item.ts));
    if (type === "message") {
      const mine = fold(item.from) === fold(me);
      if (mine) line.classList.add("mine");
      else if (mentions(item.text, me)) line.classList.add("mention");
      if (item.text.startsWith(ACTION) && item.text.length > ACTION.length) {
        line.classList.add("action");
        line.append(el("span", "what", "* "), nick(item.from, item.colour),
                    el("span", "text", " " + item.text.slice(ACTION.length)));
      } else {
        line.append(el("span", "what", "<"), nick(item.from, item.colour),
                    el("span", "what", "> "), el("span", "text", item.text));
      }
      addLine(line, item.room, live);
    } else if (type === "joined") {
      line.append(el("span", "what", "--> "), nick(item.name, item.colour),
                  el("span", "text", " (" + item.addr + ") joined"));
      addLine(line, item.room, false);
      if (live) addMember(item.room, item);
    } else if (type === "joins") {
      // Several at once (a big room's broker coalesces a busy moment's joins).
      const members = Array.isArray(item.members) ? item.members : [];
      line.append(el("span", "what", "--> "), ...joinedNames(members), el("span", "text", " joined"));
      addLine(line, item.room, false);
      if (live) {
        const entry = roomOf(item.room || "lobby");
        for (const member of members) entry.members.set(fold(member.name), member);
        drawMembers();
      }
    } else if (type === "left") {
      const verbs = { leave: "left", timeout: "timed out", kicked: "was kicked",
                      shutdown: "left: the broker shut down", part: "left" };
      let verb = verbs[item.reason] || "left [" + item.reason + "]";
      if ((item.reason === "kicked" || item.reason === "banned") && item.by) {
        verb = "was " + item.reason + " by " + item.by;
      }
      line.append(el("span", "what", "<-- "), nick(item.name, item.colour),
                  el("span", "text", " (" + item.addr + ") " + verb +
                     (item.detail ? ": " + item.detail : "")));
      addLine(line, item.room, false);
      if (live) { roomOf(item.room).members.delete(fold(item.name)); drawMembers(); }
      if (live && fold(item.name) === fold(me) && item.room) forgetRoom(item.room);
    } else if (type === "notice") {
      line.append(el("span", "what", "-!- notice: "), el("span", "text", item.text));
      addLine(line, item.room, live);
    } else if (type === "topic") {
      line.append(el("span", "what", "-!- "), nick(item.name, item.colour),
                  el("span", "text", " set the topic: " + item.text));
      addLine(line, item.room, false);
      setTopic(item.room, item.text);
    } else if (type === "mode") {
      line.append(el("span", "what", "-!- "), nick(item.name, item.colour),
                  el("span", "text", " " + item.text));
      addLine(line, item.room, false);
    } else if (type === "entered") {
      roomOf(item.room);
      setTopic(item.room, item.topic || "");
      if (live) {
        const entry = roomOf(item.room);
        entry.members.clear();
        for (const member of item.members || []) entry.members.set(fold(member.name), member);
        switchRoom(item.room);
      }
      line.append(el("span", "text", "-!- you are in #" + item.room + " (" + item.count + " here)" +
                      (item.topic ? ": " + item.topic : "")));
      addLine(line, item.room, false);
    } else if (type === "parted") {
      forgetRoom(item.room);
    } else if (type === "invited") {
      line.append(el("span", "what", "-!- "), nick(item.from, item.colour),
                  el("span", "text", " invites you to #" + item.room + " (/join " + item.room + ")"));
      addLine(line);
    } else if (type === "dm") {
      if (item.to !== undefined) {
        line.classList.add("mine");
        line.append(el("span", "what", "[private to "), nick(item.to, item.colour),
                    el("span", "what", "] "), el("span", "text", item.text));
      } else {
        line.append(el("span", "what", "[private from "), nick(item.from, item.colour),
                    el("span", "what", "] "), el("span", "text", item.text));
      }
      addLine(line);
    } else if (type === "status") {
      const says = {
        connected: "connected (your address: " + item.detail + ")",
        reconnected: "reconnected",
        disconnected: "the chat server is unreachable, retrying…",
        history_lost: "the server was restarted: the room's history starts afresh",
        missed: item.count + " events were lost: the server no longer keeps them",
        closed: "disconnected" + (item.detail ? ": " + item.detail : ""),
        refused: item.detail,
      };
      line.append(el("span", "text", "-!- " + (says[item.state] || item.state)));
      addLine(line);
    } else {
      line.append(el("span", "text", "-!- a " + (item.event || type) + " event"));
      addLine(line, item.room, false);
    }
  }

  // A `joins` of at most this many names each with its address; a bigger one
  // names one less, then "and N more" (as the terminal client does).
  const JOINS_LISTED = 4;

  function joinedNames(members) {
    const few = members.length <= JOINS_LISTED;
    const named = few ? members : members.slice(0, JOINS_LISTED - 1);
    const nodes = [];
    named.forEach((member, index) => {
      if (index) nodes.push(el("span", "text", few && index === named.length - 1 ? " and " : ", "));
      nodes.push(nick(member.name, member.colour));
      if (few) nodes.push(el("span", "text", " (" + member.addr + ")"));
    });
    if (!few) nodes.push(el("span", "text", " and " + (members.length - named.length) + " more"));
    return nodes;
  }

  function setTopic(inRoom, text) {
    roomOf(inRoom).topic = text;
    if (inRoom === room) $("topic").textContent = text;
  }

  function forgetRoom(inRoom) {
    const entry = rooms.get(inRoom);
    if (!entry || inRoom === "lobby") return;
    entry.log.remove();
    rooms.delete(inRoom);
    if (room === inRoom) switchRoom("lobby");
    else drawRooms();
  }

  function addMember(inRoom, member) {
    roomOf(inRoom || "lobby").members.set(fold(member.name), member);
    drawMembers();
  }

  function drawMembers() {
    const list = $("members");
    list.replaceChildren();
    const sorted = [...roomOf(room).members.values()].sort((a, b) => fold(a.name).localeCompare(fold(b.name)));
    for (const member of sorted) {
      const item = el("li");
      item.append(nick(member.name, member.colour), el("span", "addr", " (" + member.addr + ")"));
      list.appendChild(item);
    }
    $("count").textContent = "(" + sorted.length + ")";
  }

  function whoLine(list) {
    const line = el("div", "line info who");
    line.append(stamp(Date.now() / 1000), el("span", "text", "-!- " + list.length + " here: "));
    list.forEach((member, index) => {
      if (index) line.append(el("span", "text", ", "));
      line.append(nick(member.name, member.colour),
                  el("span", "addr", " (" + member.addr + (fold(member.name) === fold(me) ? ", you" : "") + ")"));
    });
    addLine(line);
  }

  // ------------------------------------------------------------ the outbox

  function saveOutbox() {
    store.setItem("zchat.outbox", JSON.stringify(outbox));
  }

  function pendingLine(entry) {
    const line = el("div", "line pending");
    line.dataset.id = entry.id;
    line.dataset.room = entry.room || "";
    line.append(el("span", "ts", "(pending) "));
    if (entry.type === "dm") {
      line.append(el("span", "what", "[private to "), nick(entry.to),
                  el("span", "what", "] "), el("span", "text", entry.text));
    } else if (entry.text.startsWith(ACTION)) {
      line.append(el("span", "what", "* "), nick(me), el("span", "text", " " + entry.text.slice(ACTION.length)));
    } else {
      line.append(el("span", "what", "<"), nick(me), el("span", "what", "> "), el("span", "text", entry.text));
    }
    return addLine(line, entry.room);
  }

  function findPending(id) {
    for (const node of document.querySelectorAll(".line.pending")) {
      if (node.dataset.id === id) return node;
    }
    return null;
  }

  function dropPending(inRoom, seq) {
    for (const node of document.querySelectorAll(".line.pending")) {
      if (node.dataset.seq === String(seq) && node.dataset.room === inRoom) node.remove();
    }
  }

  function queue(entry) {
    entry.id = "p" + Date.now().toString(36) + "-" + (counter++) + "-" +
      Math.random().toString(36).slice(2, 8);
    outbox.push(entry);
    saveOutbox();
    pendingLine(entry);
    send(entry);
  }

  function send(body) {
    if (ws && welcomed && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(body));
  }

  function answered(id) {
    const at = outbox.findIndex((entry) => entry.id === id);
    const entry = at >= 0 ? outbox.splice(at, 1)[0] : null;
    saveOutbox();
    return entry;
  }

  // ------------------------------------------------------------ typing

  function typed(text) {
    if (!text) return;
    if (text.startsWith("//")) return queue({ type: "say", text: text.slice(1), room: room });
    if (!text.startsWith("/")) return queue({ type: "say", text: text, room: room });
    const [command, ...rest] = text.split(" ");
    const args = rest.join(" ");
    switch (command.toLowerCase()) {
      case "/me":
        if (!args.trim()) return info("/me ACTION");
        return queue({ type: "say", text: text, room: room });
      case "/msg": {
        const to = rest[0] || "";
        const body = rest.slice(1).join(" ");
        if (!to || !body) return info("/msg NAME TEXT");
        return queue({ type: "dm", to: to, text: body });
      }
      case "/who":
      case "/names":
        return send({ type: "who", room: room });
      case "/join":
      case "/enter":
        if (!rest[0]) return info("/join ROOM");
        return send({ type: "enter", room: rest[0].replace(/^#/, "").toLowerCase() });
      case "/part": {
        const which = rest[0] ? rest[0].replace(/^#/, "").toLowerCase() : room;
        return send({ type: "part", room: which, reason: rest.slice(1).join(" ") || null });
      }
      case "/rooms":
        return send({ type: "rooms" });
      case "/topic":
        if (!args) return info("topic of #" + room + ": " + (roomOf(room).topic || "(none)"));
        return send({ type: "topic", room: room, text: args });
      case "/clear":
        return roomOf(room).log.replaceChildren();
      case "/quit":
      case "/exit":
        send({ type: "leave", reason: args || null });
        return finish("you left");
      case "/help":
        for (const [key, what] of HELP) info(key.padEnd(16) + what);
        return;
      default:
        return info("unknown command " + command + " (/help lists them; //TEXT says TEXT)", "error");
    }
  }

  function finish(why) {
    ended = true;
    store.removeItem("zchat.token");
    store.removeItem("zchat.outbox");
    setState("ended");
    info(why);
    if (ws) ws.close(1000);
  }

  // ------------------------------------------------------------ the socket

  function setState(state) {
    const conn = $("conn");
    conn.dataset.state = state;
    conn.textContent = STATE_TEXT[state] || state;
  }

  function connect() {
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
    ws = new WebSocket(url);
    welcomed = false;
    ws.onopen = () => {
      backoff = 250;
      ws.send(JSON.stringify({ type: "hello", name: name, token: token || null, after: lastN }));
    };
    ws.onmessage = (event) => {
      let body;
      try { body = JSON.parse(event.data); } catch (e) { return; }
      // A busy gateway sends what queued up as one array, in order.
      if (Array.isArray(body)) body.forEach(received);
      else received(body);
    };
    ws.onclose = (event) => {
      welcomed = false;
      if (ended) return;
      if (event.code === 4000) return finish("this session was opened in another tab");
      if (event.code === 4002) return finish("the session ended");
      if (event.code === 4001) {
        store.removeItem("zchat.token");
        token = "";
        me = "";
        showLogin();
        return;
      }
      setState("offline");
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 5000);
    };
  }

  function received(body) {
    switch (body.type) {
      case "welcome":
        if (!body.resumed) lastN = 0; // a new session: its log is numbered afresh
        welcomed = true;
        me = body.name;
        token = body.token;
        name = body.name;
        store.setItem("zchat.name", name);
        store.setItem("zchat.token", token);
        showChat();
        $("me").replaceChildren(nick(me, body.colour), el("span", "addr", " (" + body.addr + ")"));
        for (const desc of body.rooms || [{ name: "lobby", topic: "", members: body.members }]) {
          const entry = roomOf(desc.name);
          entry.members.clear();
          for (const member of desc.members || []) entry.members.set(fold(member.name), member);
          setTopic(desc.name, desc.topic || "");
        }
        drawMembers();
        setState(body.state);
        for (const entry of outbox) send(entry); // the gateway answers a resent id once
        return;
      case "item":
        if (body.n <= lastN) return;
        lastN = body.n;
        showItem(body.item, body.live);
        return;
      case "state":
        setState(body.state);
        return;
      case "ack": {
        const entry = answered(body.id);
        const line = findPending(body.id);
        if (!line) return;
        if (entry && entry.type === "say" && typeof body.seq === "number" &&
            !seen.has(entry.room + "/" + body.seq)) {
          line.dataset.seq = body.seq; // dropped when its event shows
          line.dataset.room = entry.room;
        } else {
          line.remove();
        }
        return;
      }
      case "error":
        if (body.id) {
          const entry = answered(body.id);
          const line = findPending(body.id);
          if (line) line.remove();
          const quoted = entry ? ": " + entry.text.slice(0, 40) : "";
          return info("not sent (" + body.code + ": " + body.detail + ")" + quoted, "error");
        }
        if (!welcomed) {
          $("login-error").textContent = body.detail || body.code;
          return;
        }
        return info(body.code + ": " + body.detail, "error");
      case "members":
        return whoLine(body.members);
      case "roomlist": {
        const line = el("div", "line info rooms");
        line.append(stamp(Date.now() / 1000),
                    el("span", "text", "-!- " + body.rooms.length + " rooms: "));
        body.rooms.forEach((desc, index) => {
          line.append(el("span", "text", (index ? ", " : "") + "#" + desc.name + " (" + desc.count + ")" +
                          (desc.topic ? " " + desc.topic : "")));
        });
        addLine(line);
        return;
      }
    }
  }

  // ------------------------------------------------------------ screens

  function showLogin() {
    $("chat").hidden = true;
    $("login").hidden = false;
    $("name").value = name;
    $("name").focus();
  }

  function showChat() {
    if (!$("chat").hidden) return;
    $("login").hidden = true;
    $("chat").hidden = false;
    roomOf("lobby");
    switchRoom(room);
    $("input").focus();
  }

  function start() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      name = $("name").value.trim();
      if (!name) return;
      $("login-error").textContent = "";
      token = "";
      connect();
    });
    $("input-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("input");
      const text = input.value;
      input.value = "";
      typed(text);
    });
    if (name && token) {
      showChat();
      setState("offline");
      for (const entry of outbox) pendingLine(entry);
      connect();
    } else {
      showLogin();
    }
  }

  start();
})();
