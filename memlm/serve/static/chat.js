// memlm's chat page: streams answers from /v1/chat/completions (server-sent events) and shows
// the server's memory from /stats once a second. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

// Read a fetch response body as server-sent events, calling onData with each parsed JSON event.
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function ask(text) {
  $("error").textContent = "";
  history.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  answer.classList.add("streaming");
  const body = { messages: history, stream: true, temperature: number("temperature"), top_p: number("top-p"),
                 max_tokens: number("max-tokens") };
  const seed = number("seed");
  if (seed !== null) body.seed = seed;
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let reply = "";
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                       signal: controller.signal });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readEvents(resp, (event) => {
      if (event.error) throw new Error(event.error.message);
      for (const c of event.choices || []) {
        if (c.delta && c.delta.content) {
          reply += c.delta.content;
          answer.textContent = reply;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (c.finish_reason) answer.dataset.finish = c.finish_reason;
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") $("error").textContent = e.message;
  } finally {
    answer.classList.remove("streaming");
    answer.dataset.done = "true";
    history.push({ role: "assistant", content: reply });
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

async function refresh() {
  try {
    const resp = await fetch("/stats", { headers: headers() });
    if (!resp.ok) throw new Error(await errorText(resp));
    const s = await resp.json();
    const m = s.memory;
    $("model").textContent = s.model;
    $("plan").textContent = s.plan;
    $("mem-budget").textContent = m.budget_bytes ? bytes(m.budget_bytes) : "none";
    $("mem-predicted").textContent = bytes(m.predicted_peak_bytes);
    $("mem-resident").textContent = bytes(m.resident_bytes);
    $("mem-peak").textContent = bytes(m.peak_resident_bytes);
    const scale = m.budget_bytes || Math.max(m.predicted_peak_bytes, m.peak_resident_bytes);
    $("mem-bar").style.width = Math.min(100, 100 * m.resident_bytes / scale) + "%";
    $("mem-predicted-mark").style.left = Math.min(100, 100 * m.predicted_peak_bytes / scale) + "%";
    $("slots").textContent = s.slots_in_use + " / " + s.slots;
    $("kv").textContent = s.slots + " x " + s.context + " tokens";
    $("kv-bytes").textContent = bytes(m.kv_pool_bytes);
    $("queue").textContent = s.queue_depth + " (max " + s.queue_size + ")";
    $("tps").textContent = s.tokens_per_second.toFixed(1);
    $("tokens").textContent = s.tokens_generated;
    $("updated").textContent = new Date().toLocaleTimeString();
    $("memory").dataset.updates = String(Number($("memory").dataset.updates) + 1);
  } catch (e) {
    $("updated").textContent = "failed: " + e.message;
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  ask(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => { history.length = 0; $("messages").textContent = ""; });
$("api-key").value = sessionStorage.getItem("memlm-api-key") || "";
$("api-key").addEventListener("change", () => { sessionStorage.setItem("memlm-api-key", $("api-key").value); refresh(); });
refresh();
setInterval(refresh, 1000);
