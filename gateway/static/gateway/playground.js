// The playground: sends the conversation to the console (never with a key), which forwards it to the
// gateway on the chosen department's behalf; reads the server-sent events as they arrive and shows
// each answer with its token count, time to first token and tokens per second.
(function () {
  "use strict";
  var histories = { a: [], b: [] };

  function el(id) { return document.getElementById(id); }

  function fill(select, names, keepEmpty, noneLabel) {
    var previous = select.value;
    select.innerHTML = "";
    if (keepEmpty) select.add(new Option(noneLabel, ""));
    names.forEach(function (name) { select.add(new Option(name, name)); });
    if (names.indexOf(previous) >= 0) select.value = previous;
  }

  function bubble(pane, role, text) {
    var p = document.createElement("p");
    p.className = "turn " + role;
    p.textContent = text;
    pane.querySelector(".conversation").appendChild(p);
    return p;
  }

  function ask(form, paneKey, deployment, message) {
    var pane = el("pane-" + paneKey), stats = pane.querySelector(".stats");
    pane.hidden = false;
    pane.querySelector(".pane-title").textContent = deployment;
    var messages = [];
    var system = form.elements.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages = messages.concat(histories[paneKey], [{ role: "user", content: message }]);
    bubble(pane, "user", message);
    var answer = bubble(pane, "assistant", "");
    var body = {
      department: parseInt(form.elements.department.value, 10), deployment: deployment, messages: messages,
      temperature: parseFloat(form.elements.temperature.value), top_p: parseFloat(form.elements.top_p.value),
      max_tokens: parseInt(form.elements.max_tokens.value, 10),
      stop: form.elements.stop.value.split("\n").filter(function (s) { return s; }),
    };
    var started = performance.now(), first = null, text = "", usage = null;
    stats.textContent = "…";
    return fetch(form.dataset.url, {
      method: "POST", credentials: "same-origin", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", "X-CSRFToken": form.elements.csrfmiddlewaretoken.value },
    }).then(function (response) {
      if (!response.ok) {
        return response.json().then(function (data) { throw new Error(data.error.message); });
      }
      var snippet = response.headers.get("X-Snippet");
      if (snippet && paneKey === "a") el("pg-snippet").textContent = JSON.parse(snippet);
      var reader = response.body.getReader(), decoder = new TextDecoder(), buffer = "";
      function pump() {
        return reader.read().then(function (chunk) {
          if (chunk.done) return;
          buffer += decoder.decode(chunk.value, { stream: true });
          var events = buffer.split("\n\n");
          buffer = events.pop();
          events.forEach(function (event) {
            if (event.indexOf("data: ") !== 0 || event === "data: [DONE]") return;
            var data = JSON.parse(event.slice(6));
            if (data.error) throw new Error(data.error.message);
            if (data.usage) usage = data.usage;
            (data.choices || []).forEach(function (choice) {
              var piece = (choice.delta && choice.delta.content) || "";
              if (piece && first === null) first = performance.now();
              text += piece;
            });
            answer.textContent = text;
          });
          return pump();
        });
      }
      return pump();
    }).then(function () {
      var seconds = (performance.now() - (first || started)) / 1000;
      var tokens = usage ? usage.completion_tokens : 0;
      stats.textContent = tokens + " " + stats.dataset.tokensLabel + " · " + stats.dataset.ttftLabel + " "
        + Math.round((first || performance.now()) - started) + " ms · "
        + (seconds > 0 && tokens > 1 ? ((tokens - 1) / seconds).toFixed(1) : "—") + " " + stats.dataset.rateLabel;
      stats.dataset.tokens = String(tokens);
      histories[paneKey].push({ role: "user", content: message }, { role: "assistant", content: text });
    }).catch(function (error) {
      answer.classList.add("error");
      answer.textContent = error.message;
      stats.textContent = "";
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var form = el("playground");
    if (!form) return;
    var choices = JSON.parse(el("playground-choices").textContent);
    function refresh() {
      var names = choices[form.elements.department.value] || [];
      fill(form.elements.deployment_a, names, false, "");
      fill(form.elements.deployment_b, names, true, form.dataset.none);
    }
    form.elements.department.addEventListener("change", refresh);
    refresh();
    el("pg-clear").addEventListener("click", function () {
      histories = { a: [], b: [] };
      document.querySelectorAll(".conversation").forEach(function (c) { c.innerHTML = ""; });
      document.querySelectorAll(".stats").forEach(function (s) { s.textContent = ""; });
    });
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var message = form.elements.message.value.trim(), error = el("pg-error");
      error.hidden = true;
      if (!form.elements.deployment_a.value) {
        error.textContent = form.dataset.missing;
        error.hidden = false;
        return;
      }
      var button = el("pg-send");
      button.disabled = true;
      var asks = [ask(form, "a", form.elements.deployment_a.value, message)];
      var other = form.elements.deployment_b.value;
      if (other) asks.push(ask(form, "b", other, message)); else el("pane-b").hidden = true;
      form.elements.message.value = "";
      Promise.all(asks).then(function () { button.disabled = false; });
    });
  });
})();
