// SAE feature browser: a small single-page app over the JSON API (/api/...).
// All text from the analysis is inserted with textContent, never as HTML.
"use strict";

const view = document.getElementById("view");
const tooltip = document.getElementById("tooltip");
let META = null;

// ---------- helpers ----------

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const kid of kids.flat()) if (kid) e.append(kid);
  return e;
}

async function api(path, opts) {
  const r = await fetch(path, opts);
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) {
    const msg = body && body.error ? body.error : `HTTP ${r.status}`;
    const err = new Error(msg);
    err.status = r.status;
    throw err;
  }
  return body;
}

function fmtAct(x) {
  if (x === null || x === undefined) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 100) return x.toFixed(0);
  if (a >= 10) return x.toFixed(1);
  if (a >= 0.01) return x.toFixed(2);
  return x.toExponential(1);
}

function fmtFreq(f) {
  if (!f) return "0";
  const p = f * 100;
  if (p >= 1) return p.toFixed(2) + "%";
  if (p >= 0.01) return p.toFixed(3) + "%";
  return p.toExponential(1) + "%";
}

function fmtInt(n) {
  return Number(n).toLocaleString("en-US");
}

// Visible text of a token: newlines and tabs as symbols, empty tokens as a marker.
function tokenLabel(t) {
  if (t === "") return "∅";
  return t.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
}

function actColor(act, scale) {
  if (!(act > 0) || !(scale > 0)) return "";
  const a = Math.min(1, act / scale);
  return `rgba(255, 122, 0, ${(0.08 + 0.82 * a).toFixed(3)})`;
}

function showTip(ev, text) {
  tooltip.textContent = text;
  tooltip.hidden = false;
  const x = Math.min(ev.clientX + 12, window.innerWidth - tooltip.offsetWidth - 8);
  tooltip.style.left = x + "px";
  tooltip.style.top = ev.clientY + 14 + "px";
}
function hideTip() { tooltip.hidden = true; }

// One token as a span, highlighted by `act` relative to `scale`.
function tokenSpan(text, act, scale, opts = {}) {
  const s = el("span", { class: "tok" + (opts.center ? " center" : "") + (opts.special ? " special" : "") });
  s.textContent = tokenLabel(text);
  const bg = actColor(act, scale);
  if (bg) {
    s.style.backgroundColor = bg;
    s.classList.add("hl");
  }
  s.addEventListener("mousemove", (ev) =>
    showTip(ev, `${JSON.stringify(text)}  act ${fmtAct(act)}` + (opts.extra ? "\n" + opts.extra : "")));
  s.addEventListener("mouseleave", hideTip);
  return s;
}

function parseHash() {
  const h = location.hash.replace(/^#/, "") || "/";
  const [path, q] = h.split("?");
  return { path, params: new URLSearchParams(q || "") };
}

function setHash(path, params) {
  const q = params.toString();
  const h = "#" + path + (q ? "?" + q : "");
  if (location.hash !== h) location.hash = h;
  else route();
}

function errorBox(msg) {
  return el("div", { class: "error", role: "alert" }, msg);
}

// ---------- charts ----------

// Bars over equal bins; labels for the x range.
function barChart(bins, opts) {
  const W = 560, H = 150, L = 36, B = 22, T = 8;
  const n = bins.length;
  const max = Math.max(1, ...bins);
  const bw = (W - L - 4) / n;
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "hist " + (opts.cls || ""), role: "img" });
  g.append(svg("line", { x1: L, y1: H - B, x2: W, y2: H - B }));
  bins.forEach((c, i) => {
    const h = opts.log ? (c > 0 ? (Math.log10(c + 1) / Math.log10(max + 1)) * (H - B - T) : 0)
      : (c / max) * (H - B - T);
    const r = svg("rect", { class: "bar", x: L + i * bw + 0.5, y: H - B - h, width: Math.max(1, bw - 1), height: h });
    r.append(svg("title", { text: opts.binLabel(i) + `: ${fmtInt(c)}` }));
    g.append(r);
  });
  for (const [frac, label] of opts.xLabels) {
    g.append(svg("text", { x: L + frac * (W - L - 4), y: H - 6, "text-anchor": frac === 0 ? "start" : frac === 1 ? "end" : "middle", text: label }));
  }
  g.append(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end", text: fmtInt(max) }));
  g.append(svg("text", { x: L - 4, y: H - B, "text-anchor": "end", text: "0" }));
  return g;
}

// ---------- list page ----------

const LIST_DEFAULTS = { sort: "freq", order: "desc", q: "", page: "0", dead: "show" };
const PAGE = 100;

async function renderList(params) {
  const p = Object.fromEntries(Object.entries(LIST_DEFAULTS).map(([k, v]) => [k, params.get(k) ?? v]));
  const page = Math.max(0, parseInt(p.page, 10) || 0);
  const q = new URLSearchParams({ sort: p.sort, order: p.order, q: p.q, offset: page * PAGE, limit: PAGE, dead: p.dead });
  const update = (changes) => {
    const n = new URLSearchParams({ ...p, page: 0, ...changes });
    for (const [k, v] of Object.entries(LIST_DEFAULTS)) if (n.get(k) === v) n.delete(k);
    setHash("/", n);
  };

  const search = el("input", { type: "search", id: "search", placeholder: "Search tokens (top activations & logits), e.g.  def", value: p.q, "aria-label": "Search latents by token" });
  let timer = null;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => update({ q: search.value }), 300);
  });
  const sortSel = el("select", { id: "sort", "aria-label": "Sort by" },
    ...[["freq", "frequency"], ["max", "max activation"], ["mean", "mean activation"], ["id", "latent id"]]
      .map(([v, t]) => el("option", { value: v, selected: v === p.sort }, t)));
  sortSel.addEventListener("change", () => update({ sort: sortSel.value }));
  const orderBtn = el("button", { class: "plain", id: "order", onclick: () => update({ order: p.order === "desc" ? "asc" : "desc" }) },
    p.order === "desc" ? "↓ descending" : "↑ ascending");
  const deadBox = el("input", { type: "checkbox", id: "hide-dead", checked: p.dead === "hide" });
  deadBox.addEventListener("change", () => update({ dead: deadBox.checked ? "hide" : "show" }));

  const head = el("div", { class: "card" },
    el("div", { class: "title-row" }, el("h1", {}, "Latents"),
      el("span", { class: "muted" }, `${fmtInt(META.meta.d_sae)} latents · ${fmtInt(META.density.dead)} never fired · ${fmtInt(META.meta.n_tokens)} tokens scanned`)),
    densityChart());
  const toolbar = el("div", { class: "toolbar" }, search, el("span", { class: "muted" }, "sort"), sortSel, orderBtn,
    el("label", { class: "muted" }, deadBox, " hide dead"), el("span", { class: "grow" }));
  const tableCard = el("div", { class: "card" }, toolbar, el("p", { class: "muted" }, "Loading…"));
  view.replaceChildren(head, tableCard);
  if (document.activeElement === document.body && p.q) search.focus();

  let data;
  try {
    data = await api("/api/latents?" + q);
  } catch (e) {
    tableCard.replaceChildren(toolbar, errorBox(e.message));
    return;
  }
  const maxLogFreq = 0, minLogFreq = -7;
  const th = (key, label) => el("th", {
    class: (p.sort === key ? "sorted" : "") + (p.sort === key && p.order === "asc" ? " asc" : ""),
    onclick: () => update({ sort: key, order: p.sort === key && p.order === "desc" ? "asc" : "desc" }),
  }, label);
  const rows = data.items.map((it) => {
    return el("tr", { class: it.n_fired === 0 ? "dead" : "", "data-id": it.id, onclick: (ev) => { if (ev.target.tagName !== "A") location.hash = "#/latent/" + it.id; } },
      el("td", { class: "num" }, el("a", { href: "#/latent/" + it.id }, "#" + it.id)),
      el("td", { class: "num" }, fmtFreq(it.freq), el("span", { class: "freqbar" })),
      el("td", { class: "num" }, fmtAct(it.max)),
      el("td", { class: "num" }, fmtAct(it.mean)),
      el("td", {}, it.top_tokens.map((t) => el("span", { class: "chip" }, tokenLabel(t)))),
      el("td", {}, it.top_logits.map((t) => el("span", { class: "chip logit" }, tokenLabel(t)))));
  });
  // Bar widths set through the CSSOM (the page's CSP has no inline styles).
  rows.forEach((r, i) => {
    const it = data.items[i];
    const w = it.freq > 0 ? Math.max(2, 70 * (Math.log10(it.freq) - minLogFreq) / (maxLogFreq - minLogFreq)) : 0;
    r.querySelector(".freqbar").style.width = w + "px";
  });
  const table = el("table", { class: "latents", id: "latent-table" },
    el("thead", {}, el("tr", {}, th("id", "latent"), th("freq", "frequency"), th("max", "max act"), th("mean", "mean act"),
      el("th", {}, "top tokens"), el("th", {}, "top logits"))),
    el("tbody", {}, rows));
  const last = Math.max(0, Math.ceil(data.total / PAGE) - 1);
  const pager = el("div", { class: "pager" },
    el("span", { class: "muted" }, data.total === 0 ? "no latents match" :
      `${fmtInt(page * PAGE + 1)}–${fmtInt(Math.min(data.total, (page + 1) * PAGE))} of ${fmtInt(data.total)}`),
    el("button", { class: "plain", disabled: page === 0, onclick: () => setHash("/", new URLSearchParams({ ...p, page: page - 1 })) }, "‹ prev"),
    el("button", { class: "plain", disabled: page >= last, onclick: () => setHash("/", new URLSearchParams({ ...p, page: page + 1 })) }, "next ›"));
  tableCard.replaceChildren(toolbar, table, pager);
}

function densityChart() {
  const d = META.density;
  const n = d.bins.length;
  const lab = (i) => `1e${d.log10_lo + i * d.step}`;
  const wrap = el("div", { class: "density-wrap" });
  wrap.append(el("div", { class: "muted" }, "Firing frequency of all latents (log scale)" + (d.dead ? ` — ${fmtInt(d.dead)} dead latents not shown` : "")));
  wrap.append(barChart(d.bins, {
    cls: "density",
    binLabel: (i) => `frequency ${lab(i)} – ${lab(i + 1)}`,
    xLabels: [[0, "1e-7"], [3 / 7, "1e-4"], [5 / 7, "1e-2"], [1, "1"]],
  }));
  return wrap;
}

// ---------- latent page ----------

async function renderLatent(id) {
  view.replaceChildren(el("p", { class: "muted" }, "Loading…"));
  let d;
  try {
    d = await api("/api/latent/" + encodeURIComponent(id));
  } catch (e) {
    view.replaceChildren(el("div", { class: "card" }, el("h1", {}, `Latent ${id}`), errorBox(e.message),
      el("a", { href: "#/" }, "← back to the list")));
    return;
  }
  const scale = d.max;
  const stat = (k, v, idAttr) => el("div", { class: "stat" }, el("div", { class: "k" }, k), el("div", { class: "v", id: idAttr }, v));
  const nav = el("div", { class: "nav" },
    el("button", { class: "plain", disabled: d.id === 0, onclick: () => (location.hash = "#/latent/" + (d.id - 1)) }, "‹ prev"),
    el("button", { class: "plain", disabled: d.id + 1 >= d.d_sae, onclick: () => (location.hash = "#/latent/" + (d.id + 1)) }, "next ›"),
    META.live ? el("button", { onclick: () => (location.hash = "#/text?latent=" + d.id) }, "Try text on this latent") : null);
  const header = el("div", { class: "card" },
    el("div", { class: "title-row" }, el("h1", { id: "latent-title" }, `Latent #${d.id}`), nav),
    el("div", { class: "stats" },
      stat("frequency", fmtFreq(d.freq), "stat-freq"),
      stat("firings", fmtInt(d.n_fired)),
      stat("1 in", d.freq > 0 ? fmtInt(Math.round(1 / d.freq)) + " tokens" : "–"),
      stat("max act", fmtAct(d.max)),
      stat("mean act", fmtAct(d.mean))));

  const hi = d.hist.hi;
  const nb = d.hist.bins.length;
  const histCard = el("div", { class: "card", id: "hist-card" }, el("h2", {}, "Activation density"),
    d.n_fired === 0 ? el("p", { class: "muted" }, "This latent never fired in the scanned text.") :
      barChart(d.hist.bins, {
        binLabel: (i) => `act ${fmtAct((i * hi) / nb)} – ${fmtAct(((i + 1) * hi) / nb)}`,
        xLabels: [[0, "0"], [0.5, fmtAct(hi / 2)], [1, fmtAct(hi)]],
      }));
  const logitsCard = el("div", { class: "card", id: "logits-card" }, el("h2", {}, "Logit effect of the decoder direction"), logitTables(d.logits));

  const exCard = el("div", { class: "card examples", id: "top-examples" },
    el("div", { class: "title-row" }, el("h2", {}, "Top activations"), legend(scale)),
    d.top.length ? d.top.map((e) => exampleRow(e, scale)) : el("p", { class: "muted" }, "No examples."));
  const randCard = el("div", { class: "card examples", id: "random-examples" },
    el("h2", {}, "Random firings across the activation range"),
    d.random.length ? d.random.map((e) => exampleRow(e, scale)) : el("p", { class: "muted" }, "No examples."));
  view.replaceChildren(header, el("div", { class: "row" }, histCard, logitsCard), exCard, randCard);
}

function legend(scale) {
  return el("span", { class: "legend" }, "0", el("span", { class: "scale" }), fmtAct(scale));
}

function logitTables(l) {
  if (!l.top.length) return el("p", { class: "muted" }, "Not computed for this analysis.");
  const maxAbs = Math.max(...l.top.map((x) => Math.abs(x.value)), ...l.bottom.map((x) => Math.abs(x.value)), 1e-9);
  const table = (items, cls, title) => el("div", { class: "grow" }, el("div", { class: "muted" }, title),
    el("table", { class: "logits" }, el("tbody", {}, items.map((x) => {
      const bar = el("span", { class: "logbar " + cls });
      bar.style.width = Math.round((60 * Math.abs(x.value)) / maxAbs) + "px";
      return el("tr", {}, el("td", {}, el("span", { class: "chip" }, tokenLabel(x.token))),
        el("td", { class: "v " + cls }, (x.value >= 0 ? "+" : "") + x.value.toFixed(3)), el("td", {}, bar));
    }))));
  return el("div", { class: "row" }, table(l.top, "pos", "promotes"), table(l.bottom, "neg", "suppresses"));
}

function exampleRow(e, scale) {
  const toks = el("div", { class: "toks" },
    e.tokens.map((t, i) => tokenSpan(t, e.acts[i], scale, { center: i === e.center, special: e.pos - e.center + i === 0 && META.meta.skip_first })));
  return el("div", { class: "ex" }, el("div", { class: "act" }, fmtAct(e.act)), toks);
}

// ---------- text page ----------

let lastText = "The quick brown fox jumps over the lazy dog.\ndef add(a, b):\n    return a + b\n";

async function renderText(params) {
  const wanted = params.get("latent");
  const input = el("textarea", { id: "text-in", spellcheck: "false", "aria-label": "Text to encode" });
  input.value = lastText;
  const go = el("button", { id: "encode" }, "Encode");
  const status = el("span", { class: "muted" });
  const out = el("div", { id: "text-result" });
  const card = el("div", { class: "card" },
    el("div", { class: "title-row" }, el("h1", {}, "Try text"),
      el("span", { class: "muted" }, META.live ? `up to ${fmtInt(META.max_tokens)} tokens; Ctrl+Enter encodes` : "")),
    el("p", { class: "muted" }, "Type text and see which latents fire on which token. Click a latent to highlight its activations, click a token to list the latents firing there."),
    input, el("div", { class: "toolbar" }, go, status));
  view.replaceChildren(card, out);
  if (!META.live) {
    go.disabled = true;
    out.replaceChildren(errorBox("This server has no model loaded, so text cannot be encoded. Start `sae serve` with the SAE and model available."));
    return;
  }
  const run = async () => {
    lastText = input.value;
    go.disabled = true;
    status.textContent = "encoding…";
    try {
      const r = await api("/api/encode", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: input.value }) });
      status.textContent = `${r.tokens.length} tokens, ${r.latents.length} latents fired`;
      showEncoded(out, r, wanted);
    } catch (e) {
      status.textContent = "";
      out.replaceChildren(errorBox(e.message));
    } finally {
      go.disabled = false;
    }
  };
  go.addEventListener("click", run);
  input.addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) run(); });
  if (input.value.trim()) run();
}

function showEncoded(out, r, wanted) {
  let selected = null;
  const wantedId = wanted === null ? null : Number(wanted);
  const byId = new Map(r.latents.map((l) => [l.id, l]));
  const textBox = el("div", { class: "text-out", id: "text-tokens" });
  const tokenInfo = el("div", { class: "token-info", id: "token-info" }, el("span", { class: "muted" }, "Click a token to see its latents."));
  const caption = el("div", { class: "title-row" });
  const rows = new Map();
  const select = (id) => {
    selected = id;
    for (const [k, tr] of rows) tr.classList.toggle("sel", k === id);
    const l = byId.get(id);
    const acts = l ? l.acts : r.tokens.map(() => 0);
    const scale = l ? Math.max(l.max, l.max_in_corpus || 0) : 1;
    caption.replaceChildren(el("h2", {}, l ? `Activations of latent #${id}` : wantedId !== null ? `Latent #${id} does not fire on this text` : "No latent fired"),
      l ? el("a", { href: "#/latent/" + id }, "open latent page") : null, legend(scale));
    textBox.replaceChildren(...r.tokens.map((t, i) => {
      const special = i === 0 && r.first_is_bos;
      const top = r.per_token[i].slice(0, 5).map(([j, v]) => `#${j} ${fmtAct(v)}`).join("  ");
      const s = tokenSpan(t, special ? 0 : acts[i], scale, { special, extra: top ? "top: " + top : "no latent fires" });
      s.addEventListener("click", () => showToken(i));
      return s;
    }));
  };
  const showToken = (i) => {
    textBox.querySelectorAll(".picked").forEach((x) => x.classList.remove("picked"));
    textBox.children[i]?.classList.add("picked");
    const pairs = r.per_token[i];
    tokenInfo.replaceChildren(el("div", {}, "Token ", el("span", { class: "chip" }, tokenLabel(r.tokens[i])),
      pairs.length ? ` — ${pairs.length} strongest latents:` : " — no latent fires here."),
      el("div", {}, pairs.map(([j, v]) => el("span", { class: "chip", title: "highlight this latent", onclick: () => select(j) }, `#${j}  ${fmtAct(v)}`))));
  };
  const table = el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "latent"), el("th", {}, "max"), el("th", {}, "tokens"), el("th", {}, "top tokens in corpus"))),
    el("tbody", {}, r.latents.map((l) => {
      const tr = el("tr", { "data-id": l.id, onclick: () => select(l.id) },
        el("td", {}, el("a", { href: "#/latent/" + l.id, onclick: (ev) => ev.stopPropagation() }, "#" + l.id)),
        el("td", { class: "num" }, fmtAct(l.max)), el("td", { class: "num" }, l.count),
        el("td", {}, (l.top_tokens || []).map((t) => el("span", { class: "chip" }, tokenLabel(t)))));
      rows.set(l.id, tr);
      return tr;
    })));
  out.replaceChildren(el("div", { class: "text-grid" },
    el("div", { class: "card" }, caption, textBox, tokenInfo),
    el("div", { class: "card" }, el("h2", {}, "Latents that fired"), el("div", { class: "fired", id: "fired" }, table))));
  select(wantedId !== null && !Number.isNaN(wantedId) ? wantedId : r.latents.length ? r.latents[0].id : null);
}

// ---------- routing ----------

async function route() {
  hideTip();
  const { path, params } = parseHash();
  document.getElementById("nav-list").classList.toggle("active", path === "/");
  document.getElementById("nav-text").classList.toggle("active", path === "/text");
  const m = path.match(/^\/latent\/(.*)$/);
  if (m) return renderLatent(decodeURIComponent(m[1]));
  if (path === "/text") return renderText(params);
  return renderList(params);
}

document.getElementById("jump").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = document.getElementById("jump-id").value.trim().replace(/^#/, "");
  if (v) location.hash = "#/latent/" + v;
});

(async () => {
  try {
    META = await api("/api/meta");
  } catch (e) {
    view.replaceChildren(errorBox("Cannot reach the server: " + e.message));
    return;
  }
  const m = META.meta;
  document.getElementById("meta-line").textContent =
    `${m.model} · ${m.hook} · ${m.arch} · d_sae ${fmtInt(m.d_sae)} · ${m.corpus}`;
  window.addEventListener("hashchange", route);
  route();
})();
