// The page of `sana serve`: a form over the server's own HTTP API (same origin, no external assets).
// POST /v1/jobs starts a job; its events (Server-Sent Events) are read with fetch() so that an API key can
// travel as an Authorization header, which EventSource cannot send.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["done", "error", "cancelled"]);
const SIZE_MULTIPLE = 32;
let config = null;

// ------------------------------------------------------------------------------------------------ helpers

function headers(extra = {}) {
  const h = { ...extra };
  const key = $("apikey").value.trim();
  if (config && config.auth && key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The form field a request parameter comes from (the server's errors name the parameter).
const FIELDS = {
  prompt: "prompt",
  negative_prompt: "negative",
  size: "size",
  num_inference_steps: "steps",
  guidance_scale: "guidance",
  seed: "seed",
  n: "n",
  sampler: "sampler",
};

function showError(message, param = null) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
  for (const id of Object.values(FIELDS)) $(id).removeAttribute("aria-invalid");
  const field = param && FIELDS[param] && $(FIELDS[param]);
  if (field) {
    field.setAttribute("aria-invalid", "true");
    field.setAttribute("aria-errormessage", "error");
  }
}

// The message of an error body: {"error": {"message"}}, {"message"}, or FastAPI's {"detail"}.
function messageOf(body, fallback) {
  if (!body) return fallback;
  if (typeof body === "string") return body;
  if (body.error) return typeof body.error === "string" ? body.error : body.error.message || fallback;
  if (body.message) return body.message;
  if (Array.isArray(body.detail)) {
    return body.detail.map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}`).join("; ");
  }
  if (body.detail) return String(body.detail);
  return fallback;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const error = new Error(messageOf(body, `${response.status} ${response.statusText}`));
    error.param = body && body.error && body.error.param;
    throw error;
  }
  return body;
}

const roundTo = (v, m) => Math.max(m, Math.round(v / m) * m);

// The native size first, then square, portrait and landscape sizes of the native area (and larger areas),
// multiples of 32 no side above max_side.
function sizePresets(width, height, maxSide) {
  const presets = [{ w: width, h: height, label: "native" }];
  const ratios = [
    [1, 1, "1:1 square"],
    [3, 4, "3:4 portrait"],
    [2, 3, "2:3 portrait"],
    [9, 16, "9:16 portrait"],
    [4, 3, "4:3 landscape"],
    [3, 2, "3:2 landscape"],
    [16, 9, "16:9 landscape"],
  ];
  const seen = new Set([`${width}x${height}`]);
  for (const scale of [1, 2, 4]) {
    const area = width * height * scale * scale;
    for (const [a, b, name] of ratios) {
      const w = roundTo(Math.sqrt((area * a) / b), SIZE_MULTIPLE);
      const h = roundTo(Math.sqrt((area * b) / a), SIZE_MULTIPLE);
      if (w > maxSide || h > maxSide || seen.has(`${w}x${h}`)) continue;
      seen.add(`${w}x${h}`);
      presets.push({ w, h, label: name });
    }
  }
  return presets;
}

function randomSeed() {
  const a = new Uint32Array(1);
  crypto.getRandomValues(a);
  return a[0] % 2147483647;
}

function parseSize(text) {
  const m = /^\s*(\d+)\s*[xX×*]\s*(\d+)\s*$/.exec(text);
  return m ? `${Number(m[1])}x${Number(m[2])}` : text.trim();
}

// A number field's value: null when empty (the server's default), NaN stays as text so the server says why.
function numberOf(input) {
  const text = input.value.trim();
  if (text === "") return null;
  const v = Number(text);
  return Number.isFinite(v) ? v : text;
}

// ------------------------------------------------------------------------------------------------ setup

async function loadConfig() {
  try {
    config = await api("/v1/config");
  } catch (e) {
    $("model").textContent = "server unavailable";
    showError(`Could not read the server's configuration: ${e.message}`);
    return;
  }
  const limits = config.limits || {};
  $("model").textContent =
    `${config.model} · ${config.width}×${config.height}, ${config.steps} steps, guidance ${config.guidance_scale}`;
  document.title = `Sana · ${config.model}`;
  $("apikey-row").hidden = !config.auth;
  if (config.auth) $("apikey").value = sessionStorage.getItem("sana-api-key") || "";

  const preset = $("preset");
  preset.replaceChildren();
  for (const p of sizePresets(config.width, config.height, limits.max_side || Math.max(config.width, config.height))) {
    preset.append(new Option(`${p.w}×${p.h} ${p.label}`, `${p.w}x${p.h}`));
  }
  preset.append(new Option("custom", "custom"));
  $("size").value = `${config.width}x${config.height}`;
  preset.value = $("size").value;

  $("steps").value = config.steps;
  if (limits.max_steps) $("steps").max = limits.max_steps;
  $("guidance").value = config.guidance_scale;
  if (limits.max_images) $("n").max = limits.max_images;
  $("seed").value = randomSeed();

  const sampler = $("sampler");
  sampler.replaceChildren();
  const names = config.samplers && config.samplers.length ? config.samplers : [config.sampler];
  for (const name of names) sampler.append(new Option(name === config.sampler ? `${name} (model default)` : name, name));
  sampler.value = config.sampler;
  document.body.dataset.ready = "true";
}

$("preset").addEventListener("change", () => {
  if ($("preset").value !== "custom") $("size").value = $("preset").value;
  else $("size").focus();
});
$("size").addEventListener("input", () => {
  const v = parseSize($("size").value);
  $("preset").value = [...$("preset").options].some((o) => o.value === v) ? v : "custom";
});
$("randomise").addEventListener("click", () => {
  $("seed").value = randomSeed();
});
$("apikey").addEventListener("change", () => sessionStorage.setItem("sana-api-key", $("apikey").value.trim()));
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("form").requestSubmit();
  }
});
$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  generate();
});

// ------------------------------------------------------------------------------------------------ jobs

async function generate() {
  showError("");
  const prompt = $("prompt").value.trim();
  if (!prompt) {
    showError("Write a prompt first.", "prompt");
    $("prompt").focus();
    return;
  }
  if ($("seed").value.trim() === "") $("seed").value = randomSeed();
  const request = {
    prompt,
    negative_prompt: $("negative").value,
    n: numberOf($("n")),
    size: parseSize($("size").value),
    num_inference_steps: numberOf($("steps")),
    guidance_scale: numberOf($("guidance")),
    seed: numberOf($("seed")),
    sampler: $("sampler").value || null,
    output_format: "png",
  };
  for (const k of Object.keys(request)) if (request[k] === null) delete request[k];

  let job;
  try {
    job = await api("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
  } catch (e) {
    showError(e.message, e.param);
    return;
  }
  watch(job, request);
}

function jobCard(request) {
  const li = document.createElement("li");
  li.className = "job";
  const title = document.createElement("div");
  title.className = "job-title";
  title.textContent = request.prompt;
  const status = document.createElement("div");
  status.className = "job-status muted";
  status.textContent = "submitted";
  const bar = document.createElement("progress");
  bar.className = "progress";
  bar.setAttribute("aria-label", `Progress of “${request.prompt}”`);
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "cancel";
  cancel.textContent = "Cancel";
  li.append(title, cancel, bar, status);
  $("jobs").prepend(li);
  return { li, status, bar, cancel };
}

async function watch(job, request) {
  const card = jobCard(request);
  card.li.dataset.job = job.id;
  const eventsUrl = job.events_url || `/v1/jobs/${job.id}/events`;
  const controller = new AbortController();
  let finished = false;
  card.cancel.addEventListener("click", async () => {
    card.cancel.disabled = true;
    try {
      await api(job.url || `/v1/jobs/${job.id}`, { method: "DELETE" });
    } catch (e) {
      showError(`Cancel failed: ${e.message}`);
      card.cancel.disabled = false;
    }
  });

  const handle = (event, data) => {
    if (event === "queued") {
      card.bar.removeAttribute("value");
      card.status.textContent = data && data.position != null ? `queued, position ${data.position}` : "queued";
    } else if (event === "running") {
      card.status.textContent = "running";
    } else if (event === "progress") {
      card.bar.max = data.steps;
      card.bar.value = data.step;
      card.status.textContent = `step ${data.step}/${data.steps}`;
    } else if (event === "done") {
      finished = true;
      card.li.remove();
      addImages(data, request);
    } else if (event === "error") {
      finished = true;
      const message = messageOf(data, "generation failed");
      card.li.classList.add("failed");
      card.status.textContent = `failed: ${message}`;
      card.bar.remove();
      card.cancel.remove();
      showError(message);
    } else if (event === "cancelled") {
      finished = true;
      card.li.classList.add("cancelled");
      card.status.textContent = "cancelled";
      card.bar.remove();
      card.cancel.remove();
      setTimeout(() => card.li.remove(), 4000);
    }
  };

  try {
    const response = await fetch(eventsUrl, {
      headers: headers({ Accept: "text/event-stream" }),
      signal: controller.signal,
    });
    if (!response.ok) {
      let body = null;
      try {
        body = await response.json();
      } catch (_) {
        body = null;
      }
      throw new Error(messageOf(body, `${response.status} ${response.statusText}`));
    }
    await readEvents(response.body, (event, data) => {
      handle(event, data);
      if (TERMINAL.has(event)) controller.abort();
    });
  } catch (e) {
    if (e.name === "AbortError" && finished) return;
    if (!finished) handle("error", { message: `lost the job's events: ${e.message}` });
    return;
  }
  if (!finished) handle("error", { message: "the job's event stream ended early" });
}

// Server-Sent Events over a fetch() body: blocks separated by a blank line, "event:" and "data:" fields.
async function readEvents(stream, onEvent) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
      }
      if (!data.length && event === "message") continue;
      let parsed = data.join("\n");
      try {
        parsed = JSON.parse(parsed);
      } catch (_) {
        /* plain text data */
      }
      onEvent(event, parsed);
      if (TERMINAL.has(event)) return;
    }
  }
}

// ------------------------------------------------------------------------------------------------ gallery

function slug(text) {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "image";
}

async function imageSource(url) {
  // Without auth an <img> reads the URL itself; with it, the bytes come through fetch() with the key.
  if (!config || !config.auth) return url;
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  return URL.createObjectURL(await response.blob());
}

function addImages(data, request) {
  const images = (data && (data.images || data.data)) || [];
  const seeds = (data && data.seeds) || [];
  const batch = document.createDocumentFragment();
  const loads = [];
  images.forEach((item, i) => {
    const url = typeof item === "string" ? item : item.url;
    let seed = typeof item === "object" && item.seed != null ? item.seed : seeds[i];
    if (seed == null) seed = images.length === 1 ? request.seed : `${request.seed} (#${i + 1})`;
    const figure = document.createElement("figure");
    figure.className = "result";
    const img = document.createElement("img");
    img.alt = request.prompt;
    const link = document.createElement("a");
    link.className = "download";
    link.textContent = "Download";
    link.download = `sana-${String(seed).replace(/\D+/g, "-")}-${slug(request.prompt)}.png`;
    const caption = document.createElement("figcaption");
    const prompt = document.createElement("div");
    prompt.className = "result-prompt";
    prompt.textContent = request.prompt;
    const params = document.createElement("dl");
    const fields = [
      ["seed", seed],
      ["size", (request.size || "").replace("x", "×")],
      ["steps", request.num_inference_steps ?? config.steps],
      ["guidance", request.guidance_scale ?? config.guidance_scale],
      ["sampler", request.sampler || config.sampler],
    ];
    if (request.negative_prompt) fields.push(["negative", request.negative_prompt]);
    for (const [k, v] of fields) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      dd.dataset.param = k;
      params.append(dt, dd);
    }
    caption.append(prompt, params, link);
    figure.append(img, caption);
    batch.append(figure);
    loads.push([url, img, link]);
  });
  $("gallery").prepend(batch);
  $("empty").hidden = $("gallery").children.length > 0;
  for (const [url, img, link] of loads) {
    imageSource(url).then(
      (src) => {
        img.src = src;
        link.href = src;
      },
      (e) => showError(`Could not load the image: ${e.message}`),
    );
  }
}

loadConfig();
