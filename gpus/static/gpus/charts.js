// History charts (GPUs, and a deployment's engine metrics): one line per series, data from the chart's
// data-url (served by the console itself). Each chart
// fills its box (a fixed-height .chart-box), times are written in the page's language, and a chart
// without samples says so instead of drawing an empty grid.
(function () {
  "use strict";
  var lang = document.documentElement.lang || undefined;
  var RANGE_HOURS = { "1h": 1, "24h": 24, "7d": 168, "30d": 720 };
  var current = "1h";

  function timeFormat() {
    var hours = RANGE_HOURS[current] || 1;
    var options = hours <= 24 ? { hour: "2-digit", minute: "2-digit" }
      : { month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit" };
    return new Intl.DateTimeFormat(lang, options);
  }

  function showEmpty(canvas, empty) {
    var note = canvas.parentElement.querySelector(".chart-empty");
    if (note) note.hidden = !empty;
    canvas.hidden = empty;
  }

  function load(canvas) {
    var url = canvas.dataset.url + "?range=" + encodeURIComponent(current) + "&metric=" + encodeURIComponent(canvas.dataset.metric)
      + (canvas.dataset.gpu ? "&gpu=" + encodeURIComponent(canvas.dataset.gpu) : "");
    return fetch(url, { credentials: "same-origin" }).then(function (r) { return r.json(); }).then(function (data) {
      var datasets = data.series.map(function (s) {
        return { label: s.label, data: s.points.map(function (p) { return { x: p[0], y: p[1] }; }), pointRadius: 0, borderWidth: 1.5 };
      });
      var empty = !datasets.some(function (d) { return d.data.length > 0; });
      showEmpty(canvas, empty);
      var format = timeFormat();
      var until = Date.now(), since = until - (RANGE_HOURS[current] || 1) * 3600 * 1000;  // the whole range
      if (canvas._chart) {
        canvas._chart.options.scales.x.min = since;
        canvas._chart.options.scales.x.max = until;
        canvas._chart.data.datasets = datasets;
        canvas._chart.options.scales.y.title.text = data.unit;
        canvas._chart.options.scales.x.ticks.callback = function (v) { return format.format(new Date(v)); };
        canvas._chart.update("none");
        return;
      }
      canvas._chart = new Chart(canvas, {
        type: "line",
        data: { datasets: datasets },
        options: {
          animation: false, parsing: false, normalized: true, responsive: true, maintainAspectRatio: false,
          interaction: { mode: "nearest", intersect: false },
          scales: {
            x: { type: "linear", min: since, max: until, ticks: { maxTicksLimit: 6, maxRotation: 0, callback: function (v) { return format.format(new Date(v)); } } },
            y: { beginAtZero: true, suggestedMax: data.unit === "%" ? 100 : undefined, title: { display: true, text: data.unit } },
          },
          plugins: {
            legend: { position: "bottom", labels: { boxWidth: 12 } },
            tooltip: { callbacks: { title: function (items) { return items.length ? new Intl.DateTimeFormat(lang, { dateStyle: "short", timeStyle: "medium" }).format(new Date(items[0].parsed.x)) : ""; } } },
          },
        },
      });
    });
  }
  function loadAll() { document.querySelectorAll("canvas.gpu-chart").forEach(function (c) { load(c); }); }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".range-button").forEach(function (button) {
      button.addEventListener("click", function () {
        current = button.dataset.range;
        document.querySelectorAll(".range-button").forEach(function (b) { b.setAttribute("aria-pressed", b === button ? "true" : "false"); });
        loadAll();
      });
    });
    loadAll();
    setInterval(loadAll, 30000);
  });
})();
