// Usage charts: data embedded in the page (json_script), drawn with the vendored Chart.js.
(function () {
  "use strict";
  function draw(canvas) {
    const data = JSON.parse(document.getElementById(canvas.dataset.source).textContent);
    const tokens = canvas.dataset.kind === "tokens";
    const datasets = (tokens ? data.tokens : data.requests).map((s) => ({ label: s.label, data: s.data, borderWidth: 1.5, pointRadius: 0 }));
    new Chart(canvas, {
      type: tokens ? "bar" : "line",
      data: { labels: data.labels, datasets: datasets },
      options: {
        animation: false,
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { stacked: tokens },
          y: { stacked: tokens, beginAtZero: true, title: { display: true, text: tokens ? data.axis.tokens : data.axis.requests } },
        },
        plugins: { legend: { position: "bottom" } },
      },
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("canvas.usage-chart").forEach(draw);
  });
})();
