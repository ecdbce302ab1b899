// The wallboard (docs/wallboard.md): rendered from the board the page came with, then from each
// Server-Sent Event the console pushes (a call changed, or a heartbeat). EventSource reconnects by
// itself; only while it cannot, the page fetches /api/wallboard every FALLBACK ms instead.
"use strict";
(function () {
  const FALLBACK = 15000, STALE = 20000, SVG = "http://www.w3.org/2000/svg";
  const body = document.body;
  const amber = +body.dataset.amber, red = +body.dataset.red, target = +body.dataset.target;
  const names = JSON.parse(document.getElementById("names").textContent);
  let state = JSON.parse(document.getElementById("initial").textContent);
  let receivedAt = Date.now(), fallbackTimer = null, source = null;

  const $ = (id) => document.getElementById(id);
  const pct = (v) => (v === null || v === undefined ? "–" : Math.round(v * 100) + "%");
  const dur = (s) => {
    if (s === null || s === undefined) return "–";
    s = Math.max(0, Math.round(s));
    return s >= 3600 ? Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0")
                     : Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  };
  const MISSED_SHOWN = 12;
  const clock = (iso, zone) => new Date(iso).toLocaleTimeString("en-GB", {timeZone: zone});
  const name = (n) => (n === null ? "(no number)" : names[n] || String(n));
  const row = (tbody, cells) => {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
  };
  const fill = (id, rows, make) => {
    const tbody = document.querySelector("#" + id + " tbody");
    tbody.replaceChildren();
    rows.forEach((r) => row(tbody, make(r)));
  };

  function render() {
    const b = state.board, elapsed = (Date.now() - receivedAt) / 1000;
    for (const key of ["waiting_now", "offered", "answered", "abandoned", "in_progress", "agents_on_calls",
                       "short_abandoned", "voicemail", "out_of_hours"]) $(key).textContent = b[key];
    const longest = b.waiting_now ? b.longest_wait + elapsed : 0;
    $("longest_wait").textContent = dur(longest);
    $("longest_wait").className = "big" + (longest > red ? " red" : longest > amber ? " amber" : "");
    $("service_level").textContent = pct(b.service_level);
    $("service_level").className = "big" + (b.service_level === null ? "" : b.service_level >= target ? " ok" : " red");
    $("sl_t").textContent = b.service_level_seconds;
    $("abandon_rate").textContent = b.abandon_rate === null ? "" : "(" + pct(b.abandon_rate) + ")";
    $("asa").textContent = dur(b.asa);
    $("day").textContent = b.date + " · " + b.timezone;
    $("as-of").textContent = clock(b.as_of, b.timezone);
    $("as-of").setAttribute("datetime", b.as_of);
    fill("numbers", b.numbers, (n) => [[name(n.number_id)], [n.waiting_now, "n"], [dur(n.waiting_now ? n.longest_wait : 0), "n"],
      [n.offered, "n"], [n.answered, "n"], [n.abandoned, "n"], [pct(n.service_level), "n"], [dur(n.asa), "n"]]);
    const live = state.live;
    fill("live", [...live.waiting.map((c) => ({...c, state: "waiting"})), ...live.calls.map((c) => ({...c, state: "talking"}))],
      (c) => [[c.uuid.slice(0, 8)], [name(c.number_id)], [c.state, c.state], [c.user_id ?? ""], [dur(c.age + elapsed), "n"]]);
    document.querySelectorAll("#live tbody tr").forEach((tr, i) => { tr.dataset.uuid = (i < live.waiting.length ? live.waiting[i] : live.calls[i - live.waiting.length]).uuid; });
    fill("agents", state.agents, (a) => [[a.user_id], [a.calls, "n"], [dur(a.talk), "n"], [a.on_call ? "on a call" : "", a.on_call ? "talking" : ""]]);
    const missed = state.missed.slice(0, MISSED_SHOWN);  // the latest first
    fill("missed", missed, (m) => [[m.caller_number ?? ""], [name(m.number_id)], [clock(m.ended_at, b.timezone)], [m.missing_call_reason ?? ""]]);
    $("missed-more").textContent = state.missed.length > MISSED_SHOWN ? "the latest " + MISSED_SHOWN : "";
    chart(b.slots);
  }

  function chart(slots) {
    const svg = $("chart");
    svg.replaceChildren();
    const max = Math.max(1, ...slots.map((s) => s.offered)), w = 960 / 96;
    for (const s of slots) {
      const local = s.start.slice(11, 16).split(":");
      const x = ((+local[0]) * 4 + Math.floor(+local[1] / 15)) * w;
      for (const [key, scale] of [["offered", 1], ["answered", 1], ["abandoned", 1]]) {
        const h = (s[key] / max) * 140 * scale, r = document.createElementNS(SVG, "rect");
        r.setAttribute("x", x + (key === "offered" ? 0 : key === "answered" ? 1 : w / 2));
        r.setAttribute("width", key === "offered" ? w - 1 : w / 2 - 1);
        r.setAttribute("y", 145 - h);
        r.setAttribute("height", h);
        r.setAttribute("class", key);
        const title = document.createElementNS(SVG, "title");
        title.textContent = s.start.slice(11, 16) + ": " + key + " " + s[key];
        r.appendChild(title);
        svg.appendChild(r);
      }
    }
    for (let hour = 0; hour < 24; hour += 3) {
      const t = document.createElementNS(SVG, "text");
      t.setAttribute("x", hour * 4 * w);
      t.setAttribute("y", 158);
      t.textContent = String(hour).padStart(2, "0") + ":00";
      svg.appendChild(t);
    }
  }

  function feed(text, cls) { $("feed").textContent = text; $("feed").className = "feed " + cls; }

  function fallback(on) {
    if (on && !fallbackTimer) {
      fallbackTimer = setInterval(refresh, FALLBACK);
      refresh();
    } else if (!on && fallbackTimer) {
      clearInterval(fallbackTimer);
      fallbackTimer = null;
    }
  }

  async function refresh() {  // only while the push is cut
    try {
      const [b, live] = await Promise.all(["/api/wallboard", "/api/wallboard/live"].map(
        (u) => fetch(u, {credentials: "same-origin"}).then((r) => { if (!r.ok) throw new Error(r.status); return r.json(); })));
      state = {...state, board: b, live: live};
      receivedAt = Date.now();
      feed("refreshing every " + FALLBACK / 1000 + " s (push cut)", "");
      render();
    } catch (e) {
      feed("no answer from the console", "stale");
    }
  }

  function connect() {
    source = new EventSource("/api/wallboard/events");
    source.addEventListener("open", () => { fallback(false); feed("live", "live"); });
    source.addEventListener("board", (e) => {
      state = JSON.parse(e.data);
      receivedAt = Date.now();
      feed("live", "live");
      render();
    });
    source.addEventListener("unavailable", (e) => feed(JSON.parse(e.data).error, "stale"));
    source.addEventListener("error", () => {
      fallback(true);
      if (source.readyState === EventSource.CLOSED) {  // refused (503, logged out): it will not retry itself
        setTimeout(connect, FALLBACK * 2);
      }
    });
  }

  setInterval(() => {  // ages move between pushes; a board nothing has refreshed says so
    render();
    if (Date.now() - receivedAt > STALE) feed("stale: no figures for " + dur((Date.now() - receivedAt) / 1000), "stale");
  }, 1000);
  render();
  connect();
})();
