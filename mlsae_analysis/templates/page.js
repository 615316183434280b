// Shared by every report page: JS errors are written into #js-errors (tests read it), and a click on
// a figure shows it enlarged.
(function () {
  "use strict";
  function showError(text) {
    var box = document.getElementById("js-errors");
    if (!box) { document.addEventListener("DOMContentLoaded", function () { showError(text); }); return; }
    box.hidden = false;
    box.textContent += text + "\n";
  }
  window.addEventListener("error", function (event) {
    showError("error: " + event.message + " (line " + event.lineno + ")");
  });
  window.addEventListener("unhandledrejection", function (event) {
    showError("unhandled rejection: " + event.reason);
  });
  document.addEventListener("DOMContentLoaded", function () {
    var lightbox = document.getElementById("lightbox");
    document.querySelectorAll("figure img").forEach(function (img) {
      img.addEventListener("click", function () {
        lightbox.querySelector("img").src = img.src;
        lightbox.hidden = false;
      });
    });
    lightbox.addEventListener("click", function () { lightbox.hidden = true; });
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape") { lightbox.hidden = true; }
    });
  });
})();
