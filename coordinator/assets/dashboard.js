// The CountApp dashboard: polls GET /dashboard.json once a second (asking only for the samples
// and events it lacks), renders the workers, the config and the events, and draws the charts on
// canvases. Text from the cluster is only ever set as textContent, never parsed as HTML.
"use strict";

(() => {
  const POLL_MS = 1000;
  const WINDOW_MS = 5 * 60 * 1000;
  const MIN_SPAN_MS = 60 * 1000;
  // Samples further apart than this have a gap between them: nobody was watching.
  const GAP_MS = 2500;
  // A worker restarted this recently says so beside its state.
  const RECENT_RESTART_MS = 30 * 1000;
  const MAX_EVENTS = 100;
  const PALETTE = ["#1f6feb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#b91c1c"];
  const DASHES = [[], [6, 4], [2, 3], [10, 3, 2, 3]];
  const TOTAL_COLOR = "#1b1f24";

  const STATES = {
    ready: { word: "Ready", tone: "ok", mark: "✓" },
    starting: { word: "Starting", tone: "warn", mark: "…" },
    unhealthy: { word: "Unhealthy", tone: "bad", mark: "!" },
    exited: { word: "Exited", tone: "bad", mark: "✕" },
    stopping: { word: "Stopping", tone: "idle", mark: "■" },
    blocked: { word: "Blocked: port taken", tone: "bad", mark: "⊘" },
  };

  const $ = (id) => document.getElementById(id);
  const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const decimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

  let since = 0;
  let samples = [];
  let events = [];
  const seenEvents = new Set();
  let latest = null;
  let timer = null;
  let polling = false;

  const portOf = (url) => {
    const match = /:(\d+)\/?$/.exec(url);
    return match ? Number(match[1]) : 0;
  };

  // A worker's colour and dash follow from its port alone, so that they never move when a
  // worker is added or removed, nor between tabs. The low bits are mixed with higher ones:
  // neighbouring ports (5001, 5002, ...) get different colours, and so do ports the kernel
  // hands out, which are mostly odd.
  function lookOf(url) {
    const port = portOf(url);
    const color = (port ^ (port >> 3) ^ (port >> 6)) % PALETTE.length;
    const dash = ((port >> 3) ^ (port >> 9)) % DASHES.length;
    return { color: PALETTE[color], dash: DASHES[dash] };
  }

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children || []) node.append(child);
    return node;
  }

  const fmtInt = (v) => (v == null ? "–" : integer.format(v));
  const fmtRate = (v) => (v == null ? "–" : v < 10 ? decimal.format(v) : integer.format(v));
  const fmtSeconds = (v) => (v == null ? "–" : v < 10 ? decimal.format(v) + " s" : integer.format(v) + " s");

  function ago(unixMs) {
    const s = Math.max(0, Math.round((Date.now() - unixMs) / 1000));
    if (s === 0) return "just now";
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
  }

  const clock = (unixMs) => new Date(unixMs).toLocaleTimeString(undefined, { hour12: false });

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    // A hidden tab stops polling, so that forgotten tabs cost the coordinator nothing.
    if (document.hidden || polling) return;
    polling = true;
    try {
      const reply = await fetch("/dashboard.json" + (since ? "?since=" + since : ""), { cache: "no-store" });
      const body = await reply.json().catch(() => null);
      if (!reply.ok || !body) throw new Error((body && body.error) || "HTTP " + reply.status);
      absorb(body);
      render(body);
      setConnection(true, "Live · updated " + clock(body.taken_at_unix_ms));
    } catch (e) {
      setConnection(false, "Coordinator unreachable (" + e.message + "); retrying every second");
    } finally {
      polling = false;
      schedule();
    }
  }

  function setConnection(ok, text) {
    const node = $("connection");
    node.textContent = text;
    node.className = "connection " + (ok ? "live" : "down");
  }

  function absorb(body) {
    since = body.taken_at_unix_ms;
    const known = new Set(samples.map((s) => s.t_unix_ms));
    for (const s of body.history || []) if (!known.has(s.t_unix_ms)) samples.push(s);
    samples.sort((a, b) => a.t_unix_ms - b.t_unix_ms);
    const oldest = body.taken_at_unix_ms - WINDOW_MS;
    samples = samples.filter((s) => s.t_unix_ms >= oldest);
    // Events come with their number: one seen in an earlier poll is not shown twice.
    for (const e of body.events || []) {
      if (seenEvents.has(e.seq)) continue;
      seenEvents.add(e.seq);
      events.push(e);
    }
    events = events.slice(-MAX_EVENTS);
  }

  function render(body) {
    latest = body;
    const workers = body.workers || [];
    renderSummary(body, workers);
    renderWorkers(workers);
    renderConfig(body.config || {}, workers);
    renderEvents();
    drawCharts();
  }

  function renderSummary(body, workers) {
    const ready = workers.filter((w) => w.state === "ready").length;
    const node = $("summary-workers");
    node.textContent = ready + " of " + workers.length;
    node.className = "big " + (workers.length === 0 ? "bad" : ready === workers.length ? "ok" : ready === 0 ? "bad" : "warn");
    const notReady = workers.filter((w) => w.state !== "ready").map((w) => (STATES[w.state] || { word: w.state }).word.toLowerCase());
    $("summary-workers-note").textContent = notReady.length ? "not ready: " + notReady.join(", ") : "all workers take requests";
    const cluster = body.cluster || {};
    $("summary-ingest").textContent = fmtRate(cluster.items_per_s);
    $("summary-pending").textContent = fmtInt(cluster.pending_items);
    $("summary-lag").textContent =
      cluster.oldest_pending_s == null ? "items acknowledged, waiting for a merge" : "oldest waits " + fmtSeconds(cluster.oldest_pending_s);
    const config = body.config || {};
    const summary = $("summary-config");
    summary.textContent = config.valid ? "Valid" : "Invalid";
    summary.className = "big " + (config.valid ? "ok" : "bad");
    $("summary-config-note").textContent = config.valid ? "the file on disk is in force" : "edit refused; the last good config stays in force";
  }

  function stateBadge(w) {
    const known = STATES[w.state] || { word: String(w.state), tone: "idle", mark: "?" };
    // Exited or starting again after a crash: the supervisor is bringing it back.
    const restarting = w.local && w.restarts > 0 && (w.state === "exited" || w.state === "starting");
    const word = restarting ? "Restarting (" + known.word.toLowerCase() + ")" : known.word;
    const badge = el("span", { className: "badge state " + known.tone, textContent: known.mark + " " + word });
    const cell = el("td", {}, [badge]);
    if (!restarting && w.restarted_at_unix_ms && Date.now() - w.restarted_at_unix_ms < RECENT_RESTART_MS) {
      cell.append(el("span", { className: "state-note", textContent: "restarted " + ago(w.restarted_at_unix_ms) }));
    }
    if (w.adopted) cell.append(el("span", { className: "note", textContent: " adopted" }));
    if (w.state !== "ready" && w.not_ready) {
      cell.append(el("span", { className: "state-note not-ready", textContent: "not ready: " + w.not_ready }));
    }
    return cell;
  }

  // The last error with its time; once the worker has been ready since, it is shown as past.
  function errorCell(w) {
    const cell = el("td", { className: "error last-error" });
    if (w.last_error) {
      if (w.last_error_at_unix_ms != null) {
        const time = el("time", { textContent: clock(w.last_error_at_unix_ms) });
        time.dateTime = new Date(w.last_error_at_unix_ms).toISOString();
        cell.append(time, " ");
      }
      cell.append(w.last_error_past ? "before it was ready again: " + w.last_error : w.last_error);
      if (w.last_error_past) cell.classList.add("past");
    }
    const more = [];
    if (w.stats_error) more.push("stats unavailable: " + w.stats_error);
    for (const q of w.quarantined || []) more.push("tenant “" + q.tenant + "” quarantined: " + q.reason + " (" + q.file + ")");
    for (const text of more) cell.append(el("span", { className: "problem", textContent: text }));
    if (!w.last_error && more.length === 0) cell.textContent = "–";
    return cell;
  }

  function renderWorkers(workers) {
    const showConfig = workers.some((w) => w.config_version != null);
    for (const th of document.querySelectorAll("#workers .col-config")) th.hidden = !showConfig;
    const coordinatorVersion = latest && latest.config ? latest.config.version : undefined;
    const rows = workers.map((w) => {
      const look = lookOf(w.url);
      const swatch = el("span", { className: "swatch" + (look.dash.length ? " dashed" : "") });
      swatch.style.borderTopColor = look.color;
      const urlCell = el("td", { className: "url" }, [swatch, w.url]);
      if (!w.local) urlCell.append(el("span", { className: "note", textContent: " (remote)" }));
      const cells = [
        urlCell,
        stateBadge(w),
        el("td", { className: "num pid", textContent: w.pid == null ? "–" : String(w.pid) }),
        el("td", { className: "num restarts", textContent: fmtInt(w.restarts) }),
        el("td", { className: "num", textContent: fmtRate(w.requests_per_s) }),
        el("td", { className: "num", textContent: fmtRate(w.items_per_s) }),
        el("td", { className: "num pending", textContent: fmtInt(w.pending_items) }),
        el("td", { className: "num", textContent: fmtSeconds(w.merge_lag_s) }),
      ];
      if (showConfig) {
        const version = w.config_version == null ? "–" : String(w.config_version);
        const differs = w.config_version != null && coordinatorVersion != null && String(w.config_version) !== String(coordinatorVersion);
        cells.push(el("td", { className: "mono col-config", textContent: differs ? version + " (differs from the coordinator's)" : version }));
      }
      cells.push(errorCell(w));
      const row = el("tr", {}, cells);
      row.dataset.url = w.url;
      row.dataset.state = w.state;
      return row;
    });
    $("workers").tBodies[0].replaceChildren(...rows);
    if (workers.length === 0) {
      const empty = el("td", { colSpan: 10, className: "note", textContent: "The config lists no workers." });
      $("workers").tBodies[0].replaceChildren(el("tr", {}, [empty]));
    }
  }

  function renderConfig(config, workers) {
    const state = $("config-state");
    state.textContent = config.valid ? "✓ Valid: the file on disk is in force" : "✕ Invalid: the edit is refused, the last good config stays in force";
    state.className = config.valid ? "ok-text" : "bad-text";
    $("config-path").textContent = config.path || "–";
    $("config-loaded").textContent = config.loaded_at_unix_ms
      ? new Date(config.loaded_at_unix_ms).toLocaleString() + " (" + ago(config.loaded_at_unix_ms) + ")"
      : "–";
    const hasVersion = config.version != null;
    for (const node of document.querySelectorAll(".config-version-row")) node.hidden = !hasVersion;
    $("config-version").textContent = hasVersion ? String(config.version) : "";
    const versions = workers.filter((w) => w.config_version != null);
    let processes;
    if (versions.length) {
      const differing = versions.filter((w) => hasVersion && String(w.config_version) !== String(config.version));
      processes = differing.length
        ? differing.length + " worker(s) run another config version than the coordinator (see the Config column)"
        : "Every worker that reports its config runs the coordinator's version.";
    } else {
      processes = "The coordinator and its workers apply every valid edit of this file within about a second.";
    }
    $("config-processes").textContent = processes;
    const error = $("config-error");
    error.hidden = !config.error;
    error.textContent = config.error || "";
  }

  function renderEvents() {
    const items = events
      .slice()
      .reverse()
      .map((e) => {
        const time = el("time", { textContent: clock(e.at_unix_ms) });
        time.dateTime = new Date(e.at_unix_ms).toISOString();
        const parts = [time];
        parts.push(el("span", { className: "who", textContent: e.worker || "config" }));
        parts.push(e.message);
        const item = el("li", {}, parts);
        item.dataset.seq = String(e.seq);
        return item;
      });
    $("events").replaceChildren(...items);
    $("events-empty").hidden = items.length > 0;
  }

  // Charts.

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(v)));
    for (const step of [1, 2, 2.5, 5, 10]) if (v <= step * power) return step * power;
    return 10 * power;
  }

  const fine = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });

  function compact(v) {
    if (v >= 1e6) return fine.format(v / 1e6) + "M";
    if (v >= 1e3) return fine.format(v / 1e3) + "k";
    return fine.format(v);
  }

  // series: [{ color, dash, width, points: [[t, v|null], ...] }]
  function drawChart(canvas, series, now, span) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 400;
    const height = canvas.clientHeight || 180;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const left = 48, right = 8, top = 8, bottom = 20;
    const plotW = width - left - right, plotH = height - top - bottom;
    let max = 0;
    for (const s of series) for (const [, v] of s.points) if (v != null && v > max) max = v;
    const yMax = niceMax(max);
    const x = (t) => left + ((t - (now - span)) / span) * plotW;
    const y = (v) => top + plotH - (v / yMax) * plotH;

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#57606a";
    ctx.strokeStyle = "#e1e5ea";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      const py = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, py);
      ctx.lineTo(width - right, py);
      ctx.stroke();
      ctx.fillText(compact(v), left - 6, py);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const tick = span > 2 * 60000 ? 60000 : 15000;
    for (let back = Math.floor(span / tick) * tick; back >= 0; back -= tick) {
      const label = back === 0 ? "now" : tick === 60000 ? "−" + back / 60000 + " min" : "−" + back / 1000 + " s";
      ctx.fillText(label, Math.min(Math.max(x(now - back), left + 16), width - right - 12), top + plotH + 5);
    }

    for (const s of series) {
      ctx.strokeStyle = s.color;
      ctx.lineWidth = s.width;
      ctx.setLineDash(s.dash);
      ctx.beginPath();
      // A sample with no neighbour (watching just began, or resumed) is drawn as a dot.
      const alone = [];
      let prev = null;
      s.points.forEach(([t, v], i) => {
        if (v == null) {
          prev = null;
          return;
        }
        if (prev === null || t - prev > GAP_MS) {
          ctx.moveTo(x(t), y(v));
          const next = s.points[i + 1];
          if (!next || next[1] == null || next[0] - t > GAP_MS) alone.push([t, v]);
        } else {
          ctx.lineTo(x(t), y(v));
        }
        prev = t;
      });
      ctx.stroke();
      ctx.fillStyle = s.color;
      for (const [t, v] of alone) {
        ctx.beginPath();
        ctx.arc(x(t), y(v), s.width + 0.5, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
    ctx.setLineDash([]);
  }

  function drawCharts() {
    if (!latest) return;
    const now = latest.taken_at_unix_ms;
    // The charts span what there is, from one minute up to five.
    const first = samples.length ? samples[0].t_unix_ms : now;
    const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, now - first));
    const urls = [...new Set(samples.flatMap((s) => Object.keys(s.workers || {})))].sort((a, b) => portOf(a) - portOf(b));
    const chart = (id, total, perWorker, nowId, fmt) => {
      const series = urls.map((url) => ({
        ...lookOf(url),
        width: 1.5,
        points: samples.map((s) => [s.t_unix_ms, s.workers && s.workers[url] ? s.workers[url][perWorker] : null]),
      }));
      series.push({ color: TOTAL_COLOR, dash: [], width: 2.5, points: samples.map((s) => [s.t_unix_ms, s[total]]) });
      const canvas = $(id);
      drawChart(canvas, series, now, span);
      const last = samples.length ? samples[samples.length - 1][total] : null;
      const peak = Math.max(0, ...samples.map((s) => s[total] || 0));
      $(nowId).textContent = "now " + fmt(last);
      canvas.setAttribute("aria-label", canvas.getAttribute("aria-label").split(":")[0] + ": now " + fmt(last) + ", highest shown " + fmt(peak));
    };
    chart("chart-ingest", "items_per_s", "items_per_s", "chart-ingest-now", fmtRate);
    chart("chart-pending", "pending_items", "pending_items", "chart-pending-now", fmtInt);
    chart("chart-lag", "oldest_pending_s", "merge_lag_s", "chart-lag-now", fmtSeconds);
    renderLegend(urls);
  }

  function renderLegend(urls) {
    const total = el("li", {}, [el("span", { className: "swatch total" }), "cluster total (bold)"]);
    total.firstChild.style.borderTopColor = TOTAL_COLOR;
    const items = urls.map((url) => {
      const look = lookOf(url);
      const swatch = el("span", { className: "swatch" + (look.dash.length ? " dashed" : "") });
      swatch.style.borderTopColor = look.color;
      return el("li", {}, [swatch, url]);
    });
    $("legend").replaceChildren(total, ...items);
  }

  // Tenant lookup, through the coordinator like any client: strong reads, which count every id
  // acknowledged before the question.

  // The tenant typed in, as a path segment; null (with why, in `result`) if there is none to ask.
  function tenantPath(result) {
    const tenant = $("lookup-tenant").value;
    result.className = "lookup-result";
    if (tenant === "") {
      result.textContent = "Type a tenant name first.";
      return null;
    }
    // A browser resolves "." and ".." path segments (even percent-encoded) before sending.
    if (tenant === "." || tenant === "..") {
      result.className = "lookup-result failed";
      result.textContent = "A browser cannot ask for the tenant “" + tenant + "”: it rewrites that URL. Use curl --path-as-is.";
      return null;
    }
    return "/items/" + encodeURIComponent(tenant);
  }

  // Asks `path` (with `init`), and hands a 200's JSON body to `shown`; a failure goes in `result`.
  async function ask(result, path, init, shown) {
    try {
      const reply = await fetch(path, { cache: "no-store", ...init });
      const body = await reply.json().catch(() => null);
      if (reply.ok && body) {
        shown(body);
        return;
      }
      result.className = "lookup-result failed";
      result.textContent = "✕ " + ((body && body.error) || "HTTP " + reply.status);
    } catch (e) {
      result.className = "lookup-result failed";
      result.textContent = "✕ The coordinator did not answer: " + e.message;
    }
  }

  async function lookup(event) {
    event.preventDefault();
    const result = $("lookup-result");
    delete result.dataset.count;
    const path = tenantPath(result);
    if (path === null) return;
    const tenant = $("lookup-tenant").value;
    result.textContent = "Counting “" + tenant + "”…";
    await ask(result, path + "/count?consistency=strong", {}, (body) => {
      const count = el("span", { className: "count", textContent: integer.format(body.count) });
      const asked = " (every id acknowledged before " + clock(Date.now()) + ")";
      result.replaceChildren(count, " distinct ids for tenant “" + tenant + "”" + asked);
      result.dataset.count = String(body.count);
    });
  }

  async function membership(event) {
    event.preventDefault();
    const result = $("membership-result");
    delete result.dataset.contains;
    const path = tenantPath(result);
    if (path === null) return;
    const ids = $("membership-ids").value.split(/[\s,]+/).filter((id) => id !== "");
    if (ids.length === 0) {
      result.textContent = "Type ids, separated by commas or spaces.";
      return;
    }
    const tenant = $("lookup-tenant").value;
    result.textContent = "Looking for " + ids.length + " ids in “" + tenant + "”…";
    const init = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(ids) };
    await ask(result, path + "/contains?consistency=strong", init, (body) => {
      const found = body.contains.filter(Boolean).length;
      const each = ids.map((id, i) => el("li", { className: body.contains[i] ? "in" : "out", textContent: (body.contains[i] ? "✓ " : "✕ ") + id }));
      result.replaceChildren(found + " of " + ids.length + " in “" + tenant + "”", el("ul", { className: "ids" }, each));
      result.dataset.contains = JSON.stringify(body.contains);
    });
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
  });
  window.addEventListener("resize", drawCharts);
  $("lookup").addEventListener("submit", lookup);
  $("membership").addEventListener("submit", membership);
  poll();
})();
