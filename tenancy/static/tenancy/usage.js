// Usage charts: data embedded in the page (json_script), drawn with the vendored Chart.js. Bucket times are
// written in the page's language (hours in the appliance's time zone, days as the UTC days the roll-ups
// count), each chart fills its fixed-height box, and a range without usage says so instead of an empty grid.
(function () {
  "use strict";
  var lang = document.documentElement.lang || undefined;

  function labels(data) {
    if (!data.moments) return data.labels;
    var hourly = data.period === "hour";
    var format = new Intl.DateTimeFormat(lang, hourly
      ? { month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", timeZone: data.time_zone || "UTC" }
      : { year: "numeric", month: "2-digit", day: "2-digit", timeZone: "UTC" });
    return data.moments.map(function (ms) { return format.format(new Date(ms)); });
  }

  function draw(canvas) {
    var data = JSON.parse(document.getElementById(canvas.dataset.source).textContent);
    var tokens = canvas.dataset.kind === "tokens";
    var series = tokens ? data.tokens : data.requests;
    var empty = !series.some(function (s) { return s.data.some(function (v) { return v > 0; }); });
    var note = canvas.parentElement.querySelector(".chart-empty");
    if (note) note.hidden = !empty;
    canvas.hidden = empty;
    if (empty) return;
    canvas._chart = new Chart(canvas, {
      type: tokens ? "bar" : "line",
      data: { labels: labels(data), datasets: series.map(function (s) { return { label: s.label, data: s.data, borderWidth: 1.5, pointRadius: 0 }; }) },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { stacked: tokens, ticks: { maxTicksLimit: 8, maxRotation: 0 } },
          y: { stacked: tokens, beginAtZero: true, title: { display: true, text: tokens ? data.axis.tokens : data.axis.requests },
               ticks: { callback: function (v) { return new Intl.NumberFormat(lang).format(v); } } },
        },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
      },
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("canvas.usage-chart").forEach(draw);
  });
})();
