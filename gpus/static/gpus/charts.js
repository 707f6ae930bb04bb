// GPU history charts: one line per GPU, data from /gpus/chart (served by the console itself).
(function () {
  "use strict";
  const charts = [];
  function load(canvas, range) {
    const url = canvas.dataset.url + "?range=" + encodeURIComponent(range) + "&metric=" + encodeURIComponent(canvas.dataset.metric);
    return fetch(url, { credentials: "same-origin" }).then((r) => r.json()).then((data) => {
      const datasets = data.series.map((s) => ({ label: s.label, data: s.points.map((p) => ({ x: p[0], y: p[1] })), pointRadius: 0, borderWidth: 1.5 }));
      if (canvas._chart) { canvas._chart.data.datasets = datasets; canvas._chart.options.scales.y.title.text = data.unit; canvas._chart.update("none"); return; }
      canvas._chart = new Chart(canvas, {
        type: "line",
        data: { datasets: datasets },
        options: {
          animation: false, parsing: false, normalized: true,
          scales: { x: { type: "linear", ticks: { callback: (v) => new Date(v).toLocaleString() } }, y: { beginAtZero: true, title: { display: true, text: data.unit } } },
          plugins: { legend: { position: "bottom" }, decimation: { enabled: true, algorithm: "lttb" } },
        },
      });
      charts.push(canvas);
    });
  }
  function loadAll(range) { document.querySelectorAll("canvas.gpu-chart").forEach((c) => load(c, range)); }
  document.addEventListener("DOMContentLoaded", function () {
    let current = "1h";
    document.querySelectorAll(".range-button").forEach((button) => {
      button.addEventListener("click", () => {
        current = button.dataset.range;
        document.querySelectorAll(".range-button").forEach((b) => b.setAttribute("aria-pressed", b === button ? "true" : "false"));
        loadAll(current);
      });
    });
    loadAll(current);
    setInterval(() => loadAll(current), 30000);
  });
})();
