// Forms of the console: a form is sent once (a double click does not send it twice), and what was
// typed in a form survives a login in between: when the session expired while the form was open,
// the console sends the admin to log in and then back to the form's page, where the values come
// back. Values are kept in this tab's sessionStorage only, from the submit to the next page shown,
// and never those of password, hidden (CSRF token) or file fields.
(function () {
  "use strict";
  var KEY = "console:form-in-flight";
  var MAX_AGE_MS = 60 * 60 * 1000;
  var SKIPPED = ["password", "hidden", "file", "submit", "button", "reset", "image"];
  var script = document.currentScript;
  var loginPath = script ? script.getAttribute("data-login-url") : null;

  function keptFields(form) {
    return Array.prototype.filter.call(form.elements, function (field) {
      return field.name && !field.disabled && SKIPPED.indexOf(field.type) === -1 &&
        !field.hasAttribute("data-not-kept") && field.autocomplete !== "off";
    });
  }

  function save(form) {
    var values = keptFields(form).map(function (field) {
      if (field.type === "checkbox" || field.type === "radio") {
        return { name: field.name, value: field.value, checked: field.checked };
      }
      if (field.type === "select-multiple") {
        return { name: field.name, selected: Array.prototype.filter.call(field.options, function (o) { return o.selected; })
          .map(function (o) { return o.value; }) };
      }
      return { name: field.name, value: field.value };
    });
    try {
      sessionStorage.setItem(KEY, JSON.stringify({
        path: location.pathname, action: form.getAttribute("action") || "", values: values, at: Date.now(),
      }));
    } catch (e) { /* storage full or refused: the form is sent all the same */ }
  }

  function restore(form, values) {
    var fields = keptFields(form);
    values.forEach(function (saved) {
      fields.forEach(function (field) {
        if (field.name !== saved.name) return;
        if (field.type === "checkbox" || field.type === "radio") {
          if (field.value === saved.value) field.checked = saved.checked;
        } else if (field.type === "select-multiple") {
          Array.prototype.forEach.call(field.options, function (o) { o.selected = saved.selected.indexOf(o.value) !== -1; });
        } else {
          field.value = saved.value;
        }
      });
    });
  }

  // Destructive actions ask first: a form with data-confirm="…" (naming what it acts on) is sent
  // only once the question is answered yes. Capturing, so it runs before anything else sees the submit.
  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute && event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);

  // Logs that follow their tail: a <pre data-follow> shows its newest line when the page opens and
  // after each refresh (htmx swaps the part around it), unless the reader scrolled up to read.
  var reading = {};  // log id -> where the reader scrolled to (absent: following the tail)
  function follow(root) {
    Array.prototype.forEach.call((root || document).querySelectorAll("pre[data-follow]"), function (log) {
      log.scrollTop = log.id in reading ? reading[log.id] : log.scrollHeight;
      log.addEventListener("scroll", function () {
        if (log.scrollTop + log.clientHeight >= log.scrollHeight - 4) delete reading[log.id];
        else reading[log.id] = log.scrollTop;
      });
    });
  }
  document.addEventListener("DOMContentLoaded", function () { follow(document); });
  document.addEventListener("htmx:afterSwap", function (event) { follow(event.target); });

  // Disclosures that stay as the reader left them: a <details id=… data-keep-open> opened by the reader
  // is open again after htmx refreshes the part around it.
  var opened = {};
  document.addEventListener("toggle", function (event) {
    var details = event.target;
    if (details.matches && details.matches("details[data-keep-open][id]")) {
      if (details.open) opened[details.id] = true; else delete opened[details.id];
    }
  }, true);
  document.addEventListener("htmx:afterSwap", function (event) {
    Array.prototype.forEach.call(event.target.querySelectorAll("details[data-keep-open][id]"), function (details) {
      if (opened[details.id]) details.open = true;
    });
  });

  // Copy buttons: data-copy="#id" copies that element's text, and the button says so for a moment.
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.querySelector(button.getAttribute("data-copy"));
    if (!source || !navigator.clipboard) return;
    navigator.clipboard.writeText(source.textContent).then(function () {
      var label = button.textContent;
      button.textContent = button.getAttribute("data-copied") || "✓";
      setTimeout(function () { button.textContent = label; }, 1500);
    });
  });

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (event.defaultPrevented || (form.method || "").toLowerCase() !== "post") return;
    var sentAt = Number(form.getAttribute("data-sent-at") || 0);
    if (Date.now() - sentAt < 10000) {  // sent already, the next page is on its way
      event.preventDefault();
      return;
    }
    form.setAttribute("data-sent-at", String(Date.now()));
    if (location.pathname !== loginPath) save(form);
  });

  // A page restored from the back/forward cache may be sent again.
  window.addEventListener("pageshow", function () {
    document.querySelectorAll("form[data-sent-at]").forEach(function (form) { form.removeAttribute("data-sent-at"); });
  });

  document.addEventListener("DOMContentLoaded", function () {
    var raw = sessionStorage.getItem(KEY);
    if (!raw || location.pathname === loginPath) return;  // on the login page: keep it for after the login
    sessionStorage.removeItem(KEY);
    var saved;
    try { saved = JSON.parse(raw); } catch (e) { return; }
    if (saved.path !== location.pathname || Date.now() - saved.at > MAX_AGE_MS) return;
    var form = Array.prototype.find.call(document.forms, function (f) { return (f.getAttribute("action") || "") === saved.action; });
    if (form) restore(form, saved.values);
  });
})();
