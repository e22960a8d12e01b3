// The jitgate status bar's countdown (proxy/statusbar.py). Without this script the bar
// still says when access ends; with it, the time left is counted down every second.
(function () {
  "use strict";
  var bar = document.getElementById("jitgate-statusbar");
  var out = bar && bar.querySelector(".jitgate-sb-left");
  var total = bar ? Number(bar.getAttribute("data-left")) : NaN;
  if (!out || !isFinite(total)) {
    return;
  }
  // Counted from the server's figure on the page's monotonic clock, so a client whose
  // wall clock is wrong still shows the right time left.
  var start = performance.now();
  function two(n) {
    return (n < 10 ? "0" : "") + n;
  }
  function tick() {
    var s = Math.max(0, Math.ceil(total - (performance.now() - start) / 1000));
    if (s === 0) {
      out.textContent = "access ended";
      bar.classList.add("jitgate-sb-ended");
      return;
    }
    var h = Math.floor(s / 3600);
    var m = Math.floor((s % 3600) / 60);
    out.textContent = (h ? h + ":" + two(m) : String(m)) + ":" + two(s % 60) + " left";
    if (s <= 300) {
      bar.classList.add("jitgate-sb-soon");
    }
    setTimeout(tick, 1000);
  }
  tick();
})();
