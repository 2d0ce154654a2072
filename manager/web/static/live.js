// Progressive enhancement only: every page works without this script.
// 1. /endpoints: polls /endpoints.json and swaps the endpoints fragment in place.
// 2. The run form: while the POST waits for the result, says so and counts the seconds (the
//    server answers with the result, or after RUN_WAIT_S with the task's page link).
(function () {
  var box = document.getElementById("endpoints-live");
  if (box && window.fetch) {
    var poll = function () {
      fetch("/endpoints.json", {credentials: "same-origin"})
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) { if (data) box.innerHTML = data.html; })
        .catch(function () {})
        .then(function () { setTimeout(poll, 2000); });
    };
    setTimeout(poll, 2000);
  }
  var form = document.getElementById("run-form");
  var progress = document.getElementById("run-progress");
  if (form && progress) {
    form.addEventListener("submit", function () {
      var started = Date.now();
      var button = document.getElementById("run-submit");
      var tick = function () {
        var s = Math.floor((Date.now() - started) / 1000);
        progress.textContent = "Running… " + s + " s (after " + progress.getAttribute("data-wait") +
          " s this page shows the task's link; the task keeps running)";
      };
      tick();
      progress.hidden = false;
      setInterval(tick, 1000);
      // disabled after the submit has taken the form's values (a disabled button sends nothing)
      setTimeout(function () { if (button) { button.disabled = true; } }, 0);
    });
  }
})();
