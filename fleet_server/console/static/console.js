// edgefleet console: live parts of a page. An element with data-poll is refreshed from that URL
// every data-seconds seconds (a server-rendered fragment), while the tab is visible. The pages
// work without this script; it only saves the reload.
(function () {
  "use strict";
  function poll(el) {
    var url = el.getAttribute("data-poll");
    var seconds = parseFloat(el.getAttribute("data-seconds") || "2");
    var busy = false;
    function tick() {
      if (busy || document.hidden) return;
      // keep what the reader opened or focused: a details element they expanded stays expanded
      var open = Array.prototype.map.call(el.querySelectorAll("details"), function (d) { return d.open; });
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) {
          if (r.status === 401) { window.location.reload(); return null; }
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (html === null || html === undefined) return;
          el.innerHTML = html;
          el.querySelectorAll("details").forEach(function (d, i) { if (i < open.length) d.open = open[i]; });
          el.setAttribute("data-updated", String(Date.now()));
        })
        .catch(function () { /* the next tick tries again */ })
        .then(function () { busy = false; });
    }
    window.setInterval(tick, seconds * 1000);
  }
  document.querySelectorAll("[data-poll]").forEach(poll);
})();
