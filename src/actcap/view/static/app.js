// actcap view: the page. Plain JavaScript, no framework; charts by the vendored Chart.js.
// Every text that comes from a run (ids, prompts, answers, tokens, names) is put in the page with
// textContent or as a text node, never as HTML.
"use strict";

(() => {
  const main = document.getElementById("main");
  const nav = document.getElementById("nav");
  const tooltip = document.getElementById("tooltip");
  const modelState = document.getElementById("model-state");
  const PAGE = 50;
  const state = { runs: [], compare: false, tables: [], summaries: [], compareTable: null };
  let charts = [];
  let renderId = 0;

  // ---- small helpers -------------------------------------------------------------------------

  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = String(v);
      else if (k === "dataset") Object.assign(e.dataset, v);
      else if (k === "style") e.style.cssText = v; // CSSOM: allowed by the page's style-src 'self'

      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  async function api(path, params) {
    const query = new URLSearchParams(params || {}).toString();
    const response = await fetch(path + (query ? "?" + query : ""));
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    return data;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "\u2013";
    if (typeof x !== "number") return String(x);
    const d = digits === undefined ? 4 : digits;
    return Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : x.toFixed(d).replace(/\.?0+$/, "") || "0";
  }

  function pct(x) { return typeof x === "number" ? (100 * x).toFixed(1) + "%" : "unknown"; }

  function gradeBadge(correct) {
    if (correct === true) return el("span", { class: "badge right", text: "right" });
    if (correct === false) return el("span", { class: "badge wrong", text: "wrong" });
    return el("span", { class: "badge", text: "ungraded" });
  }

  function visible(text) {
    // Whitespace made visible in token strips and lens tables.
    return String(text).replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/\r/g, "\u240d");
  }

  function errorBox(message) { return el("div", { class: "error", text: message }); }

  function showTooltip(event, text) {
    tooltip.textContent = text;
    tooltip.hidden = false;
    const x = Math.min(event.clientX + 14, window.innerWidth - 440);
    tooltip.style.left = Math.max(0, x) + "px";
    tooltip.style.top = event.clientY + 14 + "px";
  }
  function hideTooltip() { tooltip.hidden = true; }

  function hashFor(...parts) { return "#/" + parts.map((p) => encodeURIComponent(String(p))).join("/"); }

  function chart(canvas, config) {
    config.options = Object.assign({ animation: false, responsive: true, maintainAspectRatio: false }, config.options || {});
    const c = new Chart(canvas, config);
    charts.push(c);
    return c;
  }

  // ---- colours -------------------------------------------------------------------------------

  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const DIVERGING = [[59, 76, 192], [141, 176, 254], [242, 242, 242], [244, 154, 123], [180, 4, 38]];
  function ramp(stops, t) {
    const x = Math.max(0, Math.min(1, t)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(x));
    const f = x - i;
    const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function scaleFor(values, kind, log) {
    const flat = [];
    for (const row of values) if (row) for (const v of row) if (v !== null) flat.push(log ? Math.log10(Math.max(v, 1e-6)) : v);
    if (!flat.length) return { colour: () => "#ddd", lo: 0, hi: 0, stops: VIRIDIS, clipped: false };
    // The colour range stops at three times the 90th percentile (of |value|, or above the
    // minimum), so a few outliers (an attention sink's "massive activation") do not wash out
    // every other cell; they show in the end colours.
    const at = (xs, q) => xs[Math.min(xs.length - 1, Math.round(q * (xs.length - 1)))];
    let lo, hi, clipped;
    if (kind === "diverging") {
      const mags = flat.map(Math.abs).sort((a, b) => a - b);
      const top = mags[mags.length - 1];
      const m = Math.min(top, 3 * at(mags, 0.9)) || top || 1;
      lo = -m; hi = m; clipped = m < top;
    } else {
      flat.sort((a, b) => a - b);
      lo = flat[0];
      const top = flat[flat.length - 1];
      hi = Math.min(top, lo + 3 * (at(flat, 0.9) - lo));
      if (!(hi > lo)) hi = top;
      clipped = hi < top;
    }
    const span = hi - lo || 1;
    const stops = kind === "diverging" ? DIVERGING : VIRIDIS;
    return {
      colour: (v) => (v === null ? "#d0d0d0" : ramp(stops, ((log ? Math.log10(Math.max(v, 1e-6)) : v) - lo) / span)),
      lo, hi, stops, clipped,
    };
  }

  function legend(scale, label) {
    const c = el("canvas", { width: 160, height: 10 });
    const ctx = c.getContext("2d");
    for (let i = 0; i < 160; i++) { ctx.fillStyle = ramp(scale.stops, i / 159); ctx.fillRect(i, 0, 1, 10); }
    const lo = (scale.clipped ? "\u2264 " : "") + fmt(scale.lo, 3), hi = (scale.clipped ? "\u2265 " : "") + fmt(scale.hi, 3);
    return el("div", { class: "legend" }, el("span", { text: lo }), c, el("span", { text: hi }),
      el("span", { text: label + (scale.clipped ? " (a few outlying cells take the end colours; hover for any value)" : "") }));
  }

  // ---- the grid (heatmap, similarity matrix) -------------------------------------------------

  function grid(canvas, opts) {
    // opts: rows, cols, cw, ch, left, top, colour(r, c), label(r), onHover(r, c, ev), onClick(r, c), mark(c)
    const ctx = canvas.getContext("2d");
    canvas.width = opts.left + opts.cols * opts.cw + 2;
    canvas.height = opts.top + opts.rows * opts.ch + 2;
    function draw() {
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      ctx.font = "11px system-ui, sans-serif";
      ctx.textBaseline = "middle";
      for (let r = 0; r < opts.rows; r++) {
        if (opts.label) { ctx.fillStyle = "#444"; ctx.fillText(opts.label(r), 2, opts.top + r * opts.ch + opts.ch / 2, opts.left - 4); }
        for (let c = 0; c < opts.cols; c++) {
          ctx.fillStyle = opts.colour(r, c);
          ctx.fillRect(opts.left + c * opts.cw, opts.top + r * opts.ch, opts.cw, opts.ch);
        }
      }
      if (opts.decorate) opts.decorate(ctx);
      const m = opts.mark ? opts.mark() : null;
      if (m !== null && m !== undefined && m >= 0) {
        ctx.strokeStyle = "#ff2d55"; ctx.lineWidth = 2;
        ctx.strokeRect(opts.left + m * opts.cw + 1, opts.top + 1, Math.max(1, opts.cw - 2), opts.rows * opts.ch - 2);
      }
    }
    function cellAt(ev) {
      const box = canvas.getBoundingClientRect();
      const x = ev.clientX - box.left - opts.left, y = ev.clientY - box.top - opts.top;
      const c = Math.floor(x / opts.cw), r = Math.floor(y / opts.ch);
      return r >= 0 && r < opts.rows && c >= 0 && c < opts.cols ? [r, c] : null;
    }
    canvas.addEventListener("mousemove", (ev) => { const rc = cellAt(ev); if (rc) opts.onHover(rc[0], rc[1], ev); else hideTooltip(); });
    canvas.addEventListener("mouseleave", hideTooltip);
    canvas.addEventListener("click", (ev) => { const rc = cellAt(ev); if (rc && opts.onClick) opts.onClick(rc[0], rc[1]); });
    draw();
    return { draw };
  }

  // ---- navigation ----------------------------------------------------------------------------

  function renderNav(route) {
    nav.textContent = "";
    const run = route.run;
    const links = [];
    state.runs.forEach((r, i) => links.push([hashFor("r" + i), `Run: ${r.label}`, route.view !== "compare" && route.view !== "layers" && run === i]));
    links.push([hashFor("r" + run, "layers"), "Layers", route.view === "layers"]);
    if (state.compare) links.push([hashFor("compare"), "Compare runs", route.view === "compare"]);
    for (const [href, text, active] of links) nav.append(el("a", { href, text, class: active ? "active" : "" }));
  }

  function parseRoute() {
    const parts = location.hash.replace(/^#\/?/, "").split("/").filter((p) => p !== "").map((p) => decodeURIComponent(p));
    const route = { view: "run", run: 0, args: [] };
    if (parts[0] === "compare") {
      route.view = "compare"; route.args = parts.slice(1);
      return route;
    }
    if (parts[0] && /^r\d+$/.test(parts[0])) route.run = Math.min(Number(parts[0].slice(1)), state.runs.length - 1);
    if (parts[1] === "q" && parts.length >= 3) { route.view = "question"; route.args = [parts.slice(2).join("/")]; }
    else if (parts[1] === "layers") route.view = "layers";
    else if (parts[1] === "pair" && parts.length >= 4) { route.view = "pair"; route.args = [parts[2], parts[3]]; }
    return route;
  }

  async function render() {
    const id = ++renderId;
    for (const c of charts) c.destroy();
    charts = [];
    hideTooltip();
    const route = parseRoute();
    renderNav(route);
    main.dataset.state = "loading";
    main.dataset.view = route.view;
    const page = el("div");
    try {
      if (route.view === "run") await runPage(page, route.run);
      else if (route.view === "question") await questionPage(page, route.run, route.args[0]);
      else if (route.view === "layers") await layersPage(page, route.run);
      else if (route.view === "pair") await pairPage(page, route.run, route.args[0], route.args[1]);
      else if (route.view === "compare") await comparePage(page, route.args);
    } catch (e) {
      if (id !== renderId) return;
      page.append(errorBox(String(e.message || e)));
    }
    if (id !== renderId) return;
    main.textContent = "";
    main.append(page);
    main.dataset.state = "ready";
    for (const fn of page._after || []) fn();
  }

  function after(page, fn) { (page._after = page._after || []).push(fn); }

  // ---- run page ------------------------------------------------------------------------------

  async function summary(run) {
    if (!state.summaries[run]) state.summaries[run] = await api("/api/summary", { run });
    return state.summaries[run];
  }

  async function runPage(page, run) {
    const s = await summary(run);
    page.append(el("h1", { text: s.label }));
    const score = s.score || {};
    const v = s.verification;
    let verdict = el("span", { class: "note", text: "not verified" });
    if (v) {
      const cls = v.passed === true ? "badge right" : v.passed === false ? "badge wrong" : "badge";
      const word = v.passed === true ? "passed" : v.passed === false ? "FAILED" : "not run";
      verdict = el("span", {}, el("span", { class: cls, id: "verification", text: word }),
        ` ${v.n_checked ?? 0} of ${v.n_samples ?? "?"} samples re-checked`,
        ...(v.problems || []).map((p) => el("div", { class: "note", text: p })));
    }
    const overview = el("div", { class: "card" },
      el("div", { class: "note", text: "accuracy" }),
      el("div", { class: "big", id: "accuracy", text: typeof score.accuracy === "number" ? score.accuracy.toFixed(3) : "unknown" }),
      el("div", { class: "note", text: `${score.n_correct ?? 0} right of ${score.n ?? 0} graded; ${s.n_samples} questions, ${s.n_captured} with activations` + (s.finished ? "" : " (unfinished: no results.json)") }));
    const about = el("div", { class: "card" }, el("dl", { class: "kv" },
      el("dt", { text: "model" }), el("dd", { text: s.model ?? "\u2013" }),
      el("dt", { text: "benchmark" }), el("dd", { id: "benchmark", text: s.benchmark ?? "\u2013" }),
      el("dt", { text: "started" }), el("dd", { text: s.started ?? "\u2013" }),
      el("dt", { text: "storage" }), el("dd", { text: s.storage ?? "\u2013" }),
      el("dt", { text: "sites" }), el("dd", { text: `${(s.sites || []).length} (${(s.sites || []).slice(0, 3).join(", ")}${(s.sites || []).length > 3 ? ", \u2026" : ""})` }),
      el("dt", { text: "verification" }), el("dd", {}, verdict)));
    const opts = el("dl", { class: "kv" });
    for (const [k, val] of Object.entries(Object.assign({}, s.options || {}, s.capture ? { capture: JSON.stringify(s.capture) } : {}, s.compute ? { compute: JSON.stringify(s.compute) } : {}))) {
      opts.append(el("dt", { text: k }), el("dd", { text: typeof val === "object" && val !== null ? JSON.stringify(val) : String(val) }));
    }
    const options = el("div", { class: "card" }, el("details", {}, el("summary", { text: `options (${opts.children.length / 2})` }), opts));
    page.append(el("div", { class: "cards" }, overview, about, options));

    const cats = Object.entries(score.per_category || {});
    if (cats.length > 1) {
      const body = el("tbody");
      for (const [name, c] of cats) {
        body.append(el("tr", {}, el("td", { text: name }), el("td", { class: "num", text: `${c.n_correct ?? "?"}/${c.n ?? "?"}` }),
          el("td", { class: "num", text: pct(c.accuracy) }),
          el("td", { style: "width:40%" }, el("div", { class: "bar", style: `width:${Math.round(100 * (c.accuracy || 0))}%` }))));
      }
      page.append(el("h2", { text: "Accuracy by category" }),
        el("table", { id: "categories" }, el("thead", {}, el("tr", {}, el("th", { text: "category" }), el("th", { text: "right" }), el("th", { text: "accuracy" }), el("th", {}))), body));
    }
    page.append(el("h2", { text: "Questions" }));
    await questionTable(page, run, s);
  }

  async function questionTable(page, run, s) {
    const t = state.tables[run] = state.tables[run] || { grade: "all", category: "", q: "", sort: "order", desc: false, offset: 0 };
    const grade = el("select", { id: "grade" });
    for (const [value, text] of [["all", "all"], ["right", "right"], ["wrong", "wrong"], ["ungraded", "ungraded"]]) grade.append(new Option(text, value));
    grade.value = t.grade;
    const category = el("select", { id: "category" });
    category.append(new Option("all categories", ""));
    for (const c of s.categories || []) category.append(new Option(c, c));
    category.value = t.category;
    const search = el("input", { type: "search", id: "search", placeholder: "search id, question, answer" });
    search.value = t.q;
    const info = el("span", { id: "pageinfo", class: "note" });
    const prev = el("button", { id: "prev", text: "\u2190 previous" });
    const next = el("button", { id: "next", text: "next \u2192" });
    const head = el("tr");
    const columns = [["id", "id"], ["category", "category"], ["question", "question"], ["response", "answer"], ["reference", "reference"], ["correct", "grade"], ["score", "score"]];
    for (const [key, label] of columns) {
      const th = el("th", { class: "sortable", text: label, dataset: { sort: key } });
      if (t.sort === key) th.classList.add("sorted");
      if (t.sort === key && t.desc) th.classList.add("desc");
      th.addEventListener("click", () => {
        if (t.sort === key) t.desc = !t.desc; else { t.sort = key; t.desc = false; }
        t.offset = 0;
        for (const other of head.children) other.classList.remove("sorted", "desc");
        th.classList.add("sorted"); if (t.desc) th.classList.add("desc");
        load();
      });
      head.append(th);
    }
    const body = el("tbody");
    const table = el("table", { id: "questions" }, el("thead", {}, head), body);
    page.append(el("div", { class: "controls" }, el("label", { text: "grade" }), grade, el("label", { text: "category" }), category, search),
      table, el("div", { class: "pager" }, prev, next, info));

    let loadId = 0;
    async function load() {
      const mine = ++loadId;
      table.dataset.state = "loading";
      const data = await api("/api/samples", { run, grade: t.grade, category: t.category, q: t.q, sort: t.sort, desc: t.desc ? 1 : 0, offset: t.offset, limit: PAGE });
      if (mine !== loadId) return;
      body.textContent = "";
      for (const r of data.rows) {
        const tr = el("tr", { class: "clickable", dataset: { id: r.id } },
          el("td", { text: r.id }), el("td", { text: r.category }), el("td", { class: "text", text: r.question }),
          el("td", { class: "text", text: r.response }), el("td", { class: "text", text: r.reference }),
          el("td", {}, gradeBadge(r.correct)), el("td", { class: "num", text: fmt(r.score, 3) }));
        tr.addEventListener("click", () => { location.hash = hashFor("r" + run, "q", r.id); });
        body.append(tr);
      }
      const end = Math.min(data.offset + data.rows.length, data.matched);
      info.textContent = data.matched ? `${data.offset + 1}\u2013${end} of ${data.matched.toLocaleString()} (of ${data.total.toLocaleString()})` : `none of ${data.total.toLocaleString()} match`;
      prev.disabled = data.offset <= 0;
      next.disabled = end >= data.matched;
      table.dataset.state = "ready";
      table.dataset.matched = String(data.matched);
    }
    grade.addEventListener("change", () => { t.grade = grade.value; t.offset = 0; load(); });
    category.addEventListener("change", () => { t.category = category.value; t.offset = 0; load(); });
    let timer = null;
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { t.q = search.value; t.offset = 0; load(); }, 250); });
    prev.addEventListener("click", () => { t.offset = Math.max(0, t.offset - PAGE); load(); });
    next.addEventListener("click", () => { t.offset += PAGE; load(); });
    await load();
  }

  // ---- one question --------------------------------------------------------------------------

  function recordCard(d, title, link) {
    const r = d.record || {};
    const box = el("div", { class: "card question" });
    if (title) box.append(el("h2", { text: title }));
    box.append(el("h1", { class: "qid", text: d.id }));
    if (link) box.append(el("p", {}, el("a", { href: link, text: "open this question \u2192" })));
    const texts = el("div", { class: "texts" });
    const kv = el("dl", { class: "kv" });
    kv.append(el("dt", { text: "grade" }), el("dd", {}, gradeBadge(d.correct)));
    for (const key of ["category", "reference", "extracted", "grader", "mode", "score"]) {
      if (r[key] !== undefined && r[key] !== null && r[key] !== "") kv.append(el("dt", { text: key }), el("dd", { text: typeof r[key] === "object" ? JSON.stringify(r[key]) : String(r[key]) }));
    }
    if (r.question !== undefined) texts.append(el("div", { class: "note", text: "question" }), el("pre", { class: "text question-text", text: String(r.question) }));
    if (Array.isArray(r.choices)) {
      const ol = el("ol", { type: "A" });
      for (const c of r.choices) ol.append(el("li", { text: String(c) }));
      texts.append(el("div", { class: "note", text: "choices" }), ol);
    }
    texts.append(el("div", { class: "note", text: "answer" }), el("pre", { class: "text response-text", text: String(r.response ?? "") }));
    if (r.prompt !== undefined) texts.append(el("details", {}, el("summary", { text: "prompt as the model read it" }), el("pre", { class: "text", text: String(r.prompt) })));
    box.append(el("div", { class: "record" }, texts, kv));
    return box;
  }

  function tokenLabel(t) { return t.text !== null && t.text !== undefined ? visible(t.text) : t.id !== null ? "#" + t.id : `#${t.pos}`; }

  async function questionPage(page, run, sampleId) {
    const d = await api("/api/sample", { run, id: sampleId });
    page.append(el("p", {}, el("a", { href: hashFor("r" + run), text: "\u2190 all questions" })));
    page.append(recordCard(d));
    if (!d.captured) { page.append(el("p", { class: "note", text: "This question was answered without capture: it has no activations." })); return; }
    const layers = d.layer_sites;
    const stat = el("select", { id: "stat" });
    stat.append(new Option("residual norm", "norm"), new Option("projection on right \u2212 wrong (difference of means)", "proj"));
    const layer = el("select", { id: "layer" });
    for (const l of layers) layer.append(new Option(l, l));
    layer.value = layers[Math.floor(layers.length / 2)];
    const log = el("input", { type: "checkbox", id: "log", checked: "" });
    const logLabel = el("label", {}, log, " log colour scale");
    const tokNote = d.decoded ? `${d.tokens.length} tokens` : d.model && d.model.state !== "none" && d.model.state !== "ready" ? `${d.tokens.length} tokens (token ids: the model is ${d.model.state}${d.model.message ? ": " + d.model.message : ""})` : `${d.tokens.length} tokens (token ids: no model to decode them)`;
    const tokens = el("div", { class: "tokens", id: "tokens" });
    const canvas = el("canvas", { class: "grid", id: "heatmap" });
    const legendBox = el("div");
    const heatNote = el("div", { class: "note", id: "heat-note" });
    const lensBox = el("div", { id: "lens", class: "card" }, el("div", { class: "note", text: "Click a token (above or in the heatmap) to read its logit lens: the tokens each layer's residual predicts through the model's final norm and unembedding." }));
    const profileBox = el("div", { class: "chart-box" }, el("canvas", { id: "profile-chart" }));
    const profileNote = el("div", { class: "note", id: "profile-note" });
    page.append(
      el("h2", { text: "Tokens by layer" }),
      el("div", { class: "controls" }, el("label", { text: "statistic" }), stat, el("label", { text: "direction from" }), layer, logLabel),
      el("div", { class: "note", text: tokNote }), tokens,
      el("div", { class: "heat-wrap" }, canvas), legendBox, heatNote,
      el("div", { class: "columns" },
        el("div", {}, el("h2", { text: "Logit lens" }), lensBox),
        el("div", {}, el("h2", { text: "Per layer: this question's last token against the run" }), profileBox, profileNote)));

    let selected = -1;
    let heat = null;
    const spans = d.tokens.map((t, i) => {
      const span = el("span", { class: "token" + (t.generated ? " generated" : ""), text: tokenLabel(t), title: `#${t.pos}` + (t.id !== null ? ` id ${t.id}` : ""), dataset: { pos: String(i) } });
      span.addEventListener("click", () => selectToken(i));
      tokens.append(span);
      return span;
    });

    async function selectToken(i) {
      selected = i;
      spans.forEach((sp, k) => sp.classList.toggle("selected", k === i));
      if (heat) heat.draw();
      lensBox.textContent = "";
      lensBox.dataset.state = "loading";
      lensBox.append(el("div", { class: "note", text: `reading the lens at token #${i}\u2026` }));
      let data;
      try { data = await api("/api/lens", { run, id: sampleId, token: d.tokens.length === 1 ? -1 : i }); }
      catch (e) { lensBox.textContent = ""; lensBox.append(errorBox(e.message)); lensBox.dataset.state = "error"; return; }
      if (selected !== i) return;
      lensBox.textContent = "";
      lensBox.dataset.token = String(i);
      if (!data.available) { lensBox.append(el("div", { class: "note", id: "lens-message", text: data.message })); lensBox.dataset.state = "unavailable"; return; }
      lensBox.append(el("div", { class: "note", text: `token #${i}: ${tokenLabel(d.tokens[i])}` }));
      const body = el("tbody");
      for (const row of data.rows) {
        const tr = el("tr", {}, el("td", { text: row.site }));
        row.tokens.forEach((tok, k) => tr.append(el("td", {}, visible(tok), el("span", { class: "p", text: (100 * (row.probs[k] || 0)).toFixed(1) + "%" }))));
        body.append(tr);
      }
      const head = el("tr", {}, el("th", { text: "layer" }), ...data.rows[0].tokens.map((_, k) => el("th", { text: `top ${k + 1}` })));
      lensBox.append(el("table", { class: "lens" }, el("thead", {}, head), body));
      lensBox.dataset.state = "ready";
    }

    let drawId = 0;
    async function draw() {
      const mine = ++drawId;
      layer.disabled = stat.value !== "proj";
      log.disabled = stat.value !== "norm";
      canvas.dataset.state = "loading";
      const params = { run, id: sampleId, stat: stat.value, layer: layer.value };
      const [h, prof] = await Promise.all([api("/api/heatmap", params), api("/api/profile", { run, stat: stat.value, layer: layer.value })]);
      if (mine !== drawId) return;
      heatNote.textContent = "";
      legendBox.textContent = "";
      if (!h.available) { heatNote.textContent = h.message; canvas.dataset.state = "unavailable"; drawProfile(null, prof); return; }
      const scale = scaleFor(h.values, stat.value === "proj" ? "diverging" : "sequential", stat.value === "norm" && log.checked);
      const rows = h.sites.length, cols = d.tokens.length;
      const cw = Math.max(4, Math.min(28, Math.floor(1100 / Math.max(cols, 1))));
      heat = grid(canvas, {
        rows, cols, cw, ch: 16, left: 90, top: 2,
        colour: (r, c) => scale.colour(h.values[r] ? h.values[r][c] : null),
        label: (r) => h.sites[r],
        mark: () => selected,
        onHover: (r, c, ev) => {
          const v = h.values[r] ? h.values[r][c] : null;
          showTooltip(ev, `${h.sites[r]} \u00b7 token #${c} ${tokenLabel(d.tokens[c])}\n${stat.value === "norm" ? "norm" : "projection"} ${v === null ? "n/a" : fmt(v, 4)}`);
        },
        onClick: (r, c) => selectToken(c),
      });
      legendBox.append(legend(scale, stat.value === "norm" ? (log.checked ? "log10 of the L2 norm" : "L2 norm") : `projection on the unit difference of means at ${layer.value}`));
      canvas.dataset.state = "ready";
      canvas.dataset.stat = stat.value;
      drawProfile(h, prof);
    }

    function drawProfile(h, prof) {
      for (const c of charts) c.destroy();
      charts = [];
      profileNote.textContent = "";
      const datasets = [];
      const labels = prof.available ? prof.sites : h ? h.sites : layers;
      if (h) datasets.push({ label: "this question", data: h.line, borderColor: "#2f5fb3", backgroundColor: "#2f5fb3", borderWidth: 2 });
      if (prof.available) {
        datasets.push({ label: "run average", data: prof.mean, borderColor: "#6b7380", borderDash: [5, 4], pointRadius: 0 });
        datasets.push({ label: "right answers", data: prof.right, borderColor: "#1e8a4c", pointRadius: 0 });
        datasets.push({ label: "wrong answers", data: prof.wrong, borderColor: "#c23b32", pointRadius: 0 });
        profileNote.textContent = `Averages over ${prof.n} questions read from the run (last token).`;
      } else {
        profileNote.textContent = prof.message;
      }
      chart(document.getElementById("profile-chart") || profileBox.querySelector("canvas"), {
        type: "line", data: { labels, datasets },
        options: { plugins: { legend: { position: "bottom" } }, scales: { y: { title: { display: true, text: stat.value === "norm" ? "L2 norm" : "projection" } } } },
      });
    }

    stat.addEventListener("change", draw);
    layer.addEventListener("change", draw);
    log.addEventListener("change", draw);
    after(page, () => { draw().catch((e) => { heatNote.textContent = ""; heatNote.append(errorBox(e.message)); }); });
  }

  // ---- layers --------------------------------------------------------------------------------

  async function layersPage(page, run) {
    const s = await summary(run);
    page.append(el("h1", { text: `Layers \u00b7 ${s.label}` }));
    const target = el("select", { id: "target" });
    target.append(new Option("right or wrong", "correct"), new Option("category", "category"));
    const probeBox = el("div", { class: "chart-box" }, el("canvas", { id: "probe-chart" }));
    const probeNote = el("div", { class: "note", id: "probe-note" });
    const simLayer = el("select", { id: "sim-layer" });
    const simCanvas = el("canvas", { class: "grid", id: "similarity" });
    const simNote = el("div", { class: "note", id: "sim-note" });
    const simLegend = el("div");
    page.append(
      el("h2", { text: "Probe accuracy by layer" }),
      el("div", { class: "controls" }, el("label", { text: "predict" }), target),
      el("div", { class: "card" }, probeBox, probeNote),
      el("h2", { text: "Similarity of questions" }),
      el("div", { class: "controls" }, el("label", { text: "layer" }), simLayer, el("span", { class: "note", text: "cosine of last-token vectors; right answers first, then wrong (coloured edges); click a cell to open the two questions" })),
      el("div", { class: "heat-wrap" }, simCanvas), simLegend, simNote);

    let probeChart = null;
    async function probe() {
      probeNote.textContent = "training probes\u2026";
      probeBox.dataset.state = "loading";
      const p = await api("/api/probe", { run, target: target.value });
      if (probeChart) { probeChart.destroy(); charts = charts.filter((c) => c !== probeChart); probeChart = null; }
      if (!p.available) { probeNote.textContent = p.message; probeBox.dataset.state = "unavailable"; return; }
      const upper = p.accuracy.map((a, i) => (a === null ? null : a + (p.std[i] || 0)));
      const lower = p.accuracy.map((a, i) => (a === null ? null : a - (p.std[i] || 0)));
      probeChart = chart(probeBox.querySelector("canvas"), {
        type: "line",
        data: {
          labels: p.sites,
          datasets: [
            { label: "+1 sd", data: upper, borderWidth: 0, pointRadius: 0, fill: false },
            { label: "\u00b11 sd over folds", data: lower, borderWidth: 0, pointRadius: 0, fill: "-1", backgroundColor: "rgba(47,95,179,0.18)" },
            { label: "probe accuracy", data: p.accuracy, borderColor: "#2f5fb3", backgroundColor: "#2f5fb3", borderWidth: 2 },
            { label: "majority baseline", data: p.baseline, borderColor: "#8a8f98", borderDash: [6, 4], pointRadius: 0 },
          ],
        },
        options: {
          plugins: { legend: { position: "bottom", labels: { filter: (item) => item.text !== "+1 sd" } } },
          scales: { y: { min: 0, max: 1, title: { display: true, text: "accuracy" } } },
        },
      });
      probeNote.textContent = `Logistic-regression probes on the last token, ${p.folds}-fold cross-validated, on ${p.n} of the run's ${p.total.toLocaleString()} questions.`;
      probeBox.dataset.state = "ready";
    }

    async function similarity() {
      simCanvas.dataset.state = "loading";
      simNote.textContent = "computing\u2026";
      simLegend.textContent = "";
      const m = await api("/api/similarity", { run, layer: simLayer.value });
      if (!m.available) { simNote.textContent = m.message; simCanvas.dataset.state = "unavailable"; return; }
      const n = m.ids.length;
      const cell = Math.max(2, Math.min(14, Math.floor(640 / Math.max(n, 1))));
      const scale = scaleFor(m.matrix, "sequential", false);
      const edge = 7;
      const gradeColour = (c) => (c === true ? "#1e8a4c" : c === false ? "#c23b32" : "#bbb");
      grid(simCanvas, {
        rows: n, cols: n, cw: cell, ch: cell, left: edge + 2, top: edge + 2,
        colour: (r, c) => scale.colour(m.matrix[r][c]),
        decorate: (ctx) => { for (let i = 0; i < n; i++) { ctx.fillStyle = gradeColour(m.correct[i]); ctx.fillRect(0, edge + 2 + i * cell, edge, cell); ctx.fillRect(edge + 2 + i * cell, 0, cell, edge); } },
        onHover: (r, c, ev) => showTooltip(ev, `${m.ids[r]}\n${m.ids[c]}\ncosine ${fmt(m.matrix[r][c], 4)}`),
        onClick: (r, c) => { location.hash = hashFor("r" + run, "pair", m.ids[r], m.ids[c]); },
      });
      simLegend.append(legend(scale, "cosine"));
      simNote.textContent = `${n} of the run's ${m.total.toLocaleString()} questions.`;
      simCanvas.dataset.state = "ready";
    }

    target.addEventListener("change", () => probe().catch((e) => { probeNote.textContent = e.message; }));
    simLayer.addEventListener("change", () => similarity().catch((e) => { simNote.textContent = e.message; }));
    after(page, async () => {
      try {
        const layers = (await api("/api/profile", { run, stat: "norm" }));
        if (layers.available) { for (const l of layers.sites) simLayer.append(new Option(l, l)); simLayer.value = layers.sites[Math.floor(layers.sites.length / 2)]; }
        else { simNote.textContent = layers.message; probeNote.textContent = layers.message; return; }
      } catch (e) { simNote.textContent = e.message; return; }
      probe().catch((e) => { probeNote.textContent = e.message; });
      similarity().catch((e) => { simNote.textContent = e.message; });
    });
  }

  // ---- two questions of one run --------------------------------------------------------------

  function cosineChart(canvas, cos, title) {
    return chart(canvas, {
      type: "line",
      data: { labels: cos.sites, datasets: [
        { label: "last token", data: cos.last, borderColor: "#2f5fb3", backgroundColor: "#2f5fb3", borderWidth: 2 },
        { label: "mean over tokens", data: cos.mean, borderColor: "#d08a1e", backgroundColor: "#d08a1e", borderWidth: 2 },
      ] },
      options: { plugins: { legend: { position: "bottom" }, title: { display: !!title, text: title } }, scales: { y: { title: { display: true, text: "cosine" } } } },
    });
  }

  async function pairPage(page, run, a, b) {
    const p = await api("/api/pair", { run, a, b });
    page.append(el("p", {}, el("a", { href: hashFor("r" + run, "layers"), text: "\u2190 layers" })));
    page.append(el("div", { class: "columns", id: "pair" }, recordCard(p.a, "question A", hashFor("r" + run, "q", a)), recordCard(p.b, "question B", hashFor("r" + run, "q", b))));
    page.append(el("h2", { text: "Per-layer cosine of A and B" }));
    if (p.cosine) {
      const box = el("div", { class: "chart-box" }, el("canvas", { id: "pair-chart" }));
      page.append(el("div", { class: "card" }, box));
      after(page, () => cosineChart(box.querySelector("canvas"), p.cosine));
    } else page.append(el("p", { class: "note", text: p.cosine_message }));
  }

  // ---- two runs ------------------------------------------------------------------------------

  async function comparePage(page, args) {
    const s = await api("/api/compare/summary");
    if (args[0] === "q" && args.length >= 2) return compareQuestion(page, args.slice(1).join("/"), s);
    page.append(el("h1", { text: `${s.a} and ${s.b}` }));
    const c = s.counts;
    page.append(el("div", { class: "cards" },
      el("div", { class: "card" }, el("div", { class: "note", text: "shared questions" }), el("div", { class: "big", id: "shared", text: String(s.shared) }),
        el("div", { class: "note", text: `${s.only_in_a} only in A, ${s.only_in_b} only in B` })),
      el("div", { class: "card" }, el("dl", { class: "kv" },
        el("dt", { text: "both right" }), el("dd", { text: String(c.both_right) }),
        el("dt", { text: "both wrong" }), el("dd", { text: String(c.both_wrong) }),
        el("dt", { text: `right only in A (${s.a})` }), el("dd", { text: String(c.only_a) }),
        el("dt", { text: `right only in B (${s.b})` }), el("dd", { text: String(c.only_b) }),
        el("dt", { text: "ungraded" }), el("dd", { text: String(c.ungraded) })))));
    const box = el("div", { class: "chart-box" }, el("canvas", { id: "compare-chart" }));
    const note = el("div", { class: "note", id: "compare-note" });
    page.append(el("h2", { text: "Per-layer cosine between the runs (average over shared questions)" }), el("div", { class: "card" }, box, note));
    after(page, async () => {
      try {
        const m = await api("/api/compare/cosine");
        if (!m.available) { note.textContent = m.message; return; }
        cosineChart(box.querySelector("canvas"), m);
        note.textContent = `Average over ${m.n} shared questions.`;
      } catch (e) { note.textContent = e.message; }
    });

    const t = state.compareTable = state.compareTable || { agreement: "all", q: "", offset: 0 };
    const agreement = el("select", { id: "agreement" });
    for (const [v, text] of [["all", "all"], ["differ", "grades differ"], ["agree", "grades agree"], ["only_a", "right only in A"], ["only_b", "right only in B"], ["both_right", "both right"], ["both_wrong", "both wrong"]]) agreement.append(new Option(text, v));
    agreement.value = t.agreement;
    const search = el("input", { type: "search", id: "compare-search", placeholder: "search id, question, answers" });
    search.value = t.q;
    const body = el("tbody");
    const table = el("table", { id: "compare-table" }, el("thead", {}, el("tr", {}, ...["id", "question", "reference", "answer A", "grade A", "answer B", "grade B"].map((h) => el("th", { text: h })))), body);
    const info = el("span", { class: "note", id: "compare-pageinfo" });
    const prev = el("button", { text: "\u2190 previous" });
    const next = el("button", { text: "next \u2192" });
    page.append(el("h2", { text: "Answers side by side" }), el("div", { class: "controls" }, el("label", { text: "show" }), agreement, search), table, el("div", { class: "pager" }, prev, next, info));
    async function load() {
      table.dataset.state = "loading";
      const d = await api("/api/compare/questions", { agreement: t.agreement, q: t.q, offset: t.offset, limit: PAGE });
      body.textContent = "";
      for (const r of d.rows) {
        const tr = el("tr", { class: "clickable", dataset: { id: r.id } }, el("td", { text: r.id }), el("td", { class: "text", text: r.question }), el("td", { class: "text", text: r.reference }),
          el("td", { class: "text", text: r.a.response }), el("td", {}, gradeBadge(r.a.correct)), el("td", { class: "text", text: r.b.response }), el("td", {}, gradeBadge(r.b.correct)));
        tr.addEventListener("click", () => { location.hash = hashFor("compare", "q", r.id); });
        body.append(tr);
      }
      const end = Math.min(d.offset + d.rows.length, d.matched);
      info.textContent = d.matched ? `${d.offset + 1}\u2013${end} of ${d.matched}` : "none match";
      prev.disabled = d.offset <= 0; next.disabled = end >= d.matched;
      table.dataset.state = "ready";
      table.dataset.matched = String(d.matched);
    }
    agreement.addEventListener("change", () => { t.agreement = agreement.value; t.offset = 0; load(); });
    let timer = null;
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { t.q = search.value; t.offset = 0; load(); }, 250); });
    prev.addEventListener("click", () => { t.offset = Math.max(0, t.offset - PAGE); load(); });
    next.addEventListener("click", () => { t.offset += PAGE; load(); });
    await load();
  }

  async function compareQuestion(page, sampleId, s) {
    const q = await api("/api/compare/question", { id: sampleId });
    page.append(el("p", {}, el("a", { href: hashFor("compare"), text: "\u2190 both runs" })));
    const card = (rec, label) => recordCard({ id: sampleId, record: rec, correct: rec.correct === undefined || rec.correct === null ? null : !!rec.correct }, label);
    page.append(el("div", { class: "columns", id: "compare-pair" }, card(q.a, `A: ${s.a}`), card(q.b, `B: ${s.b}`)));
    page.append(el("h2", { text: "Per-layer cosine of the two runs' activations" }));
    if (q.cosine) {
      const box = el("div", { class: "chart-box" }, el("canvas", { id: "compare-q-chart" }));
      page.append(el("div", { class: "card" }, box));
      after(page, () => cosineChart(box.querySelector("canvas"), q.cosine));
    } else page.append(el("p", { class: "note", text: q.cosine_message }));
  }

  // ---- start ---------------------------------------------------------------------------------

  async function refreshModel(wasLoading) {
    try {
      const r = await api("/api/runs");
      const states = r.runs.map((x) => (x.model ? `${x.model.state}` : "off"));
      modelState.textContent = `model: ${states.join(" / ")}`;
      const loading = states.includes("loading");
      if (loading) setTimeout(() => refreshModel(true), 2000);
      // Token text needs the model: show it once the model has loaded.
      else if (wasLoading && ["question", "pair"].includes(parseRoute().view)) render();
    } catch (e) { modelState.textContent = ""; }
  }

  async function start() {
    try {
      const r = await api("/api/runs");
      state.runs = r.runs;
      state.compare = r.compare;
    } catch (e) {
      main.textContent = "";
      main.append(errorBox(String(e.message || e)));
      return;
    }
    window.addEventListener("hashchange", render);
    refreshModel(false);
    render();
  }

  start();
})();
