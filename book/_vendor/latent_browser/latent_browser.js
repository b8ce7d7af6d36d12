/* The latent browser: filter a crosscoder's latents by class, by any label the data has (the decision
   of an organism latent's best AUROC) and by any numeric column (ν, density, Δnorm, AUROC, ...), pick
   one, and read its top-activating contexts, decoder norms, cosine, ν and promoted tokens. Plain
   JavaScript, no dependencies. Data: window.LATENT_BROWSER[key] (index.js, loaded by the page) and
   chunk-XXXX.js files loaded on demand with <script> tags, which work under file://. Performance marks
   "latent-browser-ready" (list shown) and "latent-browser-shown" (a latent's contexts shown) let a
   benchmark time the page. */
(function () {
  "use strict";
  var chunks = {};      // key -> chunk number -> data
  var waiting = {};     // key/chunk -> callbacks
  window.latentBrowserChunk = function (key, data) {
    (chunks[key] = chunks[key] || {})[data.chunk] = data;
    (waiting[key + "/" + data.chunk] || []).forEach(function (cb) { cb(data); });
    delete waiting[key + "/" + data.chunk];
  };
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) { return v === null || v === undefined ? "–" : (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3)); }
  function loadChunk(root, key, c, cb) {
    if (chunks[key] && chunks[key][c]) return cb(chunks[key][c]);
    var id = key + "/" + c;
    if (waiting[id]) return waiting[id].push(cb);
    waiting[id] = [cb];
    var s = el("script", {src: root.dataset.base + "chunk-" + ("000" + c).slice(-4) + ".js"});
    s.onerror = function () { root.querySelector(".lb-detail").textContent = "could not load " + s.src; };
    document.head.appendChild(s);
  }
  function init(root) {
    var key = root.dataset.key, idx = (window.LATENT_BROWSER || {})[key];
    if (!idx) { root.textContent = "latent browser data " + key + " not found"; return; }
    var cols = Object.keys(idx.columns), labels = idx.labels || {}, labs = Object.keys(labels);
    var controls = el("div", {"class": "lb-controls"});
    var cls = el("select", {"class": "lb-class"});
    cls.appendChild(el("option", {value: ""}, "all classes"));
    idx.classes.forEach(function (c, i) { cls.appendChild(el("option", {value: String(i)}, c)); });
    controls.appendChild(el("label", {}, "class ")).appendChild(cls);
    var labSel = {};
    labs.forEach(function (name) {
      var s = el("select", {"class": "lb-label", "data-label": name});
      s.appendChild(el("option", {value: ""}, "any " + name));
      labels[name].names.forEach(function (n, i) { s.appendChild(el("option", {value: String(i)}, n)); });
      controls.appendChild(el("label", {}, name + " ")).appendChild(s);
      labSel[name] = s;
    });
    function labelOf(name, j) { var i = labels[name].of[j]; return i < 0 ? "–" : labels[name].names[i]; }
    var ranges = {};
    cols.forEach(function (c) {
      var lab = el("label", {"class": "lb-range"}, c + " ");
      var lo = el("input", {type: "number", step: "any", placeholder: "min", "data-col": c, "class": "lb-min"});
      var hi = el("input", {type: "number", step: "any", placeholder: "max", "data-col": c, "class": "lb-max"});
      lab.appendChild(lo); lab.appendChild(hi); controls.appendChild(lab);
      ranges[c] = [lo, hi];
    });
    var sort = el("select", {"class": "lb-sort"});
    cols.forEach(function (c) { sort.appendChild(el("option", {value: c}, "sort by " + c + " ↓")); });
    controls.appendChild(sort);
    var pick = el("input", {type: "number", min: "0", max: String(idx.n_latents - 1), placeholder: "latent #", "class": "lb-pick"});
    controls.appendChild(pick);
    var count = el("div", {"class": "lb-count"}), list = el("div", {"class": "lb-list"}), detail = el("div", {"class": "lb-detail"});
    root.appendChild(controls); root.appendChild(count);
    var body = el("div", {"class": "lb-body"}); body.appendChild(list); body.appendChild(detail); root.appendChild(body);
    function refresh() {
      var want = cls.value === "" ? -1 : Number(cls.value), out = [];
      for (var j = 0; j < idx.n_latents; j++) {
        if (want >= 0 && idx.class[j] !== want) continue;
        var ok = true;
        for (var n in labSel) {
          if (labSel[n].value !== "" && labels[n].of[j] !== Number(labSel[n].value)) { ok = false; break; }
        }
        for (var c in ranges) {
          var v = idx.columns[c][j], lo = ranges[c][0].value, hi = ranges[c][1].value;
          if ((lo !== "" || hi !== "") && v === null) { ok = false; break; }
          if (lo !== "" && v < Number(lo)) { ok = false; break; }
          if (hi !== "" && v > Number(hi)) { ok = false; break; }
        }
        if (ok) out.push(j);
      }
      var col = idx.columns[sort.value];
      out.sort(function (a, b) { return (col[b] === null ? -Infinity : col[b]) - (col[a] === null ? -Infinity : col[a]); });
      count.textContent = out.length + " of " + idx.n_latents + " latents match" + (out.length > 200 ? " (first 200 listed)" : "");
      list.innerHTML = "";
      var t = el("table"), head = el("tr");
      ["latent", "class"].concat(labs, cols).forEach(function (h) { head.appendChild(el("th", {}, h)); });
      t.appendChild(head);
      out.slice(0, 200).forEach(function (j) {
        var tr = el("tr", {"data-latent": String(j), "class": "lb-row"});
        tr.appendChild(el("td", {}, String(j))); tr.appendChild(el("td", {}, idx.classes[idx.class[j]]));
        labs.forEach(function (n) { tr.appendChild(el("td", {}, labelOf(n, j))); });
        cols.forEach(function (c) { tr.appendChild(el("td", {}, fmt(idx.columns[c][j]))); });
        tr.onclick = function () { show(j); };
        t.appendChild(tr);
      });
      list.appendChild(t);
    }
    function show(j) {
      detail.innerHTML = "";
      detail.appendChild(el("h4", {}, "latent " + j + " · " + idx.classes[idx.class[j]]));
      var facts = el("div", {"class": "lb-facts"});
      labs.forEach(function (n) { facts.appendChild(el("span", {}, n + " " + labelOf(n, j))); });
      cols.forEach(function (c) { facts.appendChild(el("span", {}, c + " " + fmt(idx.columns[c][j]))); });
      detail.appendChild(facts);
      loadChunk(root, key, Math.floor(j / idx.chunk_size), function (ch) {
        var lat = ch.latents[String(j)];
        Object.keys(lat.prom).reverse().forEach(function (m) {
          var p = el("div", {"class": "lb-prom"}, "promotes in " + m + ": ");
          lat.prom[m].forEach(function (t) { p.appendChild(el("code", {}, ch.tokens[t])); });
          detail.appendChild(p);
        });
        if (!lat.ctx.length) detail.appendChild(el("div", {"class": "lb-none"}, "no activation on the held-out text"));
        lat.ctx.forEach(function (c) {
          var d = el("div", {"class": "lb-context", title: "held-out sequence " + c.seq + ", max " + fmt(c.max)});
          c.t.forEach(function (t, i) {
            var s = el("span", {title: fmt(c.a[i] / 99 * c.max)}, ch.tokens[t].replace(/\n/g, "⏎"));
            s.style.background = "rgba(230,120,0," + (c.a[i] / 99).toFixed(2) + ")";
            if (i === c.c) s.className = "lb-centre";
            d.appendChild(s);
          });
          detail.appendChild(d);
        });
        if (window.performance && performance.mark) performance.mark("latent-browser-shown");
      });
    }
    [cls, sort].concat(labs.map(function (n) { return labSel[n]; })).forEach(function (e) { e.onchange = refresh; });
    Object.keys(ranges).forEach(function (c) { ranges[c].forEach(function (e) { e.oninput = refresh; }); });
    pick.onchange = function () { var j = Number(pick.value); if (j >= 0 && j < idx.n_latents) show(j); };
    refresh();
    if (window.performance && performance.mark) performance.mark("latent-browser-ready");
  }
  function start() { Array.prototype.forEach.call(document.querySelectorAll(".latent-browser"), init); }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
