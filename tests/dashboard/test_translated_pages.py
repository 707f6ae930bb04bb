"""No English left on a page in Chinese: every page of the console (the URL conf walked, filled with
real objects in many states) is rendered in Simplified Chinese as an appliance admin, and no piece of
its text (text nodes, and the attributes people read: titles, placeholders, labels, confirmations)
is a string of the catalogue that has a Chinese translation. Such a piece means a string was shown
without going through the catalogue (a raw choice value, a message stored in English)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from django.utils import translation
from django.utils.translation import trans_real

from tests.appliance.pages import console_pages
from tests.appliance.walls import PAGE_QUERIES, World, build_world, expected, page_variants

pytestmark = pytest.mark.django_db

READ_ATTRIBUTES = ("title", "placeholder", "aria-label", "data-confirm", "alt")
SKIP_INSIDE = {"script", "style", "pre", "code", "textarea"}  # and elements with a lang of their own


class _Texts(HTMLParser):
    """The pieces of a page a person reads, one per text node or readable attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[str] = []
        self.skipping: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        lang = dict(attrs).get("lang")
        if tag in SKIP_INSIDE or (lang and not lang.startswith("zh")):  # code, or text in another language on purpose
            self.skipping.append(tag)
        for name, value in attrs:
            if value and (name in READ_ATTRIBUTES or (name == "value" and dict(attrs).get("type") == "submit")):
                self.pieces.append(value.strip())

    def handle_endtag(self, tag: str) -> None:
        if self.skipping and self.skipping[-1] == tag:
            self.skipping.pop()

    def handle_data(self, data: str) -> None:
        text = " ".join(data.split())
        if text and not self.skipping:
            self.pieces.append(text)


def _catalogue() -> list[tuple[re.Pattern[str], str]]:
    """(pattern, msgid) for every English string with a Chinese translation that differs from it."""
    catalog = trans_real.translation("zh-hans")._catalog
    found = []
    for key, value in catalog.items():
        msgid = key[0] if isinstance(key, tuple) else key
        if not msgid or msgid == value or not re.search(r"[A-Za-z]{3}", msgid):
            continue
        literal = re.split(r"%\(\w+\)[sd]|%[sd]", msgid)
        if sum(len(part.strip()) for part in literal) < 4:  # "%(name)s" alone, "GPU %(index)s": too loose
            continue
        pattern = ".+?".join(re.escape(" ".join(part.split())) for part in literal)
        found.append((re.compile(rf"{pattern}"), msgid))
    return found


def english_pieces(html: str, catalogue: list[tuple[re.Pattern[str], str]]) -> set[str]:
    parser = _Texts()
    parser.feed(html)
    left = set()
    for piece in parser.pieces:
        for pattern, msgid in catalogue:
            if pattern.fullmatch(piece):
                left.add(f"{piece!r} (catalogue: {msgid!r})")
    return left


def test_the_crawl_finds_an_untranslated_string() -> None:
    """The check itself: a catalogue string shown raw is caught, its translation is not, and data that
    only contains such a word is not mistaken for it."""
    catalogue = _catalogue()
    with translation.override("zh-hans"):
        translated = translation.gettext("Deployments")
    assert translated != "Deployments"
    page = f"<h1>Deployments</h1><p>{translated}</p><p>my Deployments list</p><button title='Deployments'>x</button>"
    assert english_pieces(page, catalogue) == {"'Deployments' (catalogue: 'Deployments')"}
    assert english_pieces(f"<h1>{translated}</h1><pre>Deployments</pre>", catalogue) == set()


@pytest.fixture
def world() -> World:
    from provisioning.models import Deployment, Replica

    world = build_world()
    # Objects in the states that show words of their own: a deployment with a starting and a crashed replica.
    world.dep_a.desired = Deployment.Desired.RUNNING
    world.dep_a.replicas = 2
    world.dep_a.save()
    Replica.objects.create(deployment=world.dep_a, ordinal=0, node=settings.NODE_NAME, port=1, state="starting")
    Replica.objects.create(deployment=world.dep_a, ordinal=1, node=settings.NODE_NAME, state="crashed",
                           last_error="engine exited")  # fmt: skip
    # A GPU with findings (alerts and health reasons), as the collector records them.
    from gpus.alerts import sync_alerts
    from gpus.health import evaluate
    from gpus.models import Gpu

    reading = {"temperature": 95, "xids": [79, 13], "power_draw": None, "util_gpu": 50, "mem_used": 1, "mem_total": 2}
    findings = evaluate(reading, [], temperature_limit=85)
    Gpu.objects.filter(pk=world.gpu.pk).update(latest=reading, health=sync_alerts(world.gpu, findings),
                                               health_reasons=[f.reason() for f in findings])  # fmt: skip
    return world


def test_no_page_in_chinese_shows_a_catalogue_string_in_english(world: World) -> None:
    admin = world.users["admin"]
    client = Client()
    client.force_login(admin)
    client.cookies[settings.LANGUAGE_COOKIE_NAME] = "zh-hans"
    catalogue = _catalogue()
    left: dict[str, set[str]] = {}
    crawled = 0
    for page in console_pages():
        if not page.is_page:
            continue
        for side, action, kwargs in page_variants(page, world):
            if side == "B" or expected(admin, page.rule_for(action), side, world) != "ok":
                continue
            response = client.get(reverse(page.name, kwargs=kwargs), PAGE_QUERIES.get(page.name, {}), follow=True)
            if "html" not in response.get("Content-Type", "") or response.streaming:
                continue
            crawled += 1
            found = english_pieces(response.content.decode(), catalogue)
            if found:
                left[f"{page.name} {kwargs}"] = found
    assert crawled > 20
    assert left == {}, "English on pages in Chinese:\n" + "\n".join(f"{k}: {sorted(v)}" for k, v in left.items())
