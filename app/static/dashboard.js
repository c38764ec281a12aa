// AWQForge dashboard: plain script over the /v1 API (session cookie + CSRF header); no build step.
"use strict";
const meta = (n) => (document.querySelector(`meta[name="${n}"]`) || {}).content;
const API = meta("api") || "/v1";
const CSRF = meta("csrf-token");
const $ = (id) => document.getElementById(id);
const STAGES = ["resolve", "calibrate", "quantize", "evaluate", "package", "publish"];

async function api(path, opts = {}) {
  const headers = Object.assign({ "X-CSRF-Token": CSRF }, opts.headers || {});
  const r = await fetch(API + path, Object.assign({ credentials: "same-origin" }, opts, { headers }));
  if (r.status === 401) { location.href = "/dashboard"; throw new Error("signed out"); }
  const type = r.headers.get("content-type") || "";
  const body = type.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error(errorText(body, r.status));
  return body;
}

function errorText(body, status) {
  const d = body && body.detail;
  if (Array.isArray(d)) return d.map((e) => (e.field ? `${e.field}: ${e.reason}` : e.reason || JSON.stringify(e))).join("; ");
  return d ? String(d) : `HTTP ${status}`;
}

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
// Binary units everywhere (B, KiB, MiB, GiB, TiB), as the CLI, the report and the model card print them.
const fmtBytes = (n) => {
  if (n == null || n === "") return "–";
  n = Number(n);
  if (!Number.isFinite(n)) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  if (!i) return `${Math.round(n)} B`;
  const digits = n < 10 ? 2 : 1;
  if (Number(n.toFixed(digits)) >= 1024 && i < u.length - 1) { n /= 1024; i++; } // 1023.97 KiB -> 1.00 MiB
  return `${n.toFixed(n < 10 ? 2 : 1)} ${u[i]}`;
};
const fmtDur = (s) => {
  if (s == null) return "";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
};
const pplText = (m) => (m && m.fp_perplexity != null && m.quant_perplexity != null
  ? `${m.fp_perplexity.toFixed(2)} → ${m.quant_perplexity.toFixed(2)}` : "–");
const pplDelta = (m) => (m && m.fp_perplexity ? (100 * (m.quant_perplexity - m.fp_perplexity)) / m.fp_perplexity : null);
const active = (s) => s === "queued" || s === "running";

// ---------------------------------------------------------------- jobs page
const streams = new Map(); // job id -> EventSource (a few at a time: browsers cap connections per host)
const MAX_STREAMS = 4;

function jobRow(j) {
  const pct = Math.round(100 * j.progress);
  const cls = j.status === "succeeded" ? "done" : j.status === "failed" ? "failed" : "";
  return `<tr id="row-${esc(j.id)}" data-status="${esc(j.status)}">
    <td><a href="/dashboard/jobs/${encodeURIComponent(j.id)}"><code>${esc(j.id)}</code></a></td>
    <td>${esc(j.model.split("/").slice(-2).join("/"))}</td>
    <td>${esc(j.method.toUpperCase())} W${j.bits} g${j.group_size}</td><td>${esc(j.queue)}</td>
    <td><span class="badge ${esc(j.status)}">${esc(j.status)}</span></td>
    <td><div class="progress small"><div class="bar ${cls}" style="width:${pct}%"></div></div><span class="pct">${pct}%</span> <span class="muted stage">${esc(j.stage || "")}</span></td>
    <td class="eta">${active(j.status) && j.eta_s != null ? fmtDur(j.eta_s) : ""}</td>
    <td>${pplText(j.metrics)}</td><td class="muted">${new Date(j.created_at).toLocaleString()}</td></tr>`;
}

async function refreshJob(id) {
  try {
    const j = await api(`/jobs/${encodeURIComponent(id)}`);
    const row = $(`row-${id}`);
    if (row) row.outerHTML = jobRow(j);
  } catch (e) { /* the next list refresh catches up */ }
}

function follow(id) {
  if (streams.has(id) || streams.size >= MAX_STREAMS) return;
  const es = new EventSource(`${API}/jobs/${encodeURIComponent(id)}/events`);
  streams.set(id, es);
  const onEvent = (ev) => {
    const d = JSON.parse(ev.data);
    const row = $(`row-${id}`);
    if (!row) return;
    if (d.progress != null) {
      row.querySelector(".bar").style.width = `${Math.round(100 * d.progress)}%`;
      row.querySelector(".pct").textContent = `${Math.round(100 * d.progress)}%`;
    }
    if (d.stage) row.querySelector(".stage").textContent = d.stage;
    if (ev.type === "status") refreshJob(id);
  };
  ["progress", "stage", "status"].forEach((k) => es.addEventListener(k, onEvent));
  es.addEventListener("end", () => { es.close(); streams.delete(id); refreshJob(id); });
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) streams.delete(id); };
}

async function loadJobs() {
  try {
    const page = await api("/jobs?limit=100");
    $("job-rows").innerHTML = page.data.length ? page.data.map(jobRow).join("")
      : `<tr><td colspan="9" class="muted">No jobs yet: submit one above.</td></tr>`;
    page.data.filter((j) => active(j.status)).forEach((j) => follow(j.id));
    $("live").className = "live";
  } catch (e) { $("live").className = "live off"; }
}

function deepMerge(a, b) {
  for (const [k, v] of Object.entries(b)) {
    a[k] = v && typeof v === "object" && !Array.isArray(v) && a[k] && typeof a[k] === "object" ? deepMerge(a[k], v) : v;
  }
  return a;
}

async function submitJob(ev) {
  ev.preventDefault();
  const f = ev.target, msg = $("submit-msg");
  msg.className = ""; msg.textContent = "submitting…";
  try {
    const body = {
      model: f.model.value.trim(), method: f.method.value,
      bits: parseInt(f.bits.value, 10), group_size: parseInt(f.group_size.value, 10),
      calibration: { n_samples: parseInt(f.n_samples.value, 10), seq_len: parseInt(f.seq_len.value, 10) },
    };
    if (f.extra.value.trim()) {
      let extra;
      try { extra = JSON.parse(f.extra.value); } catch (e) { throw new Error(`More fields: not JSON (${e.message})`); }
      deepMerge(body, extra);
    }
    if (f.calibration.files.length) {
      msg.textContent = "uploading calibration file…";
      const fd = new FormData(); fd.append("file", f.calibration.files[0]);
      const cal = await api("/calibration-sets", { method: "POST", body: fd });
      body.calibration.upload_id = cal.id; delete body.calibration.source;
    }
    const job = await api("/jobs", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
    msg.innerHTML = `Submitted <a href="/dashboard/jobs/${encodeURIComponent(job.id)}"><code>${esc(job.id)}</code></a> to queue ${esc(job.queue)}`;
    await loadJobs();
  } catch (e) {
    msg.className = "error"; msg.textContent = e.message;
  }
}

// ----------------------------------------------------------------- job page
const jobId = meta("job-id");
let stageStarts = []; // [stage, Date] from the event stream, for the live timeline
let chart = null, lastJob = null;

function renderTimeline(j) {
  const m = j.metrics;
  let parts = [];
  if (m && m.total_s != null) {
    parts = STAGES.map((s) => [s, m[`${s}_s`]]).filter(([, v]) => v != null && v > 0);
  } else if (stageStarts.length) {
    const now = Date.now();
    parts = stageStarts.map(([s, t], i) => [s, ((i + 1 < stageStarts.length ? stageStarts[i + 1][1] : now) - t) / 1000]);
  }
  const total = parts.reduce((a, [, v]) => a + v, 0) || 1;
  $("timeline").innerHTML = parts.map(([s, v]) =>
    `<div class="s-${esc(s)}" style="flex:${Math.max(v / total, 0.01)}" title="${esc(s)} ${fmtDur(v)}">${v / total > 0.08 ? esc(s) : ""}</div>`).join("");
  $("timeline-legend").innerHTML = parts.map(([s, v]) => `<span><i class="s-${esc(s)}"></i>${esc(s)} ${v < 10 ? v.toFixed(1) + "s" : fmtDur(v)}</span>`).join("")
    || `<span>${j.status === "queued" ? "waiting in the queue" : "no stage yet"}</span>`;
}

function renderJob(j) {
  lastJob = j;
  document.title = `${j.status}: ${j.model} (${j.id})`;
  $("status").textContent = j.status; $("status").className = `badge ${j.status}`;
  $("subtitle").textContent = `${j.model} · ${j.method.toUpperCase()} W${j.bits} g${j.group_size} · queue ${j.queue} · attempt ${j.attempts}`;
  const pct = Math.round(100 * j.progress);
  $("bar").style.width = `${pct}%`;
  $("bar").className = `bar ${j.status === "succeeded" ? "done" : j.status === "failed" ? "failed" : ""}`;
  $("pct").textContent = `${pct}%`;
  $("stage").textContent = j.stage || "–";
  $("eta").textContent = active(j.status) ? (j.eta_s != null ? `ETA ${fmtDur(j.eta_s)}` : "ETA estimating…")
    : j.finished_at && j.started_at ? `took ${fmtDur((new Date(j.finished_at) - new Date(j.started_at)) / 1000)}` : "";
  $("cancel").hidden = !active(j.status);
  $("error").hidden = !j.error; $("error").textContent = j.error || "";
  const m = j.metrics;
  if (m) {
    $("ppl").textContent = pplText(m);
    const d = pplDelta(m);
    $("ppl-note").innerHTML = d == null ? "" : `FP → quantized: <b class="${d > 5 ? "delta-bad" : "delta-good"}">${d >= 0 ? "+" : ""}${d.toFixed(1)}%</b>`;
    $("size").textContent = `${fmtBytes(m.size_before_bytes)} → ${fmtBytes(m.size_after_bytes)}`;
    $("size-note").textContent = m.size_before_bytes && m.size_after_bytes
      ? `${(m.size_before_bytes / m.size_after_bytes).toFixed(2)}× smaller · ${m.n_layers_quantized ?? "?"} layers quantized` : "";
    $("mem").textContent = fmtBytes(m.peak_rss_bytes);
    $("mem-note").textContent = `RSS${m.peak_gpu_bytes ? ` · GPU ${fmtBytes(m.peak_gpu_bytes)}` : ""} · total ${fmtDur(m.total_s)}`;
  }
  renderTimeline(j);
  renderArtifacts(j);
}

async function renderArtifacts(j) {
  if (!j.artifacts || !j.artifacts.length) return;
  const rows = [];
  for (const a of j.artifacts) {
    let sums = {};
    const man = a.files.find((f) => f.path === "manifest.json");
    if (man) { try { sums = (await (await fetch(man.url, { credentials: "same-origin" })).json()).files || {}; } catch (e) { sums = {}; } }
    for (const f of a.files) {
      rows.push(`<tr><td>${esc(a.format)}</td><td><a href="${esc(f.url)}" download>${esc(f.path)}</a></td>
        <td>${fmtBytes(f.size_bytes)}</td><td class="sha">${esc((sums[f.path] || {}).sha256 || (f.path === "manifest.json" ? "(the manifest)" : ""))}</td></tr>`);
    }
  }
  $("artifacts").innerHTML = rows.join("");
}

async function renderLayers() {
  const page = await api(`/jobs/${encodeURIComponent(jobId)}/layers`);
  const rows = page.data.filter((r) => r.mse_quant != null || r.mse_rtn != null);
  if (!rows.length) { $("layer-chart").innerHTML = `<p class="muted">No per-layer metrics for this job.</p>`; return; }
  const x = rows.map((_, i) => i);
  const pos = (v) => (v != null && v > 0 ? v : null);
  const data = [x, rows.map((r) => pos(r.mse_rtn)), rows.map((r) => pos(r.mse_quant))];
  const width = Math.max(320, $("layer-chart").clientWidth || 900);
  if (chart) chart.destroy();
  chart = new uPlot({
    width, height: 280,
    scales: { x: { time: false }, y: { distr: 3 } },
    axes: [{ label: "layer (block order)", values: (u, vals) => vals.map((v) => (Number.isInteger(v) ? v : "")) },
      { label: "output MSE", size: 70, values: (u, vals) => vals.map((v) => (v == null ? "" : v.toExponential(0))) }],
    series: [
      { label: "layer", value: (u, v) => (v == null ? "" : `${v}: ${rows[v] ? rows[v].name : ""}`) },
      { label: "round-to-nearest", stroke: "#bf8700", width: 1.5, points: { size: 4 } },
      { label: lastJob ? lastJob.method.toUpperCase() : "quantized", stroke: "#0969da", width: 2, points: { size: 4 } },
    ],
  }, data, $("layer-chart"));
}

async function renderTasks(j) {
  const m = await api(`/jobs/${encodeURIComponent(jobId)}/metrics`);
  if (!m.tasks || !m.tasks.length) return;
  $("tasks-card").hidden = false;
  const top = Math.max(1e-9, ...m.tasks.flatMap((t) => [t.fp || 0, t.quantized || 0]));
  const bar = (cls, label, v) => `<div class="tbar"><span class="tlabel">${label}</span><span class="tfill ${cls}" style="width:${v == null ? 0 : (60 * v) / top}%"></span><span>${v == null ? "–" : v.toFixed(4)}</span></div>`;
  $("task-chart").innerHTML = m.tasks.map((t) => `<div class="task"><b>${esc(t.task)}</b> <span class="muted">${esc(t.metric)}, recovery ${t.recovery == null ? "–" : t.recovery.toFixed(3)}${t.fp_cached ? ", FP cached" : ""}</span>
    ${bar("fp", "FP", t.fp)}${bar("quant", "quantized", t.quantized)}</div>`).join("");
  const art = (j.artifacts || []).find((a) => a.files.some((f) => f.path === "quant_report.json"));
  if (!art) return;
  try {
    const report = await (await fetch(art.files.find((f) => f.path === "quant_report.json").url, { credentials: "same-origin" })).json();
    const gens = (report.evaluation || {}).generations || [];
    $("generations").innerHTML = gens.length ? `<h3>Side-by-side generations</h3>` + gens.map((g) => `<div class="gen"><p><b>${esc(g.prompt)}</b></p><p><span class="muted">FP:</span> ${esc(g.fp)}</p><p><span class="muted">quantized:</span> ${esc(g.quantized)}</p></div>`).join("") : "";
  } catch (e) { /* the chart stands without the generations */ }
}

async function loadJob() {
  try {
    const j = await api(`/jobs/${encodeURIComponent(jobId)}`);
    renderJob(j);
    if (j.status === "succeeded") await renderLayers();
    if (j.status === "succeeded" || j.status === "failed") await renderTasks(j);
    return j;
  } catch (e) {
    $("error").hidden = false; $("error").textContent = e.message;
    return null;
  }
}

function followJob() {
  const es = new EventSource(`${API}/jobs/${encodeURIComponent(jobId)}/events`);
  let pending = null;
  const refreshSoon = () => { if (!pending) pending = setTimeout(async () => { pending = null; const j = await api(`/jobs/${encodeURIComponent(jobId)}`); renderJob(j); }, 1500); };
  const onEvent = (ev) => {
    const d = JSON.parse(ev.data);
    if (d.stage && (!stageStarts.length || stageStarts[stageStarts.length - 1][0] !== d.stage)) stageStarts.push([d.stage, new Date(d.created_at).getTime()]);
    if (d.progress != null) { $("bar").style.width = `${Math.round(100 * d.progress)}%`; $("pct").textContent = `${Math.round(100 * d.progress)}%`; }
    if (d.stage) $("stage").textContent = d.stage;
    if (d.message && ev.type !== "progress") {
      const log = $("log"); log.textContent += `${d.created_at.slice(11, 19)} [${ev.type}] ${d.stage || "-"}: ${d.message}\n`; log.scrollTop = log.scrollHeight;
    }
    refreshSoon();
  };
  ["progress", "stage", "status", "log"].forEach((k) => es.addEventListener(k, onEvent));
  es.addEventListener("end", () => { es.close(); loadJob(); });
}

// ----------------------------------------------------------------- start
if (document.body.dataset.page === "jobs") {
  $("submit-form").addEventListener("submit", submitJob);
  loadJobs();
  setInterval(loadJobs, 10000);
} else if (document.body.dataset.page === "job") {
  $("cancel").addEventListener("click", async () => {
    try { renderJob(await api(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" })); }
    catch (e) { $("error").hidden = false; $("error").textContent = e.message; }
  });
  loadJob().then((j) => { if (j) followJob(); });
}
