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
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import expect

from appliance.models import AuditEvent
from models_catalog.models import LocalModel
from provisioning.models import Deployment, Replica
from tenancy.models import ApiKey, Department
from tests.appliance.ldap_server import SERVICE_PASSWORD
from tests.e2e.conftest import REPO_ID, Stack, change_first_password, in_chinese, login, shot
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


def reload_until(page: Any, done: Any, seconds: float, meanwhile: Any = None) -> None:
    """Reload the page every few seconds (doing ``meanwhile`` first) until ``done()``: for what the
    worker's next pass shows, which the page does not poll for."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, page.locator("main").inner_text()[:2000]
        if meanwhile is not None:
            meanwhile()
        page.wait_for_timeout(2500)
        page.reload()


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
    # The password ensure_admin printed must be replaced before anything else.
    expect(page).to_have_url(stack.url("/settings/password/"))
    expect(page.get_by_role("heading", name="Change password")).to_be_visible()
    shot(page, "01-change-password")
    change_first_password(page, stack)
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
    assert wait_for(lambda: progress_value(page) == 100, timeout=10), seen  # the bar ends full, not at 99 %
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
    new.get_by_label("Most tokens per request").fill("64")
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
        assert any(action in cell for cell in actions), (action, actions)  # the code, beside its words
    expect(page.locator("tbody tr", has_text="api_key.issue")).to_contain_text(stack.username)
    expect(page.locator("tbody tr", has_text="api_key.issue")).to_contain_text("API key issued")
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


def test_gpu_history_charts_draw_the_data(page: Any, stack: Stack) -> None:
    """What each chart draws, read from its Chart.js object: sized to its box, a line per GPU with
    every GPU in the legend, an axis that holds the data, and times in the page's language."""
    from gpus.models import Gpu

    gpus = Gpu.objects.count()
    login(page, stack, "/gpus/")
    page.wait_for_function(
        "() => [...document.querySelectorAll('canvas.gpu-chart')].every(c => c._chart &&"
        " c._chart.data.datasets.length && c._chart.data.datasets.every(d => d.data.length > 1))",
        timeout=30_000,
    )
    for metric in ("util_gpu", "mem_used", "temperature", "power_draw"):
        drawn = page.locator(f"canvas.gpu-chart[data-metric={metric}]").evaluate(
            """c => { const ch = c._chart, ys = ch.data.datasets.flatMap(d => d.data.map(p => p.y));
            return {width: c.clientWidth, height: c.clientHeight, box: c.parentElement.clientWidth,
                    lines: ch.data.datasets.length, legend: ch.legend.legendItems.length,
                    lo: Math.min(...ys), hi: Math.max(...ys), min: ch.scales.y.min, max: ch.scales.y.max,
                    ticks: ch.scales.x.ticks.map(t => t.label)}; }"""
        )
        assert drawn["width"] >= drawn["box"] - 40 and drawn["height"] >= 200, drawn  # its box, not 300×150
        assert drawn["lines"] == gpus and drawn["legend"] == gpus, drawn
        assert drawn["hi"] > 0 and drawn["min"] <= drawn["lo"] and drawn["max"] >= drawn["hi"], drawn
        ticks = drawn["ticks"]
        assert 2 <= len(ticks) <= 8 and len(set(ticks)) == len(ticks) and all(":" in t for t in ticks), drawn
    shot(page, "usability-gpu-charts")


def test_a_gpu_alert_in_the_header_on_its_tile_and_on_the_gpus_own_page(page: Any, stack: Stack) -> None:
    """An XID on GPU 0 (a fault injected into the simulated source): the header counts it, the tile
    names it, the GPU's own page shows it with charts of that GPU only, in English and in Chinese;
    acknowledging it there resolves it and comes back to the page."""
    from gpus.models import Alert, Gpu, SimulatedFault

    gpu = Gpu.objects.get(node=NODE, index=0)
    SimulatedFault.objects.create(node=NODE, gpu_index=0, kind="xid", value=79)
    opened = Alert.objects.filter(gpu=gpu, rule="xid_79", resolved_at__isnull=True)
    assert wait_for(opened.exists, timeout=30), stack.logs()
    login(page, stack, "/gpus/")
    expect(page.locator("nav.main-nav .alert-count")).to_be_visible()
    tile = page.locator("article.tile").filter(has=page.get_by_role("link", name=f"{NODE} · GPU 0", exact=True))
    expect(tile).to_contain_text("XID 79: the GPU fell off the bus.")
    shot(page, "usability-gpu-alert-tile")
    tile.get_by_role("link", name=f"{NODE} · GPU 0", exact=True).click()
    expect(page).to_have_url(stack.url(f"/gpus/{gpu.pk}/"))
    page.wait_for_function(
        "() => [...document.querySelectorAll('canvas.gpu-chart')]"
        ".every(c => c._chart && c._chart.data.datasets.length)",
        timeout=30_000,
    )
    lines = page.evaluate("() => [...document.querySelectorAll('canvas.gpu-chart')].map(c => c._chart.data.datasets"
                          ".map(d => d.label))")  # fmt: skip
    assert lines == [[f"{NODE} GPU 0"]] * 4, lines
    expect(page.locator("main")).to_contain_text("XID 79: the GPU fell off the bus.")
    shot(page, "usability-gpu-page")
    with in_chinese(page):
        expect(page.locator("main")).to_contain_text("XID 79：GPU 已从总线掉线。")
        expect(page.locator("main")).not_to_contain_text("fell off the bus")
        shot(page, "usability-gpu-page-zh")
    page.get_by_role("button", name="Acknowledge").first.click()
    expect(page.locator(".messages")).to_contain_text("Alert acknowledged and resolved")
    expect(page).to_have_url(stack.url(f"/gpus/{gpu.pk}/"))
    assert not opened.exists()


def test_a_process_list_opened_stays_open_while_the_tiles_refresh(page: Any, stack: Stack) -> None:
    from gpus.models import Gpu

    needs_walk("deployment")
    gpu = Gpu.objects.get(node=NODE, index=0)  # the walk's replica (ordinal 0) is GPU 0's process
    login(page, stack, "/gpus/")
    details = page.locator(f"#procs-{gpu.pk}")
    details.locator("summary").click()
    expect(details).to_have_attribute("open", "")
    for _ in range(2):  # two refreshes of the tiles
        with page.expect_response(lambda r: r.url.endswith("/gpus/tiles")):
            pass
    page.wait_for_timeout(200)
    expect(page.locator(f"#procs-{gpu.pk}")).to_have_attribute("open", "")
    expect(page.locator(f"#procs-{gpu.pk}")).to_contain_text(WALK["deployment"])
    shot(page, "usability-gpu-processes-open")


def test_the_deploy_form_shows_the_memory_it_needs_against_what_is_free(page: Any, stack: Stack) -> None:
    needs_walk("model")
    login(page, stack, f"/deployments/new?model={WALK['model'].pk}")
    panel = page.locator("#memory")
    expect(panel).to_contain_text("Memory of " + NODE)
    expect(panel).to_contain_text("It fits.")
    form_of(page, "/deployments/new").get_by_label("Memory fraction").fill("1")
    form_of(page, "/deployments/new").get_by_label("Memory fraction").dispatch_event("change")
    expect(panel).to_contain_text("need more than is free")
    expect(panel.locator(".room.short")).to_be_visible()
    shot(page, "usability-deploy-memory")
    with in_chinese(page):
        expect(panel).to_contain_text(NODE + " 的内存")
        shot(page, "usability-deploy-memory-zh")


def test_usage_charts_write_their_dates_in_the_pages_language(page: Any, stack: Stack) -> None:
    needs_walk("department")
    login(page, stack, f"/departments/{WALK['department'].pk}/")
    canvas = page.locator('canvas[data-source="department-usage-data"]')

    def ticks(code: str) -> list[str]:
        page.wait_for_function("() => (document.querySelector('canvas.usage-chart') || {})._chart")
        labels = canvas.evaluate("c => c._chart.data.labels")
        assert labels == page.evaluate(
            """([lang, data]) => data.moments.map(ms => new Intl.DateTimeFormat(lang, data.period === 'hour'
                 ? {month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', timeZone: data.time_zone}
                 : {year: 'numeric', month: '2-digit', day: '2-digit', timeZone: 'UTC'}).format(new Date(ms)))""",
            [code, chart_data(page, "department-usage-data")],
        )
        canvas.scroll_into_view_if_needed()
        shot(page, f"usability-usage-dates-{code}")
        return labels

    english = ticks("en")
    with in_chinese(page):
        chinese = ticks("zh-hans")
    assert english != chinese, (english, chinese)


def test_the_nodes_page_shows_this_box_and_how_another_joins(page: Any, stack: Stack) -> None:
    """The worker's heartbeat registers the box; "Add a box" shows the join command once."""
    login(page, stack, "/nodes/")
    row = page.locator("tr", has=page.get_by_text(NODE, exact=True))
    expect(row.locator("[data-state]")).to_have_attribute("data-state", "ready")
    shot(page, "usability-nodes")
    page.get_by_role("button", name="Add a box").click()
    expect(page.locator("#join-command")).to_contain_text("make node CONSOLE=" + stack.url("").rstrip("/"))
    expect(page.locator("#join-command")).to_contain_text("TOKEN=join_")
    shot(page, "usability-nodes-join")
    page.reload()
    expect(page.locator("main")).to_contain_text("shown once already")
    page.goto(stack.url("/nodes/"))
    with in_chinese(page):
        expect(page.locator("h1")).to_have_text("节点")
        expect(row.locator("[data-state]")).to_have_text("就绪")
        shot(page, "usability-nodes-zh")


def test_a_directory_admin_signs_in_and_tests_the_directory(page: Any, stack: Stack) -> None:
    """Alice is in the directory's ml-admins group (LDAP over StartTLS): she signs in with her
    directory password, is an appliance admin, and tests the connection on the Settings page."""
    page.goto(stack.url("/login/"))
    page.get_by_label("User name").fill("nobody")  # in no mapped group
    page.get_by_label("Password").fill("nobody-pw")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("main")).to_contain_text("in no group that this console maps to a role")
    page.get_by_label("User name").fill("alice")
    page.get_by_label("Password").fill("alice-pw")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/login/" not in url)
    expect(page.locator(".user-menu summary")).to_contain_text("alice · Appliance admin")
    page.goto(stack.url("/settings/directory/"))
    expect(page.locator("main")).to_contain_text("cn=console,ou=services")
    expect(page.locator("main")).not_to_contain_text(SERVICE_PASSWORD)
    page.get_by_role("button", name="Test connection").click()
    expect(page.locator(".messages")).to_contain_text("4 users and 4 groups found")
    shot(page, "usability-directory")
    with in_chinese(page):
        expect(page.locator("h1")).to_have_text("目录登录")
        page.get_by_role("button", name="测试连接").click()
        expect(page.locator(".messages")).to_contain_text("找到 4 个用户和 4 个组")
        shot(page, "usability-directory-zh")


def test_the_deployment_page_draws_what_its_engine_reports(page: Any, stack: Stack) -> None:
    """The engine-metrics charts of the walk's deployment, read from their Chart.js objects: the
    worker scrapes the real engine's /metrics and the charts draw those samples."""
    needs_walk("deployment")
    login(page, stack, f"/deployments/{WALK['deployment']}/")
    ready = (
        "() => ['requests', 'kv_cache', 'throughput'].every(m => {"
        " const c = document.querySelector(`canvas.gpu-chart[data-metric=${m}]`);"
        " return c && c._chart && c._chart.data.datasets.some(d => d.data.length > 1); })"
    )
    deadline = time.monotonic() + 60
    while True:  # samples come every few seconds; the charts load on open (and every 30 s): reopen until drawn
        try:
            page.wait_for_function(ready, timeout=5_000)
            break
        except PlaywrightTimeoutError:
            assert time.monotonic() < deadline, page.evaluate(
                "() => [...document.querySelectorAll('canvas.gpu-chart')].map(c => [c.dataset.metric,"
                " c._chart ? c._chart.data.datasets.map(d => d.data.length) : null])"
            )
            page.reload()
    lines = page.locator("canvas.gpu-chart[data-metric=requests]").evaluate(
        "c => c._chart.data.datasets.map(d => d.label)"
    )
    assert lines == ["running", "waiting"], lines
    # Beside the engine's own figures, the gateway's: what the walk's department waited for its first token.
    gateway = page.locator("canvas.gpu-chart[data-metric=gateway_ttft]").evaluate(
        "c => c._chart.data.datasets.map(d => [d.label, d.data.length])"
    )
    department = WALK["department"].name
    assert [label for label, _n in gateway] == [f"{department} p50", f"{department} p99"], gateway
    assert all(n >= 1 for _label, n in gateway), gateway
    page.locator('[data-testid="engine-charts"]').scroll_into_view_if_needed()
    shot(page, "usability-engine-charts")
    with in_chinese(page):
        page.wait_for_function(ready, timeout=30_000)
        expect(page.locator('[data-testid="engine-charts"]')).to_contain_text("首 token 时间")
        page.locator('[data-testid="engine-charts"]').scroll_into_view_if_needed()
        shot(page, "usability-engine-charts-zh")


def test_the_playground_streams_an_answer_with_its_figures(page: Any, stack: Stack) -> None:
    """An admin tries the walk's deployment on the department's behalf: the answer streams from the real
    engine through the console's gateway, with its tokens, time to first token and tokens per second,
    and the same call in Python beside it; in Chinese too."""
    needs_walk("deployment", "department")
    login(page, stack, "/playground/")
    form = page.locator("#playground")
    form.get_by_label("Department (billed)").select_option(label=WALK["department"].name)
    form.get_by_label("Deployment", exact=True).select_option(WALK["deployment"])
    form.get_by_label("Most tokens in the answer").fill("12")
    form.get_by_label("Message").fill("Say hello")
    form.get_by_role("button", name="Send").click()
    stats = page.locator("#pane-a .stats")
    expect(stats).to_contain_text("tokens/s", timeout=60_000)
    assert page.locator("#pane-a .turn.assistant").inner_text().strip(), "no answer drawn"
    assert 0 < int(stats.get_attribute("data-tokens")) <= 12
    expect(page.locator("#pg-snippet")).to_contain_text(f"model='{WALK['deployment']}'")
    shot(page, "usability-playground")
    with in_chinese(page):
        form.get_by_label("部门（计费）").select_option(label=WALK["department"].name)
        form.get_by_label("消息").fill("Say hello again")
        form.get_by_role("button", name="发送").click()  # 256 tokens asked, the department allows 64
        expect(page.locator("#pane-a .turn.error")).to_contain_text("64", timeout=30_000)
        form.get_by_label("回答最多 token 数").fill("12")
        form.get_by_label("消息").fill("Say hello again")
        form.get_by_role("button", name="发送").click()
        expect(page.locator("#pane-a .stats")).to_contain_text("token/秒", timeout=60_000)
        shot(page, "usability-playground-zh")


def test_the_playground_compares_two_deployments_side_by_side(page: Any, stack: Stack) -> None:
    """A second deployment of the walk's model, deployed with one click and allowed to the department:
    the playground sends one message to both, and each pane streams its own real engine's answer with
    its figures. The second engine is stopped and deleted after (two engines on two cores)."""
    needs_walk("model", "deployment", "department")
    login(page, stack, f"/deployments/new?model={WALK['model'].pk}")
    deploy = form_of(page, "/deployments/new")
    deploy.get_by_label("Served model name").fill("tiny-compare")
    deploy.get_by_label("Memory fraction").fill("0.15")
    deploy.get_by_label("Maximum context length").fill("512")
    deploy.get_by_role("button", name="Deploy").click()
    expect(page).to_have_url(stack.url("/deployments/tiny-compare/"))
    try:
        WALK["department"].deployments.add(Deployment.objects.get(name="tiny-compare"))
        ready = Replica.objects.filter(deployment__name="tiny-compare", state=Replica.State.READY)
        assert wait_for(ready.exists, timeout=420, interval=2), stack.logs()
        page.goto(stack.url("/playground/"))
        form = page.locator("#playground")
        form.get_by_label("Department (billed)").select_option(label=WALK["department"].name)
        form.get_by_label("Deployment", exact=True).select_option(WALK["deployment"])
        form.get_by_label("Compare with").select_option("tiny-compare")
        form.get_by_label("Most tokens in the answer").fill("8")
        form.get_by_label("Message").fill("Say hello")
        form.get_by_role("button", name="Send").click()
        for pane, name in (("a", WALK["deployment"]), ("b", "tiny-compare")):
            expect(page.locator(f"#pane-{pane} .stats")).to_contain_text("tokens/s", timeout=120_000)
            expect(page.locator(f"#pane-{pane} .pane-title")).to_contain_text(name)
            assert page.locator(f"#pane-{pane} .turn.assistant").inner_text().strip(), f"no answer in pane {pane}"
            assert 0 < int(page.locator(f"#pane-{pane} .stats").get_attribute("data-tokens")) <= 8
        shot(page, "usability-playground-compare")
        with in_chinese(page):
            form.get_by_label("部门（计费）").select_option(label=WALK["department"].name)
            form.get_by_label("部署", exact=True).select_option(WALK["deployment"])
            form.get_by_label("对比", exact=True).select_option("tiny-compare")
            form.get_by_label("回答最多 token 数").fill("8")
            form.get_by_label("消息").fill("Say hello")
            form.get_by_role("button", name="发送").click()
            for pane in ("a", "b"):
                expect(page.locator(f"#pane-{pane} .stats")).to_contain_text("token/秒", timeout=120_000)
            shot(page, "usability-playground-compare-zh")
    finally:
        page.goto(stack.url("/deployments/tiny-compare/"))
        page.on("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Stop").click()
        replicas = Replica.objects.filter(deployment__name="tiny-compare")
        assert wait_for(lambda: all(r.state in Replica.TERMINAL for r in replicas.all()), timeout=60), stack.logs()
        page.get_by_role("button", name="Delete").click()
        expect(page).to_have_url(stack.url("/deployments/"))


def test_a_target_the_engine_misses_raises_an_alert_and_the_costs_page_shows_the_month(page: Any, stack: Stack) -> None:
    """A p99 TTFT target of 1 ms on the walk's deployment, missed by the real engine under a few
    requests: the scrape opens an alert on the deployment page; acknowledged from the page; cleared
    when the target goes. Then the month's costs, in English and Chinese."""
    needs_walk("deployment", "key")
    name = WALK["deployment"]
    login(page, stack, f"/deployments/{name}/")
    targets = form_of(page, f"/deployments/{name}/targets")
    targets.get_by_label("p99 time to first token (ms)").fill("1")
    targets.get_by_role("button", name="Save targets").click()
    expect(page.locator(".messages")).to_contain_text(f"Targets of {name} saved")
    client = openai.OpenAI(base_url=stack.url("/v1"), api_key=WALK["key"], max_retries=0, timeout=60)
    panel = page.locator('[data-testid="targets"]')

    def load() -> None:
        for _ in range(3):
            try:
                client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            except openai.RateLimitError:  # the walk's department allows 60 a minute: the samples are there
                break

    reload_until(page, lambda: "past its target" in panel.inner_text(), 90, meanwhile=load)
    expect(panel).to_contain_text("p99 time to first token (ms)")
    form_of(page, f"/deployments/{name}/acknowledge").get_by_role("button", name="Acknowledge").click()
    expect(page.locator('[data-testid="targets"]')).to_contain_text("acknowledged by admin")
    page.locator('[data-testid="targets"]').scroll_into_view_if_needed()
    shot(page, "usability-target-alert")
    with in_chinese(page):
        expect(page.locator('[data-testid="targets"]')).to_contain_text("超出目标")
        page.locator('[data-testid="targets"]').scroll_into_view_if_needed()
        shot(page, "usability-target-alert-zh")
    form_of(page, f"/deployments/{name}/targets").get_by_label("p99 time to first token (ms)").fill("")
    form_of(page, f"/deployments/{name}/targets").get_by_role("button", name="Save targets").click()
    reload_until(page, lambda: "past its target" not in panel.inner_text(), 60)  # resolved at the next scrape

    page.goto(stack.url("/departments/costs/"))
    expect(page.locator('[data-testid="costs"]')).to_contain_text(name)
    shot(page, "usability-costs")
    with in_chinese(page):
        expect(page.locator("h1")).to_have_text("成本")
        shot(page, "usability-costs-zh")


def test_the_engine_log_shows_its_newest_line_after_a_refresh(page: Any, stack: Stack) -> None:
    needs_walk("deployment")
    login(page, stack, f"/deployments/{WALK['deployment']}/")
    log = page.locator("#replica-log")
    expect(log).to_be_visible()
    with page.expect_response(lambda r: f"/deployments/{WALK['deployment']}/" in r.url and r.request.method == "GET"):
        pass  # htmx refreshes the replicas and the log every 2 s
    page.wait_for_timeout(300)
    top, height, shown = log.evaluate("e => [e.scrollTop, e.scrollHeight, e.clientHeight]")
    assert top + shown >= height - 4, (top, height, shown)  # at the tail, not back at the top
    assert height <= shown or top > 0
    shot(page, "usability-log-tail")


def test_destructive_actions_ask_first_and_every_action_says_what_it_did(page: Any, stack: Stack) -> None:
    """A key revoked from the page: the question names the key; "no" changes nothing, "yes" revokes it
    and says so. A key issued: the reveal is a page of its own, and reloading it issues nothing. Every
    destructive button of the pages an admin meets asks first."""
    department = Department.objects.create(name="Confirmations")
    key, _ = ApiKey.issue(department, "to-revoke")
    login(page, stack, f"/departments/{department.pk}/")
    revoke = form_of(page, f"/departments/{department.pk}/keys/{key.pk}/revoke").get_by_role("button")
    questions: list[str] = []
    page.once("dialog", lambda dialog: (questions.append(dialog.message), dialog.dismiss()))
    revoke.click()
    assert wait_for(lambda: bool(questions), timeout=5) and "“to-revoke”" in questions[0]
    key.refresh_from_db()
    assert key.is_usable  # "no": nothing was sent
    page.once("dialog", lambda dialog: (questions.append(dialog.message), dialog.accept()))
    revoke.click()
    expect(page.locator(".messages")).to_contain_text("Key to-revoke revoked: it no longer works.")
    key.refresh_from_db()
    assert not key.is_usable
    shot(page, "usability-revoked-message")

    issue = form_of(page, f"/departments/{department.pk}/keys/new")
    issue.get_by_label("Name", exact=True).fill("reloaded")
    issue.get_by_role("button", name="Issue key").click()
    raw = page.locator("#secret").text_content().strip()
    expect(page.locator("#snippet-curl")).to_contain_text(f"Bearer {raw}")
    shot(page, "usability-key-reveal-snippets")
    page.reload()
    expect(page.locator(".panel")).to_contain_text("was shown once already")
    assert raw not in page.content() and ApiKey.objects.filter(name="reloaded").count() == 1

    for path in (f"/departments/{department.pk}/", "/settings/tokens/", "/gpus/", "/models/sources/"):
        page.goto(stack.url(path))
        dangerous = page.locator("form:has(button.danger)")
        for i in range(dangerous.count()):
            assert dangerous.nth(i).get_attribute("data-confirm"), (path, dangerous.nth(i).inner_html())


def test_usage_the_database_refused_is_shown_to_the_admin(page: Any, stack: Stack) -> None:
    """A usage entry set aside (the database refused it): the Overview's health panel says so and
    leads to the list, in English and in Chinese."""
    from tenancy.models import SetAsideUsage

    SetAsideUsage.objects.create(stream_id="1700000000000-0", reason="unreadable entry: ValueError: lots",
                                 fields='{"d": "3", "ct": "lots", "m": "tiny"}')  # fmt: skip
    try:
        login(page, stack, "/")
        panel = page.locator("#health-panel")
        expect(panel).to_contain_text("1 entry set aside")
        panel.get_by_role("link", name="See the usage entries the database refused").click()
        expect(page.locator("h1")).to_have_text("Usage set aside")
        expect(page.locator("table")).to_contain_text("unreadable entry: ValueError: lots")
        shot(page, "usability-usage-set-aside")
        with in_chinese(page):
            expect(page.locator("h1")).to_have_text("被搁置的用量")
            expect(page.locator("table")).to_contain_text("unreadable entry: ValueError: lots")
            shot(page, "usability-usage-set-aside-zh")
            page.goto(stack.url("/"))
            expect(page.locator("#health-panel")).to_contain_text("1 条被搁置")
            shot(page, "usability-usage-set-aside-overview-zh")
    finally:
        SetAsideUsage.objects.all().delete()


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
    # Stop and delete it again (it would start a second engine), answering yes to each question.
    page.on("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Stop").click()
    expect(page.locator(".messages")).to_contain_text("Stopping tiny-twice")
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
