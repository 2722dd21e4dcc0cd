// The xldm page. txt2img, img2img and inpainting go through the A1111 routes (/sdapi/v1/txt2img, /sdapi/v1/img2img)
// with A1111's field names; /sdapi/v1/progress is polled while a job runs. The model picker lists
// /sdapi/v1/sd-models and switches with POST /sdapi/v1/options (sd_model_checkpoint). Hires fix and ControlNet
// appear only when the server answers /sdapi/v1/upscalers and /controlnet/model_list. Generated images are kept
// in localStorage (bounded); a dropped PNG is read by POST /sdapi/v1/png-info. Same-origin requests only.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_KEY = "xldm.history.v1";
const HISTORY_MAX = 24;  // entries kept across reloads; older ones are dropped first
let config = null;
let running = false;
let mode = "txt2img";
let initImage = null;  // {dataUrl, width, height} of the img2img / inpainting init image
let controlImage = null;  // data URL of the ControlNet control image
const features = { hires: false, controlnet: false };

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

function reportError(e) { showError(String((e && e.message) || e)); }

// The server's error as text: FastAPI's {"detail": "..."} or its validation list, else the body itself.
async function responseError(what, response) {
  const text = await response.text();
  let detail = text;
  try {
    const data = JSON.parse(text);
    if (Array.isArray(data.detail)) {
      detail = data.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("\n");
    } else if (data.detail !== undefined) {
      detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    }
  } catch (e) { /* not JSON: the text as it came */ }
  return new Error(`${what}: HTTP ${response.status}: ${detail}`);
}

async function getJson(url, what) {
  const response = await fetch(url);
  if (!response.ok) throw await responseError(what, response);
  return response.json();
}

// ---- sizes labelled by aspect ratio ----------------------------------------------------------------------
const COMMON_RATIOS = [[1, 1], [5, 4], [4, 3], [3, 2], [16, 10], [16, 9], [2, 1], [21, 9]];

function gcd(a, b) { return b ? gcd(b, a % b) : a; }

// "1:1" for 1024x1024, "7:4 ≈16:9" for 1344x768: the exact reduced ratio (a decimal when its terms exceed 21),
// named after a common ratio when it equals one, with "≈" and that ratio when it is within 2% of one.
function aspectLabel(width, height) {
  const g = gcd(width, height), a = width / g, b = height / g, ratio = width / height;
  const commons = COMMON_RATIOS.flatMap(([x, y]) => (x === y ? [[x, y]] : [[x, y], [y, x]]));
  const same = commons.find(([x, y]) => x * height === y * width);
  if (same) return `${same[0]}:${same[1]}`;
  const exact = a <= 21 && b <= 21 ? `${a}:${b}`
    : (ratio >= 1 ? `${ratio.toFixed(2)}:1` : `1:${(1 / ratio).toFixed(2)}`);
  const near = commons.find(([x, y]) => Math.abs(Math.log(ratio / (x / y))) < 0.02);
  return near ? `${exact} ≈${near[0]}:${near[1]}` : exact;
}

function sizeOption(w, h, note = "") {
  return new Option(`${aspectLabel(w, h)} · ${w}x${h}${note}`, `${w}x${h}`);
}

function selectSize(width, height, note) {
  const value = `${width}x${height}`;
  const size = $("size");
  if (![...size.options].some((o) => o.value === value)) size.add(sizeOption(width, height, note));
  size.value = value;
}

// ---- configuration, models, optional blocks ----------------------------------------------------------------
async function loadConfig() {
  config = await getJson("/xldm/v1/config", "config");
  $("model-name").textContent = config.refiner ? `refiner: ${config.refiner}` : "";
  const size = $("size");
  const previous = size.value;
  size.replaceChildren();
  for (const [w, h] of config.sizes) {
    const option = sizeOption(w, h);
    if (w === config.default_size[0] && h === config.default_size[1]) option.selected = true;
    size.add(option);
  }
  if (previous && [...size.options].some((o) => o.value === previous) && $("sampler").options.length) {
    size.value = previous;  // a reload after switching models keeps a size the new model also offers
  }
  if (!$("sampler").options.length) {  // the first load: the shared defaults (xldm.config.GENERATE_DEFAULTS)
    for (const name of config.samplers) {
      const chosen = name === config.defaults.sampler;
      $("sampler").add(new Option(name, name, chosen, chosen));
    }
    $("steps").value = config.defaults.steps;
    $("cfg").value = config.defaults.cfg_scale;
  }
  $("steps").max = config.limits.max_steps;
  $("cfg").max = config.limits.max_cfg;
  $("batch").max = config.limits.max_batch_size;
  $("prompt").maxLength = config.limits.max_prompt_chars;
  const refiner = config.refiner || config.refiners[0] || null;
  $("refiner").disabled = !refiner;
  $("refiner").dataset.name = refiner || "";
  $("refiner-name").textContent = refiner ? refiner : "(no refiner loaded)";
}

async function loadModels() {
  const models = await getJson("/sdapi/v1/sd-models", "sd-models");
  const refiners = new Set(config.refiners);  // a refiner cannot generate on its own
  const picker = $("model");
  picker.replaceChildren();
  for (const m of models) {
    const file = m.filename || m.title;  // the name sd_model_checkpoint takes (the title carries the hash)
    if (refiners.has(file)) continue;
    picker.add(new Option(m.hash ? `${m.model_name} [${m.hash}]` : m.model_name, file));
  }
  picker.value = config.model;
  picker.dataset.current = config.model;
}

async function switchModel() {
  const picker = $("model");
  const wanted = picker.value;
  showError("");
  picker.disabled = true;
  try {
    const response = await fetch("/sdapi/v1/options", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sd_model_checkpoint: wanted }),
    });
    if (!response.ok) throw await responseError(`switching to ${wanted}`, response);
    await loadConfig();
    picker.dataset.current = config.model;
    picker.value = config.model;
    setProgress(0, `model: ${config.model}`);
  } catch (e) {
    picker.value = picker.dataset.current;  // the server kept its model
    reportError(e);
  } finally {
    picker.disabled = false;
  }
}

// A route that answers 404 is a feature this server does not have: its block stays hidden. Other failures show.
async function optional(url, what) {
  const response = await fetch(url);
  if (response.status === 404) return null;
  if (!response.ok) throw await responseError(what, response);
  return response.json();
}

async function loadHires() {
  const upscalers = await optional("/sdapi/v1/upscalers", "upscalers");
  if (upscalers === null) return;
  const latent = (await optional("/sdapi/v1/latent-upscale-modes", "latent-upscale-modes")) || [];
  const select = $("hr-upscaler");
  select.replaceChildren();
  for (const item of [...latent, ...upscalers]) {
    if (item.name && item.name !== "None") select.add(new Option(item.name, item.name));
  }
  features.hires = true;
  updateMode();
}

async function loadControlNet() {
  const models = await optional("/controlnet/model_list", "controlnet model_list");
  if (models === null) return;
  const select = $("cn-model");
  select.replaceChildren();
  for (const name of models.model_list || []) select.add(new Option(name, name));
  features.controlnet = true;
  $("cn-box").hidden = false;
}

// ---- modes, init image, mask ------------------------------------------------------------------------------
function setMode(next) {
  mode = next;
  for (const tab of document.querySelectorAll("#modes [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  }
  updateMode();
}

function updateMode() {
  $("init-box").hidden = mode === "txt2img";
  $("mask-tools").hidden = mode !== "inpaint";
  $("mask-canvas").hidden = mode !== "inpaint";
  $("hires-box").hidden = !(features.hires && mode === "txt2img");  // A1111's hires fix is txt2img's
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function stripDataUrl(dataUrl) { return dataUrl.slice(dataUrl.indexOf(",") + 1); }

function setInitImage(dataUrl) {
  return new Promise((resolve, reject) => {
    const img = $("init-preview");
    img.onload = () => {
      initImage = { dataUrl, width: img.naturalWidth, height: img.naturalHeight };
      const canvas = $("mask-canvas");
      canvas.width = img.naturalWidth;  // the mask has the init image's pixels
      canvas.height = img.naturalHeight;
      $("init-stage").hidden = false;
      if ([...$("size").options].some((o) => o.value === `${img.naturalWidth}x${img.naturalHeight}`)) {
        $("size").value = `${img.naturalWidth}x${img.naturalHeight}`;
      }
      resolve();
    };
    img.onerror = () => reject(new Error("the init image is not an image the browser can read"));
    img.src = dataUrl;
  });
}

async function setInitFile(file) {
  if (!file) return;
  await setInitImage(await readFile(file));
}

function canvasPoint(canvas, event) {
  const rect = canvas.getBoundingClientRect();
  return [(event.clientX - rect.left) * canvas.width / rect.width,
          (event.clientY - rect.top) * canvas.height / rect.height];
}

function setupMaskPainting() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  let last = null;
  const paint = (point) => {
    ctx.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "#ffffff";
    ctx.lineWidth = Number($("brush").value);  // in image pixels
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (last) {
      ctx.moveTo(last[0], last[1]);
      ctx.lineTo(point[0], point[1]);
      ctx.stroke();
    } else {
      ctx.arc(point[0], point[1], ctx.lineWidth / 2, 0, 2 * Math.PI);
      ctx.fill();
    }
    last = point;
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = null;
    paint(canvasPoint(canvas, e));
  });
  canvas.addEventListener("pointermove", (e) => { if (last) paint(canvasPoint(canvas, e)); });
  const stop = () => { last = null; };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
  $("mask-clear").addEventListener("click", () => ctx.clearRect(0, 0, canvas.width, canvas.height));
}

// The painted mask as A1111 takes it: a PNG of the init image's size, white = repaint, black = keep.
function maskBase64() {
  const canvas = $("mask-canvas");
  const alpha = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = false;
  for (let i = 3; i < alpha.length; i += 4) if (alpha[i]) { painted = true; break; }
  if (!painted) throw new Error("inpainting: paint the area to repaint on the image first");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(canvas, 0, 0);
  return stripDataUrl(out.toDataURL("image/png"));
}

// ---- the request ------------------------------------------------------------------------------------------
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
  if (mode !== "txt2img") {
    if (!initImage) throw new Error(`${mode}: choose or drop an init image first`);
    body.init_images = [stripDataUrl(initImage.dataUrl)];
    body.denoising_strength = Number($("strength").value);
    if (mode === "inpaint") {
      body.mask = maskBase64();
      body.inpainting_mask_invert = Number($("mask-invert").value);
    }
  } else if (features.hires && $("hr-enable").checked) {  // A1111's StableDiffusionProcessingTxt2Img fields
    body.enable_hr = true;
    body.hr_scale = Number($("hr-scale").value);
    body.hr_upscaler = $("hr-upscaler").value;
    body.denoising_strength = Number($("hr-strength").value);
    body.hr_second_pass_steps = Number($("hr-steps").value);
  }
  if (features.controlnet && $("cn-enable").checked) {  // the sd-webui-controlnet extension's API unit
    if (!controlImage) throw new Error("ControlNet: choose a control image first");
    body.alwayson_scripts = { controlnet: { args: [{
      image: stripDataUrl(controlImage), module: $("cn-module").value, model: $("cn-model").value,
      weight: Number($("cn-weight").value), guidance_start: Number($("cn-start").value),
      guidance_end: Number($("cn-end").value),
    }] } };
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
    } catch (e) { /* the next poll tries again; the generation request reports its own failure */ }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

function base64ToBlob(b64, type) {
  const bytes = atob(b64);
  const array = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) array[i] = bytes.charCodeAt(i);
  return new Blob([array], { type });
}

// ---- results and history ----------------------------------------------------------------------------------
function actionButtons(entry) {
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "small reuse-seed";
  reuse.textContent = "Reuse seed";
  reuse.addEventListener("click", () => { $("seed").value = entry.seed; });
  const send = document.createElement("button");
  send.type = "button";
  send.className = "small send-img2img";
  send.textContent = "Send to img2img";
  send.addEventListener("click", () => {
    setMode("img2img");
    setInitImage(`data:image/png;base64,${entry.image}`).catch(reportError);
  });
  const row = document.createElement("div");
  row.className = "actions";
  row.append(reuse, send);
  return row;
}

function addResult(entry) {
  const url = URL.createObjectURL(base64ToBlob(entry.image, "image/png"));
  const figure = document.createElement("figure");
  figure.className = "result";
  const img = document.createElement("img");
  img.src = url;
  img.alt = entry.infotext.split("\n")[0];
  const params = document.createElement("pre");
  params.className = "params";
  params.textContent = entry.infotext;
  const link = document.createElement("a");
  link.className = "download";
  link.href = url;
  link.download = `xldm-${entry.seed}.png`;
  link.textContent = `Download xldm-${entry.seed}.png`;
  figure.append(img, params, link, actionButtons(entry));
  $("gallery").prepend(figure);
}

function readHistory() {
  try {
    const list = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(list) ? list : [];
  } catch (e) {
    showError(`history: the stored history could not be read (${e.message}); it starts again`);
    return [];
  }
}

// Newest first, at most HISTORY_MAX; when the browser's storage is full the oldest entries go first.
function remember(entries) {
  let list = [...entries, ...readHistory()].slice(0, HISTORY_MAX);
  for (;;) {
    try {
      localStorage.setItem(HISTORY_KEY, JSON.stringify(list));
      break;
    } catch (e) {
      if (list.length <= 1) {
        showError(`history: this image is too large for the browser's storage (${e.name}); it is not kept`);
        break;
      }
      list = list.slice(0, -1);
    }
  }
  renderHistory();
}

function renderHistory() {
  const list = readHistory();
  const box = $("history");
  box.replaceChildren();
  for (const entry of list) {
    const figure = document.createElement("figure");
    figure.className = "history-item";
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${entry.image}`;
    img.alt = entry.infotext.split("\n")[0];
    img.title = entry.infotext;
    const params = document.createElement("pre");
    params.className = "params";
    params.textContent = entry.infotext;
    figure.append(img, params, actionButtons(entry));
    box.append(figure);
  }
  $("history-count").textContent = `(${list.length} kept in this browser, at most ${HISTORY_MAX})`;
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  showError("");
  let body;
  try {
    body = buildRequest();
  } catch (e) {
    reportError(e);
    return;
  }
  running = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  setProgress(0, "starting...");
  const poll = pollProgress();
  try {
    const route = mode === "txt2img" ? "txt2img" : "img2img";
    const response = await fetch(`/sdapi/v1/${route}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) throw await responseError(route, response);
    const data = await response.json();
    const info = JSON.parse(data.info);
    const entries = data.images.map((image, i) => ({
      image, infotext: info.infotexts[i], seed: info.all_seeds[i], time: Date.now(),
    }));
    entries.forEach(addResult);
    remember([...entries].reverse());  // the newest first, as the gallery shows them
    const interrupted = info.xldm && info.xldm.interrupted;
    setProgress(1, interrupted ? `interrupted: ${data.images.length} image(s)` : `done: seed ${info.seed}`);
  } catch (e) {
    setProgress(0, "failed");
    reportError(e);
  } finally {
    running = false;
    await poll;
    $("preview").hidden = true;  // the result is in the gallery now
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

// ---- a dropped PNG fills the form -------------------------------------------------------------------------
function setIfPresent(id, value) { if (value !== undefined && value !== "") $(id).value = value; }

async function readParameters(file) {
  const dataUrl = await readFile(file);
  const response = await fetch("/sdapi/v1/png-info", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ image: stripDataUrl(dataUrl) }),
  });
  if (!response.ok) throw await responseError(`png-info of ${file.name}`, response);
  const { info, parameters: p } = await response.json();
  if (!info) throw new Error(`${file.name} carries no generation parameters`);
  setIfPresent("prompt", p.Prompt);
  $("negative").value = p["Negative prompt"] || "";
  setIfPresent("steps", p.Steps);
  setIfPresent("cfg", p["CFG scale"]);
  setIfPresent("seed", p.Seed);
  if (p.Sampler) {
    if (![...$("sampler").options].some((o) => o.value === p.Sampler)) {
      throw new Error(`${file.name}: sampler ${p.Sampler} is not one this server has`);
    }
    $("sampler").value = p.Sampler;
  }
  if (p["Size-1"] && p["Size-2"]) selectSize(Number(p["Size-1"]), Number(p["Size-2"]), " (from PNG)");
  setIfPresent("strength", p["Denoising strength"]);
  if (p.Refiner && !$("refiner").disabled) {
    $("refiner").checked = true;
    setIfPresent("refiner-switch", p["Refiner switch at"]);
  }
  if (features.hires && p["Hires upscale"]) {
    $("hr-enable").checked = true;
    setIfPresent("hr-scale", p["Hires upscale"]);
    setIfPresent("hr-steps", p["Hires steps"]);
    setIfPresent("hr-upscaler", p["Hires upscaler"]);
    setIfPresent("hr-strength", p["Denoising strength"]);
  }
  const model = p.Model && p.Model !== ($("model").selectedOptions[0] || {}).textContent
    ? ` (made with model ${p.Model}; the picker is unchanged)` : "";
  setProgress(0, `parameters read from ${file.name}${model}`);
}

function setupDrops() {
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (!file) return;
    showError("");
    const onInit = mode !== "txt2img" && e.target.closest && e.target.closest("#init-drop");
    (onInit ? setInitFile(file) : readParameters(file)).catch(reportError);
  });
}

// ---- wiring -----------------------------------------------------------------------------------------------
for (const tab of document.querySelectorAll("#modes [role=tab]")) {
  tab.addEventListener("click", () => setMode(tab.dataset.mode));
}
$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => fetch("/sdapi/v1/interrupt", { method: "POST" }).then(
  async (r) => { if (!r.ok) reportError(await responseError("interrupt", r)); }, reportError));
$("lora-refresh").addEventListener("click", () => loadLoras(true).catch(reportError));
$("model").addEventListener("change", switchModel);
$("init-file").addEventListener("change", (e) => setInitFile(e.target.files[0]).catch(reportError));
$("cn-file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) {
    readFile(file).then((url) => {
      controlImage = url;
      $("cn-preview").src = url;
      $("cn-preview").hidden = false;
    }, reportError);
  }
});
$("history-clear").addEventListener("click", () => { localStorage.removeItem(HISTORY_KEY); renderHistory(); });
setupMaskPainting();
setupDrops();
renderHistory();
updateMode();

function addToPrompt(tag) {
  const prompt = $("prompt");
  prompt.value = prompt.value.trim() ? `${prompt.value.trimEnd()} ${tag}` : tag;
  prompt.focus();
}

async function loadLoras(refresh = false) {
  if (refresh) {
    const response = await fetch("/sdapi/v1/refresh-loras", { method: "POST" });
    if (!response.ok) throw await responseError("refresh-loras", response);
  }
  const loras = await getJson("/sdapi/v1/loras", "loras");
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

loadConfig()
  .then(() => Promise.all([loadModels(), loadLoras(), loadHires(), loadControlNet()]))
  .then(() => { document.body.dataset.ready = "true"; })
  .catch(reportError);
