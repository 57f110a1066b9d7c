/* reproq live dashboard: EventSource + a JSON snapshot, no build step, no dependencies.
 *
 * Every value coming from the server is inserted with textContent / createTextNode, never as
 * HTML. Counters move at once from the events (/reproq/events/); the whole page is then
 * re-read from /reproq/snapshot/ (at most every REFRESH_MS, and every FALLBACK_MS anyway).
 */
(function () {
  "use strict";

  var REFRESH_MS = 1000;
  var FALLBACK_MS = 15000;
  var LOG_MAX = 60;

  var root = document.getElementById("reproq-dashboard");
  if (!root) { return; }
  var urls = {
    events: root.dataset.eventsUrl,
    snapshot: root.dataset.snapshotUrl,
    action: root.dataset.actionUrl,
    adminRuns: root.dataset.adminRunsUrl
  };
  var state = JSON.parse(document.getElementById("reproq-snapshot").textContent);
  var live = { seen: 0, lastId: 0, source: null, refreshTimer: null, refreshing: false, refreshes: 0 };
  window.reproqDashboard = live;

  // ------------------------------------------------------------------ DOM helpers
  function el(tag, attrs) {
    var node = document.createElement(tag);
    var key;
    for (key in (attrs || {})) {
      if (!Object.prototype.hasOwnProperty.call(attrs, key) || attrs[key] == null) { continue; }
      if (key === "text") { node.textContent = String(attrs[key]); }
      else if (key === "className") { node.className = attrs[key]; }
      else if (key.indexOf("data-") === 0) { node.setAttribute(key, String(attrs[key])); }
      else { node[key] = attrs[key]; }
    }
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child == null) { continue; }
      node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function byId(id) { return document.getElementById(id); }
  function setText(id, value) { var n = byId(id); if (n) { n.textContent = String(value); } }
  function num(value) { return Number(value || 0); }

  function ago(iso) {
    if (!iso) { return ""; }
    var seconds = (Date.now() - Date.parse(iso)) / 1000;
    var future = seconds < 0;
    seconds = Math.abs(seconds);
    var text = seconds < 90 ? Math.round(seconds) + " s"
      : seconds < 5400 ? Math.round(seconds / 60) + " min"
      : seconds < 172800 ? Math.round(seconds / 3600) + " h" : Math.round(seconds / 86400) + " d";
    return future ? "in " + text : text + " ago";
  }

  function csrfToken() {
    var input = document.querySelector("#csrf-holder input[name=csrfmiddlewaretoken]");
    if (input) { return input.value; }
    var match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  function actionForm(action, fields, label) {
    var form = el("form", { className: "reproq-action", method: "post", action: urls.action });
    form.appendChild(el("input", { type: "hidden", name: "csrfmiddlewaretoken", value: csrfToken() }));
    Object.keys(fields).forEach(function (name) {
      form.appendChild(el("input", { type: "hidden", name: name, value: String(fields[name]) }));
    });
    form.appendChild(el("button", { name: "action", value: action, text: label || action }));
    return form;
  }

  function fillBody(tableId, rows, colspan, emptyText) {
    var body = byId(tableId).tBodies[0];
    if (!rows.length) {
      body.replaceChildren(el("tr", { className: "empty" }, el("td", { colSpan: colspan, text: emptyText })));
    } else {
      body.replaceChildren.apply(body, rows);
    }
  }

  function shortJson(value) {
    if (value == null) { return ""; }
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // ------------------------------------------------------------------ rendering
  function renderTiles() {
    var by = state.runs.by_status;
    var q = state.queues, enq = 0, ok = 0, bad = 0;
    q.forEach(function (row) { enq += num(row.enqueued_1m); ok += num(row.succeeded_1m); bad += num(row.failed_5m); });
    function approx(s) { return (by[s].estimated ? "~" : "") + num(by[s].count); }
    setText("tile-ready", approx("READY"));
    setText("tile-waiting", approx("WAITING"));
    setText("tile-running", approx("RUNNING"));
    setText("tile-enqueued", enq);
    setText("tile-succeeded", ok);
    setText("tile-failed", bad);
    setText("tile-workers", state.workers.count);
    setText("tile-leader", state.workers.leader ? state.workers.leader.id : "none");
  }

  function renderQueues() {
    var fields = ["ready", "waiting", "blocked", "running", "enqueued_1m", "succeeded_1m", "failed_5m", "throughput_per_minute"];
    fillBody("queues", state.queues.map(function (q) {
      var tr = el("tr", { "data-queue": q.name }, el("td", { text: q.name }));
      var estimated = q.estimated || [];
      fields.forEach(function (f) {
        var approx = estimated.indexOf(f.toUpperCase()) >= 0 || (state.throughput_estimated && /_1m|_5m|per_minute/.test(f));
        tr.appendChild(el("td", { "data-field": f, text: (approx ? "~" : "") + num(q[f]) }));
      });
      tr.appendChild(el("td", null, q.paused
        ? el("span", { className: "pill bad", text: "paused" }) : el("span", { className: "pill ok", text: "active" }),
        q.paused && q.pause_reason ? " " + q.pause_reason : null));
      tr.appendChild(el("td", null, actionForm(q.paused ? "resume" : "pause", { queue: q.name })));
      return tr;
    }), 11, "no queues");
  }

  function renderRunning() {
    var rows = state.running || [];
    setText("running-count", rows.length);
    fillBody("running", rows.map(function (r) {
      return el("tr", { "data-run": r.id },
        el("td", { text: "#" + r.id }), el("td", { className: "task", text: r.task_path }),
        el("td", { text: r.queue_name }), el("td", { text: r.lease_owner || "" }),
        el("td", { text: r.attempts + "/" + r.max_attempts }), el("td", { text: ago(r.last_attempted_at) }),
        el("td", null, actionForm("cancel", { id: r.id })));
    }), 7, "nothing running");
  }

  function renderWorkers() {
    fillBody("workers", state.workers.items.map(function (w) {
      return el("tr", { "data-worker": w.id },
        el("td", null, w.id, w.is_leader ? " " : null, w.is_leader ? el("span", { className: "pill ok", text: "leader" }) : null),
        el("td", { text: w.hostname + ":" + w.pid }), el("td", { text: w.server }),
        el("td", { text: (w.queues || []).join(", ") }), el("td", { text: w.running + "/" + w.concurrency }),
        el("td", { text: ago(w.last_seen_at) }));
    }), 6, "no live workers");
  }

  function renderFailures() {
    fillBody("failures", (state.recent_failures || []).map(function (f) {
      return el("tr", { "data-run": f.id },
        el("td", { text: "#" + f.id }), el("td", { className: "task", text: f.task_path }),
        el("td", { text: f.queue_name }), el("td", { text: ago(f.finished_at), title: f.finished_at || "" }),
        el("td", null, el("details", null, el("summary", { text: f.exception || f.status_reason || "error" }),
          el("pre", { text: f.traceback || "" }))),
        el("td", null, el("code", { text: shortJson(f.args) }), " ", el("code", { text: shortJson(f.kwargs) })),
        el("td", null, actionForm("retry", { id: f.id })));
    }), 7, "no failures");
  }

  function renderSchedules() {
    fillBody("schedules", state.schedules.items.map(function (s) {
      return el("tr", { "data-schedule": s.name, className: s.enabled ? "" : "disabled" },
        el("td", { text: s.name }), el("td", null, el("code", { text: s.cron_expr }), " " + (s.timezone || "")),
        el("td", { className: "task", text: s.task_path }), el("td", { text: s.queue_name }),
        el("td", { text: s.enabled ? ago(s.next_run_at) : "disabled", title: s.next_run_at || "" }),
        el("td", { text: ago(s.last_run_at), title: s.last_run_at || "" }));
    }), 6, "no schedules");
  }

  function renderTotals() {
    var by = state.runs.by_status;
    fillBody("totals", Object.keys(by).map(function (status) {
      return el("tr", { "data-status": status }, el("td", { text: status }),
        el("td", { text: (by[status].estimated ? "~" : "") + num(by[status].count).toLocaleString() }));
    }), 2, "");
    fillBody("top-failing", (state.top_failing_tasks || []).map(function (t) {
      return el("tr", null, el("td", { className: "task", text: t.task_path }), el("td", { text: t.failures }));
    }), 2, "none");
  }

  function render() {
    renderTiles();
    renderQueues();
    renderRunning();
    renderWorkers();
    renderFailures();
    renderSchedules();
    renderTotals();
    if (state.events && state.events.last_id > live.lastId) { live.lastId = state.events.last_id; }
    setText("last-event-id", live.lastId);
  }

  // ------------------------------------------------------------------ snapshot refresh
  function refresh() {
    if (live.refreshing) { scheduleRefresh(); return Promise.resolve(false); }
    live.refreshing = true;
    return fetch(urls.snapshot, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (!r.ok) { throw new Error("snapshot " + r.status); } return r.json(); })
      .then(function (data) { state = data; render(); live.refreshes += 1; return true; })
      .catch(function (err) { flash("could not refresh: " + err.message, true); return false; })
      .then(function (ok) { live.refreshing = false; return ok; });
  }
  live.refresh = refresh;

  function scheduleRefresh() {
    if (live.refreshTimer) { return; }
    live.refreshTimer = setTimeout(function () { live.refreshTimer = null; refresh(); }, REFRESH_MS);
  }

  // ------------------------------------------------------------------ live events
  function queueRow(name) {
    var row = null;
    state.queues.forEach(function (q) { if (q.name === name) { row = q; } });
    if (!row && name) {
      row = { name: name, ready: 0, waiting: 0, blocked: 0, running: 0, enqueued_1m: 0, succeeded_1m: 0,
        failed_1m: 0, succeeded_5m: 0, failed_5m: 0, retried_5m: 0, throughput_per_minute: 0, paused: false };
      state.queues.push(row);
    }
    return row;
  }

  function bump(row, field, by) { if (row) { row[field] = Math.max(num(row[field]) + by, 0); } }
  function bumpStatus(status, by) {
    var s = state.runs.by_status[status];
    if (s) { s.count = Math.max(num(s.count) + by, 0); }
  }

  function applyEvent(ev) {
    var n = ev.data && typeof ev.data.count === "number" ? ev.data.count : 1;
    var q = queueRow(ev.queue);
    switch (ev.kind) {
      case "enqueued": bump(q, "ready", n); bump(q, "enqueued_1m", n); bumpStatus("READY", n); break;
      case "started": bump(q, "ready", -n); bump(q, "running", n); bumpStatus("READY", -n); bumpStatus("RUNNING", n); break;
      case "succeeded": bump(q, "running", -n); bump(q, "succeeded_1m", n); bumpStatus("RUNNING", -n); break;
      case "failed": bump(q, "running", -n); bump(q, "failed_5m", n); bumpStatus("RUNNING", -n); break;
      case "retried": bump(q, "running", -n); bump(q, "waiting", n); bumpStatus("RUNNING", -n); bumpStatus("WAITING", n); break;
      case "queue_paused": if (q) { q.paused = true; q.pause_reason = (ev.data && ev.data.reason) || ""; } break;
      case "queue_resumed": if (q) { q.paused = false; q.pause_reason = ""; } break;
      default: break;
    }
    renderTiles();
    renderQueues();
    logEvent(ev);
    scheduleRefresh();
  }

  function logEvent(ev) {
    var log = byId("event-log");
    var n = ev.data && typeof ev.data.count === "number" && ev.data.count > 1 ? " ×" + ev.data.count : "";
    var what = ev.task || ev.worker || "";
    log.insertBefore(el("li", { className: "ev ev-" + ev.kind },
      el("time", { text: new Date(ev.at || Date.now()).toLocaleTimeString() }), " ",
      el("b", { text: ev.kind + n }), " ", el("span", { className: "task", text: what }),
      ev.queue ? " @" + ev.queue : null, ev.run_id ? " #" + ev.run_id : null), log.firstChild);
    while (log.children.length > LOG_MAX) { log.removeChild(log.lastChild); }
  }

  function status(text, cls) {
    var pill = byId("live-status");
    pill.textContent = text;
    pill.className = "pill " + cls;
  }

  function connect() {
    if (!window.EventSource) { status("no EventSource: polling", "off"); return; }
    var source = new EventSource(urls.events, { withCredentials: true });
    live.source = source;
    status("connecting", "off");
    source.onopen = function () { status("live", "ok"); };
    source.onmessage = function (msg) {
      var ev;
      try { ev = JSON.parse(msg.data); } catch (e) { return; }
      live.seen += 1;
      if (ev.id > live.lastId) { live.lastId = ev.id; }
      setText("events-seen", live.seen);
      setText("last-event-id", live.lastId);
      applyEvent(ev);
    };
    source.addEventListener("gap", function () { refresh(); });
    source.addEventListener("bye", function () { status("reconnecting", "off"); });
    source.onerror = function () {
      status(source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting", "bad");
    };
  }

  // ------------------------------------------------------------------ actions
  function flash(text, bad) {
    var box = byId("flash");
    box.replaceChildren(el("p", { className: "flash " + (bad ? "error" : "success"), text: text }));
  }

  document.addEventListener("submit", function (e) {
    var form = e.target;
    if (!form.classList || !form.classList.contains("reproq-action")) { return; }
    e.preventDefault();
    var data = new FormData(form);
    if (e.submitter && e.submitter.name) { data.set(e.submitter.name, e.submitter.value); }
    fetch(urls.action, {
      method: "POST", credentials: "same-origin", body: data,
      headers: { Accept: "application/json", "X-CSRFToken": csrfToken() }
    }).then(function (r) { return r.json().catch(function () { return { ok: false, error: "HTTP " + r.status }; }); })
      .then(function (body) { flash(body.ok ? body.message : body.error, !body.ok); refresh(); })
      .catch(function (err) { flash(err.message, true); });
  });

  render();
  connect();
  setInterval(refresh, FALLBACK_MS);
}());
