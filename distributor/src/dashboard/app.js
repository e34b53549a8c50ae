// The logdist dashboard: polls the distributor's own API once a second and drives its admin API.
// No library and nothing fetched from elsewhere, so it works offline.
"use strict";

const POLL_MS = 1000;
const HISTORY_MS = 5 * 60 * 1000;
const SHARE_WINDOW_MS = 60 * 1000;
const SVG = "http://www.w3.org/2000/svg";

const history = []; // {t, acked, pending, byAnalyzer: {id: acknowledged}}
const edited = new Set(); // analyzer ids whose weight input the user changed and not yet applied
let analyzers = [];

const $ = (id) => document.getElementById(id);
const fmt = (n) => Number(n).toLocaleString("en-US", { maximumFractionDigits: 1 });

function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  // The admin API asks every change to be declared JSON, even one without a body.
  if (method !== "GET") init.headers["content-type"] = "application/json";
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!r.ok) throw new Error((json && json.error) || `${method} ${path}: HTTP ${r.status}`);
  return json;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function renderTable() {
  const body = $("analyzers");
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.id : null;
  const rows = analyzers.map((a) => {
    const input = el("input", {
      class: "weight", type: "number", min: "0", step: "0.05", id: `weight-${a.id}`,
      "data-id": a.id, value: String(a.weight),
    });
    input.addEventListener("input", () => edited.add(a.id));
    const old = document.getElementById(`weight-${a.id}`);
    if (old && edited.has(a.id)) input.value = old.value; // keep what the user typed
    const state = !a.enabled ? ["off", "disabled"] : a.draining ? ["off", "draining"]
      : [a.breaker.state, a.breaker.state.replace("_", "-")];
    const toggle = el("button", {
      type: "button", "data-id": a.id, "data-action": a.enabled ? "disable" : "enable",
    }, a.enabled ? "Disable" : "Enable");
    toggle.addEventListener("click", () => switchAnalyzer(a.id, a.enabled ? "disable" : "enable"));
    const next = a.breaker.next_probe_in_ms == null ? "" : `${(a.breaker.next_probe_in_ms / 1000).toFixed(1)} s`;
    return el("tr", { "data-id": a.id },
      el("td", {}, a.id), el("td", {}, a.endpoint), el("td", {}, input),
      el("td", { class: "num" }, `${(a.share * 100).toFixed(1)} %`),
      el("td", {}, el("span", { class: `state ${state[0]}` }, state[1])),
      el("td", { class: "num" }, a.breaker.consecutive_failures), el("td", { class: "num" }, next),
      el("td", { class: "num" }, fmt(a.acknowledged)), el("td", { class: "num" }, fmt(a.queued)),
      el("td", { class: "num" }, fmt(a.in_flight)), el("td", {}, toggle));
  });
  body.replaceChildren(...rows);
  if (focused) {
    const again = document.getElementById(`weight-${focused}`);
    if (again) again.focus();
  }
}

function renderBars() {
  const svg = $("bars");
  const w = svg.clientWidth || 500, h = svg.clientHeight || 220, pad = 28;
  svg.replaceChildren();
  const now = history[history.length - 1];
  const then = history.find((p) => p.t >= now.t - SHARE_WINDOW_MS) || history[0];
  let deltas = analyzers.map((a) => Math.max(0, (now.byAnalyzer[a.id] || 0) - (then.byAnalyzer[a.id] || 0)));
  let total = deltas.reduce((x, y) => x + y, 0);
  let scope = "last 60 s";
  if (total === 0) { // nothing in the window: show the shares since the distributor started
    deltas = analyzers.map((a) => a.acknowledged);
    total = deltas.reduce((x, y) => x + y, 0);
    scope = "since start (no traffic in the last 60 s)";
  }
  $("share-scope").textContent = scope;
  const n = Math.max(analyzers.length, 1);
  const group = (w - pad) / n, bar = Math.min(40, group / 3);
  for (const f of [0, 0.25, 0.5, 0.75, 1]) {
    const y = h - pad - f * (h - 2 * pad);
    svg.append(svgEl("line", { x1: pad, x2: w, y1: y, y2: y, stroke: "#eef1f4" }));
    svg.append(svgEl("text", { x: 0, y: y + 4 }, `${f * 100}%`));
  }
  analyzers.forEach((a, i) => {
    const observed = total > 0 ? deltas[i] / total : 0;
    const x = pad + i * group + group / 2 - bar;
    const y = (f) => h - pad - f * (h - 2 * pad);
    svg.append(svgEl("rect", { x, y: y(observed), width: bar - 2, height: h - pad - y(observed), fill: "#0969da", "data-id": a.id, class: "observed" },));
    svg.append(svgEl("rect", { x: x + bar, y: y(a.share), width: bar - 2, height: h - pad - y(a.share), fill: "#8c959f", class: "weight" }));
    svg.append(svgEl("text", { x: x, y: h - 10 }, a.id));
    svg.append(svgEl("text", { x: x, y: y(observed) - 4 }, `${(observed * 100).toFixed(1)}`));
  });
}

function renderHistory() {
  const svg = $("history");
  const w = svg.clientWidth || 500, h = svg.clientHeight || 220, pad = 28;
  svg.replaceChildren();
  if (history.length < 2) return;
  const t0 = history[history.length - 1].t - HISTORY_MS;
  const rates = history.slice(1).map((p, i) => ({
    t: p.t, rate: Math.max(0, (p.acked - history[i].acked) / ((p.t - history[i].t) / 1000)), pending: p.pending,
  }));
  const topRate = Math.max(0, ...rates.map((r) => r.rate));
  const topPending = Math.max(0, ...rates.map((r) => r.pending));
  const maxRate = Math.max(1, topRate), maxPending = Math.max(1, topPending);
  const x = (t) => pad + ((t - t0) / HISTORY_MS) * (w - pad);
  const line = (key, max, color) => {
    const pts = rates.map((r) => `${x(r.t).toFixed(1)},${(h - pad - (r[key] / max) * (h - 2 * pad)).toFixed(1)}`);
    svg.append(svgEl("polyline", { points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
  };
  svg.append(svgEl("line", { x1: pad, x2: w, y1: h - pad, y2: h - pad, stroke: "#d9dee5" }));
  line("rate", maxRate, "#0969da");
  line("pending", maxPending, "#cf222e");
  svg.append(svgEl("text", { x: pad, y: 12 }, `peak ${fmt(topRate)}/s acknowledged, ${fmt(topPending)} pending`));
  svg.append(svgEl("text", { x: pad, y: h - 8 }, "-5 min"));
  svg.append(svgEl("text", { x: w - 30, y: h - 8 }, "now"));
}

async function poll() {
  try {
    const [list, stats, health] = await Promise.all([
      api("GET", "/admin/analyzers"), api("GET", "/stats"), api("GET", "/health"),
    ]);
    analyzers = list.analyzers;
    const byAnalyzer = {};
    for (const a of analyzers) byAnalyzer[a.id] = a.acknowledged;
    const t = Date.now();
    history.push({ t, acked: stats.acknowledged.total, pending: stats.wal.pending_messages, byAnalyzer });
    while (history.length > 2 && history[0].t < t - HISTORY_MS) history.shift();
    $("status").textContent = health.status;
    $("pending").textContent = fmt(stats.wal.pending_messages);
    $("acked").textContent = fmt(stats.acknowledged.total);
    const prev = history[history.length - 2];
    $("rate").textContent = prev ? fmt((stats.acknowledged.total - prev.acked) / ((t - prev.t) / 1000)) : "…";
    $("updated").textContent = `updated ${new Date(t).toLocaleTimeString()}`;
    renderTable();
    renderBars();
    renderHistory();
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (e) {
    say(`cannot reach the distributor: ${e.message}`, true);
  }
}

async function applyWeights() {
  const weights = {};
  for (const input of document.querySelectorAll("input.weight")) {
    const v = Number(input.value);
    if (input.value.trim() === "" || !Number.isFinite(v)) {
      say(`weight of ${input.dataset.id} is not a number`, true);
      return;
    }
    weights[input.dataset.id] = v;
  }
  try {
    const now = await api("PUT", "/admin/weights", weights);
    edited.clear();
    say(`weights applied: ${Object.entries(now).map(([k, v]) => `${k}=${v}`).join(", ")}`);
    await poll();
  } catch (e) {
    say(`weights not changed: ${e.message}`, true);
  }
}

async function switchAnalyzer(id, action) {
  try {
    await api("POST", `/admin/analyzers/${encodeURIComponent(id)}/${action}`);
    say(`${id}: ${action}d`);
    await poll();
  } catch (e) {
    say(`${id} not ${action}d: ${e.message}`, true);
  }
}

$("apply-weights").addEventListener("click", applyWeights);
$("reset-weights").addEventListener("click", () => { edited.clear(); renderTable(); say("edits discarded"); });
poll();
setInterval(poll, POLL_MS);
