// jaxinterp circuit viewer: plain JavaScript and SVG, no library, no network.
// The data (see jaxinterp/viewer.py, `page_data`) lists every edge with its entry size: the smallest
// top-n size n whose pruned circuit holds the edge. Edges are sorted by entry size, so the circuit at
// size n is the prefix of edges with entry <= n (exactly `Graph.top_n(n)`).
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("viewer-data").textContent);
  const E = D.edges, N = D.n_total, M = E.s.length;
  const nodes = D.nodes, S = nodes.length - 1;  // node S is logits
  const $ = (id) => document.getElementById(id);
  const graphSvg = $("graph"), edgesG = $("edges"), hitsG = $("edge-hits"), nodesG = $("nodes");
  const SVGNS = graphSvg.namespaceURI;
  const QKV = ["q", "k", "v", ""];
  const KIND_NAMES = ["query", "key", "value", ""];
  const DASH_LIMIT = 1000;  // above this many drawn edges, q/k/v edges are drawn solid

  // ---------------------------------------------------------------------------- precomputed
  const byRank = new Int32Array(M);  // edge indices, strongest first
  let smax = 0;
  for (let i = 0; i < M; i++) {
    byRank[E.rank[i] - 1] = i;
    smax = Math.max(smax, Math.abs(E.score[i]));
  }
  const recvNode = D.receivers.map((r) => r[0]), recvKind = D.receivers.map((r) => r[1]);
  const edgeName = (i) => nodes[E.s[i]] + "->" + D.receiver_names[E.r[i]];
  const fmt = (x) => (x === null || x === undefined) ? "?" : String(x);
  const fmt3 = (x) => Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(2) : x.toFixed(3);
  const el = (tag, attrs, parent) => {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  };
  const esc = (t) => String(t).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");

  // ---------------------------------------------------------------------------- nodes
  const H = D.shape.n_heads, L = D.shape.n_layers;
  const xs = D.pos.map((p) => p[0]), ys = D.pos.map((p) => p[1]);
  const headXs = [];
  for (let i = 0; i < S; i++) if (nodes[i].startsWith("a")) headXs.push(xs[i]);
  const dx = H > 1 ? (Math.max(...headXs) - Math.min(...headXs)) / (H - 1) : 80;
  const boxW = Math.min(64, dx * 0.84), boxH = L > 4 ? 17 : 22;
  const kindOf = (name) => name.startsWith("a") ? "head" : (name.startsWith("m") ? "mlp" : "io");
  const nodeEls = [];
  for (let i = 0; i <= S; i++) {
    const kind = kindOf(nodes[i]);
    const w = kind === "head" ? boxW : Math.max(boxW, 52);
    const g = el("g", {class: "node " + kind, "data-node": i, transform: `translate(${xs[i]},${ys[i]})`}, nodesG);
    el("rect", {x: -w / 2, y: -boxH / 2, width: w, height: boxH, rx: kind === "head" ? boxH / 2 : 3}, g);
    const t = el("text", {}, g);
    t.textContent = nodes[i];
    if (boxW < 46 && kind === "head") t.setAttribute("style", "font-size:9px");
    el("title", {}, g).textContent = nodes[i];
    nodeEls.push(g);
  }
  for (let l = 0; l < L; l++) {  // layer labels, left of the heads row
    const i = nodes.indexOf("a" + l + ".h0");
    const t = el("text", {class: "layer-label", x: xs[i] - boxW / 2 - 6, y: ys[i]}, nodesG);
    t.textContent = "L" + l;
  }
  const minX = Math.min(...xs) - 70, maxX = Math.max(...xs) + 60;
  const minY = Math.min(...ys) - 24, maxY = Math.max(...ys) + 24;
  graphSvg.setAttribute("viewBox", `${minX} ${minY} ${maxX - minX} ${maxY - minY}`);
  graphSvg.style.maxWidth = Math.round(2.2 * (maxX - minX)) + "px";

  function edgePath(i) {
    const s = E.s[i], r = E.r[i], t = recvNode[r], k = recvKind[r];
    const x1 = xs[s], y1 = ys[s] - boxH / 2;
    const x2 = xs[t] + (k < 3 ? (k - 1) * boxW / 3 : 0), y2 = ys[t] + boxH / 2;
    const c = (y1 - y2) * 0.5;
    const bow = Math.abs(x2 - x1) < boxW && (y1 - y2) > 2.5 * boxH ? Math.min(70, (y1 - y2) * 0.22) : 0;
    return `M${x1.toFixed(1)} ${y1.toFixed(1)}C${(x1 + bow).toFixed(1)} ${(y1 - c).toFixed(1)} ` +
           `${(x2 + bow).toFixed(1)} ${(y2 + c).toFixed(1)} ${x2.toFixed(1)} ${y2.toFixed(1)}`;
  }
  const width = (i) => (0.6 + 4.4 * (smax > 0 ? Math.sqrt(Math.abs(E.score[i]) / smax) : 0)).toFixed(2);

  // ---------------------------------------------------------------------------- state & drawing
  const state = {n: -1, count: 0, drawn: 0, nodes: 0, selected: -1, renderMs: 0};
  function prefixLength(n) {  // edges with entry <= n (they come first)
    let lo = 0, hi = M;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (E.entry[mid] <= n) lo = mid + 1; else hi = mid; }
    return lo;
  }

  function draw(n) {
    const t0 = performance.now();
    const count = prefixLength(n), cap = D.max_drawn;
    const inCircuit = new Uint8Array(S + 1);
    for (let i = 0; i < count; i++) { inCircuit[E.s[i]] = 1; inCircuit[recvNode[E.r[i]]] = 1; }
    const drawn = [];
    if (count > 0) {
      for (let j = 0; j < M && drawn.length < Math.min(count, cap); j++) {
        const i = byRank[j];
        if (E.entry[i] <= n) drawn.push(i);
      }
    }
    const parts = new Array(drawn.length), hits = drawn.length <= DASH_LIMIT ? [] : null;
    for (let j = drawn.length - 1, o = 0; j >= 0; j--, o++) {  // weakest first: strong edges on top
      const i = drawn[j], k = QKV[recvKind[E.r[i]]], d = edgePath(i);
      parts[o] = `<path d="${d}" class="${E.score[i] >= 0 ? "pos" : "neg"}${k ? " " + k : ""}"` +
                 ` stroke-width="${width(i)}" data-i="${i}"></path>`;
      if (hits) hits.push(`<path d="${d}" data-i="${i}"></path>`);
    }
    edgesG.innerHTML = parts.join("");
    hitsG.innerHTML = hits ? hits.join("") : "";  // wide transparent strokes: easier to hover
    edgesG.classList.toggle("plain", drawn.length > DASH_LIMIT);  // dashes are slow to paint
    let nNodes = 0;
    for (let v = 0; v <= S; v++) {
      const live = inCircuit[v] || v === S;
      nNodes += live && v !== 0 ? 1 : 0;
      nodeEls[v].classList.toggle("out", !live && v !== 0);
    }
    nNodes += inCircuit[0];
    Object.assign(state, {n: n, count: count, drawn: drawn.length, nodes: nNodes});
    edgesG.setAttribute("data-n", n);
    edgesG.setAttribute("data-count", count);
    edgesG.setAttribute("data-drawn", drawn.length);
    const pct = N ? (100 * n / N) : 0;
    $("status").textContent = `top ${n.toLocaleString("en")} of ${N.toLocaleString("en")} edges ` +
      `(${pct < 1 ? pct.toPrecision(2) : pct.toFixed(1)}%) by |score| → ${count.toLocaleString("en")} ` +
      `edge${count === 1 ? "" : "s"} and ${nNodes} node${nNodes === 1 ? "" : "s"} after pruning`;
    const warn = $("warning");
    warn.hidden = drawn.length <= DASH_LIMIT;
    warn.textContent = (count > cap ? `Drawing the ${cap.toLocaleString("en")} strongest of the ` +
      `${count.toLocaleString("en")} circuit edges (the page caps drawn edges to stay responsive). ` : "") +
      (drawn.length > DASH_LIMIT ? `Above ${DASH_LIMIT.toLocaleString("en")} drawn edges q/k/v are told ` +
      "apart only by where they end (left/centre/right), not by dash pattern." : "");
    if (state.selected >= 0) showNode(state.selected);
    updateCurve();
    state.renderMs = performance.now() - t0;
  }

  // ---------------------------------------------------------------------------- size controls
  const slider = $("size-slider"), numN = $("size-n"), numPct = $("size-pct");
  const logN = Math.log1p(N);
  const sliderToN = (v) => Math.min(N, Math.round(Math.expm1(v / 1000 * logN)));
  const nToSlider = (n) => logN > 0 ? Math.round(1000 * Math.log1p(n) / logN) : 0;
  numN.max = N;
  let pending = null;
  function setSize(n, from) {
    n = Math.max(0, Math.min(N, Math.round(n)));
    if (from !== "slider") slider.value = nToSlider(n);
    if (from !== "n") numN.value = n;
    if (from !== "pct") numPct.value = N ? +(100 * n / N).toPrecision(4) : 0;
    for (const b of document.querySelectorAll("#mib-row button")) b.classList.toggle("active", +b.dataset.n === n);
    if (n !== state.n) draw(n);
  }
  function schedule(n, from) {  // coalesce slider events into one redraw per frame
    if (pending === null) requestAnimationFrame(() => { const p = pending; pending = null; setSize(p.n, p.from); });
    pending = {n: n, from: from};
  }
  slider.addEventListener("input", () => schedule(sliderToN(+slider.value), "slider"));
  const fromN = () => { if (numN.value !== "" && isFinite(+numN.value)) setSize(+numN.value, "n"); };
  numN.addEventListener("input", fromN);
  numN.addEventListener("change", fromN);
  const fromPct = () => {
    const p = +numPct.value;
    if (numPct.value !== "" && isFinite(p)) setSize(Math.floor(Math.min(100, Math.max(0, p)) * N / 100 + 1e-9), "pct");
  };
  numPct.addEventListener("input", fromPct);
  numPct.addEventListener("change", fromPct);
  for (const [p, n] of D.mib) {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.n = n;
    b.textContent = p + "%";
    b.title = `${n.toLocaleString("en")} edges (floor of ${p}% of ${N.toLocaleString("en")})`;
    b.addEventListener("click", () => setSize(n, "mib"));
    $("mib-row").appendChild(b);
    const o = document.createElement("option");
    o.value = nToSlider(n);
    $("mib-ticks").appendChild(o);
  }

  // ---------------------------------------------------------------------------- hover & click
  const tip = $("tooltip");
  let hovered = null;
  const unhover = () => { if (hovered) hovered.classList.remove("hover"); hovered = null; tip.hidden = true; };
  const onOver = (ev) => {
    const i = ev.target.dataset ? ev.target.dataset.i : undefined;
    if (i === undefined) return;
    unhover();
    hovered = edgesG.querySelector(`path[data-i="${i}"]`);
    if (hovered) hovered.classList.add("hover");
    const k = recvKind[E.r[i]];
    tip.innerHTML = `<b class="tip-name">${esc(edgeName(i))}</b><br>score <span class="tip-score">` +
      `${fmt(E.score[i])}</span> · rank <span class="tip-rank">${E.rank[i]}</span> of ${N} by |score|` +
      (k < 3 ? `<br>into the ${KIND_NAMES[k]} input` : "") + `<br>in the circuit from n = ${E.entry[i]}`;
    tip.hidden = false;
    moveTip(ev);
  };
  for (const g of [edgesG, hitsG]) {
    g.addEventListener("mouseover", onOver);
    g.addEventListener("mousemove", moveTip);
    g.addEventListener("mouseout", unhover);
  }
  function moveTip(ev) {
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = (ev.clientY + 14) + "px";
  }
  nodesG.addEventListener("click", (ev) => {
    const g = ev.target.closest(".node");
    if (g) showNode(+g.dataset.node);
  });
  graphSvg.addEventListener("click", (ev) => { if (!ev.target.closest(".node")) showNode(-1); });

  function showNode(v) {
    if (state.selected >= 0) nodeEls[state.selected].classList.remove("selected");
    state.selected = v;
    edgesG.classList.toggle("focus", v >= 0);
    if (v < 0) {
      $("node-title").textContent = "Node";
      $("node-info").innerHTML = '<p class="hint">Click a node to list its edges in the circuit.</p>';
      return;
    }
    nodeEls[v].classList.add("selected");
    const inc = [], out = [];
    for (let i = 0; i < state.count; i++) {
      if (recvNode[E.r[i]] === v) inc.push(i);
      if (E.s[i] === v) out.push(i);
    }
    for (const p of edgesG.children) {
      const i = +p.dataset.i;
      if (E.s[i] === v || recvNode[E.r[i]] === v) p.classList.add("hl");
    }
    const table = (list, title) => {
      list.sort((a, b) => E.rank[a] - E.rank[b]);
      const shown = list.slice(0, 300).map((i) => `<tr><td>${esc(edgeName(i))}</td>` +
        `<td class="num">${fmt(E.score[i])}</td><td class="num">#${E.rank[i]}</td></tr>`).join("");
      const more = list.length > 300 ? `<p class="hint">and ${list.length - 300} more</p>` : "";
      return `<h3>${title} (${list.length})</h3>` + (list.length ? `<table>${shown}</table>` : "") + more;
    };
    $("node-title").textContent = nodes[v] + (state.count ? "" : " (empty circuit)");
    $("node-info").innerHTML = `<div class="incoming">${table(inc, "incoming edges")}</div>` +
      `<div class="outgoing">${table(out, "outgoing edges")}</div>`;
  }

  // ---------------------------------------------------------------------------- curve & legend
  const C = D.curve, curveSvg = $("curve");
  const CW = 340, CH = 210, cl = 38, cr = 12, ct = 10, cb = 30;
  let cx = null, cy = null;
  function buildCurve() {
    if (!C) {
      $("curve-pane").querySelector("h2").textContent = "Faithfulness";
      $("faith-readout").textContent = "No faithfulness curve was given (pass faithfulness.csv with --curve).";
      curveSvg.style.display = "none";
      return;
    }
    const fs = C.faithfulness;
    const lo = Math.min(0, ...fs) - 0.14, hi = Math.max(1, ...fs) + 0.08;
    cx = (n) => cl + (CW - cl - cr) * (logN > 0 ? Math.log1p(n) / logN : 0);
    cy = (f) => ct + (CH - ct - cb) * (hi - f) / (hi - lo);
    const ax = el("g", {class: "axis"}, curveSvg);
    el("line", {x1: cl, x2: CW - cr, y1: CH - cb, y2: CH - cb}, ax);
    el("line", {x1: cl, x2: cl, y1: ct, y2: CH - cb}, ax);
    for (let p = 0; Math.pow(10, p) <= N; p++) {
      const x = cx(Math.pow(10, p));
      el("line", {x1: x, x2: x, y1: CH - cb, y2: CH - cb + 4}, ax);
      el("text", {x: x, y: CH - cb + 14, "text-anchor": "middle"}, ax).textContent = p < 4 ? String(Math.pow(10, p)) : "1e" + p;
    }
    el("text", {x: (cl + CW - cr) / 2, y: CH - 3, "text-anchor": "middle"}, ax).textContent = "edges n (top-n by |score|, log scale)";
    for (const f of [0, 0.5, 1]) {
      el("text", {x: cl - 4, y: cy(f), "text-anchor": "end", "dominant-baseline": "central"}, ax).textContent = String(f);
    }
    const b = D.baselines;
    el("line", {class: "baseline full", x1: cl, x2: CW - cr, y1: cy(1), y2: cy(1)}, curveSvg);
    el("line", {class: "baseline empty", x1: cl, x2: CW - cr, y1: cy(0), y2: cy(0)}, curveSvg);
    el("text", {class: "curve-label", x: CW - cr - 2, y: cy(1) - 5, "text-anchor": "end"}, curveSvg).textContent =
      "full model" + (b.full !== null ? ` (metric ${fmt3(b.full)})` : "");
    el("text", {class: "curve-label", x: CW - cr - 2, y: cy(0) + 11, "text-anchor": "end"}, curveSvg).textContent =
      "empty circuit" + (b.empty !== null ? ` (metric ${fmt3(b.empty)})` : "");
    el("path", {class: "curve-line", d: C.n.map((n, j) => (j ? "L" : "M") + cx(n).toFixed(1) + " " + cy(fs[j]).toFixed(1)).join("")}, curveSvg);
    el("line", {class: "cursor", id: "curve-cursor", x1: 0, x2: 0, y1: ct, y2: CH - cb}, curveSvg);
    C.n.forEach((n, j) => {
      const c = el("circle", {class: "curve-pt", cx: cx(n), cy: cy(fs[j]), r: 3.2, "data-n": n}, curveSvg);
      el("title", {}, c).textContent = `n = ${n}: faithfulness ${fs[j].toFixed(3)} (click to show)`;
      c.addEventListener("click", () => setSize(n, "curve"));
    });
  }
  function updateCurve() {
    if (!C) return;
    const n = state.n, cur = $("curve-cursor");
    cur.setAttribute("x1", cx(n));
    cur.setAttribute("x2", cx(n));
    for (const c of curveSvg.querySelectorAll(".curve-pt")) c.classList.toggle("now", +c.dataset.n === n);
    const j = C.n.indexOf(n), out = $("faith-readout");
    if (j >= 0) {
      out.textContent = `faithfulness at n = ${n}: ${C.faithfulness[j].toFixed(3)}` +
        (C.metric[j] !== null ? ` (metric ${fmt3(C.metric[j])})` : "");
      return;
    }
    let a = -1;
    for (let q = 0; q < C.n.length; q++) if (C.n[q] < n) a = q;
    const at = (q) => `n = ${C.n[q]}: ${C.faithfulness[q].toFixed(3)}`;
    out.textContent = `faithfulness at n = ${n}: not measured` + (a < 0 ? ` (first measured ${at(0)})` :
      a === C.n.length - 1 ? ` (last measured ${at(a)})` : ` (measured ${at(a)} and ${at(a + 1)})`);
  }
  function buildLegend() {
    const g = $("legend");
    const rows = [["q", "query input (dashed, enters left)"], ["k", "key input (dotted, enters centre)"],
                  ["v", "value input (dash-dot, enters right)"], ["", "MLP / logits input (solid)"]];
    rows.forEach(([k, label], j) => {
      el("path", {d: `M8 ${12 + j * 18}H58`, class: "neg " + k, "stroke-width": 2.4, fill: "none"}, g).style.stroke = "#333";
      el("text", {x: 66, y: 12 + j * 18}, g).textContent = label;
    });
    const cut = D.score_legend.indexOf(" (");  // "higher = ..." and "(graph.json's sign, ...)"
    const sense = cut < 0 ? [D.score_legend, ""] : [D.score_legend.slice(0, cut), D.score_legend.slice(cut + 1)];
    el("text", {class: "score-legend", x: 8, y: 86}, g).textContent = "score: " + sense[0];
    el("text", {x: 8, y: 100}, g).textContent = sense[1];
    el("path", {d: "M8 118H58", class: "pos", "stroke-width": 3, fill: "none"}, g);
    el("text", {x: 66, y: 118}, g).textContent = "score > 0: carries the behaviour";
    el("path", {d: "M8 136H58", class: "neg", "stroke-width": 3, fill: "none"}, g);
    el("text", {x: 66, y: 136}, g).textContent = "score < 0: ablating it helps";
    el("text", {x: 8, y: 156}, g).textContent = "width grows with |score|; faded nodes: not in the circuit";
  }

  // ---------------------------------------------------------------------------- start
  const m = D.meta, bits = [];
  for (const k of ["model", "task", "method", "intervention", "n_examples"]) if (m[k] !== undefined) bits.push(`${k} ${m[k]}`);
  bits.push(`${N.toLocaleString("en")} edges, ${nodes.length} nodes (${L} layers × ${H} heads)`);
  if (D.stored_in_graph) bits.push(`the file's own circuit: ${D.stored_in_graph.toLocaleString("en")} edges`);
  $("meta").textContent = bits.join(" · ");
  buildCurve();
  buildLegend();
  setSize(D.n, "start");
  window.circuitViewer = {setSize: (n) => setSize(n, "api"), state: state, data: D, sliderToN: sliderToN};
  document.body.setAttribute("data-ready", "1");
})();
