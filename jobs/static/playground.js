// The playground page: a form of every GenerationParams field, Generate, a table of runs.
// Plain JS on purpose (no build step); the server validates everything, the page only
// collects values and shows the server's answer.
"use strict";

const FLOATS = ["temperature", "top_p", "repetition_penalty"];
const INTS = ["out_seq_length", "top_k", "n", "min_tokens", "seed"];
const BOOLS = ["recompute", "greedy", "ignore_eos"];
const TEXTS = ["start", "restart"];           // \n, \t, \r and \\ are escapes
const COLUMNS = ["temperature", "out_seq_length", "recompute", "greedy", "top_p", "top_k", "repetition_penalty",
                 "stop_sequences", "start", "restart", "n", "seed", "min_tokens", "ignore_eos"];
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
  const stop = $("stop_sequences").value.trim();
  try {
    p.stop_sequences = stop === "" ? [] : JSON.parse(stop);
  } catch (e) {
    p.stop_sequences = stop;  // the server answers: stop_sequences must be a list
  }
  return p;
}

function fillForm(p) {
  for (const k of FLOATS.concat(INTS)) $(k).value = p[k] === null || p[k] === undefined ? "" : p[k];
  for (const k of BOOLS) $(k).checked = !!p[k];
  for (const k of TEXTS) $(k).value = escapeText(p[k] || "");
  $("stop_sequences").value = JSON.stringify(p.stop_sequences || []);
}

function showStatus(msg, error) {
  const s = $("status");
  s.textContent = msg;
  s.className = error ? "error" : "";
}

async function errorText(resp) {
  let body;
  try { body = await resp.json(); } catch (e) { return `HTTP ${resp.status}`; }
  const d = body.detail;
  if (Array.isArray(d)) {
    return d.map((e) => `${e.loc.filter((x) => x !== "body").join(".")}: ${e.msg}`).join("; ");
  }
  return `HTTP ${resp.status}: ${d}`;
}

async function post(url, body) {
  return fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
}

function cell(tr, cls, content) {
  const td = document.createElement("td");
  td.className = cls;
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  tr.appendChild(td);
  return td;
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
    out.appendChild(d);
  }
  cell(tr, "output", out);
  for (const k of COLUMNS) cell(tr, "p-" + k, showParam(k, data.params[k]));
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

async function init() {
  presets = await (await fetch("/v1/presets")).json();
  fillForm(presets.server);
  const m = (await (await fetch("/v1/models")).json()).data[0];
  $("model").textContent = `model ${m.id} (${m.arch}, ${(m.n_params / 1e6).toFixed(1)}M params, ${m.dtype}, ${m.device}, context ${m.max_model_len})`;
  $("preset").onchange = () => fillForm(presets[$("preset").value]);
  $("form").onsubmit = generate;
  $("copy-overrides").onclick = copyOverrides;
  document.body.dataset.ready = "1";
}

init();
