// The /-/ui/ pages' one script (served from /-/ui/-/static/ui_script.js: the CSP allows no inline script).
// The pages work without it; it only helps: the list's filter applies as you type (the server
// filters: the form is submitted after a pause), and the overview's counters refresh every few
// seconds from /-/ui/-/counters.json.  Values are written with textContent, never as markup.
"use strict";
(function () {
  var form = document.getElementById("filter");
  var input = document.getElementById("q");
  if (form && input) {
    var timer = null;
    var end = input.value.length;
    input.setSelectionRange(end, end);
    input.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { form.submit(); }, 400);
    });
    var kind = document.getElementById("kind");
    if (kind) { kind.addEventListener("change", function () { form.submit(); }); }
  }
  var proxies = document.getElementById("proxies");
  if (proxies && window.fetch) {
    var refresh = function () {
      fetch("/-/ui/-/counters.json", { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) {
          if (!data) { return; }
          proxies.querySelectorAll("tr[data-key]").forEach(function (row) {
            var counts = data.proxies[row.getAttribute("data-key")] || {};
            row.querySelectorAll("[data-counter]").forEach(function (cell) {
              var value = counts[cell.getAttribute("data-counter")];
              cell.textContent = value === undefined ? "0" : String(value);
            });
          });
          document.querySelectorAll("[data-gauge]").forEach(function (cell) {
            var value = data.gauges[cell.getAttribute("data-gauge")];
            if (value !== undefined) { cell.textContent = String(value); }
          });
        })
        .catch(function () {});
    };
    setInterval(refresh, 5000);
  }
})();
