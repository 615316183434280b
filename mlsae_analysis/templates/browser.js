// The latent browser. Reads the JSON object in #latent-data (written by html_report.py), lists the
// latents a page at a time, searches them by id or by text of their top contexts, and shows one
// latent: its distribution over layers, its top contexts with the active token marked, and its
// nearest decoder neighbours. The URL hash #search=TEXT fills the search box and #latent=ID selects.
(function () {
  "use strict";
  var started = performance.now();
  var PAGE_SIZE = 50;
  var SVG = "http://www.w3.org/2000/svg";
  var TYPES = { uint8: Uint8Array, int8: Int8Array, uint16: Uint16Array, int32: Int32Array,
                uint32: Uint32Array, float32: Float32Array };

  // ---------------------------------------------------------------- data
  function unpack(spec) {
    var binary = atob(spec.b64);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) { bytes[i] = binary.charCodeAt(i); }
    return new TYPES[spec.dtype](bytes.buffer);
  }

  // [0, c0, c0 + c1, ...]: where each run of a list of counts starts, and where the last one ends
  function starts(counts) {
    var out = new Uint32Array(counts.length + 1);
    for (var i = 0; i < counts.length; i++) { out[i + 1] = out[i] + counts[i]; }
    return out;
  }

  var dataElement = document.getElementById("latent-data");
  var raw = JSON.parse(dataElement.textContent);
  dataElement.remove();  // the parsed arrays are all that is needed; free the text
  var nLatents = raw.n_latents;
  var layers = raw.layers;
  var nLayers = layers.length;
  var vocab = raw.vocab;
  var nTokensAnalysed = raw.n_tokens;
  var meanLayer = unpack(raw.mean_layer);
  var varLayer = unpack(raw.var_layer);
  var nActive = unpack(raw.n_active);
  var maxActivation = unpack(raw.max_activation);
  var pLayer = unpack(raw.p_layer);  // [nLatents * nLayers] in units of 1/65535
  var ctxStart = starts(unpack(raw.ctx_count));  // [nLatents + 1] into contexts
  var ctxTokenStart = starts(unpack(raw.ctx_length));  // [nContexts + 1] into ctxTokens
  var ctxTokens = unpack(raw.ctx_tokens);  // indices into vocab
  var ctxOffset = unpack(raw.ctx_offset);
  var ctxLayer = raw.ctx_layer ? unpack(raw.ctx_layer) : null;  // position on the layer axis; null: per-token latents (crosscoder)
  var layerLabel = raw.layer_label || "Distribution over layers, P(L | J = {latent})";
  var ctxActivation = unpack(raw.ctx_activation);
  var kNeighbours = raw.k_neighbours;
  var nbIndex = kNeighbours ? unpack(raw.nb_index) : null;  // [nLatents * k]
  var nbCosine = kNeighbours ? unpack(raw.nb_cosine) : null;
  raw = null;

  function probabilities(latent) {
    var out = [];
    for (var l = 0; l < nLayers; l++) { out.push(pLayer[latent * nLayers + l] / 65535); }
    return out;
  }
  function activeToken(context) {
    return vocab[ctxTokens[ctxTokenStart[context] + ctxOffset[context]]];
  }
  function fmt(x, digits) {
    return isFinite(x) ? Number(x).toFixed(digits) : "–";
  }
  function frequencyText(latent) {
    return nTokensAnalysed ? (100 * nActive[latent] / nTokensAnalysed).toPrecision(2) + "% of tokens" : "";
  }

  // ---------------------------------------------------------------- DOM helpers
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    for (var key in attrs || {}) { node.setAttribute(key, attrs[key]); }
    (children || []).forEach(function (child) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }
  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    for (var key in attrs) { node.setAttribute(key, attrs[key]); }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  // Token text with newlines and tabs made visible (they would otherwise vanish or break the row).
  function visible(text) {
    return text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }
  function tokenText(vocabIndices) {
    var text = "";
    for (var i = 0; i < vocabIndices.length; i++) { text += vocab[vocabIndices[i]]; }
    return visible(text);
  }

  // ---------------------------------------------------------------- list order and search
  var SORT_KEYS = {
    mean_layer: function (j) { return meanLayer[j]; },
    frequency: function (j) { return -nActive[j]; },
    max_activation: function (j) { return -maxActivation[j]; },
    var_layer: function (j) { return -varLayer[j]; },
    id: function (j) { return j; }
  };
  var orders = {};
  function orderFor(sortName) {  // active latents in the chosen order, cached per order
    if (!orders[sortName]) {
      var ids = [];
      for (var j = 0; j < nLatents; j++) { if (nActive[j] > 0) { ids.push(j); } }
      var key = SORT_KEYS[sortName];
      var keys = new Float64Array(nLatents);
      ids.forEach(function (j) { var k = key(j); keys[j] = isNaN(k) ? Infinity : k; });
      ids.sort(function (a, b) { return keys[a] - keys[b] || a - b; });
      orders[sortName] = ids;
    }
    return orders[sortName];
  }

  // All contexts, lower-cased, in one string (each followed by \u0001), with where each context and
  // its active token lie in it: one indexOf pass then finds a text anywhere, across token boundaries.
  var textIndex = null;
  function buildTextIndex() {
    var lower = vocab.map(function (s) { return s.toLowerCase(); });
    var nContexts = ctxStart[nLatents];
    var parts = new Array(ctxTokens.length + nContexts);
    var contextAt = new Uint32Array(nContexts + 1), activeAt = new Uint32Array(nContexts), activeEnd = new Uint32Array(nContexts);
    var latentOf = new Uint32Array(nContexts);
    var length = 0, p = 0;
    for (var j = 0; j < nLatents; j++) {
      for (var c = ctxStart[j]; c < ctxStart[j + 1]; c++) {
        latentOf[c] = j;
        contextAt[c] = length;
        var active = ctxTokenStart[c] + ctxOffset[c];
        for (var t = ctxTokenStart[c]; t < ctxTokenStart[c + 1]; t++) {
          if (t === active) { activeAt[c] = length; }
          parts[p++] = lower[ctxTokens[t]];
          length += lower[ctxTokens[t]].length;
          if (t === active) { activeEnd[c] = length; }
        }
        parts[p++] = "\u0001";
        length += 1;
      }
    }
    contextAt[nContexts] = length;
    textIndex = { text: parts.join(""), contextAt: contextAt, activeAt: activeAt, activeEnd: activeEnd, latentOf: latentOf };
  }
  // Per latent: 2 for each top context where the text overlaps the active token, 1 for each other context holding it.
  function textScores(text) {
    if (!textIndex) { buildTextIndex(); }
    var index = textIndex, scores = new Uint16Array(nLatents);
    var c = 0, best = 0, last = ctxStart[nLatents];
    for (var at = index.text.indexOf(text); at >= 0; at = index.text.indexOf(text, at + 1)) {
      var context = c;
      while (index.contextAt[context + 1] <= at) { context++; }
      if (context !== c) { scores[index.latentOf[c]] += best; best = 0; c = context; }
      best = Math.max(best, at < index.activeEnd[c] && at + text.length > index.activeAt[c] ? 2 : 1);
    }
    if (c < last) { scores[index.latentOf[c]] += best; }
    return scores;
  }
  // The latents to list for a query: a number is a latent id; any other text lists the latents whose
  // top contexts contain it, best score first, ties in the chosen sort order.
  function search(query, sortName) {
    var trimmed = query.trim();
    if (!trimmed) { return orderFor(sortName); }
    if (/^\d+$/.test(trimmed)) { return Number(trimmed) < nLatents ? [Number(trimmed)] : []; }
    var scores = textScores(query.toLowerCase());  // untrimmed: " the" should find the token " the"
    var ids = orderFor(sortName).filter(function (j) { return scores[j] > 0; });
    ids.sort(function (a, b) { return scores[b] - scores[a]; });  // stable: ties keep the sort order
    return ids;
  }

  // ---------------------------------------------------------------- the list
  var state = { ids: [], page: 0, selected: -1 };
  var searchBox = document.getElementById("latent-search");
  var sortBox = document.getElementById("latent-sort");
  var rowsBox = document.getElementById("latent-rows");

  function sparkline(latent) {
    var p = probabilities(latent);
    var top = Math.max.apply(null, p) || 1;
    var width = 60, height = 16, step = width / nLayers;
    var chart = svg("svg", { "class": "spark", viewBox: "0 0 " + width + " " + height, width: width, height: height });
    p.forEach(function (value, l) {
      var h = height * value / top;
      chart.appendChild(svg("rect", { x: l * step, y: height - h, width: Math.max(step - 0.4, 0.6), height: h }));
    });
    return chart;
  }
  function topTokenText(latent) {
    return ctxStart[latent + 1] > ctxStart[latent] ? "\u201c" + visible(activeToken(ctxStart[latent])) + "\u201d" : "";
  }

  function renderList() {
    var ids = state.ids;
    var pages = Math.max(1, Math.ceil(ids.length / PAGE_SIZE));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    rowsBox.textContent = "";
    var first = state.page * PAGE_SIZE;
    ids.slice(first, first + PAGE_SIZE).forEach(function (j) {
      var row = el("li", { "data-latent": j, "class": j === state.selected ? "selected" : "" }, [
        el("span", { "class": "id" }, ["#" + j]),
        sparkline(j),
        el("span", { "class": "el", title: "expected layer E[L]" }, [nActive[j] ? "E[L] " + fmt(meanLayer[j], 1) : "never active"]),
        el("span", { "class": "tok" }, [topTokenText(j)])
      ]);
      row.addEventListener("click", function () { select(j); });
      rowsBox.appendChild(row);
    });
    document.getElementById("list-count").textContent = ids.length + (ids.length === 1 ? " latent" : " latents");
    document.getElementById("page-label").textContent = ids.length ? "page " + (state.page + 1) + " of " + pages : "no match";
    document.getElementById("page-prev").disabled = state.page === 0;
    document.getElementById("page-next").disabled = state.page >= pages - 1;
  }

  function onSearchInput() {
    var searchStarted = performance.now();
    state.ids = search(searchBox.value, sortBox.value);
    state.page = 0;
    var query = searchBox.value.trim();
    if (query && state.ids.length) { select(state.ids[0]); }
    else if (/^\d+$/.test(query)) { showUnknown(query); }
    else { renderList(); }
    document.body.setAttribute("data-search-ms", Math.round(performance.now() - searchStarted));
  }

  // ---------------------------------------------------------------- one latent
  var detail = document.getElementById("latent-detail");

  function layerChart(latent) {
    var p = probabilities(latent);
    var width = 640, height = 210, left = 44, right = 10, topMargin = 12, bottom = 34;
    var plotW = width - left - right, plotH = height - topMargin - bottom;
    var ceiling = Math.max(0.05, Math.ceil(Math.max.apply(null, p) * 10) / 10);
    var step = plotW / nLayers;
    var chart = svg("svg", { "class": "layer-chart", viewBox: "0 0 " + width + " " + height, role: "img",
                             "aria-label": "distribution over layers of latent " + latent });
    [0, 0.5, 1].forEach(function (f) {
      var y = topMargin + plotH * (1 - f);
      chart.appendChild(svg("line", { x1: left, x2: width - right, y1: y, y2: y, "class": "grid" }));
      chart.appendChild(svg("text", { x: left - 6, y: y + 4, "class": "tick", "text-anchor": "end" }, (ceiling * f).toFixed(2)));
    });
    var labelEvery = Math.ceil(nLayers / 16);
    p.forEach(function (value, l) {
      var h = plotH * value / ceiling;
      var bar = svg("rect", { "class": "bar", x: left + l * step + step * 0.1, y: topMargin + plotH - h,
                              width: step * 0.8, height: h, "data-layer": layers[l], "data-p": value.toFixed(4) });
      bar.appendChild(svg("title", {}, "layer " + layers[l] + ": P = " + value.toFixed(4)));
      chart.appendChild(bar);
      if (l % labelEvery === 0 || l === nLayers - 1) {
        chart.appendChild(svg("text", { x: left + (l + 0.5) * step, y: height - bottom + 16, "class": "tick", "text-anchor": "middle" }, String(layers[l])));
      }
    });
    if (isFinite(meanLayer[latent])) {
      var x = left + (meanLayer[latent] + 0.5) * step;
      chart.appendChild(svg("line", { x1: x, x2: x, y1: topMargin - 4, y2: topMargin + plotH, "class": "mean" }));
      chart.appendChild(svg("text", { x: x + 4, y: topMargin + 6, "class": "mean-label" }, "E[L]"));
    }
    chart.appendChild(svg("text", { x: left + plotW / 2, y: height - 4, "class": "axis", "text-anchor": "middle" }, "layer"));
    return chart;
  }

  function contextsList(latent) {
    var rows = [];
    for (var c = ctxStart[latent]; c < ctxStart[latent + 1]; c++) {
      var tokens = ctxTokens.subarray(ctxTokenStart[c], ctxTokenStart[c + 1]);
      var at = ctxOffset[c];
      var badge = ctxLayer ? el("span", { "class": "badge", title: "layer of this activation" }, ["layer " + layers[ctxLayer[c]]])
                           : el("span", { "class": "badge", title: "the latent fired for this token, at every layer" }, ["all layers"]);
      rows.push(el("div", { "class": "context", "data-layer": ctxLayer ? layers[ctxLayer[c]] : "all", "data-activation": ctxActivation[c].toFixed(3) }, [
        badge,
        el("span", { "class": "act", title: "activation" }, [fmt(ctxActivation[c], 2)]),
        el("span", { "class": "left" }, [el("span", {}, [tokenText(tokens.subarray(0, at))])]),
        el("mark", {}, [tokenText(tokens.subarray(at, at + 1))]),
        el("span", { "class": "right" }, [tokenText(tokens.subarray(at + 1))])
      ]));
    }
    if (!rows.length) { return el("p", { "class": "note" }, ["No contexts: this latent never fired on the analysed tokens."]); }
    return el("div", { "class": "contexts" }, rows);
  }

  function neighboursList(latent) {
    if (!kNeighbours) {
      return el("p", { "class": "note" }, ["No decoder neighbours in this report: rebuild it with the run, " +
        "python -m mlsae_analysis.html_report ANALYSIS_DIR --run RUN_DIR"]);
    }
    var items = [];
    for (var r = 0; r < kNeighbours; r++) {
      var j = nbIndex[latent * kNeighbours + r];
      items.push(el("li", {}, [
        el("a", { "class": "neighbour", href: "#latent=" + j, "data-latent": j }, ["#" + j]),
        el("span", { "class": "cos" }, ["cos " + fmt(nbCosine[latent * kNeighbours + r], 3)]),
        sparkline(j),
        el("span", { "class": "el" }, [nActive[j] ? "E[L] " + fmt(meanLayer[j], 1) : "never active"]),
        el("span", { "class": "tok" }, [topTokenText(j)])
      ]));
    }
    return el("ol", { "class": "neighbours" }, items);
  }

  // An id that names no latent (from #latent=, a search or a link): say so instead of doing nothing.
  function showUnknown(text) {
    state.selected = -1;
    renderList();
    detail.textContent = "";
    detail.setAttribute("data-latent", "");
    detail.appendChild(el("p", { "class": "note unknown-latent" }, ["There is no latent " + text +
      " in this report: latent ids run from 0 to " + (nLatents - 1) + "."]));
  }

  function select(latent) {
    if (!(Number.isInteger(latent) && latent >= 0 && latent < nLatents)) { showUnknown(String(latent)); return; }
    state.selected = latent;
    var index = state.ids.indexOf(latent);
    if (index >= 0) { state.page = Math.floor(index / PAGE_SIZE); }
    renderList();
    var stats = nActive[latent]
      ? "E[L] = " + fmt(meanLayer[latent], 2) + " \u00b7 Var(L) = " + fmt(varLayer[latent], 2) + " \u00b7 fires on " +
        nActive[latent] + " tokens (" + frequencyText(latent) + ") \u00b7 max activation " + fmt(maxActivation[latent], 2)
      : "never active on the analysed tokens";
    detail.textContent = "";
    detail.setAttribute("data-latent", latent);
    detail.appendChild(el("h3", { id: "detail-title" }, ["Latent " + latent]));
    detail.appendChild(el("p", { "class": "detail-stats" }, [stats]));
    detail.appendChild(el("h4", {}, [layerLabel.split("{latent}").join(String(latent))]));
    detail.appendChild(layerChart(latent));
    detail.appendChild(el("h4", {}, ["Top contexts (active token marked; badge: the layer it fired at)"]));
    detail.appendChild(contextsList(latent));
    detail.appendChild(el("h4", {}, ["Nearest decoder neighbours (cosine similarity of decoder rows)"]));
    detail.appendChild(neighboursList(latent));
    try { history.replaceState(null, "", "#latent=" + latent); } catch (e) { /* some file:// settings forbid it */ }
  }

  // ---------------------------------------------------------------- wiring
  var pendingSearch = null;  // typing restarts the search a moment later, so a fast typist waits for one search only
  searchBox.addEventListener("input", function () {
    clearTimeout(pendingSearch);
    pendingSearch = setTimeout(onSearchInput, 120);
  });
  sortBox.addEventListener("change", onSearchInput);
  document.getElementById("page-prev").addEventListener("click", function () { state.page--; renderList(); });
  document.getElementById("page-next").addEventListener("click", function () { state.page++; renderList(); });
  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest("a[data-latent]") : null;
    if (!link) { return; }
    event.preventDefault();
    select(Number(link.getAttribute("data-latent")));
    if (!link.closest("#browser")) { document.getElementById("browser").scrollIntoView(); }
  });

  function followHash() {
    var hash = decodeURIComponent(location.hash.slice(1));
    if (hash.indexOf("search=") === 0) {
      searchBox.value = hash.slice("search=".length);
      searchBox.dispatchEvent(new Event("input"));  // exactly what typing does
    } else if (hash.indexOf("latent=") === 0) {
      var id = hash.slice("latent=".length).trim();
      if (/^\d+$/.test(id)) { select(Number(id)); } else { showUnknown("\u201c" + id + "\u201d"); }
    }
  }
  window.addEventListener("hashchange", followHash);
  state.ids = orderFor(sortBox.value);
  renderList();
  followHash();
  document.body.setAttribute("data-browser-ms", Math.round(performance.now() - started));  // load time, for diagnosis
  document.body.setAttribute("data-browser-ready", "1");
})();
