"""The rows of a backup (``tables.jsonl``, backup format 3): written and loaded table by table.

Most rows are plain: every column is a value, every reference is to another row of the dump. Those
are written per model as one header line ``{"table": "<app.model>", "columns": [attname, …]}``
followed by one JSON array per row (``values_list`` read in chunks, ``orjson`` written), and loaded
back with one ``executemany`` INSERT per ``BATCH`` rows, each value passed through its field's own
conversions (``to_python`` then ``get_db_prep_save``), so the archive is the same on SQLite and
PostgreSQL and a box may move from one to the other. Many-to-many tables made by Django are tables
like the others, written after every model.

Rows that refer to what a fresh install numbers itself (content types and permissions: users'
and groups' permissions) or that use multi-table inheritance are written as Django serialises them
(``{"model": …, "pk": …, "fields": …}``, references by natural key) and loaded with the serializer.

Measured by ``bench/ops.py`` (a million usage records): see the issue's note for the figures against
format 2, which serialised every row through Django (``load_rows`` still reads it).
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from typing import IO, Any

import orjson
from django.apps import apps
from django.conf import settings
from django.core import serializers
from django.core.management.color import no_style
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import Model
from django.utils.duration import duration_iso_string

BATCH = 2000  # rows per INSERT batch (and per read chunk)
SQLITE_CACHE_KIB = 256 * 1024  # page cache while loading: indexes of a million rows stay in memory
# Made by `migrate` on a fresh install; dumping them would clash with the fresh install's own rows.
NOT_DUMPED = ("contenttypes", "auth.permission", "sessions", "axes")
# Columns whose JSON value is what the database takes (no conversion on load).
PLAIN = {
    "AutoField", "BigAutoField", "SmallAutoField", "IntegerField", "BigIntegerField", "SmallIntegerField",
    "PositiveIntegerField", "PositiveBigIntegerField", "PositiveSmallIntegerField", "CharField", "TextField",
    "SlugField", "EmailField", "URLField", "FilePathField", "FloatField", "BooleanField",
}  # fmt: skip


def not_dumped(model: type[Model]) -> bool:
    """Whether a backup leaves the model's rows out (a fresh install makes them)."""
    meta = model._meta
    return meta.app_label in NOT_DUMPED or meta.label_lower in NOT_DUMPED


def _dumped_models() -> list[type[Model]]:
    """Every model whose rows a backup holds, referred-to models first (as ``dumpdata`` orders them)."""
    app_list = {
        config: [m for m in config.get_models() if not not_dumped(m) and not m._meta.proxy and m._meta.managed]
        for config in apps.get_app_configs()
        if config.models_module is not None and config.label not in NOT_DUMPED
    }
    return serializers.sort_dependencies(app_list.items(), allow_cycles=True)


def _is_plain(model: type[Model]) -> bool:
    """Whether the model's rows can be copied column by column: no multi-table parent, no reference
    to a model the dump leaves out, many-to-many only through tables Django made between dumped ones."""
    meta = model._meta
    if meta.parents:
        return False
    for field in meta.concrete_fields:
        if field.is_relation and not_dumped(field.related_model):
            return False
    for field in meta.many_to_many:
        if not field.remote_field.through._meta.auto_created or not_dumped(field.related_model):
            return False
    return True


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, timedelta):
        return duration_iso_string(value)
    if isinstance(value, bytes | memoryview):
        return base64.b64encode(bytes(value)).decode()
    raise TypeError(f"cannot write {type(value).__name__} in a backup")


def _table(model: type[Model], stream: IO[bytes]) -> int:
    columns = [field.attname for field in model._meta.concrete_fields]
    stream.write(orjson.dumps({"table": model._meta.label_lower, "columns": columns}) + b"\n")
    rows = model._base_manager.using(DEFAULT_DB_ALIAS).order_by("pk").values_list(*columns)
    count = 0
    for row in rows.iterator(chunk_size=BATCH):
        stream.write(orjson.dumps(row, default=_default) + b"\n")
        count += 1
    return count


def write_rows(stream: IO[bytes]) -> int:
    """Write every row the console keeps to ``stream``; returns how many."""
    count = 0
    throughs: list[type[Model]] = []
    for model in _dumped_models():
        if _is_plain(model):
            count += _table(model, stream)
            throughs += [field.remote_field.through for field in model._meta.many_to_many]
            continue
        for obj in model._base_manager.using(DEFAULT_DB_ALIAS).order_by("pk").iterator(chunk_size=BATCH):
            (row,) = serializers.serialize("python", [obj], use_natural_foreign_keys=True)
            stream.write(orjson.dumps(row, default=_default) + b"\n")
            count += 1
    for through in throughs:
        count += _table(through, stream)
    return count


def _datetimes(connection: Any) -> Callable[[Any], Any]:
    """A written time (ISO 8601 with its offset) as the database takes it: on SQLite the text Django
    stores (naive, in the connection's time zone: what ``adapt_datetimefield_value`` makes, a tenth
    of its cost, which counted for most of a restore), elsewhere the aware time for the driver."""
    if connection.vendor != "sqlite":
        return lambda value: None if value is None else datetime.fromisoformat(value)
    zone = connection.timezone
    utc = zone.utcoffset(None) == timedelta(0)  # a zone with daylight saving answers None

    def convert(value: Any) -> Any:
        if value is None:
            return None
        moment = datetime.fromisoformat(value)  # checked in any case
        if utc and value.endswith("+00:00"):  # as written: str() of the naive time, cut from the text
            return f"{value[:10]} {value[11:-6]}"
        if moment.tzinfo is not None:
            moment = moment.astimezone(zone).replace(tzinfo=None)
        return str(moment)

    return convert


def _converter(field: Any, connection: Any) -> Callable[[Any], Any] | None:
    target = field.target_field if field.is_relation else field
    kind = target.get_internal_type()
    if kind in PLAIN:
        return None
    if kind == "DateTimeField" and settings.USE_TZ:
        return _datetimes(connection)

    def convert(value: Any) -> Any:
        return None if value is None else field.get_db_prep_save(field.to_python(value), connection)

    return convert


class _Loader:
    """Rows going into the database: plain rows by executemany, serialised ones by the serializer."""

    def __init__(self) -> None:
        self.connection = connections[DEFAULT_DB_ALIAS]
        self.loaded: set[type[Model]] = set()
        self.count = 0
        self.model: type[Model] | None = None
        self.sql = ""
        self.converters: list[tuple[int, Callable[[Any], Any]]] = []
        self.width = 0
        self.batch: list[list[Any]] = []
        self.serialized: dict[type, list] = defaultdict(list)
        self.later: list[Any] = []  # serialised rows with many-to-many values or forward references
        self.deferred: list[str] = []  # CREATE INDEX statements to run once the rows are in
        self.current = ""  # the model of the serialised rows being read

    def _defer_indexes(self, table: str) -> None:
        """SQLite: a table's secondary indexes are dropped while its rows go in and made again once
        at the end (a sorted build instead of a million scattered inserts: most of a restore's time,
        measured). Inside the restore's transaction, so a failed restore still keeps them."""
        if self.connection.vendor != "sqlite":
            return
        with self.connection.cursor() as cursor:
            found = cursor.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = %s AND sql IS NOT NULL",
                [table],
            ).fetchall()
            for name, sql in found:
                cursor.execute(f"DROP INDEX {self.connection.ops.quote_name(name)}")
                self.deferred.append(sql)

    def table(self, label: str, columns: list[str]) -> None:
        self.flush()
        model = apps.get_model(label)
        self._defer_indexes(model._meta.db_table)
        fields = {field.attname: field for field in model._meta.concrete_fields}
        unknown = [name for name in columns if name not in fields]
        if unknown:
            raise ValueError(f"{label} has no column {', '.join(unknown)} in this install")
        quote = self.connection.ops.quote_name  # names are this install's own, quoted; values are parameters
        names = ", ".join(quote(fields[c].column) for c in columns)
        self.sql = f"INSERT INTO {quote(model._meta.db_table)} ({names}) VALUES ({', '.join(['%s'] * len(columns))})"  # noqa: S608
        self.converters = [
            (index, convert)
            for index, name in enumerate(columns)
            if (convert := _converter(fields[name], self.connection)) is not None
        ]
        self.model, self.width = model, len(columns)
        self.loaded.add(model)

    def row(self, values: list[Any]) -> None:
        if self.model is None or len(values) != self.width:
            raise ValueError("a row of the dump does not match its table's columns")
        for index, convert in self.converters:
            values[index] = convert(values[index])
        self.batch.append(values)
        self.count += 1
        if len(self.batch) >= BATCH:
            self._insert()

    def _insert(self) -> None:
        if self.batch:
            with self.connection.cursor() as cursor:
                cursor.executemany(self.sql, self.batch)
            self.batch = []

    def serialised(self, row: dict[str, Any]) -> None:
        if row.get("model") != self.current:  # the previous model's rows go in before these are read
            self.flush()
            self.current = row.get("model", "")
        (item,) = serializers.deserialize("python", [row], handle_forward_references=True)
        obj, model = item.object, type(item.object)
        self.loaded.add(model)
        self.count += 1
        if model._meta.parents:  # multi-table inheritance: bulk_create cannot; as loaddata does
            item.save()
            return
        self.serialized[model].append(obj)
        if item.m2m_data or item.deferred_fields:
            self.later.append(item)
        if len(self.serialized[model]) >= BATCH:
            self._create(model)

    def _create(self, model: type) -> None:
        rows = self.serialized.pop(model, [])
        if rows:
            model._base_manager.using(DEFAULT_DB_ALIAS).bulk_create(rows)

    def flush(self) -> None:
        """Everything read so far into the database (references by natural key are looked up there)."""
        self._insert()
        for model in list(self.serialized):
            self._create(model)

    def finish(self) -> int:
        self.flush()
        with self.connection.cursor() as cursor:
            for sql in self.deferred:
                cursor.execute(sql)
        for item in self.later:
            for name, values in (item.m2m_data or {}).items():
                getattr(item.object, name).set(values)
            if item.deferred_fields:
                item.save_deferred_fields()
        connection = self.connection
        connection.check_constraints(table_names=[model._meta.db_table for model in self.loaded])
        with connection.cursor() as cursor:
            for statement in connection.ops.sequence_reset_sql(no_style(), list(self.loaded)):
                cursor.execute(statement)
        return self.count


@contextmanager
def _large_cache(connection: Any) -> Iterator[None]:
    """SQLite's page cache is 2 MB by default: inserting a million rows into indexed tables then
    reads and writes the same pages again and again (most of a restore's time, measured)."""
    if connection.vendor != "sqlite":
        yield
        return
    with connection.cursor() as cursor:
        (before,) = cursor.execute("PRAGMA cache_size").fetchone()
        cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"PRAGMA cache_size = {int(before)}")


def _lines(stream: Iterable[bytes]) -> Iterator[Any]:
    for line in stream:
        if line.strip():
            yield orjson.loads(line)


def load_rows(stream: Iterable[bytes]) -> int:
    """Load a dump (inside the caller's transaction): ``tables.jsonl`` (format 3) or ``database.jsonl``
    (format 2, ``dumpdata --format jsonl``: every row serialised). Returns the rows loaded; foreign
    keys are checked once at the end and sequences reset."""
    loader = _Loader()
    with loader.connection.constraint_checks_disabled(), _large_cache(loader.connection):
        for line in _lines(stream):
            if isinstance(line, list):
                loader.row(line)
            elif "table" in line:
                loader.table(line["table"], line["columns"])
            else:
                loader.serialised(line)
        return loader.finish()
