// The interactive conformance matrix (data: window.BN_MATRIX, written by bn_ref/site.py from
// conformance/report.json) and the per-column filters of the "conventions at a glance" tables.
(function () {
  "use strict";
  var ORDER = ["fail", "error", "xfail", "skip", "pass", "none"];
  var LABEL = {fail: "fail", error: "error", xfail: "expected deviation", skip: "skipped", pass: "pass", none: "—"};

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else e.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { if (c) e.appendChild(c); });
    return e;
  }
  function worst(list) {
    var best = "none";
    list.forEach(function (s) { var i = ORDER.indexOf(s); if (i < 0) i = 1; if (i < ORDER.indexOf(best)) best = ORDER[i]; });
    return best;
  }
  function fmt(u) { return (u === null || u === undefined) ? "—" : (typeof u === "number" ? u.toPrecision(3) : String(u)); }
  function uniq(xs) { return xs.filter(function (x, i) { return xs.indexOf(x) === i; }); }

  function select(id, label, values) {
    var s = el("select", {id: id, "aria-label": label});
    s.appendChild(el("option", {value: "", text: "all"}));
    values.forEach(function (v) { s.appendChild(el("option", {value: v, text: v})); });
    return el("label", {}, [document.createTextNode(label), s]);
  }

  function buildMatrix(root, D) {
    root.innerHTML = "";
    var frameworks = uniq(D.rows.map(function (r) { return r.framework; }));
    var conventions = uniq(D.rows.map(function (r) { return String(r.convention.name); }));
    var filters = el("div", {cls: "bn-filters"}, [
      select("bn-f-framework", "framework", frameworks),
      select("bn-f-convention", "convention", conventions),
      select("bn-f-dtype", "dtype", D.dtypes),
      select("bn-f-group", "check group", D.groups),
      select("bn-f-status", "status", ORDER.slice(0, 5)),
    ]);
    root.appendChild(filters);
    var count = el("p", {id: "bn-count", cls: "bn-meta"});
    root.appendChild(count);
    var table = el("table", {id: "bn-matrix-table", cls: "bn-mx"});
    var head = el("tr", {}, [el("th", {text: "implementation"}), el("th", {text: "framework"}),
      el("th", {text: "convention"})]);
    D.groups.forEach(function (g) { head.appendChild(el("th", {text: g, "data-group": g, cls: "bn-gcol"})); });
    table.appendChild(el("thead", {}, [head]));
    var body = el("tbody");
    table.appendChild(body);
    root.appendChild(table);
    var detail = el("div", {id: "bn-detail", cls: "bn-detail", hidden: "hidden"});
    root.appendChild(detail);

    function state() {
      var v = function (id) { return document.getElementById(id).value; };
      return {framework: v("bn-f-framework"), convention: v("bn-f-convention"), dtype: v("bn-f-dtype"),
              group: v("bn-f-group"), status: v("bn-f-status")};
    }
    function checksOf(i, g, dtype) {
      return D.checks.filter(function (c) {
        return c[0] === i && (c[4] === g || c[4] === "case") && (!dtype || c[2] === dtype);
      });
    }
    function cellStatus(i, g, dtype) {
      var cell = D.rows[i].cells[g];
      if (!cell) return "none";
      if (!dtype) return cell.status;
      if (cell.status === "none") return "none";
      var own = checksOf(i, g, dtype).filter(function (c) { return c[4] === g; });
      return own.length ? worst(own.map(function (c) { return c[6]; })) : "pass";
    }
    function render() {
      var st = state();
      body.innerHTML = "";
      var groups = st.group ? [st.group] : D.groups;
      table.querySelectorAll("th.bn-gcol").forEach(function (th) {
        th.hidden = groups.indexOf(th.getAttribute("data-group")) < 0;
      });
      var shown = 0;
      D.rows.forEach(function (r, i) {
        if (st.framework && r.framework !== st.framework) return;
        if (st.convention && String(r.convention.name) !== st.convention) return;
        var statuses = groups.map(function (g) { return cellStatus(i, g, st.dtype); });
        if (st.status && statuses.indexOf(st.status) < 0) return;
        var tr = el("tr", {cls: "bn-row", "data-row": String(i), "data-framework": r.framework,
                           "data-convention": String(r.convention.name)});
        var name = el("td", {text: r.name, title: r.description || ""});
        if (r.build_skip || r.build_error) name.appendChild(el("div", {cls: "bn-meta", text: "not run: " + (r.build_skip || r.build_error)}));
        if (r.compute_dtype) name.appendChild(el("div", {cls: "bn-meta", text: "computes in " + r.compute_dtype}));
        tr.appendChild(name);
        tr.appendChild(el("td", {text: r.framework}));
        tr.appendChild(el("td", {text: String(r.convention.name)}));
        groups.forEach(function (g, k) {
          var s = statuses[k];
          var cell = r.cells[g] || {counts: {}};
          var counts = Object.keys(cell.counts || {}).map(function (key) { return cell.counts[key] + " " + key; }).join(", ");
          var td = el("td", {cls: "bn-cell bn-st-" + s, "data-group": g, "data-status": s,
                             title: counts || "no checks", tabindex: "0"});
          td.appendChild(el("div", {text: LABEL[s] || s}));
          if (!st.dtype && cell.worst !== null && cell.worst !== undefined) td.appendChild(el("div", {cls: "bn-meta", text: "worst " + fmt(cell.worst) + "×tol"}));
          td.addEventListener("click", function () { open(i, g); });
          td.addEventListener("keydown", function (e) { if (e.key === "Enter") open(i, g); });
          tr.appendChild(td);
        });
        body.appendChild(tr);
        shown += 1;
      });
      count.textContent = shown + " of " + D.rows.length + " implementations shown";
    }
    function open(i, g) {
      var st = state();
      var r = D.rows[i];
      var cell = r.cells[g] || {status: "none", counts: {}};
      var list = checksOf(i, g, st.dtype).slice().sort(function (a, b) {
        return (typeof b[7] === "number" ? b[7] : -1) - (typeof a[7] === "number" ? a[7] : -1);
      });
      table.querySelectorAll("td.bn-open").forEach(function (t) { t.classList.remove("bn-open"); });
      var td = table.querySelector('tr[data-row="' + i + '"] td[data-group="' + g + '"]');
      if (td) td.classList.add("bn-open");
      detail.innerHTML = "";
      detail.hidden = false;
      detail.setAttribute("data-row", String(i));
      detail.setAttribute("data-group", g);
      var c = r.convention;
      detail.appendChild(el("h3", {text: r.name + " — " + g}));
      detail.appendChild(el("p", {text: "Convention " + c.name + ": eps " + c.eps + ", momentum " + c.momentum +
        " on the " + c.momentum_on + " term, running var " + c.running_var + ", feature axis " + c.feature_axis +
        ", n = 1: " + c.single_value + ". Group status: " + (LABEL[cell.status] || cell.status) + "; checks: " +
        (Object.keys(cell.counts || {}).map(function (k) { return cell.counts[k] + " " + k; }).join(", ") || "none") +
        "; worst error " + fmt(cell.worst) + " × tolerance" + (st.dtype ? " (all dtypes)" : "") + "."}));
      if (r.build_skip || r.build_error) detail.appendChild(el("p", {cls: "bn-reason", text: "Not run: " + (r.build_skip || r.build_error)}));
      if (!list.length) {
        detail.appendChild(el("p", {cls: "bn-none", text: "No failing, deviating or skipped check" + (st.dtype ? " in " + st.dtype : "") + "."}));
      } else {
        var worstCheck = list[0];
        detail.appendChild(el("p", {cls: "bn-worst", text: list.length + " non-passing checks" + (st.dtype ? " in " + st.dtype : "") +
          "; the worst: " + worstCheck[1] + " / " + worstCheck[3] + " / " + worstCheck[5] + " at " + (typeof worstCheck[7] === "number" ? worstCheck[7].toExponential(2) : fmt(worstCheck[7])) + " × tolerance."}));
        var reasons = uniq(list.map(function (x) { return x[9]; })).filter(function (x) { return x >= 0; });
        reasons.forEach(function (k) {
          detail.appendChild(el("div", {cls: "bn-reason"}, [el("strong", {text: "Ledger reason: "}), document.createTextNode(D.reasons[k])]));
        });
        var cases = uniq(list.map(function (x) { return x[1]; }));
        var cmd = "python -m bn_ref.conformance --no-ledger --json /tmp/report.json -k '" + worstCheck[1] +
          "'\n# the worst case; the row '" + r.name + "' reports it in /tmp/report.json" +
          (cases.length > 1 ? "\n# all " + cases.length + " cases of this cell: " + cases.join(" ") : "");
        detail.appendChild(el("p", {text: "Reproduce (the harness runs every row on the selected cases; without the ledger the deviation shows as a failure):"}));
        detail.appendChild(el("pre", {cls: "bn-repro"}, [el("code", {text: cmd})]));
        uniq(list.map(function (x) { return x[10]; })).filter(Boolean).forEach(function (snip) {
          detail.appendChild(el("p", {text: "Minimal case found by the random search:"}));
          detail.appendChild(el("pre", {cls: "bn-repro"}, [el("code", {text: snip})]));
        });
        var t = el("table", {cls: "bn-checks"});
        t.appendChild(el("thead", {}, [el("tr", {}, ["case", "dtype", "step", "check", "status", "error × tol", "message"].map(function (h) { return el("th", {text: h}); }))]));
        var tb = el("tbody");
        list.slice(0, 300).forEach(function (x) {
          tb.appendChild(el("tr", {cls: "bn-check bn-st-" + x[6]}, [x[1], x[2], x[3], x[4] + "/" + x[5], LABEL[x[6]] || x[6], fmt(x[7]), x[8]].map(function (v) { return el("td", {text: String(v)}); })));
        });
        t.appendChild(tb);
        detail.appendChild(t);
        if (list.length > 300) detail.appendChild(el("p", {text: (list.length - 300) + " more not shown; filter by dtype to narrow."}));
      }
      history.replaceState(null, "", "#cell=" + i + "/" + encodeURIComponent(g));
    }
    ["bn-f-framework", "bn-f-convention", "bn-f-dtype", "bn-f-group", "bn-f-status"].forEach(function (id) {
      document.getElementById(id).addEventListener("change", function () { render(); detail.hidden = true; });
    });
    render();
    var m = /^#cell=(\d+)\/(.+)$/.exec(window.location.hash);
    if (m && D.rows[+m[1]]) open(+m[1], decodeURIComponent(m[2]));
  }

  function filterable(table) {
    var head = table.tHead.rows[0];
    var n = head.cells.length;
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    var fr = el("tr", {cls: "bn-colfilters"});
    var sels = [];
    for (var j = 0; j < n; j++) {
      var vals = uniq(rows.map(function (r) { return r.cells[j].textContent; })).sort();
      var s = el("select", {"aria-label": "filter " + head.cells[j].textContent, "data-col": String(j)});
      s.appendChild(el("option", {value: "", text: "all"}));
      vals.forEach(function (v) { s.appendChild(el("option", {value: v, text: v.length > 40 ? v.slice(0, 38) + "…" : v})); });
      sels.push(s);
      fr.appendChild(el("th", {}, [s]));
    }
    table.tHead.appendChild(fr);
    function apply() {
      rows.forEach(function (r) {
        r.hidden = !sels.every(function (s, j) { return !s.value || r.cells[j].textContent === s.value; });
      });
    }
    sels.forEach(function (s) { s.addEventListener("change", apply); });
  }

  function init() {
    var root = document.getElementById("bn-matrix");
    if (root && window.BN_MATRIX) buildMatrix(root, window.BN_MATRIX);
    document.querySelectorAll("table.bn-filterable").forEach(filterable);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
