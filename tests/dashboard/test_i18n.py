"""Every page and message in Simplified Chinese: the zh_Hans catalog is complete, current and compiled,
and every template string a user sees is marked for translation."""

from __future__ import annotations

import gettext
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.template.base import tag_re

ROOT = Path(__file__).resolve().parents[2]
LOCALE = ROOT / "locale"
PO = LOCALE / "zh_Hans" / "LC_MESSAGES" / "django.po"
MO = PO.with_suffix(".mo")
APPS = ["appliance", "dashboard", "models_catalog", "provisioning", "gpus", "tenancy"]
TEMPLATES = sorted(path for app in APPS for path in (ROOT / app / "templates").rglob("*.html"))

# --- A tiny .po reader (the project does not depend on polib) ---------------------------------------------

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _unquote(text: str) -> str:
    text = text.strip()
    assert text.startswith('"') and text.endswith('"'), f"not a PO string: {text!r}"
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), text[1:-1])


class Entry:
    def __init__(self) -> None:
        self.flags: set[str] = set()
        self.fields: dict[str, str] = {}  # msgctxt, msgid, msgid_plural, msgstr, msgstr[0], ...
        self.obsolete = False
        self.line = 0

    @property
    def key(self) -> tuple[str | None, str, str | None]:
        return self.fields.get("msgctxt"), self.fields["msgid"], self.fields.get("msgid_plural")

    @property
    def translations(self) -> list[str]:
        return [value for name, value in self.fields.items() if name.startswith("msgstr")]

    def __str__(self) -> str:
        ctxt, msgid, plural = self.key
        where = f"line {self.line}: " + (f"[{ctxt}] " if ctxt else "")
        return where + repr(msgid) + (f" / {plural!r}" if plural else "")


def read_po(path: Path) -> list[Entry]:
    """The entries of a catalog, header included (msgid "")."""
    entries: list[Entry] = []
    entry, field = Entry(), None

    def flush() -> None:
        nonlocal entry, field
        if "msgid" in entry.fields:
            entries.append(entry)
        entry, field = Entry(), None

    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line.startswith("#~"):
            line = line[2:].strip()
            entry.obsolete = True
            if not line or line.startswith(("#", "|")):  # #~| holds a previous msgid
                continue
        elif line.startswith("#,"):
            if field and field.startswith("msgstr"):
                flush()
            entry.flags.update(flag.strip() for flag in line[2:].split(","))
            continue
        if not line or line.startswith("#"):
            if not line and field:
                flush()
            continue
        if line.startswith('"'):
            assert field, f"{path}:{number}: continuation without a keyword"
            entry.fields[field] += _unquote(line)
            continue
        keyword, _, value = line.partition(" ")
        if keyword in ("msgctxt", "msgid") and field and field.startswith("msgstr"):
            flush()  # a new entry without a blank line before it
        if keyword == "msgid" or (keyword == "msgctxt" and not entry.line):
            entry.line = entry.line or number
        entry.fields[keyword] = _unquote(value)
        field = keyword
    flush()
    return entries


def active(entries: list[Entry]) -> dict[tuple[str | None, str, str | None], Entry]:
    return {entry.key: entry for entry in entries if not entry.obsolete and entry.fields["msgid"]}


# --- The catalog -------------------------------------------------------------------------------------------------


def test_every_catalog_entry_is_translated() -> None:
    entries = read_po(PO)
    assert len(active(entries)) > 100, "the .po reader found almost nothing: is it broken?"
    problems = []
    for entry in active(entries).values():
        if "fuzzy" in entry.flags:
            problems.append(f"fuzzy: {entry}")
        elif not entry.translations or not all(text.strip() for text in entry.translations):
            problems.append(f"untranslated: {entry}")
    obsolete = [str(entry) for entry in entries if entry.obsolete]
    if obsolete:
        problems.append(f"obsolete (#~) entries to delete: {obsolete}")
    assert not problems, f"{PO.relative_to(ROOT)}:\n" + "\n".join(problems)


_PLACEHOLDER = re.compile(r"%\((\w+)\)[-#0 +]*\d*(?:\.\d+)?[sdif]|%[-#0 +]*\d*(?:\.\d+)?[sdif]|\{\w*\}")


def test_translations_keep_their_placeholders() -> None:
    problems = []
    for entry in active(read_po(PO)).values():
        source = entry.fields["msgid"] + entry.fields.get("msgid_plural", "")
        wanted = {m.group(0) for m in _PLACEHOLDER.finditer(source.replace("%%", ""))}
        for text in entry.translations:
            found = {m.group(0) for m in _PLACEHOLDER.finditer(text.replace("%%", ""))}
            if text and found != wanted:
                problems.append(f"{entry}: expects {sorted(wanted)}, has {sorted(found)} in {text!r}")
    assert not problems, "\n".join(problems)


def test_compiled_catalog_matches_the_po() -> None:
    """locale/…/django.mo is what Django reads: it must be recompiled after every .po change."""
    with MO.open("rb") as handle:
        compiled = gettext.GNUTranslations(handle)._catalog  # type: ignore[attr-defined]
    stale = []
    for (ctxt, msgid, plural), entry in active(read_po(PO)).items():
        key = f"{ctxt}\x04{msgid}" if ctxt else msgid
        if plural:
            want = [entry.fields.get(f"msgstr[{n}]") for n in range(len(entry.translations))]
            got = [compiled.get((key, n)) for n in range(len(want))]
        else:
            want, got = [entry.fields.get("msgstr")], [compiled.get(key)]
        if want != got:
            stale.append(str(entry))
    assert not stale, "django.mo is out of date: run `manage.py compilemessages --ignore=.venv`:\n" + "\n".join(stale)


_MAKEMESSAGES = """
import sys
import django
from django.conf import settings
settings.configure(LOCALE_PATHS=[sys.argv[1]], USE_I18N=True)
django.setup()
from django.core.management import call_command
call_command("makemessages", locale=["zh_Hans"], verbosity=0)
"""
_SKIP_DIRS = {".venv", "var", "tests", "locale", "node_modules", "__pycache__", "static"}


def test_makemessages_adds_nothing(tmp_path: Path) -> None:
    """Runs makemessages on a copy of the sources (it writes beside the templates it reads) into an empty
    locale directory, and compares the message ids with the committed catalog's."""
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith((".py", ".html", ".txt")):
                source = Path(dirpath) / name
                target = tmp_path / source.relative_to(ROOT)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    (tmp_path / "locale").mkdir()
    fresh = tmp_path / PO.relative_to(ROOT)
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-c", _MAKEMESSAGES, str(tmp_path / "locale")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    committed, regenerated = active(read_po(PO)), active(read_po(fresh))
    assert len(regenerated) > 100, f"makemessages found almost nothing: {result.stdout}{result.stderr}"
    missing = [str(regenerated[key]).split(": ", 1)[1] for key in regenerated.keys() - committed.keys()]
    unused = [str(committed[key]) for key in committed.keys() - regenerated.keys()]
    assert not missing, (
        "strings marked in the code but missing from the zh_Hans catalog: run `manage.py makemessages -l zh_Hans "
        "--ignore=.venv --ignore=var --ignore=tests`, translate, compile:\n" + "\n".join(sorted(missing))
    )
    assert not unused, "catalog entries no longer in the code (run makemessages):\n" + "\n".join(sorted(unused))


# --- Templates ---------------------------------------------------------------------------------------------------

# fmt: off
# Text a user sees that must stay as it is in every language. Keep it short: translate rather than add here.
ALLOWED = {
    "°C", "W", "/s",  # units after a number (temperature, power, a transfer rate after a size)
    "apc_", "sk-apc-",  # the fixed prefixes of console tokens and API keys, shown before their ids
    "sha256", "git",  # the kind of a file digest, before the digest itself
    "Qwen/…",  # placeholder of the repository search: an example repository id
}
# fmt: on
VISIBLE_ATTRIBUTES = {"placeholder", "title", "aria-label", "alt", "hx-confirm", "data-confirm"}
SENTINEL = "\ue000"  # stands for a template tag or variable: not a letter, splits the text around it
_LETTER = re.compile(r"[^\W\d_]")


_FILTER_TEXT = re.compile(r"""\|\s*(?:default|default_if_none|yesno)\s*:\s*("[^"]*"|'[^']*')""")


def _without_template_code(source: str) -> tuple[str, list[tuple[int, str]]]:
    """The template with tags, variables and comments replaced by SENTINEL, and the text inside
    {% blocktranslate %}, {% comment %} and {% verbatim %} dropped (lines stay where they were); and the
    literal text given to |default, |default_if_none and |yesno without _("…")."""
    out, closing, found, line = [], None, [], 1
    for index, piece in enumerate(tag_re.split(source)):
        if index % 2 and piece.startswith("{%"):
            name = (piece[2:-2].split() or [""])[0]
            if closing is None and name in ("blocktranslate", "blocktrans", "comment", "verbatim"):
                closing = "end" + name
            elif name == closing:
                closing = None
        elif index % 2 and piece.startswith("{{") and closing is None:
            for literal in _FILTER_TEXT.findall(piece):
                if _LETTER.search(literal) and literal[1:-1].strip() not in ALLOWED:
                    found.append((line, literal))
        elif not index % 2 and closing is None:
            out.append(piece)
            line += piece.count("\n")
            continue
        out.append(SENTINEL + "\n" * piece.count("\n"))
        line += piece.count("\n")
    return "".join(out), found


class _TextFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[int, str]] = []
        self.raw_text = False  # inside <script> or <style>
        self.in_pre = 0  # inside <pre>: code samples, shown as written in every language

    def _check(self, text: str, line: int) -> None:
        for fragment in text.split(SENTINEL):
            if _LETTER.search(fragment) and fragment.strip() not in ALLOWED:
                self.found.append((line, fragment.strip()))
            line += fragment.count("\n")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self.raw_text = True
        self.in_pre += tag == "pre"
        values = dict(attrs)
        visible = set(VISIBLE_ATTRIBUTES)
        if tag == "input" and values.get("type") in ("submit", "button", "reset"):
            visible.add("value")
        for name, value in attrs:
            if name in visible and value:
                self._check(value, self.getpos()[0])

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self.raw_text = False

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self.raw_text = False
        self.in_pre -= tag == "pre" and self.in_pre > 0

    def handle_data(self, data: str) -> None:
        if not self.raw_text and not self.in_pre:
            self._check(data, self.getpos()[0])


def untranslated_text(path: Path) -> list[tuple[int, str]]:
    text, found = _without_template_code(path.read_text(encoding="utf-8"))
    finder = _TextFinder()
    finder.feed(text)
    finder.close()
    return sorted(found + finder.found)


def test_the_template_scan_finds_unmarked_text(tmp_path: Path) -> None:
    sample = tmp_path / "sample.html"
    sample.write_text(
        '{% load i18n %}<h1>{% translate "Fine" %}</h1>\n<p>Plain {{ x }} text</p>{# a comment #}\n'
        '<input placeholder="Search" title="{% translate \'Ok\' %}"><!-- <b>html comment</b> -->\n'
        "{% blocktranslate %}Also fine {{ x }}{% endblocktranslate %}{% comment %}Not shown{% endcomment %}\n"
        "<script>const s = 'code';</script><style>p { color: red }</style><td>{{ n }} °C</td><pre>x = 1</pre>\n"
        '<span aria-label="Close">×</span>{{ a|default:"none" }}{{ b|default:_("fine")|default:"—" }}'
    )
    assert untranslated_text(sample) == [(2, "Plain"), (2, "text"), (3, "Search"), (6, '"none"'), (6, "Close")]


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: str(p.relative_to(ROOT)))
def test_template_text_is_marked_for_translation(path: Path) -> None:
    found = untranslated_text(path)
    assert not found, "text not marked for translation (wrap it in {% translate %} / {% blocktranslate %}):\n" + (
        "\n".join(f"{path.relative_to(ROOT)}:{line}: {text!r}" for line, text in found)
    )


def test_templates_were_found() -> None:
    assert len(TEMPLATES) > 30
