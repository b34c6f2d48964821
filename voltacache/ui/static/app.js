// The page's behaviour: recommendations and gallery as the user types (debounced), Generate
// through the served ensemble, and a click on a recommendation or an image fills the prompt.
"use strict";

const DEBOUNCE_MS = 250;
const $ = (id) => document.getElementById(id);
let timer = null;
let asked = 0; // answers to an older keystroke are dropped
// a gallery image's own request settings the form does not show, sent with Generate so that the
// cache can answer it (they are part of an entry's scope); typing or a recommendation clears them
let carried = {};
const CARRIED = ["negative_prompt", "cache_interval", "cache_schedule"];

async function getJson(url, options) {
  const response = await fetch(url, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// what showed the error: a refresh that succeeds clears its own error, never a refused Generate's
let errorFrom = null;
function showError(message, from = null) {
  $("error").textContent = message || "";
  errorFrom = message ? from : null;
}

function fill(prompt, params) {
  $("prompt").value = prompt;
  carried = {};
  if (params) {
    for (const name of ["steps", "guidance", "scheduler"]) {
      if (params[name] !== undefined) $(name).value = params[name];
    }
    for (const name of CARRIED) {
      if (params[name] !== undefined) carried[name] = params[name];
    }
  }
  $("recommendations").replaceChildren();
  refresh();
}

function showRecommendations(prompts) {
  const list = $("recommendations");
  list.replaceChildren(...prompts.map((p) => {
    const item = document.createElement("li");
    item.className = "recommendation";
    item.textContent = p.prompt;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = p.similarity.toFixed(2);
    item.append(score);
    item.addEventListener("click", () => fill(p.prompt));
    return item;
  }));
}

function showGallery(images, text) {
  $("gallery-title").textContent = text ? "In the cache, nearest this prompt" : "Newest in the cache";
  $("gallery").replaceChildren(...images.map((entry) => {
    const figure = document.createElement("figure");
    figure.className = "entry";
    const img = document.createElement("img");
    img.src = entry.src;
    img.alt = entry.prompt;
    const caption = document.createElement("figcaption");
    caption.textContent = entry.prompt;
    const meta = document.createElement("div");
    meta.className = "meta";
    const similarity = text ? `similarity ${entry.similarity.toFixed(2)} · ` : "";
    meta.textContent = `${similarity}seed ${entry.seed} · ${entry.params.steps} steps · ${entry.hits} hits`;
    caption.append(meta);
    figure.append(img, caption);
    figure.addEventListener("click", () => {
      $("seed").value = entry.seed;
      fill(entry.prompt, entry.params);
    });
    return figure;
  }));
}

async function refresh() {
  const text = $("prompt").value;
  const mine = ++asked;
  try {
    const q = encodeURIComponent(text);
    const [recommended, gallery] = await Promise.all([
      getJson(`/api/recommend?q=${q}`),
      getJson(`/api/gallery?q=${q}`),
    ]);
    if (mine !== asked) return;
    showRecommendations(recommended.prompts.filter((p) => p.prompt !== text));
    showGallery(gallery.images, text.trim());
    if (errorFrom === "refresh") showError("");
  } catch (error) {
    if (mine === asked) showError(error.message, "refresh");
  }
}

async function generate() {
  const button = $("generate");
  button.disabled = true;
  showError("");
  const body = {
    prompt: $("prompt").value,
    steps: $("steps").value,
    seed: $("seed").value,
    guidance: $("guidance").value,
    scheduler: $("scheduler").value,
    ...carried,
  };
  try {
    const result = await getJson("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    $("result").hidden = false;
    $("result-image").src = result.image;
    const where = {
      exact: "an exact repeat (Triton's response cache)",
      semantic: `a stored image (semantic, similarity ${result.similarity.toFixed(3)})`,
      approximate: `approximate: started from a stored latent (similarity ${result.similarity.toFixed(3)}), ${result.steps_computed} steps computed`,
      miss: `a new generation, ${result.steps_computed} steps`,
      off: `a new generation, ${result.steps_computed} steps (cache off)`,
    }[result.cache] || result.cache;
    $("result-info").innerHTML = "";
    const layer = document.createElement("span");
    layer.className = "layer";
    layer.dataset.layer = result.cache;
    layer.textContent = where;
    $("result-info").append(layer, ` · seed ${result.seed} · ${result.seconds.toFixed(2)} s`);
    refresh();
  } catch (error) {
    showError(error.message);
  } finally {
    button.disabled = false;
  }
}

$("prompt").addEventListener("input", () => {
  carried = {};
  clearTimeout(timer);
  timer = setTimeout(refresh, DEBOUNCE_MS);
});
$("prompt").addEventListener("keydown", (event) => { if (event.key === "Enter") generate(); });
$("generate").addEventListener("click", generate);

// the request's defaults and choices, as voltacache.request.Request has them
getJson("/api/defaults").then((defaults) => {
  $("scheduler").replaceChildren(...defaults.schedulers.map((name) => new Option(name, name)));
  for (const name of ["steps", "guidance", "scheduler"]) $(name).value = defaults[name];
}).catch((error) => showError(error.message));
refresh();
