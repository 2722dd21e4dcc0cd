// The xldm page: builds a /sdapi/v1/txt2img request from the form, polls /sdapi/v1/progress while it runs,
// and adds each image to the gallery with its parameters and a download link. Same-origin requests only.
"use strict";

const $ = (id) => document.getElementById(id);
let config = null;
let running = false;

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function pairOrNull(a, b) {
  const x = numberOrNull(a), y = numberOrNull(b);
  return x === null || y === null ? null : [x, y];
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadConfig() {
  const response = await fetch("/xldm/v1/config");
  if (!response.ok) throw new Error(`config: HTTP ${response.status}`);
  config = await response.json();
  $("model-name").textContent = `model: ${config.model}`;
  const size = $("size");
  size.replaceChildren();
  for (const [w, h] of config.sizes) {
    const option = new Option(`${w} x ${h}`, `${w}x${h}`);
    if (w === config.default_size[0] && h === config.default_size[1]) option.selected = true;
    size.add(option);
  }
  for (const name of config.samplers) {
    const chosen = name === config.defaults.sampler;
    $("sampler").add(new Option(name, name, chosen, chosen));
  }
  $("steps").value = config.defaults.steps;  // the shared defaults (xldm.config.GENERATE_DEFAULTS)
  $("cfg").value = config.defaults.cfg_scale;
  $("steps").max = config.limits.max_steps;
  $("cfg").max = config.limits.max_cfg;
  $("batch").max = config.limits.max_batch_size;
  $("prompt").maxLength = config.limits.max_prompt_chars;
  const refiner = config.refiner || config.refiners[0] || null;
  $("refiner").disabled = !refiner;
  $("refiner").dataset.name = refiner || "";
  $("refiner-name").textContent = refiner ? refiner : "(no refiner loaded)";
}

function addToPrompt(tag) {
  const prompt = $("prompt");
  prompt.value = prompt.value.trim() ? `${prompt.value.trimEnd()} ${tag}` : tag;
  prompt.focus();
}

async function loadLoras(refresh = false) {
  if (refresh) await fetch("/sdapi/v1/refresh-loras", { method: "POST" });
  const response = await fetch("/sdapi/v1/loras");
  if (!response.ok) throw new Error(`loras: HTTP ${response.status}`);
  const loras = await response.json();
  const list = $("lora-list");
  list.replaceChildren();
  for (const lora of loras) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "lora";
    button.textContent = lora.alias !== lora.name ? `${lora.name} (${lora.alias})` : lora.name;
    button.addEventListener("click", () => addToPrompt(`<lora:${lora.name}:1>`));
    list.append(button);
  }
  $("lora-count").textContent = loras.length ? `(${loras.length})` : "(none: start with --lora-dir DIR)";
}

function buildRequest() {
  const [width, height] = $("size").value.split("x").map(Number);
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    width, height,
    steps: Number($("steps").value),
    cfg_scale: Number($("cfg").value),
    seed: Number($("seed").value),
    sampler_name: $("sampler").value,
    batch_size: Number($("batch").value),
    n_iter: 1,
    save_images: Boolean(config && config.outputs),
    crop_top_left: [Number($("crop-top").value || 0), Number($("crop-left").value || 0)],
    aesthetic_score: Number($("aesthetic").value),
    negative_aesthetic_score: Number($("neg-aesthetic").value),
  };
  const original = pairOrNull("orig-w", "orig-h");
  if (original) body.original_size = original;
  const target = pairOrNull("target-w", "target-h");
  if (target) body.target_size = target;
  if ($("refiner").checked && $("refiner").dataset.name) {
    body.refiner_checkpoint = $("refiner").dataset.name;
    body.refiner_switch_at = Number($("refiner-switch").value);
  }
  return body;
}

function setProgress(fraction, text) {
  $("bar-fill").style.width = `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;
  $("progress-text").textContent = text;
}

async function pollProgress() {
  while (running) {
    try {
      const response = await fetch("/sdapi/v1/progress");
      if (response.ok) {
        const p = await response.json();
        if (running && p.state.sampling_steps > 0) {
          const eta = p.eta_relative > 0 ? `, about ${p.eta_relative.toFixed(1)} s left` : "";
          setProgress(p.progress, `${Math.round(p.progress * 100)}% (${p.textinfo}${eta})`);
          if (p.current_image) {
            $("preview").src = `data:image/png;base64,${p.current_image}`;
            $("preview").hidden = false;
          }
        } else if (running && p.state.queued > 0) {
          setProgress(0, `waiting in the queue (${p.state.queued} ahead or waiting)`);
        }
      }
    } catch (e) { /* the next poll tries again */ }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

function base64ToBlob(b64, type) {
  const bytes = atob(b64);
  const array = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) array[i] = bytes.charCodeAt(i);
  return new Blob([array], { type });
}

function addResult(b64, infotext, seed) {
  const url = URL.createObjectURL(base64ToBlob(b64, "image/png"));
  const figure = document.createElement("figure");
  figure.className = "result";
  const img = document.createElement("img");
  img.src = url;
  img.alt = infotext.split("\n")[0];
  const params = document.createElement("pre");
  params.className = "params";
  params.textContent = infotext;
  const link = document.createElement("a");
  link.className = "download";
  link.href = url;
  link.download = `xldm-${seed}.png`;
  link.textContent = `Download xldm-${seed}.png`;
  figure.append(img, params, link);
  $("gallery").prepend(figure);
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  showError("");
  running = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  setProgress(0, "starting...");
  const poll = pollProgress();
  try {
    const response = await fetch("/sdapi/v1/txt2img", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(buildRequest()),
    });
    const data = await response.json();
    if (!response.ok) {
      const detail = Array.isArray(data.detail)
        ? data.detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("\n") : data.detail;
      throw new Error(`HTTP ${response.status}: ${detail}`);
    }
    const info = JSON.parse(data.info);
    data.images.forEach((b64, i) => addResult(b64, info.infotexts[i], info.all_seeds[i]));
    const interrupted = info.xldm && info.xldm.interrupted;
    setProgress(1, interrupted ? `interrupted: ${data.images.length} image(s)` : `done: seed ${info.seed}`);
  } catch (e) {
    setProgress(0, "failed");
    showError(String(e.message || e));
  } finally {
    running = false;
    await poll;
    $("preview").hidden = true;  // the result is in the gallery now
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => fetch("/sdapi/v1/interrupt", { method: "POST" }));
$("lora-refresh").addEventListener("click", () => loadLoras(true).catch((e) => showError(String(e.message || e))));
loadConfig().then(() => loadLoras()).catch((e) => showError(String(e.message || e)));
