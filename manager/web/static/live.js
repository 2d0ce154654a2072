// Polls /endpoints.json and swaps the endpoints fragment in place (the page also works without it).
(function () {
  var box = document.getElementById("endpoints-live");
  if (!box || !window.fetch) return;
  function poll() {
    fetch("/endpoints.json", {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) { if (data) box.innerHTML = data.html; })
      .catch(function () {})
      .then(function () { setTimeout(poll, 2000); });
  }
  setTimeout(poll, 2000);
})();
