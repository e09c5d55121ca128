"use strict";
// The search page: no build step, no external assets. Every text from the server is put in the
// page with textContent (never innerHTML), so a file name or caption cannot inject markup.
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { query: null, results: [], offset: 0, done: false, busy: false };

  function params() {
    const p = { index: $("index").value, k: $("k").value };
    if ($("dedup-on").checked) p.dedup = $("dedup").value;
    return p;
  }

  function setUrl() {
    const u = new URLSearchParams();
    const q = state.query;
    if (q.text !== undefined) u.set("q", q.text);
    if (q.similar !== undefined) u.set("similar", q.similar);
    const p = params();
    if (p.index) u.set("index", p.index);
    u.set("k", p.k);
    if (p.dedup) u.set("dedup", p.dedup);
    history.replaceState(null, "", q.image ? location.pathname : "?" + u.toString());
  }

  async function request(offset) {
    const p = Object.assign(params(), { offset: String(offset) });
    const q = state.query;
    let resp;
    if (q.image) {
      const form = new FormData();
      form.append("image", q.image);
      for (const [key, v] of Object.entries(p)) form.append(key, v);
      resp = await fetch("/api/search", { method: "POST", body: form });
    } else if (q.similar !== undefined) {
      const [idx, row] = q.similar.split("/");
      p.index = idx;
      resp = await fetch(`/api/similar/${encodeURIComponent(idx)}/${encodeURIComponent(row)}?` +
        new URLSearchParams(p));
    } else {
      resp = await fetch("/api/search?" + new URLSearchParams(Object.assign({ q: q.text }, p)));
    }
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error || resp.statusText);
    return body;
  }

  async function run(query) {
    state.query = query;
    state.results = [];
    state.offset = 0;
    state.done = false;
    $("results").replaceChildren();
    setUrl();
    await page();
  }

  async function page() {
    if (state.busy || state.done || !state.query) return;
    state.busy = true;
    $("status").className = "";
    $("status").textContent = "searching\u2026";
    try {
      const body = await request(state.offset);
      const k = Number(body.k);
      body.results.forEach((r) => $("results").appendChild(card(r, body.index)));
      state.results.push(...body.results.map((r) => Object.assign({ index: body.index }, r)));
      state.offset += k;
      state.done = body.results.length < k;
      const t = body.timings_ms;
      $("status").textContent = `${state.results.length} results from ${body.index} ` +
        `(encode ${t.encode.toFixed(1)} ms, search ${t.search.toFixed(1)} ms)`;
    } catch (e) {
      state.done = true;
      $("status").className = "error";
      $("status").textContent = "error: " + e.message;
    } finally {
      state.busy = false;
      $("more").hidden = state.done;
      $("export-json").disabled = $("export-csv").disabled = state.results.length === 0;
    }
  }

  function card(r, index) {
    const el = document.createElement("figure");
    el.className = "card";
    const a = document.createElement("a");
    a.className = "thumb";
    a.href = r.file;
    a.target = "_blank";
    a.rel = "noopener";
    const img = document.createElement("img");
    img.src = r.thumbnail;
    img.alt = r.name;
    img.loading = "lazy";
    a.appendChild(img);
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = r.score.toFixed(4);
    meta.appendChild(score);
    if (r.caption) {
      const c = document.createElement("div");
      c.className = "caption";
      c.textContent = r.caption;
      meta.appendChild(c);
    }
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = r.name;
    name.title = r.path;
    meta.appendChild(name);
    const more = document.createElement("button");
    more.type = "button";
    more.className = "more-like";
    more.textContent = "more like this";
    more.addEventListener("click", () => {
      $("q").value = "";
      run({ similar: `${index}/${r.id}` });
    });
    el.append(a, meta, more);
    return el;
  }

  function searchImage(file) {
    if (!file || !file.type.startsWith("image/")) return;
    $("q").value = "";
    run({ image: file });
  }

  function download(name, type, text) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], { type }));
    a.download = name;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  function csvField(v) {
    const s = v === null || v === undefined ? "" : String(v);
    // a leading = + - @ would be a formula in a spreadsheet: prefix it
    const safe = /^[=+\-@\t\r]/.test(s) ? "'" + s : s;
    return '"' + safe.replace(/"/g, '""') + '"';
  }

  async function init() {
    const indexes = await (await fetch("/api/indexes")).json();
    const sel = $("index");
    for (const ix of indexes) {
      const o = document.createElement("option");
      o.value = ix.name;
      o.textContent = `${ix.name} (${ix.count})`;
      sel.appendChild(o);
    }
    sel.hidden = indexes.length < 2;
    const u = new URLSearchParams(location.search);
    if (u.get("index")) sel.value = u.get("index");
    if (u.get("k")) $("k").value = u.get("k");
    if (u.get("dedup")) {
      $("dedup-on").checked = true;
      $("dedup").value = u.get("dedup");
    }
    $("search-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("q").value.trim();
      if (text) run({ text });
    });
    $("upload").addEventListener("change", (e) => searchImage(e.target.files[0]));
    for (const id of ["index", "k", "dedup-on", "dedup"]) {
      $(id).addEventListener("change", () => state.query && !state.query.image && run(state.query));
    }
    $("more").addEventListener("click", page);
    new IntersectionObserver((es) => es[0].isIntersecting && page()).observe($("more"));
    document.addEventListener("dragover", (e) => {
      e.preventDefault();
      document.body.classList.add("dragging");
    });
    document.addEventListener("dragleave", (e) => {
      if (!e.relatedTarget) document.body.classList.remove("dragging");
    });
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      document.body.classList.remove("dragging");
      searchImage(e.dataTransfer.files[0]);
    });
    document.addEventListener("paste", (e) => {
      const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
      if (item) searchImage(item.getAsFile());
    });
    $("export-json").addEventListener("click", () => {
      const rows = state.results.map((r) => ({
        index: r.index, id: r.id, score: r.score, path: r.path, caption: r.caption, key: r.key,
      }));
      download("results.json", "application/json", JSON.stringify(rows, null, 1));
    });
    $("export-csv").addEventListener("click", () => {
      const head = ["index", "id", "score", "path", "caption", "key"];
      const lines = [head.join(",")].concat(
        state.results.map((r) => head.map((h) => csvField(r[h])).join(",")));
      download("results.csv", "text/csv", lines.join("\r\n") + "\r\n");
    });
    if (u.get("q")) {
      $("q").value = u.get("q");
      run({ text: u.get("q") });
    } else if (u.get("similar")) {
      run({ similar: u.get("similar") });
    }
  }

  document.addEventListener("DOMContentLoaded", init);
})();
