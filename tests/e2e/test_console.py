"""The console in a real browser (Debian's Chromium through Playwright) against the live console:
uvicorn, a Celery worker, Celery beat, Redis, the simulated GPU source and the real vLLM CPU
engine with the tiny model (tests/e2e/conftest.py).

``test_first_run_walk`` is the path an admin takes on a new appliance, a screenshot of each page in
var/screenshots/: log in, switch to 中文 and back, download a model from a hub (watching its
progress), deploy it, create a department with quotas, issue a key, call the model with it through
/v1, see the call on the department's usage chart, the replica on the GPUs page and every step in
the audit log. The tests after it use what the walk made (the model, the department): usability
checks (labels, keyboard, errors next to their field, live panels) and bad input (a double click
on Deploy, the back button after a key reveal, a session that expires while a form is filled in)."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from appliance.models import AuditEvent
from models_catalog.models import LocalModel
from provisioning.models import Deployment, Replica
from tenancy.models import ApiKey, Department
from tests.e2e.conftest import REPO_ID, Stack, login, shot
from tests.e2e.stack import NODE
from tests.workers import wait_for

pytestmark = pytest.mark.e2e

ENGINE_START = 300  # seconds for the engine to become ready on a busy 2-core box
DEPLOYMENT = "tiny-llama"  # the name the deploy form proposes for local/tiny-llama
WALK: dict[str, Any] = {}  # what the walk made, for the tests after it


def needs_walk(*names: str) -> None:
    missing = [name for name in names if name not in WALK]
    assert not missing, f"this test uses what test_first_run_walk makes ({missing}); see its failure first"


def form_of(page: Any, action: str) -> Any:
    """The form posting to ``action`` (a path)."""
    return page.locator(f'form[action="{action}"]')


def progress_value(page: Any) -> int | None:
    """The download's progress bar value as the page shows it now (None: no bar, or reloading)."""
    try:
        found = page.evaluate(
            """() => { const bar = document.querySelector('.job-progress progress');
                       return bar ? [bar.getAttribute('value'), bar.getAttribute('max'), bar.getAttribute('aria-label')]
                                  : null; }"""
        )
    except PlaywrightError:  # the page reloaded itself between two reads
        return None
    if found is None:
        return None
    value, maximum, label = found
    assert maximum == "100" and label == "Progress"
    return int(value)


def chart_data(page: Any, script_id: str) -> dict:
    return json.loads(page.locator(f"#{script_id}").text_content())


def test_first_run_walk(page: Any, stack: Stack) -> None:
    # 1. Log in as the first admin (made by ensure_admin, as `make run` does).
    page.goto(stack.url("/"))
    expect(page).to_have_url(stack.url("/login/?next=/"))
    shot(page, "01-login")
    page.get_by_label("User name").fill(stack.username)
    page.get_by_label("Password").fill(stack.password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    expect(page.locator("#health-panel")).to_contain_text("1 running")  # the worker's heartbeat
    shot(page, "01-overview")

    # 2. Switch to 中文 and back: the navigation is translated, then English again.
    nav = page.locator("nav.main-nav")
    page.get_by_label("Language").select_option("zh-hans")
    page.locator("form.lang").get_by_role("button").click()
    expect(nav).to_contain_text("概览")
    expect(nav).to_contain_text("部门")
    expect(page.locator("html")).to_have_attribute("lang", "zh-hans")
    shot(page, "02-chinese")
    page.locator("#lang-select").select_option("en")
    page.locator("form.lang").get_by_role("button").click()
    expect(nav).to_contain_text("Overview")
    expect(nav).not_to_contain_text("概览")

    # 3. Download the model from a hub-compatible endpoint on the LAN, watching its progress.
    nav.get_by_role("link", name="Models").click()
    page.get_by_role("link", name="Sources").click()
    source_form = form_of(page, "/models/sources/new")
    source_form.get_by_label("Name", exact=True).fill("lan-hub")
    source_form.get_by_label("Address").fill(stack.hub.url)
    source_form.get_by_label("Kind").select_option("mirror")
    source_form.get_by_role("button", name="Add source").click()
    expect(page.get_by_role("cell", name="lan-hub")).to_be_visible()
    page.get_by_role("link", name="← Models").click()
    page.get_by_role("link", name="Add a model").click()
    download = form_of(page, "/models/download")
    download.get_by_label("Repository").fill(REPO_ID)
    download.get_by_label("Source").select_option(label=f"lan-hub ({stack.hub.url})")
    shot(page, "03-add-model")
    download.get_by_role("button", name="Download").click()
    expect(page.get_by_role("heading", name=REPO_ID)).to_be_visible()
    seen: list[int] = []
    deadline = time.monotonic() + 120
    status = page.locator("h1 .badge")
    while time.monotonic() < deadline:
        value = progress_value(page)
        if value is not None and (not seen or value != seen[-1]):
            seen.append(value)
            if 0 < value < 100 and len(seen) == 2:
                shot(page, "03-download-progress")
        try:
            if status.text_content(timeout=1000) == "Ready":
                break
        except PlaywrightError:
            pass
        time.sleep(0.2)
    model = LocalModel.objects.get(repo_id=REPO_ID)
    job = model.jobs.get()
    assert model.status == "ready", (model.error, job.error, stack.logs())
    # The bar moved on its own (htmx polling, no reload of ours), forward only, then the page
    # reloaded itself once the job ended: the job at 100%, the model ready with its files.
    assert seen == sorted(seen) and len([v for v in seen if 0 < v < 100]) >= 1, seen
    assert job.status == "succeeded" and job.percent == 100
    expect(status).to_have_text("Ready")
    expect(page.locator("section[aria-labelledby=jobs] tbody tr").first).to_contain_text("Succeeded")
    expect(page.locator("section[aria-labelledby=files]")).to_contain_text("model.safetensors")
    shot(page, "03-model-ready")

    # 4. Deploy it with one click on the model page (the form comes prefilled; this 2-core box
    # without a GPU needs a smaller KV cache share and context than the recommended ones).
    page.get_by_role("link", name="Deploy", exact=True).click()
    deploy = form_of(page, "/deployments/new")
    expect(deploy.get_by_label("Model", exact=True)).to_have_value(str(model.pk))
    expect(deploy.get_by_label("Served model name")).to_have_value(DEPLOYMENT)
    deploy.get_by_label("Memory fraction").fill("0.15")
    deploy.get_by_label("Maximum context length").fill("512")
    deploy.get_by_label("Extra vLLM arguments").fill("--max-num-seqs 8")
    shot(page, "04-deploy-form")
    deploy.get_by_role("button", name="Deploy").click()
    expect(page).to_have_url(stack.url(f"/deployments/{DEPLOYMENT}/"))
    state = page.locator("#replicas tbody tr").first.locator(".badge")
    expect(state).to_have_text("Starting", timeout=30_000)
    shot(page, "04-starting")
    expect(state).to_have_text("Ready", timeout=ENGINE_START * 1000)  # the page updates itself
    assert Deployment.objects.filter(name=DEPLOYMENT).count() == 1
    shot(page, "04-ready")

    # 5. A department with quotas, allowed to use the deployment.
    nav.get_by_role("link", name="Departments").click()
    new = form_of(page, "/departments/new")
    new.get_by_label("Name", exact=True).fill("Legal")
    new.get_by_label("Contact").fill("legal-it@example.com")
    new.get_by_label("Priority").select_option("high")
    new.get_by_label("Requests per minute").fill("60")
    new.get_by_label("Tokens per minute").fill("100000")
    new.get_by_label("Tokens per day").fill("1000000")
    new.get_by_label("Concurrent requests").fill("4")
    new.get_by_label("Max_tokens per request").fill("64")
    new.get_by_label(DEPLOYMENT).check()
    shot(page, "05-new-department")
    new.get_by_role("button", name="Create department").click()
    expect(page.get_by_role("heading", name="Legal")).to_be_visible()
    department = Department.objects.get(name="Legal")
    assert (department.rpm, department.max_tokens_per_request, department.priority) == (60, 64, "high")
    assert list(department.deployments.values_list("name", flat=True)) == [DEPLOYMENT]
    shot(page, "05-department")

    # 6. Issue a key and copy it from the one-time reveal.
    issue = form_of(page, f"/departments/{department.pk}/keys/new")
    issue.get_by_label("Name", exact=True).fill("contracts-bot")
    issue.get_by_role("button", name="Issue key").click()
    expect(page.get_by_role("heading", name="New API key")).to_be_visible()
    raw = page.locator("#secret").text_content().strip()
    assert raw.startswith("sk-") and ApiKey.authenticate(raw).name == "contracts-bot"
    shot(page, "06-key-reveal")
    page.get_by_role("link", name="Done").click()
    expect(page.get_by_role("cell", name="contracts-bot")).to_be_visible()
    assert raw not in page.content()

    # 7. Call the model with that key through the console's OpenAI-compatible /v1.
    client = openai.OpenAI(base_url=stack.url("/v1"), api_key=raw, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [DEPLOYMENT]
    answer = client.chat.completions.create(
        model=DEPLOYMENT, messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )
    assert answer.usage.completion_tokens > 0 and answer.choices[0].message.content is not None
    tokens = answer.usage.prompt_tokens + answer.usage.completion_tokens

    # 8. The call on the department's usage chart (beat drains usage from Redis every second).
    def charted() -> int:
        page.reload()
        data = chart_data(page, "department-usage-data")
        return sum(sum(series["data"]) for series in data["tokens"] if series["label"] == DEPLOYMENT)

    assert wait_for(lambda: charted() == tokens, timeout=30, interval=1), (charted(), tokens)
    canvas = page.locator('canvas[data-source="department-usage-data"]')
    drawn = canvas.evaluate(
        """(canvas) => { const chart = Chart.getChart(canvas);
             const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
             let painted = 0; for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) painted++;
             return {chart: !!chart, datasets: chart ? chart.data.datasets.map(d => d.label) : [],
                     width: canvas.width, height: canvas.height, painted: painted}; }"""
    )
    assert drawn["chart"] and DEPLOYMENT in drawn["datasets"], drawn
    assert drawn["width"] > 100 and drawn["height"] > 50 and drawn["painted"] > 1000, drawn
    expect(page.locator("section[aria-labelledby=usage]")).to_contain_text("contracts-bot")
    canvas.scroll_into_view_if_needed()
    shot(page, "08-usage-chart")

    # 9. The replica on the GPUs page, whose source is marked as simulated.
    nav.get_by_role("link", name="GPUs").click()
    expect(page.locator(".simulated-banner")).to_contain_text(f"{NODE} shows SIMULATED GPUs")
    expect(page.locator("article.tile .badge", has_text="simulated")).to_have_count(2)
    replica = Replica.objects.get(deployment__name=DEPLOYMENT)
    tile = page.locator("article.tile", has_text=f"{DEPLOYMENT}#0")
    expect(tile).to_have_count(1, timeout=20_000)  # the next sample names the replica's process
    tile.locator("summary").click()
    expect(tile.locator("details li")).to_contain_text(f"PID {replica.pid}")
    shot(page, "09-gpus")

    # 10. Every step in the audit log.
    nav.get_by_role("link", name="Audit").click()
    actions = page.locator("tbody tr td:nth-child(3)").all_text_contents()
    for action in ("user.create_first_admin", "auth.login", "hub_endpoint.create", "model.download",
                   "deployment.create", "department.create", "api_key.issue"):  # fmt: skip
        assert action in actions, (action, actions)
    expect(page.locator("tbody tr", has_text="api_key.issue")).to_contain_text(stack.username)
    shot(page, "10-audit")
    assert AuditEvent.objects.filter(action="auth.login", actor_name=stack.username).exists()
    WALK.update(model=model, deployment=DEPLOYMENT, department=department, key=raw)


# Usability


UNLABELLED = """() => Array.from(document.querySelectorAll('input, select, textarea'))
  .filter((el) => !['hidden', 'submit', 'button', 'reset', 'image'].includes(el.type))
  .filter((el) => {
    const text = (node) => node && node.textContent.trim();
    const byLabel = Array.from(el.labels || []).some(text);
    const byAria = (el.getAttribute('aria-label') || '').trim();
    const byIds = (el.getAttribute('aria-labelledby') || '').split(/\\s+/)
      .some((id) => id && text(document.getElementById(id)));
    return !(byLabel || byAria || byIds);
  })
  .map((el) => el.outerHTML.slice(0, 160))"""

DANGLING_DESCRIPTIONS = """() => Array.from(document.querySelectorAll('[aria-describedby]'))
  .flatMap((el) => el.getAttribute('aria-describedby').split(/\\s+/).filter((id) => id && !document.getElementById(id))
  .map((id) => `${el.id || el.name} -> #${id}`))"""


DUPLICATE_IDS = """() => { const seen = {};
  document.querySelectorAll('[id]').forEach((el) => { seen[el.id] = (seen[el.id] || 0) + 1; });
  return Object.keys(seen).filter((id) => seen[id] > 1).map((id) => `#${id} ${seen[id]} times`); }"""
LABEL_CHECKS = (UNLABELLED, DANGLING_DESCRIPTIONS, DUPLICATE_IDS)


def test_every_form_field_has_a_label(page: Any, stack: Stack) -> None:
    """On every page with a form: each field has a label (its own <label for>, a wrapping label, or
    aria-label/labelledby), its aria-describedby points at elements that exist, and no id is used
    twice (a label would name another form's field)."""
    needs_walk("model", "deployment", "department")
    page.goto(stack.url("/login/"))
    problems = {"/login/": [found for check in LABEL_CHECKS for found in page.evaluate(check)]}
    login(page, stack)
    pages = ["/", "/models/", "/models/add", "/models/sources/", f"/models/{WALK['model'].pk}/", "/deployments/",
             f"/deployments/new?model={WALK['model'].pk}", f"/deployments/{WALK['deployment']}/", "/gpus/",
             "/departments/", f"/departments/{WALK['department'].pk}/", "/departments/usage/",
             "/departments/chargeback/", "/audit/", "/settings/users/", "/settings/tokens/"]  # fmt: skip
    fields = 0
    for path in pages:
        response = page.goto(stack.url(path))
        assert response.status == 200, path
        fields += page.locator("input:not([type=hidden]), select, textarea").count()
        problems[path] = [found for check in LABEL_CHECKS for found in page.evaluate(check)]
    assert fields > 60  # the pages have their forms
    found = {path: found for path, found in problems.items() if found}
    assert not found, json.dumps(found, indent=1)


def test_creating_a_department_with_the_keyboard_only(page: Any, stack: Stack) -> None:
    login(page, stack, "/departments/")
    page.locator("#id_name").focus()
    page.keyboard.type("Keyboard team")
    for _ in range(40):  # Tab through the form to its button
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent.trim()") == "Create department":
            break
    else:
        raise AssertionError("Tab never reached the Create department button")
    focus = page.evaluate("[getComputedStyle(document.activeElement).outlineStyle, "
                          "getComputedStyle(document.activeElement).outlineWidth]")  # fmt: skip
    assert focus[0] != "none" and focus[1] != "0px", focus  # where the focus is can be seen
    shot(page, "usability-keyboard-focus")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Keyboard team")).to_be_visible()
    assert Department.objects.filter(name="Keyboard team").count() == 1


def test_a_form_error_is_shown_next_to_its_field(page: Any, stack: Stack) -> None:
    login(page, stack, "/departments/")
    new = form_of(page, "/departments/new")
    new.get_by_label("Name", exact=True).fill("Negative")
    rpm = new.get_by_label("Requests per minute")
    rpm.fill("-5")
    # The browser refuses it first (the field's min), in a message on the field itself...
    new.get_by_role("button", name="Create department").click()
    expect(page).to_have_url(stack.url("/departments/"))
    assert rpm.evaluate("(el) => !el.validity.valid && el.validationMessage.length > 0")
    # ...and the console, for a browser that sends it anyway: the error beside the field, tied to it.
    new.evaluate("(form) => { form.noValidate = true; }")
    new.get_by_role("button", name="Create department").click()
    field = page.locator("div.field", has=page.locator("#id_rpm"))
    expect(field.locator(".errorlist")).to_contain_text("greater than or equal to 1")
    expect(page.locator(".errorlist")).to_have_count(1)  # that field only
    expect(page.locator("#id_rpm")).to_have_attribute("aria-invalid", "true")
    error_id = field.locator(".errorlist").get_attribute("id")
    assert error_id in page.locator("#id_rpm").get_attribute("aria-describedby").split()
    expect(page.locator("#id_name")).to_have_value("Negative")  # what was typed is still there
    shot(page, "usability-field-error")
    assert not Department.objects.filter(name="Negative").exists()


def test_the_gpus_page_keeps_updating_without_a_reload(page: Any, stack: Stack) -> None:
    login(page, stack, "/gpus/")
    tile = page.locator("article.tile").first
    before = tile.inner_text()
    page.evaluate("window.__sameDocument = true")
    with page.expect_response(lambda r: r.url.endswith("/gpus/tiles")):
        pass  # htmx asks for fresh tiles every few seconds
    assert wait_for(lambda: tile.inner_text() != before, timeout=30, interval=0.5), before
    assert page.evaluate("window.__sameDocument === true")  # updated in place, not reloaded
    shot(page, "usability-live-gpus")


# Bad input


def test_double_clicking_deploy_creates_one_deployment(page: Any, stack: Stack) -> None:
    needs_walk("model")
    login(page, stack, f"/deployments/new?model={WALK['model'].pk}")
    deploy = form_of(page, "/deployments/new")
    deploy.get_by_label("Served model name").fill("tiny-twice")
    deploy.get_by_label("Memory fraction").fill("0.15")
    deploy.get_by_label("Maximum context length").fill("512")
    posts_before = stack.console.access_log().count("POST /deployments/new 302")
    deploy.get_by_role("button", name="Deploy").dblclick()
    expect(page).to_have_url(stack.url("/deployments/tiny-twice/"))
    expect(page.get_by_role("heading", name="tiny-twice")).to_be_visible()
    time.sleep(1)  # a second request would have arrived by now
    log = stack.console.access_log()
    assert Deployment.objects.filter(name="tiny-twice").count() == 1
    assert [line for line in log if line.startswith("POST /deployments/new")][-1:] == ["POST /deployments/new 302"]
    assert log.count("POST /deployments/new 302") == posts_before + 1, log[-10:]
    assert not [line for line in log if line == "POST /deployments/new 400"], log[-10:]
    shot(page, "bad-input-double-click")
    # Stop and delete it again (it would start a second engine).
    page.get_by_role("button", name="Stop").click()
    replicas = Replica.objects.filter(deployment__name="tiny-twice")
    assert wait_for(lambda: all(r.state in Replica.TERMINAL for r in replicas.all()), timeout=60), stack.logs()
    page.get_by_role("button", name="Delete").click()
    expect(page).to_have_url(stack.url("/deployments/"))
    assert not Deployment.objects.filter(name="tiny-twice").exists()


def test_a_second_click_before_a_slow_answer_does_not_send_the_form_again(page: Any, stack: Stack) -> None:
    """Chromium folds a quick double click into one submission by itself; a second click while a
    slow answer is on its way would send the form again, which forms.js refuses."""
    login(page, stack, "/departments/")
    new = form_of(page, "/departments/new")
    new.get_by_label("Name", exact=True).fill("Slow answers")
    sent: list[str] = []

    def slow_server(route: Any) -> None:
        sent.append(route.request.method)
        time.sleep(0.6)  # the answer takes its time; the second click comes before it
        try:
            route.continue_()
        except PlaywrightError:
            pass  # the browser dropped this request for a later one

    page.route("**/departments/new", slow_server)
    new.get_by_role("button", name="Create department").evaluate(
        "(button) => { button.click(); setTimeout(() => button.click(), 250); }"
    )
    expect(page.get_by_role("heading", name="Slow answers")).to_be_visible()
    assert sent == ["POST"]
    assert Department.objects.filter(name="Slow answers").count() == 1


def test_back_after_a_key_reveal_does_not_show_the_key_again(page: Any, stack: Stack) -> None:
    needs_walk("department")
    department = WALK["department"]
    login(page, stack, f"/departments/{department.pk}/")
    issue = form_of(page, f"/departments/{department.pk}/keys/new")
    issue.get_by_label("Name", exact=True).fill("back-button")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        issue.get_by_role("button", name="Issue key").click()
    assert "no-store" in posted.value.headers["cache-control"]
    raw = page.locator("#secret").text_content().strip()
    assert raw.startswith("sk-")
    page.get_by_role("link", name="Done").click()
    expect(page.get_by_role("cell", name="back-button")).to_be_visible()
    try:
        page.go_back()
    except PlaywrightError:
        pass  # Chromium refuses to show a POST's answer again without sending it again
    page.wait_for_load_state()
    shot(page, "bad-input-back-after-reveal")
    assert raw not in page.content()
    assert ApiKey.objects.filter(name="back-button").count() == 1  # not sent again either
    page.go_forward()
    page.wait_for_load_state()
    assert raw not in page.content()


def test_a_session_expired_mid_form_returns_to_the_form_with_what_was_typed(page: Any, stack: Stack) -> None:
    needs_walk("deployment")
    login(page, stack, "/departments/")
    new = form_of(page, "/departments/new")
    new.get_by_label("Name", exact=True).fill("Finance")
    new.get_by_label("Contact").fill("cfo-office@example.com")
    new.get_by_label("Priority").select_option("low")
    new.get_by_label("Requests per minute").fill("30")
    new.get_by_label(WALK["deployment"]).check()
    page.context.clear_cookies(name="sessionid")  # the session ends while the form is open
    new.get_by_role("button", name="Create department").click()
    expect(page).to_have_url(stack.url("/login/?next=/departments/"))
    assert not Department.objects.filter(name="Finance").exists()
    shot(page, "bad-input-session-expired")
    page.get_by_label("User name").fill(stack.username)
    page.get_by_label("Password").fill(stack.password)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(stack.url("/departments/"))
    new = form_of(page, "/departments/new")
    expect(new.get_by_label("Name", exact=True)).to_have_value("Finance")
    expect(new.get_by_label("Contact")).to_have_value("cfo-office@example.com")
    expect(new.get_by_label("Priority")).to_have_value("low")
    expect(new.get_by_label("Requests per minute")).to_have_value("30")
    expect(new.get_by_label(WALK["deployment"])).to_be_checked()
    assert page.evaluate("sessionStorage.getItem('console:form-in-flight')") is None  # shown once, then gone
    shot(page, "bad-input-form-restored")
    new.get_by_role("button", name="Create department").click()
    expect(page.get_by_role("heading", name="Finance")).to_be_visible()
    finance = Department.objects.get(name="Finance")
    assert (finance.rpm, finance.priority, finance.contact) == (30, "low", "cfo-office@example.com")
    assert list(finance.deployments.values_list("name", flat=True)) == [WALK["deployment"]]
