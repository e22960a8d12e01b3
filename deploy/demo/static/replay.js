// Demo Replay: load a recording's rrweb events from the API and play them with rrweb-player.
// If the API refuses (e.g. jitgate without a grant), show its answer instead of a player.
(function () {
  "use strict";

  var root = document.getElementById("replay");
  var url = root.getAttribute("data-snapshots");
  var statusEl = document.getElementById("status");
  var playerEl = document.getElementById("player");

  function showError(title, text) {
    statusEl.hidden = true;
    document.getElementById("error-title").textContent = title;
    document.getElementById("error-body").textContent = text;
    document.getElementById("error").hidden = false;
  }

  function pretty(text) {
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch (e) {
      return text;
    }
  }

  // An HTML answer is a page meant for the user (the proxy's refusal or sign-in page):
  // show it as the whole document, at its own URL so that its relative links work.
  function showPage(html, pageUrl) {
    try {
      history.replaceState(null, "", pageUrl);
    } catch (e) {
      window.location.assign(pageUrl);
      return;
    }
    document.open();
    document.write(html);
    document.close();
  }

  function play(events) {
    var PlayerClass = window.rrwebPlayer && (window.rrwebPlayer.Player || window.rrwebPlayer.default || window.rrwebPlayer);
    if (typeof PlayerClass !== "function") {
      showError("Player missing", "rrweb-player did not load from /static/rrweb-player/.");
      return;
    }
    var meta = null;
    for (var i = 0; i < events.length; i++) {
      if (events[i].type === 4) { meta = events[i].data; break; }
    }
    var vw = (meta && meta.width) || 1024;
    var vh = (meta && meta.height) || 576;
    // Fit the recording's aspect ratio into the page width and the window's height
    // (rrweb-player adds an 80px controller below the frame).
    var width = Math.min(playerEl.clientWidth || 1024, 1120);
    var room = window.innerHeight - playerEl.getBoundingClientRect().top - 80 - 24;
    var height = Math.max(320, Math.min(Math.round((width * vh) / vw), room));
    var seconds = Math.round((events[events.length - 1].timestamp - events[0].timestamp) / 1000);
    statusEl.textContent = events.length + " events · " + Math.floor(seconds / 60) + ":" +
      String(seconds % 60).padStart(2, "0") + " · " + ((meta && meta.href) || "");
    statusEl.className = "status ok";
    var player = new PlayerClass({
      target: playerEl,
      props: {
        events: events,
        width: width,
        height: height,
        autoPlay: true,
        skipInactive: true,
        mouseTail: { duration: 600, lineCap: "round", lineWidth: 3, strokeStyle: "rgba(73, 80, 246, 0.45)" },
      },
    });
    // ?t=SECONDS starts the replay at that offset, like PostHog's share links.
    var start = parseFloat(new URLSearchParams(window.location.search).get("t") || "");
    if (start > 0) {
      player.goto(start * 1000, true);
    }
  }

  async function load() {
    var resp;
    try {
      resp = await fetch(url, { credentials: "include", headers: { Accept: "application/json" } });
    } catch (err) {
      showError("Could not reach the server", String(err));
      return;
    }
    var type = (resp.headers.get("content-type") || "").toLowerCase();
    var text = await resp.text();
    if (type.indexOf("text/html") !== -1) {
      showPage(text, resp.url || url);
      return;
    }
    if (!resp.ok) {
      showError(resp.status + " " + resp.statusText, pretty(text));
      return;
    }
    var data;
    try {
      data = JSON.parse(text);
    } catch (err) {
      showError("The recording is not valid JSON", text.slice(0, 2000));
      return;
    }
    var events = Array.isArray(data) ? data : data && data.snapshots;
    if (!Array.isArray(events) || events.length < 2) {
      showError("The recording has no events", pretty(text).slice(0, 2000));
      return;
    }
    play(events);
  }

  load();
})();
