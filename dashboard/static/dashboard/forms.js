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
