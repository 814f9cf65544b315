// RepServe try-it page: list tasks, classify dropped or chosen images, show top-k with score bars.
// Plain browser JS, no dependencies. Everything from the server (task names, labels, error details) is
// user data: it reaches the page through textContent and attributes only, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "repserve.token";
  const SAMPLE_LABELS = 5;

  const $ = (id) => document.getElementById(id);
  const el = {
    tokenSection: $("token-section"), tokenReason: $("token-reason"), tokenForm: $("token-form"),
    token: $("token"), tokenForget: $("token-forget"),
    form: $("classify-form"), task: $("task"), topK: $("top-k"), button: $("classify-button"),
    dropZone: $("drop-zone"), files: $("files"), fileSummary: $("file-summary"),
    status: $("status"), error: $("error"), latency: $("latency"), results: $("results"),
    tasksBody: $("tasks-body"), reloadTasks: $("reload-tasks"),
  };

  /** @type {File[]} */
  let chosen = [];
  let previews = [];     // object URLs of the shown thumbnails (revoked when replaced)
  let inFlight = null;   // AbortController of the running classification
  let requestSeq = 0;    // answers of superseded requests are ignored
  const labelCounts = new Map(); // task name -> number of labels (how many rows an answer will have)

  // ---- small DOM helpers (text only) --------------------------------------------------------------
  function node(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c); // strings become text nodes
    return e;
  }

  // ---- token --------------------------------------------------------------------------------------
  function storedToken() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
  }

  function storeToken(value) {
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
    } catch { /* storage disabled: the token lives in the field only */ }
  }

  function currentToken() { return el.token.value.trim() || storedToken(); }

  function askForToken(apiError) {
    el.tokenSection.hidden = false;
    const given = currentToken() !== "";
    el.tokenReason.textContent = (given ? "The server refused this token: " : "This server needs a token: ")
      + `${apiError.status} ${apiError.code}: ${apiError.detail}`;
    el.token.focus();
  }

  // ---- API ----------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, code, detail) {
      super(`${status} ${code}: ${detail}`);
      this.status = status; this.code = code; this.detail = detail;
    }
  }

  /** fetch with the bearer token; JSON back, or an ApiError carrying the server's {error, detail}. */
  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    headers.set("Accept", "application/json");
    const token = currentToken();
    if (token) headers.set("Authorization", `Bearer ${token}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers, cache: "no-store" });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "network_error", `the server could not be reached (${e.message})`);
    }
    const text = await response.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch { body = null; }
    if (!response.ok) {
      const code = body && typeof body.error === "string" ? body.error : `http_${response.status}`;
      let detail;
      if (body && body.detail !== undefined) {
        detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      } else {
        detail = text.trim().slice(0, 500) || response.statusText || "no detail";
      }
      throw new ApiError(response.status, code, detail);
    }
    if (body === null) throw new ApiError(response.status, "bad_response", "the server's answer is not JSON");
    return body;
  }

  function showError(err) {
    if (err instanceof ApiError) {
      el.error.replaceChildren(node("span", { class: "code", text: `${err.status || ""} ${err.code}`.trim() }),
        ": ", err.detail);
      if (err.status === 401 || err.status === 403) askForToken(err);
    } else {
      el.error.replaceChildren(node("span", { class: "code", text: "error" }), ": ", String(err && err.message || err));
    }
    el.error.hidden = false;
    el.status.textContent = "";
  }

  function clearError() {
    el.error.hidden = true;
    el.error.replaceChildren();
  }

  // ---- tasks --------------------------------------------------------------------------------------
  function accuracy(metrics) {
    for (const [key, what] of [["test_accuracy", "test set"], ["val_accuracy", "validation set"],
      ["accuracy", "accuracy"]]) {
      const v = metrics ? metrics[key] : undefined;
      if (typeof v === "number" && Number.isFinite(v)) return { text: `${(v * 100).toFixed(1)}%`, title: `${key} (${what})` };
    }
    return { text: "—", title: "no accuracy in the task's metrics" };
  }

  function labelsCell(task) {
    const sample = Array.isArray(task.first_labels) ? task.first_labels.slice(0, SAMPLE_LABELS) : [];
    const more = task.num_labels > sample.length ? ", …" : "";
    return node("td", {}, node("span", { class: "count", text: String(task.num_labels) }),
      ...(sample.length ? [": ", node("span", { class: "sample", text: sample.join(", ") + more })] : []));
  }

  function renderTasks(tasks) {
    if (!tasks.length) {
      el.tasksBody.replaceChildren(node("tr", {}, node("td", { colspan: "5", class: "muted", text: "No tasks yet." })));
      return;
    }
    el.tasksBody.replaceChildren(...tasks.map((t) => {
      const acc = accuracy(t.metrics);
      return node("tr", { "data-task": t.name },
        node("th", { scope: "row" }, t.name),
        labelsCell(t),
        node("td", { class: "num", text: String(t.version) }),
        node("td", {}, t.method, ...(t.builtin ? [" ", node("span", { class: "builtin", text: "built-in" })] : [])),
        node("td", { class: "num", title: acc.title, text: acc.text }));
    }));
  }

  function fillTaskSelect(tasks) {
    const previous = el.task.value;
    el.task.replaceChildren(...tasks.map((t) => node("option", { value: t.name, text: t.name })));
    if (!tasks.length) el.task.append(node("option", { value: "", text: "No tasks" }));
    const keep = tasks.find((t) => t.name === previous);
    if (keep) el.task.value = keep.name;
    el.task.disabled = tasks.length === 0;
  }

  async function loadTasks() {
    el.reloadTasks.disabled = true;
    try {
      const body = await api("/tasks");
      const tasks = Array.isArray(body.tasks) ? body.tasks : [];
      labelCounts.clear();
      for (const t of tasks) labelCounts.set(t.name, t.num_labels);
      fillTaskSelect(tasks);
      renderTasks(tasks);
      clearError();
      document.body.dataset.tasksLoaded = "true";
      return true;
    } catch (e) {
      el.tasksBody.replaceChildren(node("tr", {}, node("td", { colspan: "5", class: "muted",
        text: "Tasks could not be listed (see the message above)." })));
      showError(e);
      return false;
    } finally {
      el.reloadTasks.disabled = false;
    }
  }

  // ---- files --------------------------------------------------------------------------------------
  function choose(fileList, origin) {
    const all = Array.from(fileList || []);
    const images = all.filter((f) => !f.type || f.type.startsWith("image/"));
    const skipped = all.length - images.length;
    if (!images.length) {
      el.fileSummary.textContent = skipped ? `${skipped} file(s) skipped: not images.` : "No images chosen.";
      return;
    }
    chosen = images;
    const names = images.map((f) => f.name).join(", ");
    el.fileSummary.textContent = `${images.length} image${images.length === 1 ? "" : "s"} ${origin}: ${names}`
      + (skipped ? ` (${skipped} non-image file(s) skipped)` : "");
    classify();
  }

  function setPreviews() {
    for (const url of previews) URL.revokeObjectURL(url);
    previews = chosen.map((f) => URL.createObjectURL(f));
  }

  // ---- classification -----------------------------------------------------------------------------
  function topK() {
    const k = Number.parseInt(el.topK.value, 10);
    return Number.isFinite(k) && k >= 1 ? Math.min(k, 1000) : 5;
  }

  function predictionRow(label, score) {
    const pct = Math.max(0, Math.min(1, score)) * 100;
    const fill = node("div", { class: "bar-fill" });
    fill.style.width = `${pct.toFixed(2)}%`; // CSSOM, allowed by the page's style-src 'self'
    return node("li", { class: "prediction", "data-score": String(score) },
      node("span", { class: "label", title: label, text: label }),
      node("div", { class: "bar", "aria-hidden": "true" }, fill),
      node("span", { class: "score", text: `${pct.toFixed(1)}%` }));
  }

  function pendingRow() {
    return node("li", { class: "prediction pending", "aria-hidden": "true" },
      node("span", { class: "label", text: "\u00a0" }), node("div", { class: "bar" }), node("span", { class: "score" }));
  }

  function card(index, rows, state) {
    const file = chosen[index];
    const name = file ? file.name : `image ${index + 1}`;
    return node("li", { class: `result ${state}`, "data-index": String(index) },
      node("img", { class: "thumb", src: previews[index] || "", alt: name, width: "128", height: "128" }),
      node("div", {}, node("h3", { text: name }), node("ol", { class: "predictions", "aria-label": `Top labels for ${name}` },
        ...rows)));
  }

  function ms(v) { return typeof v === "number" && Number.isFinite(v) ? `${v < 10 ? v.toFixed(1) : Math.round(v)} ms` : "?"; }

  function showLatency(browserMs, body) {
    const parts = [node("span", {}, "Round trip ", node("strong", { id: "latency-browser", text: ms(browserMs) }),
      " (this browser)")];
    const t = body && body.timings;
    if (t && typeof t.total_ms === "number") {
      parts.push(" · server ", node("strong", { id: "latency-server", text: ms(t.total_ms) }),
        ` (decode ${ms(t.decode_ms)}, queue ${ms(t.queue_ms)}, load ${ms(t.load_ms)}, inference ${ms(t.inference_ms)})`);
    }
    if (body && body.task) parts.push(` · ${body.task} v${body.task_version}`);
    el.latency.replaceChildren(...parts);
  }

  async function classify() {
    const task = el.task.value;
    if (!chosen.length) {
      el.status.textContent = "Choose or drop images first.";
      el.files.focus();
      return;
    }
    if (!task) {
      el.status.textContent = "No task to classify with: the task list did not load.";
      return;
    }
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    const seq = ++requestSeq;
    const k = topK();
    const rows = Math.min(k, labelCounts.get(task) || k, 20);
    setPreviews();
    clearError();
    el.latency.replaceChildren();
    el.results.setAttribute("aria-busy", "true");
    el.results.replaceChildren(...chosen.map((_, i) => card(i, Array.from({ length: rows }, pendingRow), "pending")));
    el.status.textContent = `Classifying ${chosen.length} image${chosen.length === 1 ? "" : "s"} with ${task}…`;
    el.button.disabled = true;

    const form = new FormData();
    for (const f of chosen) form.append("files", f, f.name);
    const url = `/classify?task=${encodeURIComponent(task)}&top_k=${k}`;
    const start = performance.now();
    try {
      const body = await api(url, { method: "POST", body: form, signal: controller.signal });
      const elapsed = performance.now() - start;
      if (seq !== requestSeq) return;
      const results = Array.isArray(body.results) ? body.results : [];
      el.results.replaceChildren(...results.map((r) => card(r.index,
        (r.predictions || []).map((p) => predictionRow(String(p.label), Number(p.score))), "done")));
      showLatency(elapsed, body);
      el.status.textContent = `${results.length} image${results.length === 1 ? "" : "s"} classified with ${body.task}.`;
    } catch (e) {
      if (e.name === "AbortError" || seq !== requestSeq) return;
      el.results.replaceChildren();
      showError(e);
    } finally {
      if (seq === requestSeq) {
        el.results.removeAttribute("aria-busy");
        el.button.disabled = false;
        inFlight = null;
      }
    }
  }

  // ---- wiring -------------------------------------------------------------------------------------
  el.form.addEventListener("submit", (ev) => { ev.preventDefault(); classify(); });
  el.files.addEventListener("change", () => { choose(el.files.files, "chosen"); });

  el.dropZone.addEventListener("click", (ev) => {
    if (ev.target === el.files || ev.target.closest("label")) return; // the label opens the picker itself
    el.files.click();
  });
  for (const type of ["dragenter", "dragover"]) {
    el.dropZone.addEventListener(type, (ev) => {
      ev.preventDefault();
      if (ev.dataTransfer) ev.dataTransfer.dropEffect = "copy";
      el.dropZone.classList.add("dragging");
    });
  }
  el.dropZone.addEventListener("dragleave", (ev) => {
    if (!el.dropZone.contains(ev.relatedTarget)) el.dropZone.classList.remove("dragging");
  });
  el.dropZone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    el.dropZone.classList.remove("dragging");
    if (ev.dataTransfer) choose(ev.dataTransfer.files, "dropped");
  });
  // A file dropped beside the zone must not navigate away from the page.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());

  el.tokenForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const value = el.token.value.trim();
    if (!value) { el.token.focus(); return; }
    storeToken(value);
    el.tokenReason.textContent = "Checking the token…";
    if (await loadTasks()) {
      el.tokenReason.textContent = "Token accepted.";
      if (chosen.length) classify();
    }
  });
  el.tokenForget.addEventListener("click", () => {
    storeToken("");
    el.token.value = "";
    el.tokenReason.textContent = "Token forgotten.";
    el.token.focus();
  });
  el.reloadTasks.addEventListener("click", () => { loadTasks(); });
  el.task.addEventListener("change", () => { if (chosen.length) classify(); });

  el.token.value = storedToken();
  if (el.token.value) el.tokenSection.hidden = false;
  loadTasks();
})();
