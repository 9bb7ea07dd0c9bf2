// The playground page: a form of every GenerationParams field, Generate, a table of runs.
// Plain JS on purpose (no build step); the server validates everything, the page only
// collects values and shows the server's answer.
"use strict";

const FLOATS = ["temperature", "top_p", "repetition_penalty"];
const INTS = ["out_seq_length", "top_k", "n", "min_tokens", "seed", "logprobs"];
const BOOLS = ["recompute", "greedy", "ignore_eos"];
const TEXTS = ["start", "restart"];           // \n, \t, \r and \\ are escapes
const COLUMNS = ["temperature", "out_seq_length", "recompute", "greedy", "top_p", "top_k", "repetition_penalty",
                 "stop_sequences", "start", "restart", "n", "seed", "min_tokens", "ignore_eos", "logprobs"];
const GUIDES = {guided_json: "json", guided_regex: "regex", guided_choice: "choice"};
const $ = (id) => document.getElementById(id);
let presets = {};
let runs = 0;

function escapeText(s) {
  return s.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/\t/g, "\\t").replace(/\r/g, "\\r");
}
function unescapeText(s) {
  return s.replace(/\\([\\ntr])/g, (m, c) => ({"\\": "\\", n: "\n", t: "\t", r: "\r"})[c]);
}

// Form <-> parameter object. Unparsable input is sent as is (or null) so that the server's
// 422 names the field, exactly as an API client would see it.
function readParams() {
  const p = {};
  for (const k of FLOATS.concat(INTS)) {
    const v = $(k).value.trim();
    p[k] = v === "" ? null : (isNaN(Number(v)) ? v : Number(v));
  }
  for (const k of BOOLS) p[k] = $(k).checked;
  for (const k of TEXTS) p[k] = unescapeText($(k).value);
  p.stop_sequences = jsonOr($("stop_sequences").value, []);   // not JSON: sent as is, the server says why
  // Structured output: empty = off. The schema and the regex go as typed (the server parses them).
  const schema = $("guided_json").value.trim(), regex = $("guided_regex").value;
  p.guided_json = schema === "" ? null : schema;
  p.guided_regex = regex === "" ? null : regex;
  p.guided_choice = jsonOr($("guided_choice").value, null);
  return p;
}

function jsonOr(text, empty) {
  const t = text.trim();
  if (t === "") return empty;
  try { return JSON.parse(t); } catch (e) { return t; }
}

function fillForm(p) {
  for (const k of FLOATS.concat(INTS)) $(k).value = p[k] === null || p[k] === undefined ? "" : p[k];
  for (const k of BOOLS) $(k).checked = !!p[k];
  for (const k of TEXTS) $(k).value = escapeText(p[k] || "");
  $("stop_sequences").value = JSON.stringify(p.stop_sequences || []);
  $("guided_json").value = p.guided_json ? JSON.stringify(JSON.parse(p.guided_json), null, 1) : "";
  $("guided_regex").value = p.guided_regex || "";
  $("guided_choice").value = p.guided_choice ? JSON.stringify(p.guided_choice) : "";
}

function showStatus(msg, error) {
  const s = $("status");
  s.textContent = msg;
  s.className = error ? "error" : "";
}

async function errorText(resp) {
  let body;
  try { body = await resp.json(); } catch (e) { return `HTTP ${resp.status}`; }
  if (resp.status === 401) { $("auth").hidden = false; return "this server needs its API key: enter it above"; }
  const d = body.detail || (body.error && body.error.message);
  if (Array.isArray(d)) {
    return d.map((e) => `${e.loc.filter((x) => x !== "body").join(".")}: ${e.msg}`).join("; ");
  }
  return `HTTP ${resp.status}: ${d}`;
}

// The API key (only when the server has one) lives in this tab's sessionStorage, sent on every /v1 call.
function authHeaders() {
  const key = sessionStorage.getItem("api_key");
  return key ? {"Authorization": `Bearer ${key}`} : {};
}

async function get(url) {
  return fetch(url, {headers: authHeaders()});
}

async function post(url, body) {
  return fetch(url, {method: "POST", headers: {"Content-Type": "application/json", ...authHeaders()},
                     body: JSON.stringify(body)});
}

function cell(tr, cls, content) {
  const td = document.createElement("td");
  td.className = cls;
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  tr.appendChild(td);
  return td;
}

function showGuide(p) {
  for (const [k, label] of Object.entries(GUIDES)) {
    if (p[k] !== null && p[k] !== undefined) return `${label}: ${typeof p[k] === "string" ? p[k] : JSON.stringify(p[k])}`;
  }
  return "-";
}

// A candidate's tokens with their log-probability and the most likely alternatives.
function logprobTable(lps) {
  const box = document.createElement("details");
  box.className = "logprobs";
  const sum = lps.reduce((a, t) => a + t.logprob, 0);
  box.innerHTML = `<summary>logprobs (sum ${sum.toFixed(2)})</summary>`;
  const table = document.createElement("table");
  table.className = "lp";
  for (const t of lps) {
    const tr = table.insertRow();
    tr.insertCell().textContent = JSON.stringify(t.token);
    tr.insertCell().textContent = t.logprob.toFixed(3);
    tr.insertCell().textContent = t.top.map((x) => `${JSON.stringify(x.token)} ${x.logprob.toFixed(2)}`).join("  ");
  }
  box.appendChild(table);
  return box;
}

function showParam(k, v) {
  if (k === "stop_sequences") return JSON.stringify(v);
  if (TEXTS.includes(k)) return JSON.stringify(v);
  return v === null ? "null" : String(v);
}

function addRow(prompt, data) {
  runs += 1;
  const tr = document.createElement("tr");
  tr.dataset.run = runs;
  tr.dataset.params = JSON.stringify(data.params);
  cell(tr, "run", String(runs));
  cell(tr, "prompt", prompt);
  const out = document.createElement("div");
  for (const c of data.results[0].candidates) {
    const d = document.createElement("div");
    d.className = "cand";
    d.textContent = c.text;
    const r = document.createElement("span");
    r.className = "reason";
    r.textContent = ` [${c.finish_reason}, ${c.generated_tokens} tok]`;
    d.appendChild(r);
    if (c.logprobs) d.appendChild(logprobTable(c.logprobs));
    out.appendChild(d);
  }
  cell(tr, "output", out);
  for (const k of COLUMNS) cell(tr, "p-" + k, showParam(k, data.params[k]));
  cell(tr, "p-guide", showGuide(data.params));
  const t = data.timings;
  cell(tr, "tokens", `${data.usage.prompt_tokens}/${data.usage.generated_tokens}`);
  cell(tr, "ttft", t.ttft_s === null ? "-" : `${(1000 * t.ttft_s).toFixed(0)} ms`);
  cell(tr, "speed", `${t.tokens_per_s.toFixed(1)}`);
  cell(tr, "latency", `${t.latency_s.toFixed(2)} s`);
  const again = document.createElement("button");
  again.type = "button";
  again.textContent = "load";
  again.title = "put this run's input and parameters back into the form";
  again.onclick = () => { $("prompt").value = prompt; fillForm(data.params); };
  cell(tr, "actions", again);
  const body = document.querySelector("#results tbody");
  body.insertBefore(tr, body.firstChild);   // newest first; every run of this page stays
}

async function generate(ev) {
  ev.preventDefault();
  const prompt = $("prompt").value;
  const params = readParams();
  showStatus("generating...");
  let resp;
  try {
    resp = await post("/v1/generate", {prompt: prompt, ...params});
  } catch (e) {
    showStatus(`request failed: ${e}`, true);
    return;
  }
  if (!resp.ok) {
    showStatus(resp.status === 429 ? "the generator is busy (queue full): try again in a moment"
                                    : await errorText(resp), true);
    return;
  }
  const data = await resp.json();
  addRow(prompt, data);
  showStatus(`done in ${data.timings.latency_s.toFixed(2)} s` + (data.mlflow_run_id ? ` (MLflow run ${data.mlflow_run_id})` : ""));
}

async function copyOverrides() {
  const resp = await post("/v1/overrides", readParams());
  if (!resp.ok) { showStatus(await errorText(resp), true); return; }
  const line = (await resp.json()).hydra_overrides;
  const box = $("overrides");
  box.value = line;
  try {
    await navigator.clipboard.writeText(line);
    showStatus("copied: paste it after python -m jobs.pipeline");
  } catch (e) {          // no clipboard API (plain http on another host): select it instead
    box.select();
    const ok = document.execCommand && document.execCommand("copy");
    showStatus(ok ? "copied: paste it after python -m jobs.pipeline" : "select the line below and copy it");
  }
}

// The model and the presets; with a key-protected server this waits for the key.
async function load() {
  const [pr, mr] = [await get("/v1/presets"), await get("/v1/models")];
  if (!pr.ok || !mr.ok) { showStatus(await errorText(pr.ok ? mr : pr), true); return; }
  presets = await pr.json();
  fillForm(presets.server);
  const m = (await mr.json()).data[0];
  $("model").textContent = `model ${m.id} (${m.arch}, ${(m.n_params / 1e6).toFixed(1)}M params, ${m.dtype}, ${m.device}, context ${m.max_model_len})`;
  showStatus("");
  document.body.dataset.ready = "1";
}

async function init() {
  const health = await (await fetch("/healthz")).json();
  $("auth").hidden = !health.auth;
  $("api_key").value = sessionStorage.getItem("api_key") || "";
  $("api_key").onchange = () => { sessionStorage.setItem("api_key", $("api_key").value.trim()); load(); };
  $("preset").onchange = () => fillForm(presets[$("preset").value]);
  $("form").onsubmit = generate;
  $("copy-overrides").onclick = copyOverrides;
  await load();
}

init();
