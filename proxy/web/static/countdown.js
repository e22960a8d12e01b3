// Live countdown for the access pages: each [data-expires] element (unix seconds) shows the
// time left and ticks every second. Without this script the page still shows the expiry
// time and the minutes left when it was rendered.
"use strict";
(function () {
  var items = document.querySelectorAll("[data-expires]");
  if (!items.length) return;
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function tick() {
    var now = Date.now() / 1000;
    for (var i = 0; i < items.length; i++) {
      var left = Math.floor(Number(items[i].getAttribute("data-expires")) - now);
      if (left <= 0) {
        items[i].textContent = "(expired; reload the page)";
        items[i].classList.add("gone");
        continue;
      }
      var h = Math.floor(left / 3600), m = Math.floor((left % 3600) / 60), s = left % 60;
      items[i].textContent = "(" + (h ? h + ":" + pad(m) : m) + ":" + pad(s) + " left)";
    }
  }
  tick();
  setInterval(tick, 1000);
})();
