// The pending page follows its request: it asks the JSON API every 2 seconds and, once the
// request is approved, continues to the page the visitor wanted; once it is decided
// otherwise it reloads, so the server shows why. Without this script the page refreshes
// itself (a <noscript> meta refresh) and has a "Check again" link.
"use strict";
(function () {
  var card = document.getElementById("pending");
  if (!card) return;
  var next = card.getAttribute("data-next") || "/";
  if (next.charAt(0) !== "/" || next.charAt(1) === "/" || next.charAt(1) === "\\") next = "/";
  var state = card.getAttribute("data-state");
  if (state === "active") { window.location.replace(next); return; }
  if (state !== "pending") return;
  var api = card.getAttribute("data-api");
  function check() {
    fetch(api, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (g) {
        if (g && g.state === "active") { window.location.replace(next); return; }
        if (g && g.state !== "pending") { window.location.reload(); return; }
        setTimeout(check, 2000);
      })
      .catch(function () { setTimeout(check, 2000); });
  }
  setTimeout(check, 2000);
})();
