// coordlock status page: refresh the live part every few seconds, filters, force-unlock.
// No framework and no build step; the server renders all HTML.
(function () {
  "use strict";
  var body = document.body;
  var live = document.getElementById("live");
  var status = document.getElementById("status");
  var pause = document.getElementById("pause");
  var message = document.getElementById("message");
  var token = document.getElementById("token");
  var every = parseFloat(body.getAttribute("data-refresh") || "5") * 1000;
  var api = body.getAttribute("data-api");
  var timer = null;
  var paused = false;
  var busy = false;

  function say(text, bad) {
    message.textContent = text;
    message.className = bad ? "banner bad" : "banner";
    message.hidden = false;
    setTimeout(function () { message.hidden = true; }, 6000);
  }

  function schedule() {
    clearTimeout(timer);
    if (!paused && every > 0) timer = setTimeout(update, every);
  }

  function update() {
    if (busy) return schedule();
    busy = true;
    var url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    fetch(url, { cache: "no-store", headers: { "Accept": "text/html" } })
      .then(function (reply) {
        return reply.text().then(function (html) {
          live.innerHTML = html;
          body.setAttribute("data-updated", String(Date.now()));
          if (paused) return;  // paused while this answer was on its way
          status.textContent = reply.ok
            ? "updated " + new Date().toLocaleTimeString()
            : "refresh failed: HTTP " + reply.status;
        });
      })
      .catch(function (err) { if (!paused) status.textContent = "refresh failed: " + err; })
      .then(function () { busy = false; schedule(); });
  }

  pause.addEventListener("click", function () {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    status.textContent = paused ? "paused" : "auto-refresh every " + every / 1000 + " s";
    if (!paused) update(); else clearTimeout(timer);
  });

  // Filters apply as soon as they change (the form still works without JavaScript).
  Array.prototype.forEach.call(document.querySelectorAll(".filters select"), function (el) {
    el.addEventListener("change", function () { el.form.submit(); });
  });

  if (token) {
    token.value = sessionStorage.getItem("coordlock-token") || "";
    token.addEventListener("input", function () {
      sessionStorage.setItem("coordlock-token", token.value);
    });
  }

  live.addEventListener("click", function (ev) {
    var button = ev.target.closest ? ev.target.closest("button.unlock") : null;
    if (!button) return;
    var name = button.getAttribute("data-lock");
    if (!token || !token.value) { say("Enter the unlock token first.", true); return; }
    var question = "Force-release lock \u201c" + name + "\u201d held by " +
      button.getAttribute("data-holder") + " (fence " + button.getAttribute("data-fence") +
      ")?\n\nIts holder is not stopped: it finds its lease lost at its next renewal.";
    if (!window.confirm(question)) return;
    button.disabled = true;
    fetch(api + "/unlock", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + token.value },
      body: JSON.stringify({ name: name, confirm: name })
    })
      .then(function (reply) {
        return reply.json().then(function (data) {
          if (reply.ok) {
            say(data.released ? "Released \u201c" + name + "\u201d." : "\u201c" + name + "\u201d was not held.");
          } else {
            say("Not unlocked: " + (data.error || "HTTP " + reply.status), true);
          }
        });
      })
      .catch(function (err) { say("Not unlocked: " + err, true); })
      .then(function () { button.disabled = false; update(); });
  });

  schedule();
})();
