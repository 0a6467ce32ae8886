// The operator's console: plain JavaScript against the service's own /v1 API, no build step
// and nothing from the internet. The API key (if the service has keys) is kept in this tab's
// sessionStorage only, and sent as X-API-Key; thumbnails are fetched with it too.
"use strict";

const KEY_STORAGE = "dsmi-api-key";
const PAGE = 24;           // thumbnails per browse page
const UPLOAD_BATCH = 32;   // images per upload request (the service caps one request)

const $ = (id) => document.getElementById(id);
const state = { gallery: null, offset: 0, total: 0, files: [], probe: null };

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

function headers() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

// fetch + the service's error body ({"error": {"code", "message"}}) as an exception.
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body.error) message = `${body.error.message} (${body.error.code})`;
    } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function show(message, kind = "error") {
  const box = $("message");
  box.textContent = message;
  box.className = kind;
  box.hidden = !message;
}

function galleryPath(...parts) {
  return ["v1/galleries", ...parts.map(encodeURIComponent)].join("/");
}

// A thumbnail as an <img>: fetched with the key, shown from a blob URL.
const thumbCache = new Map();
function thumbnail(gallery, imageId) {
  const img = document.createElement("img");
  img.alt = imageId;
  img.loading = "lazy";
  const key = `${gallery}/${imageId}`;
  const load = thumbCache.get(key) || api(galleryPath(gallery, "images", imageId, "thumbnail"))
    .then((r) => r.blob()).then((b) => URL.createObjectURL(b));
  thumbCache.set(key, load);
  load.then((url) => { img.src = url; img.dataset.loaded = "1"; })
    .catch(() => { img.classList.add("missing"); img.dataset.loaded = "0"; });
  return img;
}

function card(gallery, fields, extra = {}) {
  const li = document.createElement("li");
  li.className = "card";
  li.dataset.imageId = fields.image_id;
  li.appendChild(thumbnail(gallery, fields.image_id));
  const caption = document.createElement("div");
  caption.className = "caption";
  for (const [label, value] of Object.entries(extra)) {
    const span = document.createElement("span");
    span.className = label;
    span.dataset.field = label;
    span.textContent = value;
    caption.appendChild(span);
  }
  for (const name of ["person_id", "camera_id"]) {
    const span = document.createElement("span");
    span.dataset.field = name;
    span.textContent = `${name === "person_id" ? "person" : "camera"} ${fields[name]}`;
    caption.appendChild(span);
  }
  li.appendChild(caption);
  return li;
}

// -- status and galleries -------------------------------------------------------------------

async function refreshStatus() {
  try {
    const r = await fetch("readyz");
    const body = await r.json();
    $("status").textContent = r.ok
      ? `model ${body.variant} (${body.model_id}) on ${body.providers[0]}, store: ${body.store}`
      : `not ready: ${body.error ? body.error.message : r.status}`;
  } catch (e) {
    $("status").textContent = `service unreachable: ${e.message}`;
  }
}

async function refreshGalleries() {
  const list = $("galleries");
  try {
    const body = await (await api("v1/galleries")).json();
    list.replaceChildren(...body.galleries.map((g) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.textContent = `${g.name} (${g.size})`;
      button.dataset.gallery = g.name;
      if (g.name === state.gallery) button.classList.add("selected");
      button.addEventListener("click", () => selectGallery(g.name));
      li.appendChild(button);
      return li;
    }));
    const current = body.galleries.find((g) => g.name === state.gallery);
    if (current) $("gallery-size").textContent = current.size;
    show("");
  } catch (e) {
    list.replaceChildren();
    show(e.status === 401 || e.status === 403
      ? `${e.message}: enter an API key above` : `Cannot list the galleries: ${e.message}`);
  }
}

function selectGallery(name) {
  state.gallery = name;
  state.offset = 0;
  $("work").hidden = false;
  $("gallery-name").textContent = name;
  $("results").replaceChildren();
  $("query-info").textContent = "";
  refreshGalleries();
  browse();
  updateButtons();
}

// -- browsing ---------------------------------------------------------------------------------

async function browse() {
  const grid = $("browse");
  if (!state.gallery) return;
  try {
    const r = await api(`${galleryPath(state.gallery, "images")}?offset=${state.offset}&limit=${PAGE}`);
    const body = await r.json();
    state.total = body.total;
    $("gallery-size").textContent = body.total;
    grid.replaceChildren(...body.images.map((image) => {
      const li = card(state.gallery, image);
      const del = document.createElement("button");
      del.className = "delete";
      del.title = "Delete this image";
      del.textContent = "×";
      del.dataset.testid = "delete-image";
      del.addEventListener("click", () => deleteImage(image.image_id));
      li.appendChild(del);
      return li;
    }));
    const last = Math.min(state.offset + body.images.length, body.total);
    $("page-info").textContent = body.total
      ? `${state.offset + 1}–${last} of ${body.total}` : "no images yet";
    $("prev-page").disabled = state.offset === 0;
    $("next-page").disabled = last >= body.total;
  } catch (e) {
    grid.replaceChildren();
    $("page-info").textContent = e.status === 404 ? "no images yet" : "";
    if (e.status !== 404) show(`Cannot list the gallery: ${e.message}`);
  }
}

async function deleteImage(imageId) {
  if (!confirm("Delete this image from the gallery?")) return;
  try {
    await api(galleryPath(state.gallery, "images", imageId), { method: "DELETE" });
    show("Image deleted.", "info");
    if (state.offset >= state.total - 1 && state.offset > 0) state.offset -= PAGE;
    await Promise.all([browse(), refreshGalleries()]);
    document.querySelectorAll(`#results [data-image-id="${imageId}"]`).forEach((el) => el.remove());
  } catch (e) { show(`Cannot delete the image: ${e.message}`); }
}

async function deleteGallery() {
  if (!state.gallery || !confirm(`Delete the gallery ${state.gallery} and all its images?`)) return;
  try {
    const body = await (await api(galleryPath(state.gallery), { method: "DELETE" })).json();
    show(`Gallery ${body.gallery} deleted (${body.deleted_images} images).`, "info");
    state.gallery = null;
    $("work").hidden = true;
    refreshGalleries();
  } catch (e) { show(`Cannot delete the gallery: ${e.message}`); }
}

// -- uploading --------------------------------------------------------------------------------

// "0001_c1_x.jpg" -> person "0001"; the camera from a "c<digits>" part when there is one.
function guessIds(name) {
  const stem = name.replace(/\.[^.]*$/, "");
  const parts = stem.split(/[_\-\s]+/);
  const camera = parts.slice(1).find((p) => /^c\d+$/i.test(p));
  return { person: parts[0] || stem, camera: camera ? camera.slice(1) : null };
}

function addFiles(fileList) {
  const images = [...fileList].filter((f) => f.type.startsWith("image/") || /\.(jpe?g|png|bmp|webp|tiff?|gif|ppm)$/i.test(f.name));
  const allCamera = $("all-camera").value.trim();
  for (const file of images) {
    const guess = guessIds(file.name);
    state.files.push({ file, person: $("all-person").value.trim() || guess.person,
                       camera: guess.camera || allCamera || "1" });
  }
  renderUploadTable();
}

function renderUploadTable() {
  const body = $("upload-table").querySelector("tbody");
  body.replaceChildren(...state.files.map((entry, k) => {
    const tr = document.createElement("tr");
    const img = document.createElement("img");
    img.src = URL.createObjectURL(entry.file);
    img.className = "preview";
    const cells = [img, document.createTextNode(entry.file.name)];
    for (const name of ["person", "camera"]) {
      const input = document.createElement("input");
      input.value = entry[name];
      input.dataset.field = name;
      input.addEventListener("input", () => { entry[name] = input.value; updateButtons(); });
      cells.push(input);
    }
    const remove = document.createElement("button");
    remove.textContent = "×";
    remove.title = "Leave this file out";
    remove.addEventListener("click", () => { state.files.splice(k, 1); renderUploadTable(); });
    cells.push(remove);
    for (const c of cells) { const td = document.createElement("td"); td.appendChild(c); tr.appendChild(td); }
    return tr;
  }));
  $("upload-table").hidden = state.files.length === 0;
  updateButtons();
}

async function upload() {
  const target = state.gallery;
  const files = state.files.slice();
  const progress = $("upload-progress");
  progress.hidden = false;
  progress.max = files.length;
  progress.value = 0;
  let stored = 0;
  try {
    for (let k = 0; k < files.length; k += UPLOAD_BATCH) {
      const form = new FormData();
      for (const entry of files.slice(k, k + UPLOAD_BATCH)) {
        form.append("images", entry.file, entry.file.name);
        form.append("person_id", entry.person.trim());
        form.append("camera_id", entry.camera.trim());
      }
      const body = await (await api(galleryPath(target, "images"), { method: "POST", body: form })).json();
      stored += body.count;
      progress.value = stored;
    }
    state.files = [];
    renderUploadTable();
    show(`${stored} images stored in ${target}.`, "info");
  } catch (e) {
    // Uploads are all or nothing per request: the files of the failed request stay listed.
    state.files = files.slice(stored);
    renderUploadTable();
    show(`Upload stopped after ${stored} images: ${e.message}`);
  } finally {
    progress.hidden = true;
    await Promise.all([refreshGalleries(), browse()]);
  }
}

// -- querying ---------------------------------------------------------------------------------

function setProbe(file) {
  if (!file) return;
  state.probe = file;
  const preview = $("probe-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const guess = guessIds(file.name);
  if (!$("probe-person").value) $("probe-person").value = guess.person;
  if (!$("probe-camera").value && guess.camera) $("probe-camera").value = guess.camera;
  updateButtons();
}

async function runQuery() {
  const form = new FormData();
  form.append("image", state.probe, state.probe.name);
  form.append("top_k", $("top-k").value || "10");
  const minProbability = $("min-probability").value.trim();
  if (minProbability) form.append("min_probability", minProbability);
  const camera = $("probe-camera").value.trim();
  if (camera) form.append("camera_id", camera);
  if ($("exclude-same").checked) form.append("exclude_same_camera", "true");
  const person = $("probe-person").value.trim();
  $("query").disabled = true;
  try {
    const body = await (await api(galleryPath(state.gallery, "query"), { method: "POST", body: form })).json();
    $("results").replaceChildren(...body.results.map((r) => {
      const extra = { rank: `#${r.rank}`, score: r.score.toFixed(3) };
      // The calibrated chance of a match: what an operator thresholds on.
      if (r.probability !== null && r.probability !== undefined) {
        extra.probability = `p ${(100 * r.probability).toFixed(0)}%`;
      }
      const li = card(state.gallery, r, extra);
      if (person && r.person_id === person) {
        li.classList.add("match");
        li.dataset.match = "1";
      }
      return li;
    }));
    const matches = person ? body.results.filter((r) => r.person_id === person).length : null;
    $("query-info").textContent = `${body.results.length} best of ${body.scored} images in ` +
      `${body.timings.total_ms.toFixed(0)} ms` +
      (matches === null ? "" : `; ${matches} of them are person ${person} (green)`);
    show("");
  } catch (e) {
    show(`Query failed: ${e.message}`);
  } finally { updateButtons(); }
}

// -- wiring -----------------------------------------------------------------------------------

function updateButtons() {
  const ready = state.files.length > 0 && state.files.every((f) => f.person.trim() && f.camera.trim());
  $("upload").disabled = !(state.gallery && ready);
  $("query").disabled = !(state.gallery && state.probe);
}

function dropZone(zone, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    onFiles(e.dataTransfer.files);
  });
}

function init() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    thumbCache.clear();
    refreshGalleries();
    if (state.gallery) browse();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    refreshGalleries();
  });
  $("new-gallery").addEventListener("submit", (e) => {
    e.preventDefault();
    selectGallery($("new-gallery-name").value.trim());
    $("new-gallery-name").value = "";
  });
  $("delete-gallery").addEventListener("click", deleteGallery);
  $("upload-files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  dropZone($("upload-drop"), addFiles);
  $("apply-all").addEventListener("click", () => {
    const person = $("all-person").value.trim();
    const camera = $("all-camera").value.trim();
    for (const entry of state.files) {
      if (person) entry.person = person;
      if (camera) entry.camera = camera;
    }
    renderUploadTable();
  });
  $("upload").addEventListener("click", upload);
  $("probe-file").addEventListener("change", (e) => setProbe(e.target.files[0]));
  dropZone($("probe-drop"), (files) => setProbe(files[0]));
  $("query").addEventListener("click", runQuery);
  $("prev-page").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); browse(); });
  $("next-page").addEventListener("click", () => { state.offset += PAGE; browse(); });
  refreshStatus();
  refreshGalleries();
}

document.addEventListener("DOMContentLoaded", init);
