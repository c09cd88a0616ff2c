// Spec pages: the version switcher keeps the section fragment (#§3.4) when changing version.
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("select.bn-version-select").forEach(function (sel) {
    sel.addEventListener("change", function () {
      window.location.href = sel.value + window.location.hash;
    });
  });
});
