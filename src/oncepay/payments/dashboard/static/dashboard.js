// The live overview: one EventSource, a snapshot a second, the DOM and the chart updated in
// place. No framework; uPlot draws the decisions chart. Everything here is served by OncePay.
"use strict";

(function () {
  const root = document.getElementById("overview");
  if (!root) return;
  const SERIES = ["execute", "replay", "in_progress", "reused"]; // the metric's labels
  const LABELS = ["executed", "replayed", "409 in progress", "422 reused"];
  const COLORS = ["#2f6fde", "#2a9d8f", "#e9a23b", "#d1495b"];
  const WINDOW = 120; // seconds of history on the chart
  const times = [];
  const rates = SERIES.map(() => []);
  let last = null;
  let chart = null;

  function makeChart() {
    const box = document.getElementById("decisions-chart");
    const opts = {
      width: Math.max(box.clientWidth, 320),
      height: 180,
      series: [{}].concat(LABELS.map((label, i) => ({ label, stroke: COLORS[i], width: 2 }))),
      axes: [{}, { label: "per second" }],
      // Always the last two minutes, from the first point on (not a span of years).
      scales: { x: { time: true, range: (u, min, max) => [max - WINDOW, max] } },
    };
    chart = new uPlot(opts, [times].concat(rates), box);
  }

  function text(selector, value) {
    const node = root.querySelector(selector);
    if (node) node.textContent = value;
  }

  function percent(value) {
    return value === null || value === undefined ? "-" : (value * 100).toFixed(1) + "%";
  }

  function cell(row, content, href) {
    const td = document.createElement("td");
    if (href) {
      const a = document.createElement("a");
      a.href = href;
      a.textContent = content;
      td.appendChild(a);
    } else {
      td.textContent = content;
    }
    row.appendChild(td);
    return td;
  }

  function when(seconds) {
    return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19);
  }

  function update(s) {
    let total = 0;
    for (const [status, count] of Object.entries(s.by_status)) {
      text(`[data-status="${status}"]`, String(count));
      total += count;
    }
    text("#per-second", (total / s.window).toFixed(2));
    text('[data-webhook="success_rate"]', percent(s.webhooks.success_rate));
    text('[data-webhook="pending"]', String(s.webhooks.pending || 0));
    text('[data-webhook="dead"]', String(s.webhooks.dead || 0));
    text("#open-findings", s.open_findings === null ? "-" : String(s.open_findings));
    text("#open-discrepancies", s.open_discrepancies === null ? "-" : String(s.open_discrepancies));
    for (const a of s.acquirers) {
      const row = root.querySelector(`[data-acquirer="${a.name}"]`);
      if (!row) continue;
      row.querySelector(".breaker").textContent = a.breaker;
      row.querySelector(".p50").textContent = a.p50_ms === null ? "-" : String(a.p50_ms);
      row.querySelector(".p99").textContent = a.p99_ms === null ? "-" : String(a.p99_ms);
      row.querySelector(".errors").textContent = percent(a.error_rate);
    }
    const body = document.querySelector("#recent tbody");
    body.replaceChildren();
    for (const p of s.recent) {
      const row = document.createElement("tr");
      row.dataset.payment = p.id;
      cell(row, p.id, "/dashboard/payments/" + encodeURIComponent(p.id));
      cell(row, p.merchant);
      cell(row, p.amount.toLocaleString("en") + " " + p.currency);
      const status = cell(row, "");
      const badge = document.createElement("span");
      badge.className = "status " + p.status;
      badge.textContent = p.status;
      status.appendChild(badge);
      cell(row, when(p.created));
      body.appendChild(row);
    }
    if (last !== null) {
      const dt = Math.max(s.at - last.at, 0.001);
      times.push(s.at);
      SERIES.forEach((name, i) => {
        const now = s.decisions[name] || 0;
        const before = last.decisions[name] || 0;
        rates[i].push(Math.max(now - before, 0) / dt);
      });
      while (times.length > WINDOW) {
        times.shift();
        rates.forEach((r) => r.shift());
      }
      if (chart === null) makeChart();
      else chart.setData([times].concat(rates));
    }
    last = s;
  }

  const live = document.getElementById("live");
  const source = new EventSource(root.dataset.stream);
  source.addEventListener("overview", (event) => {
    update(JSON.parse(event.data));
    live.classList.add("on");
  });
  source.addEventListener("signed_out", () => {
    // The session ended (signed out elsewhere, or expired): stop, and let the page's own
    // request take the browser to the sign-in page.
    source.close();
    live.classList.remove("on");
    window.location.reload();
  });
  source.onerror = () => live.classList.remove("on");
})();
