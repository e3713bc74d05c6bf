// Sort any table.sortable by the clicked column: numbers by data-value, text otherwise;
// empty values (missing folds, absent classes) always last. No library, no network.
(function () {
  "use strict";
  function key(cell) {
    if (!cell) { return null; }
    var v = cell.getAttribute("data-value");
    if (v === null) { v = cell.textContent.trim(); }
    if (v === "" || v === "\u2013") { return null; }
    var n = Number(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  function sortBy(table, index, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var dir = th.getAttribute("aria-sort") === "descending" ? "ascending" : "descending";
    if (!th.hasAttribute("aria-sort") && th.classList.contains("name")) { dir = "ascending"; }
    var heads = table.tHead.rows[table.tHead.rows.length - 1].cells;
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute("aria-sort"); }
    th.setAttribute("aria-sort", dir);
    var sign = dir === "ascending" ? 1 : -1;
    rows.sort(function (a, b) {
      var x = key(a.cells[index]), y = key(b.cells[index]);
      if (x === null && y === null) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      if (typeof x !== typeof y) { x = String(x); y = String(y); }
      return x < y ? -sign : (x > y ? sign : 0);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.tHead.rows[table.tHead.rows.length - 1].cells;
    Array.prototype.forEach.call(heads, function (th, index) {
      th.setAttribute("title", "sort by " + th.textContent.trim());
      th.addEventListener("click", function () { sortBy(table, index, th); });
    });
  });
}());
