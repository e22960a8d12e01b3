// Demo Replay: mark the recordings the viewer may not open, as the list API says.
// Behind jitgate with `lists: annotate`, each such recording in the API's list carries
// {"jitgate": {"locked": true, "scope": ..., "request_url": ...}}: its row gets a lock and
// a link to request access; a "reason" (a sensitivity rule's, or "metadata unknown") is
// shown under it. A recording missing from the list (`lists: filter`) loses its
// row. Without jitgate, or if the list cannot be read, the page stays as it is.
(function () {
  "use strict";

  var script = document.currentScript;
  var url = script && script.getAttribute("data-list");

  function lockRow(row, marker) {
    row.classList.add("locked");
    var cell = row.querySelector("td");
    // A padlock drawn in SVG: no emoji font needed.
    var svg = "http://www.w3.org/2000/svg";
    var icon = document.createElementNS(svg, "svg");
    icon.setAttribute("viewBox", "0 0 16 16");
    icon.setAttribute("aria-hidden", "true");
    var body = document.createElementNS(svg, "rect");
    [["x", "3"], ["y", "7"], ["width", "10"], ["height", "8"], ["rx", "1.5"]].forEach(function (a) {
      body.setAttribute(a[0], a[1]);
    });
    var shackle = document.createElementNS(svg, "path");
    shackle.setAttribute("d", "M5 7V5a3 3 0 0 1 6 0v2");
    icon.appendChild(body);
    icon.appendChild(shackle);
    var badge = document.createElement("span");
    badge.className = "lock";
    badge.title = marker.reason || (marker.scope ? "No access to " + marker.scope : "No access");
    badge.appendChild(icon);
    badge.appendChild(document.createTextNode("Locked"));
    cell.appendChild(document.createElement("br"));
    cell.appendChild(badge);
    if (marker.reason) {
      var why = document.createElement("span");
      why.className = "lock-reason";
      why.textContent = marker.reason;
      cell.appendChild(document.createTextNode(" "));
      cell.appendChild(why);
    }
    if (marker.request_url) {
      var link = document.createElement("a");
      link.className = "request";
      link.href = marker.request_url;
      link.textContent = "Request access";
      cell.appendChild(document.createTextNode(" "));
      cell.appendChild(link);
    }
  }

  async function mark() {
    var data;
    try {
      var resp = await fetch(url, { credentials: "include", headers: { Accept: "application/json" } });
      if (!resp.ok) {
        return;
      }
      data = await resp.json();
    } catch (err) {
      return;
    }
    if (!data || !Array.isArray(data.results)) {
      return;
    }
    var listed = {};
    data.results.forEach(function (item) {
      listed[String(item.id)] = item;
    });
    document.querySelectorAll("tr[data-recording]").forEach(function (row) {
      var item = listed[row.getAttribute("data-recording")];
      if (item === undefined) {
        row.remove();
      } else if (item.jitgate && item.jitgate.locked) {
        lockRow(row, item.jitgate);
      }
    });
    document.body.setAttribute("data-list-checked", "true");
  }

  if (url) {
    mark();
  }
})();
