// jaxinterp attribution-graph viewer: plain JavaScript and SVG, no library, no network.
// Draws a pruned attribution graph (circuit-tracer's graph.json, shipped by graph_viewer.py):
// token embeddings at the bottom, one row per layer (features, then the layer's error node, in
// each position's column), logit targets at the top; links coloured by sign, width by |weight|.
// Position mode (position_viewer.py: a position-level circuit) reads its row names, columns, edge
// names and q/k/v styles from the data.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("graph-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  const fmt = (x) => (x === null || x === undefined) ? "–" :
    (Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0)) ? x.toExponential(3) :
      x.toPrecision(4);
  const el = (tag, attrs, parent) => {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  };
  const N = D.nodes, S = D.links.s, T = D.links.t, W = D.links.w;
  // Position mode (position_viewer.py): rows and columns named by the data, edges by name.
  const nRows = D.n_rows || D.n_layers + 2, nPos = D.prompt_tokens.length;
  const posOf = (p) => D.columns ? D.columns[p] : p;  // a column's token position
  const maxW = D.max_abs_weight > 0 ? D.max_abs_weight : 1;
  const width = (w) => 0.6 + 5.4 * Math.sqrt(Math.abs(w) / maxW);

  // ----------------------------------------------------------------------------------- header
  $("prompt").innerHTML = (D.row_tokens || D.prompt_tokens).map((t, i) =>
    `<span title="position ${i}">${esc(t)}</span>`).join(" ");
  const counts = { feature: 0, error: 0, embedding: 0, logit: 0 };
  for (const n of N) counts[n.type]++;
  $("meta").textContent = D.meta_line ||
    `${counts.feature} features, ${counts.error} error nodes, ` +
    `${counts.embedding} tokens, ${counts.logit} logit targets; ${S.length} links` +
    (D.scan ? ` · transcoders ${D.scan}` : "") +
    (D.node_threshold !== null ? ` · pruned at node threshold ${D.node_threshold}` : "") +
    (D.edge_threshold !== null ? `, edge threshold ${D.edge_threshold}` : "") +
    (D.shared_ids.length ? ` · ${D.shared_ids.length} node ids name two nodes (circuit-tracer's ` +
      `id scheme), ${D.ambiguous_links} links to them ambiguous` : "");

  // ----------------------------------------------------------------------------------- layout
  // Each (row, position) cell holds its nodes side by side, features wrapped WRAP to a line; the
  // columns are as wide as their widest cell, the rows as tall as their tallest.
  const TOP = 26, LEFT = 78, STEP = 17, LINE = 17, PAD = 16, WRAP = 10, CHAR = 6.6;
  const BOTTOM = D.columns ? 48 : 34;  // position mode: a token line under the positions
  const labelW = (n) => Math.max(34, CHAR * n.label.length + 14);
  const boxed = (n) => n.type !== "feature" && n.type !== "error";  // labelled boxes
  const cells = new Map();  // "row,pos" -> node indices, in drawing order
  N.forEach((n, i) => {
    const k = n.row + "," + n.pos;
    if (!cells.has(k)) cells.set(k, []);
    cells.get(k).push(i);
  });
  const order = { feature: 0, error: 1, embedding: 2, logit: 3, input: 2, head: 2, mlp: 2,
    logits: 2 };
  const cellW = new Map(), cellLines = new Map();
  for (const [k, list] of cells) {
    list.sort((a, b) => order[N[a].type] - order[N[b].type] ||
      (N[b].type === "logit" ? N[b].prob - N[a].prob :
        (N[a].influence ?? 1) - (N[b].influence ?? 1)));
    const small = list.filter((i) => !boxed(N[i])).length;
    const wide = list.filter((i) => boxed(N[i])).reduce((s, i) => s + labelW(N[i]) + 6, 0);
    cellW.set(k, wide + Math.min(small, WRAP) * STEP);
    cellLines.set(k, Math.max(1, Math.ceil(small / WRAP)));
  }
  const colW = [];
  for (let p = 0; p < nPos; p++) {
    let w = 46;
    for (let r = 0; r < nRows; r++) w = Math.max(w, (cellW.get(r + "," + p) || 0) + PAD);
    colW.push(w);
  }
  const colX = [LEFT];
  for (let p = 0; p < nPos; p++) colX.push(colX[p] + colW[p]);
  const rowH = [];
  for (let r = 0; r < nRows; r++) {
    let lines = 1;
    for (let p = 0; p < nPos; p++) lines = Math.max(lines, cellLines.get(r + "," + p) || 1);
    rowH.push(Math.max(r === 0 || r === nRows - 1 ? 70 : 104, lines * LINE + 60));
  }
  const rowTop = [];  // rows from the top: logits first
  let acc = TOP;
  for (let r = nRows - 1; r >= 0; r--) { rowTop[r] = acc; acc += rowH[r]; }
  const gridBottom = acc;
  const W_SVG = colX[nPos] + 12, H_SVG = gridBottom + BOTTOM;
  const rowY = (r) => rowTop[r] + rowH[r] / 2;
  const X = new Float64Array(N.length), Y = new Float64Array(N.length);
  for (const [k, list] of cells) {
    const [r, p] = k.split(",").map(Number);
    const x0 = colX[p] + (colW[p] - cellW.get(k)) / 2, lines = cellLines.get(k);
    let x = x0, j = 0;
    for (const i of list) {
      if (boxed(N[i])) {
        X[i] = x + (labelW(N[i]) + 6) / 2;
        Y[i] = rowY(r);
        x += labelW(N[i]) + 6;
        continue;
      }
      X[i] = x + (j % WRAP) * STEP + STEP / 2;
      Y[i] = rowY(r) + (Math.floor(j / WRAP) - (lines - 1) / 2) * LINE;
      j++;
    }
  }
  const svg = $("graph");
  svg.setAttribute("viewBox", `0 0 ${W_SVG} ${H_SVG}`);
  // natural size, scaled up (at most 1.5x) to fill a wider pane; a wider graph scrolls
  const scale = Math.min(1.5, Math.max(1, ($("graph-pane").clientWidth - 4) / W_SVG));
  svg.setAttribute("width", Math.round(W_SVG * scale));
  svg.setAttribute("height", Math.round(H_SVG * scale));

  // ------------------------------------------------------------------------------------- grid
  const grid = $("grid");
  const rowName = (r) => D.row_names ? D.row_names[r] :
    r === 0 ? "tokens" : r === nRows - 1 ? "logits" : `layer ${r - 1}`;
  for (let r = 0; r < nRows; r++) {
    if (r % 2 === 1) el("rect", { class: "row-band", x: LEFT, y: rowTop[r],
      width: colX[nPos] - LEFT, height: rowH[r] }, grid);
    el("text", { class: "row-label", x: LEFT - 8, y: rowY(r) }, grid).textContent = rowName(r);
  }
  for (let p = 0; p <= nPos; p++) {
    el("line", { class: "col-line", x1: colX[p], x2: colX[p], y1: TOP, y2: gridBottom }, grid);
  }
  for (let p = 0; p < nPos; p++) {
    el("text", { class: "col-pos", x: colX[p] + colW[p] / 2, y: gridBottom + 16 }, grid)
      .textContent = `pos ${posOf(p)}`;
    if (D.columns) {
      el("text", { class: "col-label", x: colX[p] + colW[p] / 2, y: gridBottom + 32 }, grid)
        .textContent = D.prompt_tokens[p];
    }
  }

  // ------------------------------------------------------------------------------------ links
  const linksG = $("links"), hitsG = $("link-hits"), nodesG = $("nodes");
  const byWeight = Array.from(S.keys()).sort((a, b) => Math.abs(W[a]) - Math.abs(W[b]));
  const linkEls = new Array(S.length);
  const curve = (i) => {
    const x1 = X[S[i]], y1 = Y[S[i]], x2 = X[T[i]], y2 = Y[T[i]], ym = (y1 + y2) / 2;
    return `M${x1.toFixed(1)},${y1.toFixed(1)} C${x1.toFixed(1)},${ym.toFixed(1)} ` +
      `${x2.toFixed(1)},${ym.toFixed(1)} ${x2.toFixed(1)},${y2.toFixed(1)}`;
  };
  // q, k, v inputs dashed, dotted, dash-dotted as matplotlib draws them (scaled by the width)
  const DASH = { q: [5, 2], k: [1, 1.5], v: [6, 2, 1, 2] }, QKV = D.links.qkv;
  for (const i of byWeight) {
    const d = curve(i);
    linkEls[i] = el("path", { d, class: W[i] >= 0 ? "pos" : "neg", "stroke-width": width(W[i]),
      "data-i": i }, linksG);
    if (QKV && QKV[i]) {
      linkEls[i].classList.add(QKV[i]);
      linkEls[i].setAttribute("stroke-dasharray",
        DASH[QKV[i]].map((x) => (x * Math.max(1.5, width(W[i]))).toFixed(1)).join(" "));
    }
    el("path", { d, "data-i": i }, hitsG);
  }
  linksG.dataset.count = S.length;

  // ------------------------------------------------------------------------------------ nodes
  const nodeEls = N.map((n, i) => {
    const g = el("g", { class: `node ${n.type}${n.target ? " target" : ""}`, "data-node": i,
      transform: `translate(${X[i].toFixed(1)},${Y[i].toFixed(1)})` }, nodesG);
    if (n.type === "feature") {
      el("circle", { r: 6 }, g);
    } else if (n.type === "error") {
      el("rect", { x: -6, y: -6, width: 12, height: 12 }, g);
    } else {
      const w = labelW(n);
      el("rect", { x: -w / 2, y: -10, width: w, height: 20, rx: 4 }, g);
      el("text", {}, g).textContent = n.label;
    }
    return g;
  });
  nodesG.dataset.count = N.length;

  // ----------------------------------------------------------------------------------- legend
  const lg = $("legend");
  const sample = (y, w, cls, text) => {
    el("path", { d: `M10,${y} L70,${y}`, "stroke-width": width(w), class: cls,
      style: `stroke:var(--${cls});fill:none` }, lg);
    el("text", { x: 78, y: y + 4, "font-size": 11 }, lg).textContent = text;
  };
  sample(12, maxW, "pos", `+${fmt(maxW)} (largest |weight|): excites`);
  sample(30, maxW / 10, "pos", `+${fmt(maxW / 10)}`);
  sample(48, -maxW / 3, "neg", `−${fmt(maxW / 3)}: inhibits`);
  const glyph = (x, type, text) => {
    const g = el("g", { class: `node ${type}`, transform: `translate(${x},84)` }, lg);
    if (type === "feature") el("circle", { r: 6 }, g);
    else if (type === "error") el("rect", { x: -6, y: -6, width: 12, height: 12 }, g);
    else el("rect", { x: -12, y: -8, width: 24, height: 16, rx: 4 }, g);
    el("text", { x: 0, y: 24, "font-size": 10 }, g).textContent = text;
  };
  glyph(30, "feature", "feature");
  glyph(110, "error", "error");
  glyph(190, "embedding", "token");
  glyph(270, "logit", "logit");
  $("legend-text").innerHTML =
    "<p>A link's <b>weight</b> is the source's <b>direct effect</b> on the target in the local " +
    "replacement model (attention patterns, norms and MLP error terms frozen): what the source " +
    "writes into the target's input along paths through no other feature: a feature's " +
    "pre-activation (its encoder's reading), or a logit target's demeaned logit. A source " +
    "feature's weight includes its activation. Blue is positive, red negative; width grows as " +
    "√(|weight| / largest |weight|).</p>" +
    "<p>A node's <b>influence</b> is circuit-tracer's: the cumulative share of the total " +
    "influence on the logits carried by the nodes at least as influential as it (lower is more " +
    "influential). Nodes are placed by layer (row) and token position (column); within a " +
    "cell, features are ordered by influence, most influential first.</p>";
  if (D.legend) {  // position mode: the sign convention and the q/k/v line styles
    lg.innerHTML = "";
    lg.setAttribute("viewBox", "0 0 340 150");
    sample(12, maxW, "pos", `+${fmt(maxW)} (largest): ${D.legend.positive}`);
    sample(30, maxW / 10, "pos", `+${fmt(maxW / 10)}`);
    sample(48, -maxW / 3, "neg", `−${fmt(maxW / 3)}: ${D.legend.negative}`);
    D.legend.qkv.forEach(([k, text], j) => {
      const y = 72 + 20 * j;
      el("path", { d: `M10,${y} L70,${y}`, "stroke-width": 2, style: "stroke:#333;fill:none",
        "stroke-dasharray": k ? DASH[k].map((x) => x * 2).join(" ") : "none" }, lg);
      el("text", { x: 78, y: y + 4, "font-size": 11 }, lg).textContent = text;
    });
    $("legend-text").innerHTML = D.legend.html;
  }

  // ------------------------------------------------------------------------ hover and click
  const tip = $("tooltip");
  const moveTip = (ev) => {
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 4) + "px";
  };
  const nodeLines = (i) => {
    const n = N[i], rows = [[n.type, n.name]];
    rows.push(["position", `${posOf(n.pos)} (“${D.prompt_tokens[n.pos]}”)`]);
    if (n.layer !== null) rows.push(["layer", n.layer]);
    if (n.feature !== null) rows.push([n.type === "logit" ? "token" : "feature", n.feature]);
    if (n.activation !== null) rows.push(["activation", fmt(n.activation)]);
    if (n.prob !== null) rows.push(["probability", fmt(n.prob)]);
    if (n.influence !== null) rows.push(["influence", fmt(n.influence)]);
    return rows;
  };
  let hovered = null;
  const unhover = () => {
    if (hovered) hovered.classList.remove("hover");
    hovered = null;
    tip.hidden = true;
  };
  const showTip = (ev, html, target) => {
    unhover();
    hovered = target;
    target.classList.add("hover");
    tip.innerHTML = html;
    tip.hidden = false;
    moveTip(ev);
  };
  nodesG.addEventListener("mouseover", (ev) => {
    const g = ev.target.closest(".node");
    if (!g) return;
    const i = +g.dataset.node;
    showTip(ev, nodeLines(i).map(([k, v], j) => j === 0 ? `<b class="tip-name">${esc(v)}</b>` :
      `${esc(k)} <span class="tip-${esc(k)}">${esc(v)}</span>`).join("<br>"), g);
  });
  const onLink = (ev) => {
    const i = ev.target.dataset ? ev.target.dataset.i : undefined;
    if (i === undefined) return;
    const name = D.links.name ? D.links.name[i] : `${N[S[i]].name} → ${N[T[i]].name}`;
    showTip(ev, `<b class="tip-name">${esc(name)}</b><br>` +
      `${esc(D.weight_label || "weight")} <span class="tip-weight">${fmt(W[i])}</span>`,
      linkEls[i]);
  };
  for (const g of [nodesG, linksG, hitsG]) {
    g.addEventListener("mousemove", moveTip);
    g.addEventListener("mouseout", unhover);
  }
  hitsG.addEventListener("mouseover", onLink);
  linksG.addEventListener("mouseover", onLink);

  let selected = -1;
  const showNode = (v) => {
    if (selected >= 0) nodeEls[selected].classList.remove("selected");
    for (const p of linksG.querySelectorAll("path.hl")) p.classList.remove("hl");
    selected = v;
    linksG.classList.toggle("focus", v >= 0);
    if (v < 0) {
      $("node-title").textContent = "Node";
      $("node-info").innerHTML = '<p class="hint">Click a node to list its inputs and outputs.</p>';
      return;
    }
    nodeEls[v].classList.add("selected");
    const inc = [], out = [];
    for (let i = 0; i < S.length; i++) {
      if (T[i] === v) { inc.push(i); linkEls[i].classList.add("hl"); }
      if (S[i] === v) { out.push(i); linkEls[i].classList.add("hl"); }
    }
    const table = (list, title, other) => {
      list.sort((a, b) => Math.abs(W[b]) - Math.abs(W[a]));
      const rows = list.map((i) => `<tr data-node="${other(i)}"><td>` +
        `${esc(D.links.name ? D.links.name[i] : N[other(i)].name)}` +
        `</td><td class="num">${fmt(W[i])}</td></tr>`).join("");
      return `<h3>${title} (${list.length})</h3>` +
        (list.length ? `<table class="${title.toLowerCase()}">${rows}</table>` :
          '<p class="hint">none</p>');
    };
    $("node-title").textContent = N[v].name;
    $("node-info").innerHTML = "<dl>" + nodeLines(v).slice(1).map(([k, val]) =>
      `<dt>${esc(k)}</dt><dd>${esc(val)}</dd>`).join("") + "</dl>" +
      table(inc, "Inputs", (i) => S[i]) + table(out, "Outputs", (i) => T[i]);
  };
  nodesG.addEventListener("click", (ev) => {
    const g = ev.target.closest(".node");
    if (g) showNode(+g.dataset.node);
  });
  svg.addEventListener("click", (ev) => { if (!ev.target.closest(".node")) showNode(-1); });
  $("node-info").addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr[data-node]");
    if (tr) showNode(+tr.dataset.node);
  });
  document.body.dataset.ready = "1";
})();
