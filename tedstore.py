"""tedstore: the durable system of record for TED game trackers.

Trackers send NDJSON events over a Unix socket; one writer thread commits them to
SQLite (WAL) in batched transactions and acknowledges each line only after the COMMIT
that covers it has returned. Game ends resolve predictions and side bets; a scheduler
keeps hourly metrics, nightly retention and backups; the same read API answers the CLI,
the Reader and the socket, and draws the HTML report.

Sections, in this order (`grep -n '^# [A-Z][A-Z]*:' tedstore.py` lists them): CONFIGURATION,
ERRORS, TIME, RECORDS, STORE, INGEST, WRITER, SERVER, MEASURES, SCHEDULER, SYSTEMD, DAEMON,
CLIENT, SIMULATOR, QUERIES, EXPORT, REPORT, CHECKS, CLI.

The path of one line starts in SERVER and goes up the file to INGEST, then back down:
Session.data_received cuts the byte stream into numbered lines (Session._lines, which
answers control lines) and Server.submit hands them as a Chunk to Writer.submit, which
queues it (IngestQueue.put). On the writer thread, Writer._loop takes a batch
(IngestQueue.take) and Writer._commit turns it into an IngestBatch: decode_chunk decodes
each line on its own (decode_line looks closer at a line that fails), and IngestBatch._route
sorts the events by table. Writer._commit_retrying runs IngestBatch.apply inside
transaction(); once COMMIT has returned, Writer._acknowledge hands each session its Ack
through on_commit, and on the event loop Server.deliver calls Session.acknowledge, which
writes {"ack": N}.

Where to change what:
- a setting: its field of Settings (its environment variable and bounds are on it);
- a table's retention, time column or what its retention bounds: its entry of TABLES;
- a measure (median e40, within-k shares, ROI): SQL_MEASURES and Measures, and ROLLED_UP
  for the column it has in the rollup tables;
- a chart of the report over a measure: one Chart in CHARTS; a panel of another shape
  (the reliability diagrams, the bankroll): a *_panel function, called by render_report;
- a query: a q_* function, its parameters (a Window subclass carries its default window),
  its entry of QUERIES, a Reader method and a read_command;
- how answers give times (RFC 3339, for browsers): answer_time, and TIME_COLUMNS for the
  columns SQL turns into JSON (answer_column);
- what a long window (LONG_WINDOW_DAYS) reads from the daily histograms instead of the
  records: a Histogram in HISTOGRAMS (its table in schema.sql), read by its per_value();
- the schema: a new "-- version: N" step at the end of schema.sql.
"""

from __future__ import annotations
__version__ = "1.0.0"

import asyncio
import bisect
import collections
import contextlib
import csv
import dataclasses
import datetime as dt
import errno
import fcntl
import functools
import html
import io
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import select
import selectors
import shutil
import signal
import socket
import stat
import statistics
import string
import struct
import sys
import threading
import time
import tomllib
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import (Annotated, Any, Callable, ClassVar, Iterable, Iterator, Literal,
                    NamedTuple, Optional, Union)

import apsw
import click
import msgspec
from msgspec import Meta

log = logging.getLogger("tedstore")


# ---------------------------------------------------------------------------
# CONFIGURATION: constants, and the settings with where each came from
# ---------------------------------------------------------------------------

DEFAULT_CONFIG_FILE = "/etc/tedstore.toml"
MAX_RAW_BYTES = 4096                 # how much of a rejected line the rejects table keeps
MAX_ERROR_CHARS = 300                # longest error text in a reply
BUSY_TIMEOUT_MS = 5000               # how long a connection waits for the write lock
OPTIMIZE_ON_OPEN = 0x10002           # PRAGMA optimize flags SQLite advises for a new connection
JOURNAL_SIZE_LIMIT = 32 * 1024 ** 2  # the WAL is truncated back to this after a checkpoint
WRITER_POLL_SECONDS = 0.5            # the writer wakes (and beats its heart) at least this often
CHECKPOINT_IDLE_SECONDS = 1.0        # idle time after which the writer checkpoints the WAL
CHECKPOINT_PAGES = 1000              # WAL pages after which a passive checkpoint runs beside it
WAL_WARNING_BYTES = 4 * JOURNAL_SIZE_LIMIT  # a WAL this large means something holds it back
REPLICATOR_WAL_LIMIT = 1024 ** 3     # with checkpoints off, a WAL past this is checkpointed
                                     # anyway: the replicator (whose own limit is ~500 MB) is down
RATE_WINDOW_SECONDS = 60             # status counts the lines committed over this window
RETRY_MAX_SECONDS = 1.0              # longest pause between attempts at a failing commit
STOP_GRACE_SECONDS = 20.0            # how long a draining daemon retries a failing commit
ROLLUP_DELAY_SECONDS = 60            # an hour is rolled up this long after it ends ...
ROLLUP_REVISIT_HOURS = 2             # ... and again while late game ends can still change it
RETENTION_STEP_SECONDS = 0.01        # target length of one retention delete transaction
YIELD_MIN_SECONDS = 0.002            # a CLI write command's shortest pause between writes
SCHEDULER_MAX_SLEEP = 30.0
SCHEDULER_FAILURE_PAUSE = 60.0       # a failed round of jobs is tried again this much later
IDLE_SWEEP_SECONDS = 5.0
STATUS_NOTIFY_SECONDS = 5.0
QUERY_THREADS = 2                    # threads answering queries over the socket
QUERY_THREAD_NICE = 10               # ... at a lower CPU priority than the writer and the loop
GIL_SWITCH_SECONDS = 0.001           # the daemon's GIL hand-over interval (Python's is 5 ms)
QUERY_SECONDS = 2.0                  # the most work one query over the socket may take
QUERY_MAX_BYTES = 16 * 1024 ** 2     # the largest answer over the socket
MAX_ROWS = 100_000                   # the most rows one answer holds
LOCK_WAIT_SECONDS = 1.0              # how long a starting daemon tries for the database lock
TROUBLE_LOG_SECONDS = 60.0           # a client logs a lasting trouble at most this often
CLIENT_BACKOFF_MIN_SECONDS = 0.05    # a client's first wait after a failed connection,
CLIENT_BACKOFF_MAX_SECONDS = 2.0     # doubled after each, up to this
BACKUP_PREFIX = "tedstore-"
PRIVATE_FILE_MODE = 0o600            # the database, its WAL, the lock and backups
MAX_SOCKET_PATH_BYTES = 107          # sun_path holds 108 bytes on Linux, the last a NUL


def _systemd_dir(variable: str, name: str) -> str:
    """A file in the first directory systemd gave us in `variable`, else in the cwd."""
    base = os.environ.get(variable, "").split(":")[0]
    return str(Path(base) / name) if base else f"./{name}"


def env(name: str) -> Meta:
    """A setting's environment variable, kept on its field of Settings."""
    return Meta(extra={"env": name})


RetentionDays = Annotated[float, Meta(ge=1, le=36_500)]  # a day to a century


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every knob of tedstore, with its environment variable and its bounds. Every number
    has both bounds, so that nothing absurd (inf, 1e308) is accepted now and kills a
    thread later."""

    db: Annotated[str, env("TEDSTORE_DB")] = ""
    socket: Annotated[str, env("TEDSTORE_SOCKET")] = ""
    batch_size: Annotated[int, Meta(ge=1, le=100_000), env("PERSISTENCE_BATCH_SIZE")] = 5000
    batch_interval: Annotated[float, Meta(gt=0, le=60),
                              env("PERSISTENCE_INTERVAL_SECONDS")] = 0.05
    synchronous: Annotated[Literal["NORMAL", "FULL"], env("TEDSTORE_SYNCHRONOUS")] = "NORMAL"
    checkpoint: Annotated[Literal["truncate", "passive", "off"],
                          env("TEDSTORE_CHECKPOINT")] = "truncate"
    tick_sample_every: Annotated[int, Meta(ge=1, le=1_000_000), env("TICK_SAMPLE_EVERY")] = 10
    tick_retention_days: Annotated[RetentionDays, env("TICK_RETENTION_DAYS")] = 7
    prediction_retention_days: Annotated[RetentionDays, env("PREDICTION_RETENTION_DAYS")] = 90
    sidebet_retention_days: Annotated[RetentionDays, env("SIDEBET_RETENTION_DAYS")] = 90
    game_retention_days: Annotated[RetentionDays, env("GAME_RETENTION_DAYS")] = 180
    metrics_retention_days: Annotated[RetentionDays, env("METRICS_RETENTION_DAYS")] = 365
    cleanup_hour_utc: Annotated[int, Meta(ge=0, le=23), env("CLEANUP_HOUR_UTC")] = 3
    backup_dir: Annotated[Optional[str], env("TEDSTORE_BACKUP_DIR")] = None
    backup_keep: Annotated[int, Meta(ge=1, le=100_000), env("TEDSTORE_BACKUP_KEEP")] = 7
    allow_uids: Annotated[Optional[list[Annotated[int, Meta(ge=0, le=2 ** 32 - 1)]]],
                          env("TEDSTORE_ALLOW_UIDS")] = None
    persistence_enabled: Annotated[bool, env("PERSISTENCE_ENABLED")] = True
    tracker: Annotated[Optional[Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]],
                       env("TEDSTORE_TRACKER")] = None
    payout_multiplier: Annotated[float, Meta(gt=0, le=1_000_000),
                                 env("TEDSTORE_PAYOUT_MULTIPLIER")] = 5.0
    max_line_bytes: Annotated[int, Meta(ge=64, le=64 * 1024 ** 2),
                              env("TEDSTORE_MAX_LINE_BYTES")] = 1024 * 1024
    max_connections: Annotated[int, Meta(ge=1, le=65_536), env("TEDSTORE_MAX_CONNECTIONS")] = 256
    idle_timeout: Annotated[float, Meta(gt=0, le=86_400), env("TEDSTORE_IDLE_TIMEOUT")] = 300.0
    queue_events: Annotated[int, Meta(ge=1, le=10_000_000), env("TEDSTORE_QUEUE_EVENTS")] = 50_000
    queue_bytes: Annotated[int, Meta(ge=65536, le=16 * 1024 ** 3),
                           env("TEDSTORE_QUEUE_BYTES")] = 64 * 1024 ** 2
    socket_mode: Annotated[str, Meta(pattern="^0?[0-7]{3}$"), env("TEDSTORE_SOCKET_MODE")] = "0660"
    max_clock_skew: Annotated[float, Meta(ge=0, le=86_400), env("TEDSTORE_MAX_CLOCK_SKEW")] = 300.0


SETTING_TYPES = {field.name: field.type for field in msgspec.inspect.type_info(Settings).fields}
SETTING_ENV = {name: kind.extra["env"] for name, kind in SETTING_TYPES.items()}


def load_settings(config: Optional[str] = None, **flags: Any) -> Settings:
    """Merge settings: CLI flags > environment > TOML file > defaults.

    A bad value is one line naming where it came from and what is accepted.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    shown: dict[str, Any] = {}                  # each value as the user wrote it
    path = config or (DEFAULT_CONFIG_FILE if os.path.exists(DEFAULT_CONFIG_FILE) else None)
    if path:
        try:
            with open(path, "rb") as f:
                values.update(tomllib.load(f))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        unknown = sorted(set(values) - set(SETTING_ENV))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} in {path}; "
                              f"known: {', '.join(SETTING_ENV)}")
        sources.update((name, f"key {name} in {path}") for name in values)
    for name, env in SETTING_ENV.items():
        raw = os.environ.get(env)
        if raw is not None and raw.strip() != "":
            values[name] = _split_list(raw) if name == "allow_uids" else raw
            sources[name], shown[name] = f"environment variable {env}", raw
    for name, value in flags.items():
        if value is not None:
            values[name] = value
            sources[name] = f"--{name.replace('_', '-')}"
    values.setdefault("db", _systemd_dir("STATE_DIRECTORY", "tedstore.db"))
    values.setdefault("socket", _systemd_dir("RUNTIME_DIRECTORY", "tedstore.sock"))
    for name in values.keys() & _SETTING_SPELLINGS.keys():
        if isinstance(values[name], str):
            values[name] = _SETTING_SPELLINGS[name].get(values[name].strip().lower(), values[name])
    try:
        settings = msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        match = re.search(r"\$\.(\w+)", str(exc))
        if not match or match.group(1) not in SETTING_ENV:
            raise ConfigError(f"invalid configuration: {exc}") from None
        name = match.group(1)
        raise ConfigError(f"invalid value {shown.get(name, values[name])!r} for {name} "
                          f"({sources.get(name, 'default')}): expected "
                          f"{_accepted(name)}") from None
    length = len(os.fsencode(settings.socket))
    if length > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(f"socket path {settings.socket!r} ({sources.get('socket', 'default')}) "
                          f"is {length} bytes, longer than the {MAX_SOCKET_PATH_BYTES} a Unix "
                          f"socket path may have: choose a shorter path")
    return settings


def _split_list(raw: str) -> list[str]:
    return [part for part in re.split(r"[,\s]+", raw.strip()) if part]


def _spellings() -> dict[str, dict[str, Any]]:
    """Per boolean or enumerated setting, its accepted spellings (lower case) -> value."""
    table: dict[str, dict[str, Any]] = {}
    for name, kind in SETTING_TYPES.items():
        if isinstance(kind.type, msgspec.inspect.BoolType):
            table[name] = {**dict.fromkeys(("true", "yes", "on", "1"), True),
                           **dict.fromkeys(("false", "no", "off", "0"), False)}
        elif isinstance(kind.type, msgspec.inspect.LiteralType):
            table[name] = {str(value).lower(): value for value in kind.type.values}
    return table


def _accepted(name: str) -> str:
    """What a setting accepts, in words, from its type in Settings."""
    kind = SETTING_TYPES[name].type
    if isinstance(kind, msgspec.inspect.UnionType):       # Optional[...]
        kind = next(t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType))
    if isinstance(kind, msgspec.inspect.BoolType):
        return "true or false (also yes/no, on/off, 1/0)"
    if isinstance(kind, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(str(v) for v in kind.values) + " (any case)"
    if isinstance(kind, msgspec.inspect.ListType):
        return "a list of uids (non-negative integers), such as 1000,1001"
    if isinstance(kind, msgspec.inspect.StrType) and kind.pattern:
        return ("an octal file mode such as 0660" if "0-7" in kind.pattern else
                "a name of 1 to 64 letters, digits, dots, dashes or underscores")
    if isinstance(kind, (msgspec.inspect.IntType, msgspec.inspect.FloatType)):
        noun = "an integer" if isinstance(kind, msgspec.inspect.IntType) else "a number"
        if kind.ge is not None and kind.le is not None:
            return f"{noun} from {kind.ge:g} to {kind.le:g}"
        bounds = [f"above {kind.gt:g}" if kind.gt is not None else "",
                  f"at least {kind.ge:g}" if kind.ge is not None else "",
                  f"at most {kind.le:g}" if kind.le is not None else ""]
        return " ".join([noun, " and ".join(b for b in bounds if b)]).strip()
    return "a text value"


_SETTING_SPELLINGS = _spellings()


# ---------------------------------------------------------------------------
# ERRORS: one root, a subclass per kind of trouble, apsw's wrapped at the edge
# ---------------------------------------------------------------------------

class TedstoreError(Exception):
    """Root of every error tedstore raises on purpose; its text is one line for the user."""


class ConfigError(TedstoreError):
    """A setting, a path or a flag is wrong."""


class StoreError(TedstoreError):
    """The database cannot be opened, upgraded or written; `orig` keeps the apsw error."""

    def __init__(self, message: str, orig: Optional[BaseException] = None):
        super().__init__(message)
        self.orig = orig


class DaemonError(TedstoreError):
    """The daemon cannot start or talk to its clients."""


class ProtocolError(TedstoreError):
    """A client cannot reach the daemon, or the daemon broke the protocol."""


class Refused(ProtocolError):
    """The daemon refused a whole connection: a peer not allowed, too many, or idle."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"tedstore at {path} refused the connection: {reason}")
        self.reason = reason


class QueryRejected(TedstoreError):
    """A query cannot be answered: unknown, a bad parameter, or over its limits (bad_query)."""


class LineRejected(TedstoreError):
    """One input line is refused; `code` is the reject code the client sees."""

    def __init__(self, code: str, message: str):
        super().__init__(message[:MAX_ERROR_CHARS])
        self.code = code


@contextlib.contextmanager
def store_errors(what: str) -> Iterator[None]:
    """Where the store meets the rest: an apsw error becomes a StoreError that says what
    failed, with the driver's error kept on .orig."""
    try:
        yield
    except apsw.Error as exc:
        raise StoreError(f"{what}: {describe_error(exc)}", exc) from exc


def describe_error(exc: BaseException) -> str:
    """One line for an apsw error, naming SQLite's code (errors from a VFS have no text)."""
    code = getattr(exc, "extendedresult", None)
    name = apsw.mapping_extended_result_codes.get(code) if code is not None else None
    text = str(exc) or "no message"
    return f"{type(exc).__name__}: {text}" + (f" ({name})" if name else "")


# ---------------------------------------------------------------------------
# TIME: UTC text, the wire's timestamps, and spans such as 48h
# ---------------------------------------------------------------------------

MAX_EPOCH = 253402300799.0           # 9999-12-31 23:59:59 UTC

# Every event formats a time, so the text is assembled from cached parts: the minute
# ('YYYY-MM-DD HH:MM:'), the second ('SS') and the millisecond ('.mmm').
_MINUTE_TEXT: dict[int, str] = {}

_SECOND_TEXT = tuple(f"{second:02d}" for second in range(60))
_MILLI_TEXT = tuple(f".{milli:03d}" for milli in range(1000))


def utc_text(epoch: float) -> str:
    """Unix seconds as UTC text 'YYYY-MM-DD HH:MM:SS.SSS' (to the nearest millisecond)."""
    milli = int(epoch * 1000.0 + 0.5)
    minute, rest = divmod(milli, 60_000)
    prefix = _MINUTE_TEXT.get(minute)
    if prefix is None:
        if len(_MINUTE_TEXT) > 4096:
            _MINUTE_TEXT.clear()
        prefix = _MINUTE_TEXT[minute] = time.strftime("%Y-%m-%d %H:%M:", time.gmtime(minute * 60))
    second, milli = divmod(rest, 1000)
    return prefix + _SECOND_TEXT[second] + _MILLI_TEXT[milli]


def answer_time(text: Optional[str]) -> Optional[str]:
    """Stored UTC text as an answer gives it: RFC 3339 with a Z, which new Date() reads
    alike in every browser (the database keeps the text sqlite3 compares and shows)."""
    return None if text is None else f"{text[:10]}T{text[11:]}Z"


def stored_time(answered: str) -> str:
    """An answer's time as the database keeps it: the inverse of answer_time."""
    return f"{answered[:10]} {answered[11:23]}"


def shown_time(text: Optional[str], length: int = 19) -> str:
    """Stored UTC text, or an answer's time, for people: '2026-12-06 01:34:07'."""
    return text[:length].replace("T", " ") if text else "-"


def text_epoch(text: str) -> float:
    """The inverse of utc_text."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


def wire_epoch(value: Union[float, str]) -> float:
    """A `ts` from the wire (seconds, milliseconds > 1e11, or ISO-8601) as Unix seconds."""
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"ts {value!r} is not an ISO-8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        try:
            epoch = moment.timestamp()
        except (OverflowError, ValueError, OSError):     # year 1 or 9999 shifted by its offset
            epoch = -1.0
    else:
        epoch = value / 1000.0 if value > 1e11 else value
    if not 0.0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"ts {value!r} is outside 1970..9999")
    return epoch


def wire_ts(value: Union[float, str]) -> str:
    """A `ts` from the wire as UTC text."""
    return utc_text(wire_epoch(value))


def hour_floor(epoch: float) -> int:
    return int(epoch // 3600 * 3600)


def day_text(epoch: float) -> str:
    """The UTC day of a time, as the daily tables key it: 'YYYY-MM-DD'."""
    return utc_text(epoch)[:10]


_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: float) -> float:
    """A CLI time: '48h', '7d' (before now) or an ISO-8601 date or time (UTC if no offset)."""
    match = _SPAN.match(text)
    if match:
        return now - float(match.group(1)) * _SPAN_SECONDS[match.group(2)]
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"cannot read time {text!r}: use an ISO-8601 date or time "
                          f"(2026-11-20, 2026-11-20T08:00) or a span (48h, 7d)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


# ---------------------------------------------------------------------------
# RECORDS: the wire events as msgspec Structs, each line decoded on its own
# ---------------------------------------------------------------------------

MAX_TICK = 2 ** 53
Tick = Annotated[int, Meta(ge=0, le=MAX_TICK)]
Text = Annotated[str, Meta(min_length=1, max_length=256)]
Unit = Annotated[float, Meta(ge=0, le=1)]
Positive = Annotated[float, Meta(gt=0)]
Timestamp = Optional[Union[float, Annotated[str, Meta(max_length=64)]]]
TrackerName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
ModelVersion = Annotated[str, Meta(min_length=1, max_length=64)]
DEFAULT_TRACKER = "default"


class Event(msgspec.Struct, tag_field="event", omit_defaults=True, gc=False):
    """Base of the six wire events. The ingest loop turns `ts` into UTC text (or receipt time)."""


class TickFeatures(msgspec.Struct, gc=False):
    volatility_10: Optional[float] = None
    volatility_40: Optional[float] = None
    momentum: Optional[float] = None
    rsi: Optional[float] = None
    volume_ratio: Optional[float] = None


class UncertaintyBounds(msgspec.Struct, gc=False):
    lower: Optional[float] = None
    upper: Optional[float] = None


class FeaturesUsed(msgspec.Struct, gc=False):
    epr_active: Optional[bool] = None
    peak_ratio: Optional[float] = None
    volatility: Optional[float] = None
    momentum: Optional[float] = None


class GameStart(Event, tag="gameStart"):
    gameId: Text
    tick: Tick
    price: Positive
    ts: Timestamp = None


class PriceUpdate(Event, tag="priceUpdate"):
    gameId: Text
    tick: Tick
    price: Positive
    features: Optional[TickFeatures] = None
    ts: Timestamp = None


class GameEnd(Event, tag="gameEnd"):
    gameId: Text
    tick: Tick
    finalPrice: Annotated[float, Meta(ge=0)]
    startTick: Optional[Tick] = None
    treasuryRemainder: Optional[Annotated[int, Meta(ge=-MAX_TICK, le=MAX_TICK)]] = None
    patterns: Optional[Annotated[list[Annotated[str, Meta(max_length=128)]],
                                 Meta(max_length=256)]] = None
    peakPrice: Optional[Positive] = None
    peakTick: Optional[Tick] = None
    ts: Timestamp = None

    def __post_init__(self) -> None:
        if self.startTick is not None and self.tick < self.startTick:
            raise ValueError(f"end tick {self.tick} is before startTick {self.startTick}")


class Prediction(Event, tag="prediction"):
    game_id: Text
    predicted_at_tick: Tick
    predicted_end_tick: Tick
    confidence: Unit
    uncertainty_bounds: Optional[UncertaintyBounds] = None
    features_used: Optional[FeaturesUsed] = None
    model_version: ModelVersion = "v2.1.0"
    ts: Timestamp = None
    tracker: TrackerName = DEFAULT_TRACKER

    def __post_init__(self) -> None:
        if self.predicted_end_tick < self.predicted_at_tick:
            raise ValueError(f"predicted_end_tick {self.predicted_end_tick} is before "
                             f"predicted_at_tick {self.predicted_at_tick}")
        bounds = self.uncertainty_bounds
        if bounds and bounds.lower is not None and bounds.upper is not None \
                and bounds.lower > bounds.upper:
            raise ValueError("uncertainty_bounds.lower is above uncertainty_bounds.upper")


class SideBet(Event, tag="sideBet"):
    game_id: Text
    placed_at_tick: Tick
    probability: Unit
    expected_value: float
    confidence: Unit
    recommendation: Literal["BET", "SKIP"]
    window_ticks: Annotated[int, Meta(ge=1, le=1_000_000)] = 40
    ts: Timestamp = None
    tracker: TrackerName = DEFAULT_TRACKER


class StateWrite(Event, tag="state"):
    key: Text
    value: msgspec.Raw
    ts: Timestamp = None
    tracker: TrackerName = DEFAULT_TRACKER


EVENT_TYPES = (GameStart, PriceUpdate, GameEnd, Prediction, SideBet, StateWrite)
RECORD_TYPES = (Prediction, SideBet, StateWrite)     # a tracker's own: they carry its name
RECORD_EVENTS = tuple(cls.__struct_config__.tag for cls in RECORD_TYPES)
EVENT_NAMES = tuple(cls.__struct_config__.tag for cls in EVENT_TYPES)
CONTROL_OPS = ("ping", "status", "query")
_DECODER = msgspec.json.Decoder(Union[EVENT_TYPES])  # type: ignore[valid-type]


def decode_chunk(data: bytes) -> Optional[list]:
    """Decode newline-terminated lines, each on its own, in one call; None if any line
    needs the closer look of decode_line.

    Every line is decoded alone (the decoder refuses a line holding two values), so a
    line's fate never depends on its neighbours. A JSON string cannot hold a raw
    newline, and a newline never falls inside a UTF-8 character, so checking the whole
    chunk's UTF-8 once checks every line.
    """
    try:
        if not data.isascii():
            data.decode("utf-8")    # msgspec does not look inside the fields it skips
        lines = data.split(b"\n")
        lines.pop()
        return list(map(_DECODER.decode, lines))
    except (msgspec.MsgspecError, RecursionError, ValueError):
        return None


def decode_line(line: bytes) -> Union[Event, str]:
    """One line as an Event, or the op name of a control line; raises LineRejected only."""
    try:
        event = _DECODER.decode(line)
        if not line.isascii():
            line.decode("utf-8")    # msgspec does not look inside the fields it skips
        return event
    except (msgspec.MsgspecError, RecursionError, ValueError) as exc:
        problem = str(exc) or type(exc).__name__
    try:
        return _control_op(line, problem)
    except LineRejected:
        raise
    except Exception as exc:        # whatever this line is, it must not reach the writer
        raise LineRejected("bad_json", f"cannot read this line: {type(exc).__name__}: "
                                       f"{exc}") from None


_ABSENT = msgspec.Raw(b"")


class _LineKind(msgspec.Struct):
    """The two names that say what a line is, read without converting anything else."""
    event: msgspec.Raw = _ABSENT
    op: msgspec.Raw = _ABSENT


_RAW_DECODER = msgspec.json.Decoder(msgspec.Raw)
_KIND_DECODER = msgspec.json.Decoder(_LineKind)
_NAME_DECODER = msgspec.json.Decoder(str)


def _control_op(line: bytes, problem: str) -> str:
    """A control line's op, or the LineRejected that says why the event decoder refused it."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineRejected("bad_utf8", f"line is not valid UTF-8 (byte {exc.start})") from None
    if not line.strip():
        raise LineRejected("bad_json", "empty line")
    try:
        _RAW_DECODER.decode(line)    # well-formed JSON? (numbers are not converted here)
        kind = _KIND_DECODER.decode(line)
    except RecursionError:
        raise LineRejected("bad_json", "JSON is nested too deeply") from None
    except msgspec.ValidationError:          # well-formed, but not an object
        first = line.lstrip()[:1]
        what = {b"[": "an array", b'"': "a string"}.get(first, "a scalar")
        raise LineRejected("bad_event", f"line is {what}, not a JSON object") from None
    except msgspec.DecodeError as exc:
        raise LineRejected("bad_json", f"not valid JSON: {exc}") from None
    if kind.event is _ABSENT:
        op = _name(kind.op)
        if op in CONTROL_OPS:
            return op
        if kind.op is not _ABSENT:
            raise LineRejected("unknown_event",
                               f"unknown op {op!r}; known ops: {', '.join(CONTROL_OPS)}")
        raise LineRejected("bad_event", "missing field 'event'")
    name = _name(kind.event)
    if name not in EVENT_NAMES:
        raise LineRejected("unknown_event",
                           f"unknown event {name!r}; known events: {', '.join(EVENT_NAMES)}")
    raise LineRejected("bad_event", f"{name}: {problem}")


def _name(raw: msgspec.Raw) -> Any:
    """An event or op name as its string, or its JSON text when it is not a string."""
    if raw is _ABSENT:
        return None
    try:
        return _NAME_DECODER.decode(raw)
    except msgspec.ValidationError:
        return bytes(raw).decode()


# ---------------------------------------------------------------------------
# STORE: connections, schema steps, transactions
# ---------------------------------------------------------------------------

_SCHEMA_STEP = re.compile(r"^-- version: (\d+)[ \t]*$", re.M)


def schema_path() -> Path:
    """schema.sql beside this module (a checkout) or in <prefix>/share/tedstore (a wheel)."""
    for candidate in (Path(__file__).with_name("schema.sql"),
                      Path(sys.prefix) / "share" / "tedstore" / "schema.sql"):
        if candidate.is_file():
            return candidate
    raise StoreError(f"schema.sql is missing beside {__file__} and in "
                     f"{sys.prefix}/share/tedstore: reinstall tedstore")


def schema_steps() -> list[tuple[int, str]]:
    """The forward-only upgrade steps of schema.sql as (version, sql)."""
    parts = _SCHEMA_STEP.split(schema_path().read_text())
    return [(int(parts[i]), parts[i + 1]) for i in range(1, len(parts), 2)]


def schema_version() -> int:
    return schema_steps()[-1][0]


class StoredTable(NamedTuple):
    """What tedstore knows of one stored table, in one place: its columns as rows show them,
    the time column a window filters on (and retention deletes by) with its index, the
    setting of its retention (None: kept), whether the rollup reads it (retention never
    deletes past what is rolled up), what else an expired row must satisfy, and the events
    whose `ts` its retention bounds (older ones are refused: they would be deleted at once).
    Retention, the timestamp bounds, export and the recent-rows queries all derive from it."""

    name: str
    columns: tuple[str, ...]
    time_column: str
    time_index: Optional[str]           # None: a few rows, no index needed
    retention: Optional[str] = None
    rolled: bool = False
    expired_also: str = ""
    bounds: tuple[type, ...] = ()


TABLES = {table.name: table for table in (
    StoredTable("tick_samples", (
        "id", "game_id", "tick", "price", "volatility_10", "volatility_40", "momentum", "rsi",
        "volume_ratio", "ts", "created_at"),
        "created_at", "tick_samples_created_at", "tick_retention_days"),
    StoredTable("predictions", (
        "id", "game_id", "tracker", "predicted_at_tick", "predicted_end_tick", "actual_end_tick",
        "confidence", "bound_lower", "bound_upper", "epr_active", "peak_ratio", "volatility",
        "momentum", "raw_error", "signed_error", "e40", "within_windows", "model_version",
        "created_at", "resolved_at"),
        "created_at", "predictions_created_at", "prediction_retention_days", rolled=True,
        bounds=(Prediction,)),
    StoredTable("side_bets", (
        "id", "game_id", "tracker", "placed_at_tick", "window_end_tick", "probability",
        "expected_value", "confidence", "recommendation", "actual_outcome", "payout",
        "created_at", "resolved_at"),
        "created_at", "side_bets_created_at", "sidebet_retention_days", rolled=True,
        bounds=(SideBet,)),
    # A game stays while its predictions or side bets stay (:keep_*).
    StoredTable("games", (
        "id", "game_id", "start_tick", "end_tick", "duration_ticks", "peak_price", "peak_tick",
        "final_price", "treasury_remainder", "patterns_detected", "had_predictions",
        "prediction_accuracy", "side_bets_placed", "started_at", "ended_at", "created_at",
        "updated_at"),
        "created_at", "games_created_at", "game_retention_days", rolled=True,
        expired_also=(
            " AND coalesce(ended_at, '') < :cutoff"
            " AND NOT EXISTS (SELECT 1 FROM predictions AS p INDEXED BY"
            " sqlite_autoindex_predictions_1 WHERE p.game_id = games.game_id"
            " AND p.created_at >= :keep_predictions)"
            " AND NOT EXISTS (SELECT 1 FROM side_bets AS s INDEXED BY"
            " sqlite_autoindex_side_bets_1 WHERE s.game_id = games.game_id"
            " AND s.created_at >= :keep_side_bets)"),
        bounds=(GameStart, PriceUpdate, GameEnd)),
    StoredTable("rejects", (
        "id", "received_at", "peer_pid", "peer_uid", "line_no", "code", "error", "raw"),
        "received_at", "rejects_received_at", "prediction_retention_days", rolled=True),
    StoredTable("metrics_hourly", (
        "hour_start", "hour_end", "games_analyzed", "predictions_made", "median_e40",
        "mean_absolute_error", "within_1_window", "within_2_windows", "within_3_windows",
        "sidebets_recommended", "sidebets_positive_ev", "bets_won", "bets_lost", "total_ev",
        "roi_percentage", "avg_commit_latency_ms", "p99_commit_latency_ms", "rejected_lines",
        "created_at"),
        "hour_start", "sqlite_autoindex_metrics_hourly_1", "metrics_retention_days"),
    StoredTable("metrics_daily", (
        "day", "games_analyzed", "predictions", "resolved", "median_e40",
        "mean_absolute_error", "mean_e40", "within_1_window", "within_2_windows",
        "within_3_windows", "bets", "bets_won", "bets_lost", "bets_pending", "total_payout",
        "roi_percentage", "rejected_lines", "created_at"),
        "day", "sqlite_autoindex_metrics_daily_1", "metrics_retention_days"),
    StoredTable("metrics_hourly_by", (
        "hour_start", "tracker", "model_version", "games_analyzed", "predictions_made",
        "median_e40", "mean_absolute_error", "within_1_window", "within_2_windows",
        "within_3_windows", "sidebets_recommended", "sidebets_positive_ev", "bets_won",
        "bets_lost", "total_ev", "roi_percentage", "rejected_lines", "created_at"),
        "hour_start", "sqlite_autoindex_metrics_hourly_by_1", "metrics_retention_days"),
    StoredTable("state", ("tracker", "key", "value", "updated_at"), "updated_at", None),
)}
TABLE_OF_EVENT = {kind: table for table in TABLES.values() for kind in table.bounds}


def busy_handler(timeout: float) -> Callable[[int], bool]:
    """Wait for a lock by trying again every millisecond, up to `timeout` seconds.

    SQLite's own busy timeout backs off to 100 ms sleeps, so a writer that waits behind
    a CLI's retention run would stall ingest for that long after the lock is free.
    """
    since = [0.0]

    def retry(attempts: int) -> bool:
        now = time.monotonic()
        if attempts == 0:
            since[0] = now
        elif now - since[0] > timeout:
            return False
        time.sleep(0.001)
        return True
    return retry


SQL_PROBE = "SELECT count(*) FROM sqlite_schema"           # fails on a file that is no database
SQL_BEGIN = {mode: f"BEGIN {mode}" for mode in ("DEFERRED", "IMMEDIATE")}
SQL_COMMIT = "COMMIT"
SQL_ROLLBACK = "ROLLBACK"
SQL_INTEGRITY_CHECK = "PRAGMA integrity_check"


def connect(path: str, *, readonly: bool = False, create: bool = True, vfs: Optional[str] = None,
            synchronous: str = "NORMAL", checkpoint: str = "truncate") -> apsw.Connection:
    """Open a connection set up the one way tedstore uses SQLite."""
    if (readonly or not create) and not os.path.exists(path):
        raise StoreError(f"database {path} does not exist: start the daemon "
                         f"(tedstore serve) or create it (tedstore init)")
    flags = (apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE
             | (apsw.SQLITE_OPEN_CREATE if create else 0))
    new = not readonly and create and not os.path.exists(path)
    try:
        if new:                          # private to its user, and so are its -wal and -shm
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE_MODE))
        conn = apsw.Connection(path, flags=flags, vfs=vfs)
    except OSError as exc:
        raise StoreError(f"cannot create database {path}: {exc.strerror}") from exc
    except apsw.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}", exc) from exc
    try:
        conn.set_busy_handler(busy_handler(BUSY_TIMEOUT_MS / 1000))
        conn.config(apsw.SQLITE_DBCONFIG_DQS_DML, 0)
        conn.config(apsw.SQLITE_DBCONFIG_DQS_DDL, 0)
        if not readonly:
            mode = conn.pragma("journal_mode", "wal")
            if mode != "wal":
                raise StoreError(f"database {path} cannot use WAL (journal_mode is {mode}): "
                                 f"put it on a local filesystem")
            conn.pragma("synchronous", synchronous)
            conn.pragma("journal_size_limit", JOURNAL_SIZE_LIMIT)
            if checkpoint == "off":              # a replicator such as Litestream owns them
                conn.pragma("wal_autocheckpoint", 0)
                conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
        conn.execute(SQL_PROBE).fetchall()
    except apsw.Error as exc:
        conn.close()
        raise StoreError(f"cannot use database {path}: {exc}", exc) from exc
    except StoreError:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def transaction(conn: apsw.Connection, mode: str = "IMMEDIATE") -> Iterator[apsw.Connection]:
    """BEGIN/COMMIT; on failure ROLLBACK without letting a failed rollback hide the cause."""
    conn.execute(SQL_BEGIN[mode])
    try:
        yield conn
        conn.execute(SQL_COMMIT)
    except BaseException as exc:
        if conn.in_transaction:
            try:
                conn.execute(SQL_ROLLBACK)
            except apsw.Error as rollback_error:
                exc.add_note(f"the rollback failed too: {rollback_error}")
        raise


def migrate(conn: apsw.Connection, path: str) -> tuple[int, int]:
    """Bring the schema to the newest version, one forward-only step at a time."""
    steps = schema_steps()
    target = steps[-1][0]
    current = conn.pragma("user_version")
    if current > target:
        raise StoreError(f"database {path} has schema version {current}, newer than this "
                         f"tedstore understands ({target}): upgrade tedstore")
    if current < target:
        try:
            with transaction(conn):
                for version, sql in steps:
                    if version > current:
                        conn.execute(sql)
        except apsw.Error as exc:
            raise StoreError(f"cannot upgrade database {path} from schema version "
                             f"{current} to {target}: {exc}", exc) from exc
    return current, target


# Objects of tedstore's own schema: SQLite's (sqlite_*) and Litestream's (_litestream_*)
# bookkeeping are theirs.
SQL_SCHEMA_OBJECTS = r"""
SELECT name, type, tbl_name, sql FROM sqlite_schema
WHERE name NOT LIKE 'sqlite\_%' ESCAPE '\' AND name NOT LIKE '\_litestream\_%' ESCAPE '\'"""
_SQL_COMMENT = re.compile(r"--[^\n]*")


def schema_objects(conn: apsw.Connection) -> dict[str, tuple[str, str, str]]:
    """name -> (type, table, SQL with comments and spacing normalised) of each object."""
    return {name: (kind, table, " ".join(_SQL_COMMENT.sub(" ", sql or "").split()))
            for name, kind, table, sql in conn.execute(SQL_SCHEMA_OBJECTS)}


@functools.lru_cache(maxsize=None)
def fresh_schema(version: int) -> dict[str, tuple[str, str, str]]:
    """The objects of a new database at schema `version`."""
    conn = apsw.Connection(":memory:")
    try:
        for step, sql in schema_steps():
            if step <= version:
                conn.execute(sql)
        return schema_objects(conn)
    finally:
        conn.close()


def schema_differences(conn: apsw.Connection) -> list[str]:
    """How the database's schema differs from a new database's of the same version: an
    object added (a trigger that deletes rows, say), missing, or changed."""
    expected, actual = fresh_schema(conn.pragma("user_version")), schema_objects(conn)
    differences = []
    for name, (kind, table, sql) in sorted(actual.items()):
        want = expected.get(name)
        if want is None:
            differences.append(f"an extra {kind} {name}" + (f" on {table}" if table != name else ""))
        elif want[0] != kind:
            differences.append(f"{name} is a {kind} where tedstore has a {want[0]}")
        elif want != (kind, table, sql):
            differences.append(f"the {kind} {name} is not tedstore's")
    differences += [f"the {kind} {name} is missing"
                    for name, (kind, _, _) in sorted(expected.items()) if name not in actual]
    return differences


def check_schema(conn: apsw.Connection, path: str) -> None:
    """Refuse a database whose schema is not exactly tedstore's (StoreError, naming how)."""
    differences = schema_differences(conn)
    if differences:
        raise StoreError(f"database {path} has a schema tedstore did not make: "
                         f"{'; '.join(differences)}. Undo that with sqlite3 (DROP ...), or "
                         f"restore a backup (tedstore restore)")


def open_store(path: str, *, vfs: Optional[str] = None, synchronous: str = "NORMAL",
               checkpoint: str = "truncate", create: bool = True) -> apsw.Connection:
    """A read-write connection to a database at the newest schema version."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StoreError(f"the folder of database {path} does not exist: create {folder} "
                         f"or set TEDSTORE_DB")
    conn = connect(path, create=create, vfs=vfs, synchronous=synchronous, checkpoint=checkpoint)
    try:
        migrate(conn, path)
        with store_errors(f"cannot read the schema of {path}"):
            check_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def init_store(path: str) -> int:
    """Create or upgrade the database at `path`; the schema version it had (0: new)."""
    before = 0
    if os.path.exists(path):
        with contextlib.closing(connect(path, readonly=True)) as conn, \
                store_errors(f"cannot read the schema version of {path}"):
            before = conn.pragma("user_version")
    open_store(path).close()
    return before


def database_facts(path: str) -> dict:
    def size(name: str) -> Optional[int]:
        try:
            return os.stat(name).st_size
        except OSError:
            return None
    return {"path": path, "size_bytes": size(path), "wal_bytes": size(path + "-wal")}


# ---------------------------------------------------------------------------
# INGEST: one batch of lines becomes one transaction, one statement per table
# ---------------------------------------------------------------------------
# The big tables are written ROWS_PER_INSERT rows to a statement (INSERT ... VALUES
# (...), (...), ...) over plain tuples: a third faster per row than executemany of one
# row each, which binds, steps and resets once per row and releases the GIL each time.
# Releasing the GIL is cheap only while no other thread of the daemon is busy: so events
# are decoded here, in the writer, and the event loop thread only cuts lines, answers
# control lines and sends replies. The few game rows a batch touches travel as one JSON
# array through json_each(?).

# Every statement names the index it must use (INDEXED BY; sqlite_autoindex_T_1 is the
# index of T's natural key): statistics gathered while a table was tiny would otherwise
# make the planner scan it. The CROSS JOIN keeps json_each the outer loop.
SQL_LOAD_GAMES = """
SELECT g.game_id, g.start_tick, g.end_tick, g.peak_price, g.peak_tick, g.final_price,
       g.treasury_remainder, g.patterns_detected, g.started_at, g.ended_at, g.created_at
FROM json_each(?1) AS ids CROSS JOIN games AS g INDEXED BY sqlite_autoindex_games_1
     ON g.game_id = ids.value"""

SQL_SAVE_GAMES = """
INSERT INTO games (game_id, start_tick, end_tick, duration_ticks, peak_price, peak_tick,
                   final_price, treasury_remainder, patterns_detected, started_at,
                   ended_at, created_at, updated_at)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6,
       value->>7, value->>8, value->>9, value->>10, value->>11, ?2
FROM json_each(?1) WHERE true
ON CONFLICT (game_id) DO UPDATE SET
    start_tick = excluded.start_tick, end_tick = excluded.end_tick,
    duration_ticks = excluded.duration_ticks, peak_price = excluded.peak_price,
    peak_tick = excluded.peak_tick, final_price = excluded.final_price,
    treasury_remainder = excluded.treasury_remainder,
    patterns_detected = excluded.patterns_detected, started_at = excluded.started_at,
    ended_at = excluded.ended_at, created_at = excluded.created_at,
    updated_at = excluded.updated_at"""

SQL_SAVE_TICKS = """
INSERT OR IGNORE INTO tick_samples (game_id, tick, price, volatility_10, volatility_40,
                                    momentum, rsi, volume_ratio, ts, created_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)"""

SQL_SAVE_PREDICTIONS = """
INSERT OR IGNORE INTO predictions (game_id, predicted_at_tick, predicted_end_tick,
                                   confidence, bound_lower, bound_upper, epr_active,
                                   peak_ratio, volatility, momentum, model_version,
                                   created_at, tracker)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"""

SQL_SAVE_SIDE_BETS = """
INSERT OR IGNORE INTO side_bets (game_id, placed_at_tick, window_end_tick, probability,
                                 expected_value, confidence, recommendation, created_at,
                                 tracker)
VALUES (?1, ?2, ?2 + ?3, ?4, ?5, ?6, ?7, ?8, ?9)"""

# 16 to 128 rows to a statement are as fast per row; a statement for 256 rows is too long
# for apsw's statement cache, and would be prepared again at every batch.
ROWS_PER_INSERT = 32


@functools.cache
def many_rows(sql: str, rows: int = ROWS_PER_INSERT) -> str:
    """A one-row INSERT ... VALUES (?1, ...) as one that inserts `rows` rows: row j's
    ?k becomes ?(j * width + k), width being the highest parameter of the one row."""
    head, _, values = sql.rpartition("VALUES")
    width = max(int(number) for number in re.findall(r"\?(\d+)", values))
    return head + "VALUES " + ", ".join(
        re.sub(r"\?(\d+)", lambda m, j=j: f"?{j * width + int(m.group(1))}", values.strip())
        for j in range(rows))


def insert_rows(conn: apsw.Connection, sql: str, rows: list[tuple]) -> None:
    """Insert `rows` with the one-row statement `sql`: ROWS_PER_INSERT rows at a time, and
    what remains in statements of 16, 8, 4, 2 and 1 rows (a few statements to prepare)."""
    chain, first, size = itertools.chain.from_iterable, 0, ROWS_PER_INSERT
    while first < len(rows):
        whole = (len(rows) - first) // size * size
        if whole:
            conn.executemany(many_rows(sql, size), [
                tuple(chain(rows[start:start + size]))
                for start in range(first, first + whole, size)])
            first += whole
        size //= 2

# A state write's tracker is left out of its JSON when it is the default (omit_defaults).
SQL_SAVE_STATE = f"""
INSERT INTO state (tracker, key, value, updated_at)
SELECT coalesce(value->>'tracker', '{DEFAULT_TRACKER}'), value->>'key', value->'value',
       value->>'ts'
FROM json_each(?1) WHERE true
ON CONFLICT (tracker, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at
WHERE excluded.updated_at > state.updated_at
   OR (excluded.updated_at = state.updated_at AND excluded.value IS NOT state.value)"""

# Resolution runs, one game id at a time, for every game that ended in the batch or got
# a prediction or side bet in it: a late arrival is resolved on arrival, with the game's
# own ended_at. The equality constraints pin every lookup to an index.
SQL_RESOLVE_PREDICTIONS = """
UPDATE predictions INDEXED BY sqlite_autoindex_predictions_1
SET actual_end_tick = g.end_tick,
    raw_error = predictions.predicted_end_tick - g.end_tick,
    signed_error = predictions.predicted_end_tick - g.end_tick,
    e40 = (predictions.predicted_end_tick - g.end_tick) / 40.0,
    within_windows = abs(predictions.predicted_end_tick - g.end_tick) / 40,
    resolved_at = g.ended_at
FROM games AS g INDEXED BY sqlite_autoindex_games_1
WHERE g.game_id = ?1 AND g.end_tick IS NOT NULL
  AND predictions.game_id = ?1 AND predictions.actual_end_tick IS NULL"""

SQL_RESOLVE_SIDE_BETS = """
UPDATE side_bets INDEXED BY sqlite_autoindex_side_bets_1
SET actual_outcome = CASE WHEN g.end_tick BETWEEN side_bets.placed_at_tick
                                              AND side_bets.window_end_tick
                          THEN 'WON' ELSE 'LOST' END,
    payout = CASE WHEN g.end_tick BETWEEN side_bets.placed_at_tick
                                      AND side_bets.window_end_tick
                  THEN ?2 ELSE -1 END,
    resolved_at = g.ended_at
FROM games AS g INDEXED BY sqlite_autoindex_games_1
WHERE g.game_id = ?1 AND g.end_tick IS NOT NULL
  AND side_bets.game_id = ?1 AND side_bets.actual_outcome = 'PENDING'"""

SQL_GAME_AGGREGATES = """
UPDATE games INDEXED BY sqlite_autoindex_games_1
SET had_predictions = EXISTS (SELECT 1 FROM predictions p WHERE p.game_id = ?1),
    prediction_accuracy = (SELECT 100.0 * avg(abs(p.raw_error) <= 40)
                           FROM predictions p INDEXED BY sqlite_autoindex_predictions_1
                           WHERE p.game_id = ?1),
    side_bets_placed = (SELECT count(*) FROM side_bets s INDEXED BY sqlite_autoindex_side_bets_1
                        WHERE s.game_id = ?1 AND s.recommendation = 'BET')
WHERE game_id = ?1 AND end_tick IS NOT NULL"""

# A late event may change a day whose daily histograms are written (MEASURES: long
# windows): it unlists the day, which the next rollup writes again.
SQL_UNLIST_DAYS = "DELETE FROM histogram_days WHERE day IN (SELECT value FROM json_each(?1))"

SQL_SAVE_REJECT = """
INSERT INTO rejects (received_at, peer_pid, peer_uid, line_no, code, error, raw)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"""


@dataclasses.dataclass(slots=True, eq=False)
class Chunk:
    """Complete lines from one connection, numbered from first_line, on their way to a COMMIT.

    A chunk with `rejection` set stands for one line the reader already refused
    (too long, forbidden peer): the writer only records it. An `answered` chunk holds
    control lines only, answered already: the writer only acknowledges them, in order.
    """

    session: Any
    first_line: int
    count: int
    data: bytes
    received: float
    rejection: Optional[tuple[str, str]] = None
    answered: bool = False
    _lines: Optional[list[bytes]] = dataclasses.field(default=None, init=False, repr=False)

    @property
    def last_line(self) -> int:
        return self.first_line + self.count - 1

    def lines(self) -> list[bytes]:
        if self._lines is None:
            self._lines = self.data.split(b"\n")[:-1] if self.rejection is None else [self.data]
        return self._lines

    def line(self, line_no: int) -> bytes:
        """The raw text of one of its lines, by its number on the connection."""
        return self.lines()[line_no - self.first_line]

    def split(self, head_lines: int) -> tuple["Chunk", "Chunk"]:
        """Cut after `head_lines` lines, so that no batch exceeds the batch size."""
        if self.answered:
            return (Chunk(self.session, self.first_line, head_lines, b"", self.received,
                          answered=True),
                    Chunk(self.session, self.first_line + head_lines, self.count - head_lines,
                          b"", self.received, answered=True))
        cut = 0
        for _ in range(head_lines):
            cut = self.data.index(b"\n", cut) + 1
        return (Chunk(self.session, self.first_line, head_lines, self.data[:cut], self.received),
                Chunk(self.session, self.first_line + head_lines, self.count - head_lines,
                      self.data[cut:], self.received))

    def refused(self, code: str, message: str) -> "Chunk":
        """This one-line chunk turned into the record of its own rejection."""
        return Chunk(self.session, self.first_line, 1, self.data, self.received,
                     (code, message))


@dataclasses.dataclass(slots=True, eq=False)
class GameRow:
    """A games row while a batch folds its events in; written back once per batch."""

    game_id: str
    created_at: str
    start_tick: Optional[int] = None
    end_tick: Optional[int] = None
    peak_price: Optional[float] = None
    peak_tick: Optional[int] = None
    final_price: Optional[float] = None
    treasury_remainder: Optional[int] = None
    patterns: list[str] = dataclasses.field(default_factory=list)
    started_at: Optional[str] = None
    ended_at: Optional[str] = None
    dirty: bool = True

    def see(self, price: float, tick: int, ts: str) -> None:
        """Fold in one price: the peak is the highest price, at its earliest tick."""
        peak = self.peak_price
        if peak is None or price > peak or (price == peak and tick < self.peak_tick):
            self.peak_price, self.peak_tick, self.dirty = price, tick, True
        self.touch(ts)

    def touch(self, ts: str) -> None:
        """A game was created when its earliest event happened, whatever order they arrive in."""
        if ts < self.created_at:
            self.created_at, self.dirty = ts, True

    def row(self) -> list:
        duration = (self.end_tick - self.start_tick
                    if self.end_tick is not None and self.start_tick is not None else None)
        return [self.game_id, self.start_tick, self.end_tick, duration, self.peak_price,
                self.peak_tick, self.final_price, self.treasury_remainder,
                msgspec.json.encode(self.patterns).decode(), self.started_at, self.ended_at,
                self.created_at]


class Reject(NamedTuple):
    """One refused line, on its way to the rejects table and back to its client."""

    chunk: Chunk
    line_no: int
    code: str
    error: str
    raw: bytes


MAX_EPOCH_MS = MAX_EPOCH * 1000.0
ROLLED_EVENTS = (Prediction, SideBet, GameEnd)  # the events whose time the rollup reads


class IngestBatch:
    """The lines of one transaction, decoded and grouped by the table they feed.

    Each line is judged on its own: what happens to it never depends on the lines
    around it, and whatever goes wrong with one line is that line's reject.
    """

    def __init__(self, chunks: list[Chunk], settings: Settings, every_hour: bool = False):
        self.chunks = chunks
        self.settings = settings
        self.every_hour = every_hour            # note every hour touched, not only late ones
        self.touched: set[int] = set()          # hours whose rollup these events change
        self.ticks = 0
        self.peaks: dict[str, list] = {}        # game id -> [peak price, its tick, earliest ts]
        self.samples: list[tuple] = []          # rows of SQL_SAVE_TICKS
        self.predictions: list[tuple] = []      # rows of SQL_SAVE_PREDICTIONS
        self.side_bets: list[tuple] = []        # rows of SQL_SAVE_SIDE_BETS
        self.states: list[StateWrite] = []
        self.lifecycle: list[tuple[Event, Chunk, int]] = []
        self.decode_rejects: list[Reject] = []
        self.rejects: list[Reject] = []
        self.runs: list[tuple[Any, tuple]] = []  # (session, where its rows start in each list)
        self.stored: collections.Counter = collections.Counter()      # lines that changed rows
        self.duplicates: collections.Counter = collections.Counter()  # lines that changed none
        self.by_session: dict[Any, list[int]] = {}                    # [stored, duplicates]
        self.rows_changed = 0
        for chunk in chunks:
            self._read(chunk)

    @property
    def empty(self) -> bool:
        """Nothing to write: the lines were control lines, answered already."""
        return not (self.ticks or self.samples or self.predictions or self.side_bets
                    or self.states or self.lifecycle or self.decode_rejects)

    def _read(self, chunk: Chunk) -> None:
        if chunk.answered:
            return
        if chunk.rejection is not None:
            code, message = chunk.rejection
            self.decode_rejects.append(Reject(chunk, chunk.first_line, code, message, chunk.data))
            return
        limits = self._limits(chunk.received)
        events = decode_chunk(chunk.data)
        if events is not None:
            self._route(events, chunk, chunk.first_line, limits)
            return
        for offset, line in enumerate(chunk.lines()):
            try:
                event = decode_line(line)
            except LineRejected as exc:
                self.decode_rejects.append(Reject(chunk, chunk.first_line + offset, exc.code,
                                                  str(exc), line))
                continue
            if not isinstance(event, str):           # a control line was answered already
                self._route((event,), chunk, chunk.first_line + offset, limits)

    def _limits(self, received: float) -> tuple[str, float, dict, float, float]:
        """For lines read at `received`: its text, the latest `ts` allowed, the oldest per
        event type, the oldest whose tick is still sampled (README: timestamp bounds), and
        the time before which an event's hour is noted as touched (rolled up again)."""
        settings = self.settings
        oldest = {kind: received - getattr(settings, table.retention) * 86400
                  for kind, table in TABLE_OF_EVENT.items()}
        oldest[StateWrite] = -math.inf
        late = math.inf if self.every_hour else received - (ROLLUP_REVISIT_HOURS + 1) * 3600
        samples = getattr(settings, TABLES["tick_samples"].retention)
        return (utc_text(received), received + settings.max_clock_skew, oldest,
                received - samples * 86400, late)

    def _route(self, events: Iterable[Event], chunk: Chunk, line_no: int,
               limits: tuple[str, float, dict, float, float]) -> None:
        """Sort events by table, turning each `ts` into UTC text (receipt time when absent).

        Everything per event happens in this one pass: predictions, side bets and tick
        samples become table rows, and each game's ticks fold into one peak per game (the
        peak is a maximum and created_at a minimum, so folding per batch first is exact).
        """
        received, latest, oldest, oldest_sample, late = limits
        predictions, side_bets, peaks = self.predictions, self.side_bets, self.peaks
        if not self.runs or self.runs[-1][0] is not chunk.session:
            self.runs.append((chunk.session, (self.ticks, len(self.samples), len(predictions),
                                              len(side_bets), len(self.states))))
        every = self.settings.tick_sample_every
        for event in events:
            ts, kind = event.ts, type(event)
            if ts is None:
                event.ts, sampled = received, True
            else:
                try:
                    if type(ts) is float and 0.0 <= ts <= MAX_EPOCH_MS:   # the common case
                        epoch = ts / 1000.0 if ts > 1e11 else ts
                    else:
                        epoch = wire_epoch(ts)
                    if epoch > latest or epoch < oldest[kind]:
                        raise self._out_of_bounds(kind, epoch, latest)
                    event.ts = utc_text(epoch)
                except Exception as exc:                  # this line's fault, and only its
                    self._refuse(chunk, line_no, kind, exc)
                    line_no += 1
                    continue
                sampled = epoch >= oldest_sample
                if epoch < late and kind in ROLLED_EVENTS:   # rare in the daemon
                    self.touched.add(int(epoch // 3600 * 3600))
            if kind is PriceUpdate:
                self.ticks += 1
                price, tick, ts = event.price, event.tick, event.ts
                peak = peaks.get(event.gameId)     # GameRow.see's rule, inlined: hot loop
                if peak is None:
                    peaks[event.gameId] = [price, tick, ts]
                else:
                    if price > peak[0] or (price == peak[0] and tick < peak[1]):
                        peak[0], peak[1] = price, tick
                    if ts < peak[2]:
                        peak[2] = ts
                if tick % every == 0 and sampled:
                    features = event.features
                    self.samples.append(
                        (event.gameId, tick, price, None, None, None, None, None, ts)
                        if features is None else
                        (event.gameId, tick, price, features.volatility_10,
                         features.volatility_40, features.momentum, features.rsi,
                         features.volume_ratio, ts))
            elif kind is Prediction:
                bounds, used = event.uncertainty_bounds, event.features_used
                predictions.append((
                    event.game_id, event.predicted_at_tick, event.predicted_end_tick,
                    event.confidence,
                    None if bounds is None else bounds.lower,
                    None if bounds is None else bounds.upper,
                    None if used is None else used.epr_active,
                    None if used is None else used.peak_ratio,
                    None if used is None else used.volatility,
                    None if used is None else used.momentum,
                    event.model_version, event.ts, event.tracker))
            elif kind is SideBet:
                side_bets.append((event.game_id, event.placed_at_tick, event.window_ticks,
                                  event.probability, event.expected_value, event.confidence,
                                  event.recommendation, event.ts, event.tracker))
            elif kind is StateWrite:
                self.states.append(event)
            else:
                self.lifecycle.append((event, chunk, line_no))
            line_no += 1

    def _out_of_bounds(self, kind: type, epoch: float, latest: float) -> LineRejected:
        tag = kind.__struct_config__.tag
        if epoch > latest:
            skew = self.settings.max_clock_skew
            return LineRejected("bad_event", (
                f"{tag}: ts {utc_text(epoch)} is {epoch - latest + skew:,.0f} s ahead of "
                f"tedstore's clock, more than TEDSTORE_MAX_CLOCK_SKEW ({skew:g} s) allows: "
                f"fix the sender's clock"))
        table = TABLE_OF_EVENT[kind]
        return LineRejected("bad_event", (
            f"{tag}: ts {utc_text(epoch)} is older than the "
            f"{getattr(self.settings, table.retention):g}-day retention of {table.name} "
            f"({SETTING_ENV[table.retention]}): it would be deleted at once"))

    def _refuse(self, chunk: Chunk, line_no: int, kind: type, exc: Exception) -> None:
        if isinstance(exc, LineRejected):
            code, message = exc.code, str(exc)
        elif isinstance(exc, ValueError):
            code, message = "bad_event", f"{kind.__struct_config__.tag}: {exc}"
        else:
            code = "bad_event"
            message = f"tedstore cannot read this event: {type(exc).__name__}: {exc}"
        self.decode_rejects.append(Reject(chunk, line_no, code, message[:MAX_ERROR_CHARS],
                                          chunk.line(line_no)))

    def apply(self, conn: apsw.Connection, now: float) -> None:
        """Apply the batch inside the caller's transaction; safe to call again after a rollback."""
        self.rejects = list(self.decode_rejects)
        self.stored, self.duplicates = collections.Counter(), collections.Counter()
        self.by_session = {}
        bet_on = {row[0] for row in self.predictions}.union(row[0] for row in self.side_bets)
        games = self._load_games(conn, bet_on)
        ended: set[str] = set()
        for event, chunk, line_no in self.lifecycle:
            try:
                if type(event) is GameStart:
                    changed = self._start(games, event)
                else:
                    changed = self._end(games, event, ended)
            except LineRejected as exc:
                self.rejects.append(Reject(chunk, line_no, exc.code, str(exc),
                                           chunk.line(line_no)))
                continue
            self._tally(chunk.session, type(event).__struct_config__.tag, int(changed),
                        int(not changed))
        for game_id, (price, tick, ts) in self.peaks.items():
            game = games.get(game_id)
            if game is None:
                game = games[game_id] = GameRow(game_id, ts)
            game.see(price, tick, ts)
        encode, changes = msgspec.json.encode, conn.total_changes
        first = changes()
        changed = [game.row() for game in games.values() if game.dirty]
        if changed:
            conn.execute(SQL_SAVE_GAMES, (encode(changed), utc_text(now)))
        for session, start, end in self._runs(0, self.ticks):
            self._tally(session, "priceUpdate", end - start, 0)    # less the duplicate samples
        for sql, rows, kind, column in ((SQL_SAVE_TICKS, self.samples, "priceUpdate", 1),
                                        (SQL_SAVE_PREDICTIONS, self.predictions, "prediction", 2),
                                        (SQL_SAVE_SIDE_BETS, self.side_bets, "sideBet", 3)):
            for session, start, end in self._runs(column, len(rows)):
                before = changes()
                insert_rows(conn, sql, rows[start:end])
                unchanged = end - start - (changes() - before)
                self._tally(session, kind, end - start - unchanged if kind != "priceUpdate"
                            else -unchanged, unchanged)
        for session, start, end in self._runs(4, len(self.states)):
            before = changes()
            conn.execute(SQL_SAVE_STATE, (encode(self.states[start:end]),))
            unchanged = end - start - (changes() - before)
            self._tally(session, "state", end - start - unchanged, unchanged)
        self.rows_changed = changes() - first
        # Resolve games that ended now, and ended games that got late predictions or bets.
        resolve = [(game_id,) for game_id in ended.union(bet_on)
                   if games.get(game_id) is not None and games[game_id].end_tick is not None]
        if resolve:
            conn.executemany(SQL_RESOLVE_PREDICTIONS, resolve)
            conn.executemany(SQL_RESOLVE_SIDE_BETS,
                             [(game_id, self.settings.payout_multiplier) for (game_id,) in resolve])
            conn.executemany(SQL_GAME_AGGREGATES, resolve)
        if self.touched:
            conn.execute(SQL_UNLIST_DAYS, (json.dumps(sorted(
                {day_text(hour) for hour in self.touched})),))
        if self.rejects:
            conn.executemany(SQL_SAVE_REJECT, [
                (utc_text(r.chunk.received), getattr(r.chunk.session, "peer_pid", None),
                 getattr(r.chunk.session, "peer_uid", None), r.line_no, r.code, r.error,
                 _raw_for_rejects(r.raw))
                for r in self.rejects])
        self.stored, self.duplicates = +self.stored, +self.duplicates

    def _runs(self, column: int, total: int) -> Iterator[tuple[Any, int, int]]:
        """(session, start, end) of each session's run of rows in one of the batch's lists
        (column: 0 ticks, 1 samples, 2 predictions, 3 side bets, 4 states)."""
        starts = self.runs + [(None, (self.ticks, len(self.samples), len(self.predictions),
                                      len(self.side_bets), len(self.states)))]
        for (session, first), (_, after) in zip(starts, starts[1:]):
            if first[column] < after[column]:
                yield session, first[column], after[column]

    def _tally(self, session: Any, kind: str, stored: int, unchanged: int) -> None:
        """Lines that changed rows and lines that changed none, by type and by session."""
        self.stored[kind] += stored
        self.duplicates[kind] += unchanged
        counts = self.by_session.get(session)
        if counts is None:
            counts = self.by_session[session] = [0, 0]
        counts[0] += stored
        counts[1] += unchanged

    def _load_games(self, conn: apsw.Connection, bet_on: set[str]) -> dict[str, GameRow]:
        """The stored rows of every game this batch touches, or bets on."""
        ids = set(self.peaks).union(bet_on)
        ids.update(event.gameId for event, _, _ in self.lifecycle)
        games = {}
        if ids:
            for row in conn.execute(SQL_LOAD_GAMES, (msgspec.json.encode(list(ids)),)):
                (game_id, start_tick, end_tick, peak_price, peak_tick, final_price,
                 treasury, patterns, started_at, ended_at, created_at) = row
                games[game_id] = GameRow(game_id, created_at, start_tick, end_tick, peak_price,
                                         peak_tick, final_price, treasury, json.loads(patterns),
                                         started_at, ended_at, dirty=False)
        return games

    @staticmethod
    def _start(games: dict[str, GameRow], event: GameStart) -> bool:
        """Fold in a gameStart; False when it changes nothing (a resend)."""
        game = games.get(event.gameId)
        if game is not None:
            if game.started_at is not None:
                return False                         # a resent gameStart changes nothing
            if game.end_tick is not None and event.tick > game.end_tick:
                raise LineRejected("bad_event", f"gameStart tick {event.tick} is after the "
                                   f"end tick {game.end_tick} of game {event.gameId!r}")
        else:
            game = games[event.gameId] = GameRow(event.gameId, event.ts)
        game.start_tick, game.started_at, game.dirty = event.tick, event.ts, True
        game.see(event.price, event.tick, event.ts)
        return True

    @staticmethod
    def _end(games: dict[str, GameRow], event: GameEnd, ended: set[str]) -> bool:
        """Fold in a gameEnd; False when it changes nothing (a resend)."""
        game = games.get(event.gameId)
        before = game.row() if game is not None else None
        if game is not None and game.end_tick is not None:
            if game.end_tick != event.tick:
                raise LineRejected("conflict", f"game {event.gameId!r} already ended at tick "
                                   f"{game.end_tick}; the first gameEnd stands")
        else:
            start = game.start_tick if game is not None else None
            if start is None:
                start = event.startTick
            if start is not None and event.tick < start:
                raise LineRejected("bad_event", f"end tick {event.tick} is before the start "
                                   f"tick {start} of game {event.gameId!r}")
            if game is None:
                game = games[event.gameId] = GameRow(event.gameId, event.ts)
            game.start_tick = start
            game.end_tick, game.final_price = event.tick, event.finalPrice
            game.treasury_remainder, game.ended_at = event.treasuryRemainder, event.ts
            ended.add(event.gameId)
        game.patterns = sorted(set(game.patterns).union(event.patterns or ()))
        if event.peakPrice is not None and event.peakTick is not None:
            game.see(event.peakPrice, event.peakTick, event.ts)
        game.touch(event.ts)
        game.dirty = True
        return before is None or game.row() != before


def _raw_for_rejects(raw: bytes) -> Union[str, bytes]:
    """Text when the kept bytes are UTF-8 (readable in sqlite3), else a BLOB."""
    raw = raw[:MAX_RAW_BYTES]
    if raw.endswith(b"\r"):                      # a CRLF line's raw text is the line itself
        raw = raw[:-1]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


class IngestResult(msgspec.Struct):
    """What became of lines sent or imported: each is stored (it changed rows), a duplicate
    (it changed nothing), rejected, or a control line."""

    lines: int = 0
    acked: int = 0
    stored: Optional[int] = None     # None: the daemon could not say
    duplicates: Optional[int] = None
    rejections: list = msgspec.field(default_factory=list)   # [(line, code, error)]
    latencies_ms: list = msgspec.field(default_factory=list)


def ingest_offline(conn: apsw.Connection, blocks: Iterable[bytes], settings: Settings,
                   progress: Callable[[int], None] = lambda lines: None,
                   touched: Optional[set[int]] = None) -> IngestResult:
    """Apply NDJSON without a daemon, in the daemon's batches. The hours the events fall in
    are added to `touched`."""
    result, pending, waiting = IngestResult(stored=0, duplicates=0), [], 0

    def flush() -> None:
        nonlocal waiting
        batch = IngestBatch(pending, settings, every_hour=True)
        with store_errors(f"cannot store the lines from line {pending[0].first_line} on"), \
                transaction(conn):
            batch.apply(conn, time.time())
        result.rejections.extend(sorted((r.line_no, r.code, r.error) for r in batch.rejects))
        result.stored += sum(batch.stored.values())
        result.duplicates += sum(batch.duplicates.values())
        result.acked += waiting
        if touched is not None:
            touched.update(batch.touched)
        progress(waiting)
        pending.clear()
        waiting = 0

    for block in blocks:
        if not block.endswith(b"\n"):
            block += b"\n"
        count = block.count(b"\n")
        pending.append(Chunk(None, result.lines + 1, count, block, time.time()))
        result.lines += count
        waiting += count
        if waiting >= settings.batch_size:
            flush()
    if pending:
        flush()
    return result


# ---------------------------------------------------------------------------
# WRITER: one thread, one write connection, group commit, acks after COMMIT
# ---------------------------------------------------------------------------

# Errors of the disk or of the lock, not of the data: the batch is retried until it
# commits. Any other error is blamed on the data and the batch is bisected.
TRANSIENT_ERRORS = (apsw.FullError, apsw.IOError, apsw.BusyError, apsw.LockedError,
                    apsw.CantOpenError, apsw.ReadOnlyError, apsw.NoMemError,
                    apsw.ProtocolError, apsw.InterruptError)


class LatencyHistogram:
    """Latencies in 5 %-wide logarithmic buckets: bounded memory, percentiles within 5 %."""

    _GROWTH = 1.05
    _FLOOR_MS = 0.01

    def __init__(self) -> None:
        self.buckets: collections.Counter = collections.Counter()
        self.count = 0
        self.total = 0.0

    def record(self, ms: float, weight: int = 1) -> None:
        index = 0 if ms <= self._FLOOR_MS else \
            int(math.log(ms / self._FLOOR_MS) / math.log(self._GROWTH)) + 1
        self.buckets[index] += weight
        self.count += weight
        self.total += ms * weight

    def quantile(self, q: float) -> Optional[float]:
        if not self.count:
            return None
        rank, seen = q * self.count, 0
        for index, weight in sorted(self.buckets.items()):
            seen += weight
            if seen >= rank:
                return round(self._FLOOR_MS * self._GROWTH ** index, 3)
        return None

    @property
    def mean(self) -> Optional[float]:
        return round(self.total / self.count, 3) if self.count else None


class _Task:
    """Work for the writer's connection, submitted by another thread that waits for it."""

    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[apsw.Connection], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None


_STOP = object()


class IngestQueue:
    """FIFO between the socket readers and the writer, bounded by events, bytes and time.

    put() never blocks (the event loop must not); it reports when the queue is full and
    the readers should stop reading: too many events or bytes, or its oldest line has
    waited longer than max_wait (PERSISTENCE_INTERVAL_SECONDS), so that what was read
    starts its commit about that soon. take() reports when there is room again.
    """

    def __init__(self, max_events: int, max_bytes: int, max_wait: float):
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_wait = max_wait
        self.events = 0
        self.bytes = 0
        self.blocked = False
        self._items: collections.deque = collections.deque()
        self._ready = threading.Condition(threading.Lock())

    def put(self, item: Any, now: Optional[float] = None) -> bool:
        with self._ready:
            self._items.append(item)
            if type(item) is Chunk:
                self.events += item.count
                self.bytes += len(item.data)
                if (self.events >= self.max_events or self.bytes >= self.max_bytes
                        or (now or time.time()) - self._oldest().received > self.max_wait):
                    self.blocked = True
            self._ready.notify()
            return self.blocked

    def take(self, max_events: int, timeout: float,
             now: Optional[float] = None) -> tuple[Any, bool]:
        """(list of chunks up to max_events | a task | _STOP | [], room_again)."""
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            items = self._items
            if not items:
                return [], False
            if type(items[0]) is not Chunk:
                return items.popleft(), self._room(now)
            batch, events = [], 0
            while items and type(items[0]) is Chunk:
                chunk = items[0]
                if events + chunk.count > max_events:
                    if events:
                        break
                    chunk, items[0] = chunk.split(max_events)
                else:
                    items.popleft()
                batch.append(chunk)
                events += chunk.count
                self.events -= chunk.count
                self.bytes -= len(chunk.data)
            return batch, self._room(now)

    def take_tasks(self) -> list[_Task]:
        """Remove and return the queued tasks only, leaving the chunks in their order."""
        with self._ready:
            tasks = [item for item in self._items if type(item) is _Task]
            if tasks:
                self._items = collections.deque(item for item in self._items
                                                if type(item) is not _Task)
            return tasks

    def _room(self, now: Optional[float]) -> bool:
        """Room again: below half of each bound (what is left is fresh, or nothing is)."""
        if not self.blocked or self.events >= self.max_events // 2 \
                or self.bytes >= self.max_bytes // 2:
            return False
        head = self._oldest()
        if head is not None and (now or time.time()) - head.received > self.max_wait / 2:
            return False
        self.blocked = False
        return True

    def _oldest(self) -> Optional[Chunk]:
        """The chunk that has waited longest (tasks may stand before it)."""
        return next((item for item in self._items if type(item) is Chunk), None)


class WriterStats:
    """What the writer has done, read by status, the hourly rollup and systemd's STATUS=."""

    def __init__(self) -> None:
        self.records_saved = 0                 # rows inserted or updated by events
        self.commit_errors = 0
        self.batches = 0
        self.last_commit: Optional[float] = None
        self.failing: Optional[str] = None     # the error of a commit being retried
        self.unsaved = 0                       # lines given up on (at shutdown only)
        self.events_by_type: collections.Counter = collections.Counter()
        self.duplicates_by_type: collections.Counter = collections.Counter()
        self.rejects_by_code: collections.Counter = collections.Counter()
        self.latency = LatencyHistogram()
        self.latency_by_hour: dict[int, LatencyHistogram] = {}
        self.events_by_second: collections.Counter = collections.Counter()  # the last minute

    def committed(self, batch: IngestBatch, now: float) -> None:
        self.batches += 1
        self.last_commit = now
        self.records_saved += batch.rows_changed
        self.events_by_type.update(batch.stored)
        self.duplicates_by_type.update(batch.duplicates)
        self.rejects_by_code.update(reject.code for reject in batch.rejects)
        hour = self.latency_by_hour.get(hour_floor(now))
        if hour is None:
            hour = self.latency_by_hour[hour_floor(now)] = LatencyHistogram()
            for old in [h for h in self.latency_by_hour if h < hour_floor(now) - 86400]:
                del self.latency_by_hour[old]
        for chunk in batch.chunks:
            ms = max(0.0, (now - chunk.received) * 1000)
            self.latency.record(ms, chunk.count)
            hour.record(ms, chunk.count)
        second = int(now)
        self.events_by_second[second] += sum(batch.stored.values()) \
            + sum(batch.duplicates.values())
        if len(self.events_by_second) > RATE_WINDOW_SECONDS:
            for old in [s for s in self.events_by_second if s <= second - RATE_WINDOW_SECONDS]:
                del self.events_by_second[old]

    def recent_events(self, now: float, since: float) -> dict:
        """Events committed over the last RATE_WINDOW_SECONDS, or since `since` if that is
        later: a daemon up for 13 s has measured 13 s, and says so rather than extrapolate."""
        start = max(now - RATE_WINDOW_SECONDS, since)
        return {"events": sum(n for s, n in self.events_by_second.items() if s >= int(start)),
                "seconds": now - start}


class Ack(NamedTuple):
    """What one session gets after a COMMIT: its rejects, then an ack through last_line,
    and how many of its lines changed rows (stored) or none (duplicates). last_line None
    means the writer gave up on some of its lines: no more acks."""

    session: Any
    rejected: list[tuple[int, str, str]]
    last_line: Optional[int]
    stored: int = 0
    duplicates: int = 0


class Checkpointer(threading.Thread):
    """Passive checkpoints on a connection of its own, once the WAL passes CHECKPOINT_PAGES.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold, so
    that commit's acks waited 5 to 10 ms for it (and for its sync of the database file).
    Here the writer's WAL hook only wakes this thread; a passive checkpoint never blocks
    the writer, which goes on appending to the WAL meanwhile and restarts it from the
    beginning at its first commit after a complete one.
    """

    def __init__(self, settings: Settings, vfs: Optional[str]):
        super().__init__(name="tedstore-checkpointer", daemon=True)
        self.settings = settings
        self.vfs = vfs
        self.completed = 0                          # checkpoints that copied every frame
        self._wanted = threading.Event()
        self._stopping = False

    def wal_grew(self, conn: apsw.Connection, name: str, pages: int) -> int:
        """The writer's WAL hook, after each commit: wake the thread past the threshold."""
        if pages >= CHECKPOINT_PAGES:
            self._wanted.set()
        return apsw.SQLITE_OK

    def stop(self) -> None:
        self._stopping = True
        self._wanted.set()
        self.join()

    def run(self) -> None:
        try:
            conn = connect(self.settings.db, create=False, vfs=self.vfs,
                           synchronous=self.settings.synchronous, checkpoint="off")
        except StoreError as exc:
            log.warning("no background checkpoints: %s; the idle checkpoint still runs", exc)
            return
        try:
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._stopping:
                    return
                try:
                    frames, copied = conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
                    self.completed += frames == copied
                except apsw.BusyError:
                    pass                       # another checkpoint is running: it does the work
                except apsw.Error as exc:      # the next commit past the threshold tries again
                    log.warning("background WAL checkpoint failed: %s", exc)
        finally:
            conn.close()


class Writer(threading.Thread):
    """Owns the only write connection: commits batches, then hands their acks back.

    on_commit([Ack]) is called after each COMMIT has returned, never before;
    on_room() is called when a full queue drains.
    """

    def __init__(self, settings: Settings, *, vfs: Optional[str] = None,
                 on_commit: Callable[[list[Ack]], None] = lambda acks: None,
                 on_room: Callable[[], None] = lambda: None):
        super().__init__(name="tedstore-writer", daemon=True)
        self.settings = settings
        self.vfs = vfs
        self.on_commit = on_commit
        self.on_room = on_room
        self.queue = IngestQueue(settings.queue_events, settings.queue_bytes,
                                 settings.batch_interval)
        self.stats = WriterStats()
        self.started = threading.Event()
        self.start_error: Optional[BaseException] = None
        self.crashed: Optional[BaseException] = None   # why the thread died, if it did
        self.heartbeat = time.monotonic()
        self.conn: Optional[apsw.Connection] = None
        self._abandoned: weakref.WeakSet = weakref.WeakSet()   # sessions given up on
        self._late_hours: set[int] = set()             # for the scheduler to roll up again
        self._late_lock = threading.Lock()
        self._failing_since: Optional[float] = None    # the start of a run of failed commits
        self._stopping = False
        self._last_commit_mono = time.monotonic()     # idle is counted from the start
        self._checkpointed = True
        self.checkpointer: Optional[Checkpointer] = None   # passive ones, beside the writer
        self.checkpoints = 0                           # idle checkpoints that completed
        self.last_checkpoint: Optional[float] = None
        self._runaway_wal_logged = False               # with checkpoints off: said once

    # -- API for other threads -------------------------------------------------

    def submit(self, chunk: Chunk) -> bool:
        """Queue a chunk; True means the queue is full and readers should pause."""
        return self.queue.put(chunk)

    def run_task(self, fn: Callable[[apsw.Connection], Any]) -> Any:
        """Run fn(connection) on the writer thread, between batches, and return its result."""
        task = _Task(fn)
        self.queue.put(task)
        while not task.done.wait(WRITER_POLL_SECONDS):
            if not self.is_alive():
                raise StoreError("tedstore's writer has stopped; the task did not run")
        if task.error is not None:
            raise task.error
        return task.result

    def take_late_hours(self) -> set[int]:
        """Hours older than the rollup's revisit window that late events have changed."""
        with self._late_lock:
            hours, self._late_hours = self._late_hours, set()
        return hours

    def stop(self) -> None:
        """Commit everything queued so far, then close; readers must have stopped."""
        self._stopping = True
        self.queue.put(_STOP)

    # -- the thread --------------------------------------------------------------

    def run(self) -> None:
        try:
            self.conn = connect(self.settings.db, vfs=self.vfs,
                                synchronous=self.settings.synchronous,
                                checkpoint=self.settings.checkpoint)
        except StoreError as exc:
            self.start_error = exc
            self.started.set()
            return
        try:
            self.conn.pragma("analysis_limit", 1000)
            self.conn.pragma("optimize", OPTIMIZE_ON_OPEN)   # statistics steer the query plans
        except apsw.Error as exc:
            log.warning("PRAGMA optimize failed: %s", exc)
        if self.settings.checkpoint != "off":     # off: the replicator owns checkpoints
            self.checkpointer = Checkpointer(self.settings, self.vfs)
            self.conn.set_wal_hook(self.checkpointer.wal_grew)   # in place of SQLite's own
            self.checkpointer.start()
        self.started.set()
        try:
            self._loop()
        except BaseException as exc:         # not the data's fault: data is bisected below
            self.crashed = exc
            log.critical("the writer thread stopped: %s; nothing more is acknowledged",
                         describe_error(exc), exc_info=True)
        finally:
            self._close()

    def _loop(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            item, room = self.queue.take(self.settings.batch_size, WRITER_POLL_SECONDS)
            if room:
                self.on_room()
            if item is _STOP:
                for task in self.queue.take_tasks():   # fail what is left, never drop it
                    task.error = StoreError("tedstore is stopping; the task did not run")
                    task.done.set()
                return
            if type(item) is _Task:
                self._run_task(item)
            elif item:
                self._commit(item)
            # Idle means no commit for a while, not an empty queue: status requests and
            # tasks arriving every few hundred ms must not keep the WAL from its checkpoint.
            if not self._checkpointed and self.queue.events == 0 and \
                    time.monotonic() - self._last_commit_mono >= CHECKPOINT_IDLE_SECONDS:
                self._checkpoint()

    def _run_task(self, task: _Task) -> None:
        try:
            task.result = task.fn(self.conn)
        except BaseException as exc:
            task.error = exc
        finally:
            self._checkpointed = False
            task.done.set()

    def _commit(self, chunks: list[Chunk]) -> None:
        try:
            batch = IngestBatch(chunks, self.settings)
            if batch.empty:                # control lines only: no transaction, no commit
                self._acknowledge(batch)
                return
            committed = self._commit_retrying(batch)
        except Exception as exc:           # the data's fault: find the line and reject it
            self._bisect(chunks, exc)
            return
        if committed:
            self._committed(batch)

    def _commit_retrying(self, batch: IngestBatch) -> bool:
        """Commit the batch, retrying disk and lock errors until it works; False if given up.

        Between attempts the writer still runs queued tasks: a retention run can free the
        pages a full disk needs, and status and the scheduler keep working. At shutdown it
        gives up once commits have failed for STOP_GRACE_SECONDS.
        """
        delay = 0.05
        lines = sum(chunk.count for chunk in batch.chunks)
        stats = self.stats
        while True:
            try:
                with transaction(self.conn):
                    batch.apply(self.conn, time.time())
            except TRANSIENT_ERRORS as exc:
                stats.commit_errors += 1
                now = time.monotonic()
                stats.failing = describe_error(exc)
                if self._failing_since is None:
                    self._failing_since = now
                    log.error("cannot commit %d lines: %s; retrying, nothing is acknowledged "
                              "until it works", lines, stats.failing)
                if self._stopping and now - self._failing_since > STOP_GRACE_SECONDS:
                    stats.unsaved += lines
                    self._abandon(batch.chunks)
                    log.error("giving up on %d lines at shutdown: %s; they were not "
                              "acknowledged, so clients will send them again", lines, exc)
                    return False
                time.sleep(delay)
                self.heartbeat = time.monotonic()
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                for task in self.queue.take_tasks():
                    self._run_task(task)
                continue
            if self._failing_since is not None:
                log.warning("commits work again after %.1f s (%s)",
                            time.monotonic() - self._failing_since, stats.failing)
                self._failing_since = stats.failing = None
            return True

    def _bisect(self, chunks: list[Chunk], exc: Exception) -> None:
        """A batch that fails for its content: commit its halves, down to the line to reject."""
        lines = sum(chunk.count for chunk in chunks)
        if lines == 1:
            chunk = chunks[0]
            if chunk.rejection is not None:
                self.stats.unsaved += 1
                self._abandon(chunks)
                log.error("cannot record the rejection of line %d (%s): %s",
                          chunk.first_line, chunk.rejection[0], describe_error(exc))
                return
            log.warning("line %d cannot be stored: %s", chunk.first_line, describe_error(exc))
            self._commit([chunk.refused("bad_event", f"tedstore cannot store this event: "
                                                     f"{describe_error(exc)}")])
            return
        if len(chunks) == 1:
            head, tail = chunks[0].split(chunks[0].count // 2)
            halves = [[head], [tail]]
        else:
            halves = [chunks[:len(chunks) // 2], chunks[len(chunks) // 2:]]
        for half in halves:
            self._commit(half)

    def _abandon(self, chunks: list[Chunk]) -> None:
        """Lines given up on: acks are cumulative, so their sessions may get no more acks."""
        sessions = {chunk.session for chunk in chunks if chunk.session is not None}
        fresh = [session for session in sessions if session not in self._abandoned]
        self._abandoned.update(fresh)
        if fresh:
            self.on_commit([Ack(session, [], None) for session in fresh])

    def _committed(self, batch: IngestBatch) -> None:
        now = time.time()
        self.stats.committed(batch, now)
        if batch.touched:
            with self._late_lock:
                self._late_hours |= batch.touched
        self._last_commit_mono = time.monotonic()
        self._checkpointed = False
        self._acknowledge(batch)

    def _acknowledge(self, batch: IngestBatch) -> None:
        """Acknowledge each session's lines up to its last one, with its rejections."""
        by_session: dict[Any, Ack] = {}
        for chunk in batch.chunks:
            session = chunk.session
            if session is not None and session not in self._abandoned:
                ack = by_session.get(session)
                if ack is None or ack.last_line < chunk.last_line:
                    by_session[session] = Ack(session, ack.rejected if ack else [],
                                              chunk.last_line)
        for reject in batch.rejects:
            ack = by_session.get(reject.chunk.session)
            if ack is not None:
                ack.rejected.append((reject.line_no, reject.code, reject.error))
        acks = []
        for session, ack in by_session.items():
            ack.rejected.sort()
            stored, duplicates = batch.by_session.get(session, (0, 0))
            acks.append(ack._replace(stored=stored, duplicates=duplicates))
        self.on_commit(acks)

    def _checkpoint(self) -> None:
        """Checkpoint the WAL while idle as TEDSTORE_CHECKPOINT says: truncate it, or copy
        its frames into the database without waiting for anyone (passive), or leave it to
        a replicator (off) unless nothing has for a long while, rather than fill the disk.
        Readers holding old snapshots only postpone it."""
        mode = self.settings.checkpoint
        if mode == "off":
            wal = database_facts(self.settings.db)["wal_bytes"] or 0
            if wal <= REPLICATOR_WAL_LIMIT:
                self._checkpointed = True
                self._runaway_wal_logged = False
                return
            if not self._runaway_wal_logged:
                log.warning("the WAL has grown to %s with TEDSTORE_CHECKPOINT=off, so nothing "
                            "has checkpointed it: truncating it here (start the replicator; it "
                            "will take a new snapshot)", megabytes(wal))
                self._runaway_wal_logged = True
            mode = "truncate"
        self.conn.set_busy_handler(None)
        try:
            if mode == "truncate":
                self.conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
            else:
                frames, copied = self.conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
                if copied < frames:
                    raise apsw.BusyError("a reader holds frames back")
            self._checkpointed = True
            self.checkpoints += 1
            self.last_checkpoint = time.time()
        except apsw.BusyError:
            self._last_commit_mono = time.monotonic()     # a reader is in the way: try later
        except apsw.Error as exc:
            log.warning("WAL checkpoint failed: %s", exc)
            self._last_commit_mono = time.monotonic()
        finally:
            self.conn.set_busy_handler(busy_handler(BUSY_TIMEOUT_MS / 1000))

    def _close(self) -> None:
        if self.conn is None:
            return
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self._checkpoint()
        self.conn.close()
        self.conn = None


# ---------------------------------------------------------------------------
# SERVER: asyncio sessions cut streams into numbered lines and send acks back
# ---------------------------------------------------------------------------

_ACK = b'{"ack":%d}\n'
_PONG = b'{"pong":true}\n'
_BOM = b"\xef\xbb\xbf"
_PEERCRED = struct.Struct("3i")
FORBIDDEN_LOG_SECONDS = 10.0       # one log line and rejects row per refused uid this often
CONTROL_LINES_PER_TURN = 16        # control lines a session answers before the others' turn
QUERIES_PER_CONNECTION = 16        # queries waiting on one connection before it is not read
ANSWER_BYTES_PER_CONNECTION = 1024 ** 2       # its unread replies before its next query waits
ANSWER_BYTES_TOTAL = 64 * 1024 ** 2           # everyone's unread replies before any query waits
STATUS_CACHE_SECONDS = 0.05        # a flood of status lines is answered from one snapshot


class Session(asyncio.Protocol):
    """One client connection: numbers its lines, answers control lines, queues the rest.

    Complete lines it cannot take yet wait in `backlog`, unnumbered, and the connection is
    not read meanwhile: while the client does not read its replies, while it has
    QUERIES_PER_CONNECTION queries waiting, and until its next turn once it has answered
    CONTROL_LINES_PER_TURN control lines. So no client, reading or not, holds up another's
    acks or grows the daemon's memory (reads cannot hurt ingest).
    """

    def __init__(self, server: "Server"):
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.peer_pid: Optional[int] = None
        self.peer_uid: Optional[int] = None
        self.line_no = 0          # lines received and numbered
        self.acked = 0            # lines acknowledged
        self.partial = b""        # the start of a line still arriving
        self.backlog = b""        # complete lines read but not taken yet
        self.discarding = False   # inside a line that was too long
        self.eof = False
        self.closed = False
        self.fresh = True         # nothing read yet: a byte order mark may come first
        self.queries: collections.deque = collections.deque()   # (line, query, args) waiting
        self.running = 0          # its queries on a query thread now
        self.in_turn = False      # in the server's ring of sessions with queries waiting
        self.turn = 0             # control lines answered in this turn
        self.stored = self.duplicates = self.rejected = 0   # of its lines, once committed
        self.abandoned = False    # the writer gave up on some of its lines: no more acks
        self.write_paused = False # the client does not read its replies
        self.queue_paused = False # it queued lines while the queue was full
        self.reading = True
        self.last_active = time.monotonic()

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):      # peers on odd sockets stay anonymous
            self.peer_pid, self.peer_uid, _ = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        self.server.admit(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.queries.clear()
        self.backlog = b""
        self.server.forget(self)

    def pause_writing(self) -> None:
        """The client does not read its replies: stop reading its lines until it does."""
        self.write_paused = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.server.dispatch()
        self.resume()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return
            data = data[newline + 1:]
            self.discarding = False
        if self.partial:
            data = self.partial + data
            self.partial = b""
        if self.fresh:
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self.partial = data          # wait for the rest of a byte order mark
                return
            self.fresh = False
            if data.startswith(_BOM):
                data = data[len(_BOM):]
        end = data.rfind(b"\n") + 1
        if end:
            self.turn = 0
            self._take(data if end == len(data) else data[:end])
        if end < len(data):
            self._hold(data[end:])

    def eof_received(self) -> bool:
        """The client finished sending: take a last unterminated line, then ack and close."""
        self.eof = True
        if self.partial:
            self._take(self.partial + b"\n")
            self.partial = b""
        self._close_when_done()
        return True

    # -- lines ---------------------------------------------------------------------

    def _take(self, data: bytes) -> None:
        """Complete lines: numbered and queued now, or after those already waiting."""
        if self.backlog:
            self.backlog += data
        else:
            self._lines(data)

    def resume(self) -> None:
        """Take the lines that waited, as far as the budgets allow; read again once all are."""
        if self.closed:
            return
        self.turn = 0
        if self.backlog:
            data, self.backlog = self.backlog, b""
            self._lines(data)
        self.update_reading()
        self._close_when_done()

    def _lines(self, data: bytes) -> None:
        """Queue complete lines, cutting out any longer than the limit."""
        limit = self.server.settings.max_line_bytes
        if len(data) <= limit + 1:
            self._submit(data)
            return
        start = good = 0
        while start < len(data):
            end = data.index(b"\n", start) + 1
            if end - start - 1 > limit:
                if good < start:
                    self._submit(data[good:start])
                    if self.backlog:                   # over a budget: the rest waits too
                        self.backlog += data[start:]
                        return
                self._too_long(data[start:end - 1])
                good = end
            start = end
        if good < len(data):
            self._submit(data[good:])

    def _hold(self, rest: bytes) -> None:
        if len(rest) > self.server.settings.max_line_bytes:
            self._too_long(rest)
            self.discarding = True
        else:
            self.partial = rest

    def _too_long(self, head: bytes) -> None:
        self.line_no += 1
        limit = self.server.settings.max_line_bytes
        self.server.submit(Chunk(self, self.line_no, 1, head[:MAX_RAW_BYTES], time.time(),
                                 ("too_long", f"line is longer than {limit} bytes "
                                              f"(TEDSTORE_MAX_LINE_BYTES); it was discarded")))

    def _submit(self, data: bytes) -> None:
        """Number the lines and queue them for the writer, control lines answered first; the
        lines after a control line the session has no budget for wait in the backlog."""
        answered = False
        if b'"op"' in data:
            taken, answered = self._answer_control_lines(data, self.line_no + 1)
            if taken < len(data):
                data, self.backlog = data[:taken], data[taken:]
                self.update_reading()
                if not data:
                    return
        first = self.line_no + 1
        count = data.count(b"\n")
        self.line_no += count
        self.server.submit(Chunk(self, first, count, b"" if answered else data, time.time(),
                                 answered=answered))

    def _answer_control_lines(self, data: bytes, first: int) -> tuple[int, bool]:
        """Answer the control lines among data's lines (a query when it is done; the writer
        still counts them for the ack). Returns how many bytes of data were taken (all of
        them, unless the session ran out of budget at a control line), and whether they
        were all control lines, answered: nothing for the writer to decode."""
        taken, only_control, replies = 0, True, []
        for offset in itertools.count():            # line by line: a backlog may be long
            if taken == len(data):
                break
            end = data.index(b"\n", taken)
            line = data[taken:end]
            if b'"op"' not in line:
                only_control = False
            elif self._over_budget():
                break
            else:
                self.turn += 1
                try:
                    op = decode_line(line)
                except LineRejected:
                    op = None            # the writer rejects and records it in line order
                if op == "ping":
                    replies.append(_PONG)
                elif op == "status":
                    replies.append(self.server.status_reply(self))
                elif op == "query":
                    self.transport.write(b"".join(replies))
                    replies.clear()
                    self.server.ask(self, first + offset, line)
                else:
                    only_control = False     # an event, or a line the writer rejects
            taken = end + 1
        if replies:
            self.transport.write(b"".join(replies))
        return taken, only_control and taken > 0

    def _over_budget(self) -> bool:
        if self.write_paused or len(self.queries) + self.running >= QUERIES_PER_CONNECTION:
            return True                  # resume_writing or an answer takes the rest
        if self.turn >= CONTROL_LINES_PER_TURN:
            asyncio.get_running_loop().call_soon(self.resume)   # the rest in its next turn
            return True
        return False

    def send_answer(self, line_no: int, reply: bytes) -> None:
        """The answer to the query on line `line_no` (or why there is none)."""
        self.running -= 1
        self.last_active = time.monotonic()
        if not self.closed:
            self.transport.write(reply)
            self.resume()

    def unread(self) -> int:
        """Bytes of replies written to this connection that the client has not read yet."""
        return 0 if self.closed else self.transport.get_write_buffer_size()

    # -- replies and flow control --------------------------------------------------

    def acknowledge(self, ack: "Ack") -> None:
        if self.closed or self.abandoned:
            return
        encode = msgspec.json.encode
        replies = [encode({"rejected": line, "code": code, "error": error}) + b"\n"
                   for line, code, error in ack.rejected]
        replies.append(_ACK % ack.last_line)
        self.transport.write(b"".join(replies))
        self.acked = ack.last_line
        self.stored += ack.stored
        self.duplicates += ack.duplicates
        self.rejected += len(ack.rejected)
        self._close_when_done()

    def give_up(self) -> None:
        """The writer could not store some of its lines; acks are cumulative, so none follow."""
        self.abandoned = True
        if not self.closed:
            self.refuse({"error": f"tedstore could not store lines after {self.acked}; "
                                  f"reconnect and send them again"})

    def refuse(self, reply: dict) -> None:
        self.transport.write(msgspec.json.encode(reply) + b"\n")
        self.transport.close()

    def update_reading(self) -> None:
        want = not (self.write_paused or self.queue_paused or self.server.draining
                    or self.backlog)
        if want != self.reading and not self.closed:
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _close_when_done(self) -> None:
        if self.eof and self.acked >= self.line_no and not (self.queries or self.running
                                                            or self.backlog or self.closed):
            self.transport.close()


class QueryPool:
    """Threads that answer the socket's queries, off the event loop and off the writer
    thread, each on its own read-only connection. The server starts a query only on an
    idle thread, so nothing queues here; a query works QUERY_SECONDS at most and its
    answer may not pass QUERY_MAX_BYTES, checked while SQLite builds it."""

    def __init__(self, settings: Settings, deliver: Callable[[Any, int, bytes], None],
                 threads: int = QUERY_THREADS):
        self.settings = settings
        self.deliver = deliver              # (session, line, reply line), on a query thread
        self.idle = threads
        self.served = self.refused = 0      # queries answered, and refused
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"tedstore-query-{n}",
                                          daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def run(self, session: Any, line_no: int, name: str, args: Any, max_bytes: int) -> None:
        """Answer a query on an idle thread (the caller counts them: `idle`)."""
        self.idle -= 1
        self._jobs.put((session, line_no, name, args, max_bytes))

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(QUERY_SECONDS + 5)

    def _run(self) -> None:
        with contextlib.suppress(OSError):    # reads yield the CPU to ingest, not the reverse
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), QUERY_THREAD_NICE)
        conn: Optional[apsw.Connection] = None
        while (job := self._jobs.get()) is not None:
            session, line_no, name, args, max_bytes = job
            try:
                if conn is None:
                    conn = connect(self.settings.db, readonly=True)
                reply = b'{"result":%b,"line":%d}\n' % (
                    run_query_within_limits(conn, name, args, max_bytes), line_no)
                self.served += 1
            except Exception as exc:        # whatever it is, this query's and only its
                if not isinstance(exc, TedstoreError):
                    log.error("the %s query failed: %s: %s", name, type(exc).__name__, exc)
                    if conn is not None:
                        conn.close()
                        conn = None         # a fresh connection for the next one
                reply = bad_query_reply(line_no, exc)
                self.refused += 1
            self.deliver(session, line_no, reply)
        if conn is not None:
            conn.close()


def bad_query_reply(line_no: int, exc: BaseException) -> bytes:
    """The reply to a query that cannot be answered: one line that says why."""
    error = str(exc) if isinstance(exc, TedstoreError) else \
        f"tedstore cannot answer this query: {type(exc).__name__}: {exc}"
    return msgspec.json.encode({"rejected": line_no, "code": "bad_query",
                                "error": error[:MAX_ERROR_CHARS]}) + b"\n"


class Server:
    """The sessions, and the flow of lines to the writer and of acks back to them.

    While the queue is full, each session that queues a line stops being read until the
    writer makes room. Sessions that queue nothing keep being read, so a status request
    on a fresh connection is still answered; each session overshoots by one read at most.
    Queries wait on their session and start in turn, one session's query after another's.
    """

    def __init__(self, settings: Settings, writer: Writer, status: Callable[[], dict],
                 queries: QueryPool):
        self.settings = settings
        self.writer = writer
        self.status = status
        self.queries = queries
        self.sessions: set[Session] = set()
        self.held: set[Session] = set()         # paused until the queue has room
        self.asking: collections.deque = collections.deque()   # sessions with queries waiting
        self.draining = False
        self.connections_total = 0
        self.refused: collections.Counter = collections.Counter()
        self._forbidden_noted: dict[Optional[int], float] = {}
        self._status: Optional[bytes] = None    # the encoded status, STATUS_CACHE_SECONDS
        self._status_at = 0.0

    def admit(self, session: Session) -> None:
        self._status = None
        allowed = self.settings.allow_uids
        if allowed is not None and session.peer_uid not in allowed:
            self._forbid(session)
            return
        if len(self.sessions) >= self.settings.max_connections:
            self.refused["too_many_connections"] += 1
            log.warning("refused a connection from pid %s: %d connections is the limit",
                        session.peer_pid, self.settings.max_connections)
            session.refuse({"error": f"tedstore already has {self.settings.max_connections} "
                                     f"connections (TEDSTORE_MAX_CONNECTIONS); retry later"})
            return
        self.sessions.add(session)
        self.connections_total += 1

    def _forbid(self, session: Session) -> None:
        message = (f"uid {session.peer_uid} is not allowed to send to tedstore "
                   f"(TEDSTORE_ALLOW_UIDS)")
        self.refused["forbidden"] += 1
        now = time.monotonic()
        if now - self._forbidden_noted.get(session.peer_uid, -math.inf) >= FORBIDDEN_LOG_SECONDS:
            self._forbidden_noted[session.peer_uid] = now
            log.warning("refused a connection from pid %s: %s", session.peer_pid, message)
            self.writer.submit(Chunk(session, 0, 1, b"", time.time(), ("forbidden", message)))
        session.refuse({"rejected": 0, "code": "forbidden", "error": message})

    def forget(self, session: Session) -> None:
        self._status = None
        self.sessions.discard(session)
        self.held.discard(session)
        self.dispatch()                      # its unread answers no longer count

    def submit(self, chunk: Chunk) -> None:
        session = chunk.session
        if self.writer.submit(chunk) and not session.closed:
            session.queue_paused = True
            session.update_reading()
            self.held.add(session)

    def room(self) -> None:
        """The writer drained a full queue: the sessions it held back may read again."""
        if self.writer.queue.blocked:
            return                       # filled up again since; the writer will call again
        for session in self.held:
            session.queue_paused = False
            session.update_reading()
        self.held.clear()

    def status_reply(self, session: Session) -> bytes:
        """The status line for one session: the daemon's status (computed at most every
        STATUS_CACHE_SECONDS) and what became of this connection's lines so far."""
        now = time.monotonic()
        if self._status is None or now - self._status_at > STATUS_CACHE_SECONDS:
            self._status, self._status_at = msgspec.json.encode(self.status()), now
        mine = msgspec.json.encode({"acked": session.acked, "stored": session.stored,
                                    "duplicates": session.duplicates,
                                    "rejected": session.rejected})
        return b'{"status":%b,"connection":%b}}\n' % (self._status[:-1], mine)

    def ask(self, session: Session, line_no: int, line: bytes) -> None:
        """A query line: checked now, answered by the query pool in the session's turn."""
        try:
            name, args = read_query_line(line)
        except QueryRejected as exc:
            self.queries.refused += 1
            session.transport.write(bad_query_reply(line_no, exc))
            return
        session.queries.append((line_no, name, args))
        if not session.in_turn:
            session.in_turn = True
            self.asking.append(session)
        self.dispatch()

    def dispatch(self) -> None:
        """Start waiting queries on idle query threads, one per session in turn, passing
        over sessions whose unread replies are over their budget. While the unread replies
        of all sessions together are over theirs, a query's answer may only be as large as
        one session's budget: clients that read are still answered, and clients that do
        not cannot make the daemon hold more than the budgets add up to."""
        while self.queries.idle > 0 and self.asking:
            crowded = sum(session.unread() for session in self.sessions) > ANSWER_BYTES_TOTAL
            for _ in range(len(self.asking)):
                session = self.asking.popleft()
                if session.closed or not session.queries:
                    session.in_turn = False
                    continue
                if session.unread() > ANSWER_BYTES_PER_CONNECTION:
                    self.asking.append(session)
                    continue
                line_no, name, args = session.queries.popleft()
                session.running += 1
                if session.queries:
                    self.asking.append(session)
                else:
                    session.in_turn = False
                self.queries.run(session, line_no, name, args, ANSWER_BYTES_PER_CONNECTION
                                 if crowded else QUERY_MAX_BYTES)
                break
            else:
                return                   # every waiting session is over its budget

    def query_done(self, session: Session, line_no: int, reply: bytes) -> None:
        """A query thread is done (on the event loop): deliver, and start the next query."""
        self.queries.idle += 1
        session.send_answer(line_no, reply)
        self.dispatch()

    def deliver(self, acks: list[Ack]) -> None:
        self._status = None
        for ack in acks:
            if ack.last_line is None:
                ack.session.give_up()
            else:
                ack.session.acknowledge(ack)

    def sweep_idle(self) -> None:
        deadline = time.monotonic() - self.settings.idle_timeout
        for session in list(self.sessions):
            if session.last_active < deadline and session.acked >= session.line_no \
                    and not (session.queries or session.running or session.backlog):
                session.refuse({"error": f"idle for {self.settings.idle_timeout:g} s "
                                         f"(TEDSTORE_IDLE_TIMEOUT); reconnect to send more"})

    def drain(self) -> None:
        """Stop reading everywhere: what was read is committed and acked, the rest is resent."""
        self.draining = True
        for session in self.sessions:
            session.update_reading()

    async def close_all(self, timeout: float) -> None:
        for session in list(self.sessions):
            session.transport.close()
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------
# MEASURES: one window's accuracy and ROI, for the rollups, the queries and the report
# ---------------------------------------------------------------------------
# One statement measures any window [start, end), of all trackers or one (and one model),
# so that an hour's rollup, a day's, the performance query over any window and each bucket
# of the report can never disagree (the daily views' rows for days not rolled up yet spell
# the same sums in SQL; a test compares them). The resolved predictions are read once, as
# a histogram of raw_error (whole ticks, so a few hundred distinct values): the true median
# (the middle value, or the mean of the two middle ones), the mean absolute error and the
# shares within 1, 2 and 3 windows of 40 ticks all follow from it exactly, inside SQLite.
#
# Every query may narrow itself to one tracker's records (:tracker) and, where predictions
# are involved, one model's predictions (:model); NULL is all of them. Side bets have no
# model, and games, ticks and rejects are the feed's: the same whoever asks.
PREDICTIONS_OF = ("(:tracker IS NULL OR {t}tracker = :tracker) "
                  "AND (:model IS NULL OR {t}model_version = :model)")
SIDE_BETS_OF = "(:tracker IS NULL OR {t}tracker = :tracker)"


# Long windows. Sorting months of errors, confidences or probabilities takes most of a
# second, so the scheduler keeps daily histograms of them, ordered by value (schema v5):
# once a day has settled (SETTLED_HOURS after it ended, when no event for it can arrive
# unnoticed) and every record of it is resolved, its counts are written and the day is
# listed in histogram_days. A window of LONG_WINDOW_DAYS or more adds up the listed days it
# holds whole from the histograms, in value order, and reads the rest of itself (its two
# ends, and any day not listed) from the records by time. A late event for a listed day
# unlists it in the transaction that stores it (IngestBatch.apply), and days at or before
# the oldest record of a table are never read from its histograms (retention has deleted
# some of their records), so an answer is always the records' own.
LONG_WINDOW_DAYS = 60    # a shorter window sorts its records: cheaper than every histogram
SETTLED_HOURS = ROLLUP_REVISIT_HOURS + 3


class Histogram(NamedTuple):
    """A daily histogram: `records` resolved (`resolved`) counted per `value`, and per
    `groups`, with the aggregates `columns` names. Each column is (name, SQL over the
    records, how days add up: sum keeps NULL when all are NULL, total does not)."""

    table: str
    records: str
    value: str
    groups: str
    of: str                                     # PREDICTIONS_OF or SIDE_BETS_OF
    resolved: str
    columns: tuple[tuple[str, str, str], ...]

    def per_value(self) -> str:
        """The window's records as (value, aggregates): from the histograms, the listed
        days from :cover_from to :cover_to but :holes (value order, nothing sorted), and
        from the records, the ranges of :gaps."""
        return f"""
SELECT {self.value} AS v, {", ".join(f"{add}({name}) AS {name}" for name, _, add in self.columns)}
FROM {self.table} INDEXED BY sqlite_autoindex_{self.table}_1
WHERE :cover_from IS NOT NULL AND day >= :cover_from AND day < :cover_to
  AND (:holes IS NULL OR day NOT IN (SELECT value FROM json_each(:holes)))
  AND {self.of.format(t="")}
GROUP BY {self.value}
UNION ALL
SELECT {self.value}, {", ".join(f"{sql} AS {name}" for name, sql, _ in self.columns)}
FROM (SELECT value->>0 AS since, value->>1 AS until FROM json_each(:gaps)) AS gap
     CROSS JOIN {self.records} INDEXED BY {self.records}_created_at
WHERE created_at >= gap.since AND created_at < gap.until AND {self.resolved}
  AND {self.of.format(t="")}
GROUP BY {self.value}"""

    @property
    def sql_save(self) -> str:
        """A day's histogram, from its records."""
        names = ", ".join(name for name, _, _ in self.columns)
        return f"""
INSERT INTO {self.table} ({self.value}, day, {self.groups}, {names})
SELECT {self.value}, substr(:start, 1, 10), {self.groups},
       {", ".join(sql for _, sql, _ in self.columns)}
FROM {self.records} INDEXED BY {self.records}_created_at
WHERE created_at >= :start AND created_at < :end AND {self.resolved}
GROUP BY {self.value}, {self.groups}"""


ERRORS = Histogram(
    "errors_daily", "predictions", "raw_error", "tracker, model_version", PREDICTIONS_OF,
    "raw_error IS NOT NULL", (("n", "count(*)", "sum"),))
CONFIDENCES = Histogram(
    "confidences_daily", "predictions", "confidence", "tracker, model_version", PREDICTIONS_OF,
    "raw_error IS NOT NULL AND bound_lower IS NOT NULL AND bound_upper IS NOT NULL",
    (("n", "count(*)", "sum"),
     ("covered", "count(*) FILTER (WHERE bound_lower <= predicted_end_tick - raw_error "
                 "AND predicted_end_tick - raw_error <= bound_upper)", "sum"),
     ("width", "total(bound_upper - bound_lower)", "total")))
PROBABILITIES = Histogram(
    "probabilities_daily", "side_bets", "probability", "tracker", SIDE_BETS_OF,
    "actual_outcome <> 'PENDING'",
    (("n", "count(*)", "sum"),
     ("won", "count(*) FILTER (WHERE actual_outcome = 'WON')", "sum"),
     ("sq", "total((probability - (actual_outcome = 'WON')) "
            "* (probability - (actual_outcome = 'WON')))", "total"),
     ("ev", "total(expected_value) FILTER (WHERE recommendation = 'BET')", "total"),
     ("pay", "sum(payout) FILTER (WHERE recommendation = 'BET')", "sum")))
HISTOGRAMS = (ERRORS, CONFIDENCES, PROBABILITIES)

# Which days of [first, last] the histograms may answer for, and where the records begin.
SQL_LISTED_DAYS = "SELECT day FROM histogram_days WHERE day >= ?1 AND day <= ?2"
SQL_OLDEST_RECORD = {table: f"SELECT min(created_at) FROM {table} INDEXED BY {table}_created_at"
                     for table in ("predictions", "side_bets")}


def histogram_cover(conn: apsw.Connection, start: str, end: str, records: str) -> dict:
    """The parameters of Histogram.per_value for the window [start, end) of `records`:
    the listed days it holds whole, after the day of the oldest record, from :cover_from
    to :cover_to but :holes, and as :gaps the ranges of it left to read from the records."""
    begin, finish = text_epoch(start), text_epoch(end)
    none = {"cover_from": None, "cover_to": None, "holes": None, "gaps": json.dumps([[start, end]])}
    oldest = None
    if finish - begin >= LONG_WINDOW_DAYS * 86400:
        oldest = conn.execute(SQL_OLDEST_RECORD[records]).get
    if oldest is None:
        return none
    first = max(math.ceil(begin / 86400), int(text_epoch(oldest) // 86400) + 1) * 86400
    last = int(finish // 86400) * 86400 - 86400
    listed = sorted(int(text_epoch(day + " 00:00:00")) for (day,) in conn.execute(
        SQL_LISTED_DAYS, (day_text(first), day_text(last))))
    if not listed:
        return none
    cover_from, cover_to = listed[0], listed[-1] + 86400
    holes = sorted(set(range(cover_from, cover_to, 86400)).difference(listed))
    gaps = [[start, utc_text(cover_from)],
            *([utc_text(day), utc_text(day + 86400)] for day in holes),
            [utc_text(cover_to), end]]
    return {"cover_from": day_text(cover_from), "cover_to": day_text(cover_to),
            "holes": json.dumps([day_text(day) for day in holes]) if holes else None,
            "gaps": json.dumps(gaps)}


SQL_MEASURES = f"""
WITH errors AS (
    SELECT v, sum(n) AS c FROM ({ERRORS.per_value()}) GROUP BY v),
ranked AS (SELECT v, c, sum(c) OVER (ORDER BY v) AS upto, sum(c) OVER () AS n FROM errors)
SELECT
  (SELECT count(*) FROM games INDEXED BY games_ended_at
   WHERE ended_at >= :start AND ended_at < :end) AS games_analyzed,
  (SELECT count(*) FROM predictions INDEXED BY predictions_created_at
   WHERE created_at >= :start AND created_at < :end AND {PREDICTIONS_OF.format(t="")})
      AS predictions_made,
  e.resolved AS predictions_resolved, e.median_e40, e.abs_error AS mean_absolute_error,
  e.e40 AS mean_e40, e.within_1 AS within_1_window, e.within_2 AS within_2_windows,
  e.within_3 AS within_3_windows, s.bets, s.positive_ev, s.won + s.lost AS resolved_bets,
  s.resolved_positive_ev, s.won AS bets_won, s.lost AS bets_lost,
  s.bets - s.won - s.lost AS bets_pending,
  s.total_ev, s.payout AS total_payout,
  100.0 * s.payout / (s.won + s.lost) AS roi_percentage,
  (SELECT count(*) FROM rejects INDEXED BY rejects_received_at
   WHERE received_at >= :start AND received_at < :end) AS rejected_lines
FROM (SELECT coalesce(max(n), 0) AS resolved,
             (min(v) FILTER (WHERE upto >= (n + 1) / 2)
              + min(v) FILTER (WHERE upto >= (n + 2) / 2)) / 80.0 AS median_e40,
             1.0 * sum(abs(v) * c) / max(n) AS abs_error,
             sum(v * c) / 40.0 / max(n) AS e40,
             100.0 * coalesce(sum(c) FILTER (WHERE abs(v) <= 40), 0) / max(n) AS within_1,
             100.0 * coalesce(sum(c) FILTER (WHERE abs(v) <= 80), 0) / max(n) AS within_2,
             100.0 * coalesce(sum(c) FILTER (WHERE abs(v) <= 120), 0) / max(n) AS within_3
      FROM ranked) AS e,
     (SELECT count(*) FILTER (WHERE recommendation = 'BET') AS bets,
             count(*) FILTER (WHERE expected_value > 0) AS positive_ev,
             count(*) FILTER (WHERE expected_value > 0 AND actual_outcome <> 'PENDING')
                 AS resolved_positive_ev,
             count(*) FILTER (WHERE recommendation = 'BET' AND actual_outcome = 'WON') AS won,
             count(*) FILTER (WHERE recommendation = 'BET' AND actual_outcome = 'LOST') AS lost,
             total(expected_value) FILTER (WHERE recommendation = 'BET'
                                           AND actual_outcome <> 'PENDING') AS total_ev,
             sum(payout) FILTER (WHERE recommendation = 'BET' AND actual_outcome <> 'PENDING')
                 AS payout
      FROM side_bets INDEXED BY side_bets_created_at
      WHERE created_at >= :start AND created_at < :end
        AND {SIDE_BETS_OF.format(t="")}) AS s"""


class Measures(msgspec.Struct, frozen=True, kw_only=True):
    """The measures of one window [start, end), named as SQL_MEASURES names them. Ratios
    are NULL (None) when there is nothing to measure; shares are percentages."""

    games_analyzed: int                # games ended in the window
    predictions_made: int              # predictions created in it, resolved or not
    predictions_resolved: int
    median_e40: Optional[float]        # the true median, signed: it shows bias
    mean_absolute_error: Optional[float]   # ticks
    mean_e40: Optional[float]
    within_1_window: Optional[float]   # share of resolved predictions within 40 ticks
    within_2_windows: Optional[float]
    within_3_windows: Optional[float]
    bets: int                          # side bets recommended BET, resolved or not
    positive_ev: int                   # side bets with expected_value > 0, resolved or not
    resolved_bets: int
    resolved_positive_ev: int
    bets_won: int
    bets_lost: int
    bets_pending: int
    total_ev: float                    # over the resolved BETs
    total_payout: Optional[float]      # over the resolved BETs
    roi_percentage: Optional[float]    # 100 x payouts / resolved BETs
    rejected_lines: int


def measure(conn: apsw.Connection, start: str, end: str, tracker: Optional[str] = None,
            model: Optional[str] = None) -> Measures:
    """The measures of [start, end) (UTC text), of one tracker's records (and of one
    model's predictions: side bets have no model) or of all of them. Games and rejects are
    the feed's and the daemon's: the same whoever asks."""
    cursor = conn.execute(SQL_MEASURES, {"start": start, "end": end, "tracker": tracker,
                                         "model": model,
                                         **histogram_cover(conn, start, end, "predictions")})
    names = [column for column, _ in cursor.get_description()]
    return Measures(**dict(zip(names, cursor.fetchone())))


# The rollup tables keep the measures under their own column names (the hourly table's are
# the TED deployment's): column -> measure. A rollup row, and a measure read back from one,
# go through these and nothing else.
ROLLED_UP = {
    "metrics_hourly": {
        "games_analyzed": "games_analyzed", "predictions_made": "predictions_made",
        "median_e40": "median_e40", "mean_absolute_error": "mean_absolute_error",
        "within_1_window": "within_1_window", "within_2_windows": "within_2_windows",
        "within_3_windows": "within_3_windows", "sidebets_recommended": "resolved_bets",
        "sidebets_positive_ev": "resolved_positive_ev", "bets_won": "bets_won",
        "bets_lost": "bets_lost", "total_ev": "total_ev", "roi_percentage": "roi_percentage",
        "rejected_lines": "rejected_lines"},
    "metrics_daily": {
        "games_analyzed": "games_analyzed", "predictions": "predictions_made",
        "resolved": "predictions_resolved", "median_e40": "median_e40",
        "mean_absolute_error": "mean_absolute_error", "mean_e40": "mean_e40",
        "within_1_window": "within_1_window", "within_2_windows": "within_2_windows",
        "within_3_windows": "within_3_windows", "bets": "bets", "bets_won": "bets_won",
        "bets_lost": "bets_lost", "bets_pending": "bets_pending",
        "total_payout": "total_payout", "roi_percentage": "roi_percentage",
        "rejected_lines": "rejected_lines"},
}
ROLLED_UP["metrics_hourly_by"] = ROLLED_UP["metrics_hourly"]
ALL = "*"                 # metrics_hourly_by's tracker or model_version for all of them


def rolled_up(table: str, measures: Measures) -> dict:
    """The measure columns of a row of a rollup table."""
    return {column: getattr(measures, name) for column, name in ROLLED_UP[table].items()}


def from_rollup(table: str, row: dict) -> dict:
    """A rollup table's row as measures (by their names): what it holds of them."""
    return {name: row[column] for column, name in ROLLED_UP[table].items()}


# ---------------------------------------------------------------------------
# SCHEDULER: hourly rollups, nightly retention and backups
# ---------------------------------------------------------------------------
# The jobs are plain functions of a connection: the daemon reads on the scheduler's
# own connection and runs each write step on the writer thread; the CLI runs both on
# its own connection.

# A job's write steps run through a StepRunner: on the writer thread in the daemon, on
# the command's own connection in the CLI.
Step = Callable[[apsw.Connection], Any]
StepRunner = Callable[[Step], Any]
SQL_RECORD_JOB = "INSERT OR REPLACE INTO jobs (name, last_run_at, detail) VALUES (?1, ?2, ?3)"
SQL_LAST_JOBS = "SELECT name, last_run_at, detail FROM jobs"


def record_job(conn: apsw.Connection, name: str, detail: dict, now: float) -> None:
    conn.execute(SQL_RECORD_JOB, (name, utc_text(now), json.dumps(detail)))


def last_jobs(conn: apsw.Connection) -> dict[str, dict]:
    """When each job last ran, and what it did."""
    jobs = {}
    with store_errors("cannot read the jobs table"):
        if conn.table_exists("main", "jobs"):
            for name, at, detail in conn.execute(SQL_LAST_JOBS):
                jobs[name] = {"at": at, **json.loads(detail)}
    return jobs


def yielding_steps(conn: apsw.Connection) -> StepRunner:
    """Steps for a command run beside the daemon: after each write transaction it pauses
    as long as the transaction took, so the daemon's writer gets the lock as often."""
    def run_step(step: Step) -> Any:
        started = time.perf_counter()
        try:
            return step(conn)
        finally:
            time.sleep(max(YIELD_MIN_SECONDS, time.perf_counter() - started))
    return run_step


# The rollup reads hour by hour through the time indexes, named (INDEXED BY) so that no
# planner statistics, however stale, turn an hour into a table scan.
SQL_NEXT_DATA = """
SELECT min(t) FROM (
    SELECT min(created_at) AS t FROM predictions INDEXED BY predictions_created_at
     WHERE created_at >= ?1
    UNION ALL SELECT min(created_at) FROM side_bets INDEXED BY side_bets_created_at
     WHERE created_at >= ?1
    UNION ALL SELECT min(ended_at) FROM games INDEXED BY games_ended_at WHERE ended_at >= ?1
    UNION ALL SELECT min(received_at) FROM rejects INDEXED BY rejects_received_at
     WHERE received_at >= ?1)"""

SQL_SAVE_ROLLUP = f"""
INSERT INTO metrics_hourly ({", ".join(TABLES["metrics_hourly"].columns)})
VALUES ({", ".join(":" + column for column in TABLES["metrics_hourly"].columns)})
ON CONFLICT (hour_start) DO UPDATE SET
    {", ".join(f"{column} = excluded.{column}" for column in ROLLED_UP["metrics_hourly"])},
    avg_commit_latency_ms = coalesce(excluded.avg_commit_latency_ms,
                                     metrics_hourly.avg_commit_latency_ms),
    p99_commit_latency_ms = coalesce(excluded.p99_commit_latency_ms,
                                     metrics_hourly.p99_commit_latency_ms),
    created_at = excluded.created_at"""

SQL_SAVE_DAY = f"""
INSERT OR REPLACE INTO metrics_daily ({", ".join(TABLES["metrics_daily"].columns)})
VALUES ({", ".join(":" + column for column in TABLES["metrics_daily"].columns)})"""

# Each tracker's rows of an hour replace those it had (a tracker may have gone since).
SQL_CLEAR_ROLLUP_BY = "DELETE FROM metrics_hourly_by WHERE hour_start = ?1"
SQL_SAVE_ROLLUP_BY = f"""
INSERT INTO metrics_hourly_by ({", ".join(TABLES["metrics_hourly_by"].columns)})
VALUES ({", ".join(":" + column for column in TABLES["metrics_hourly_by"].columns)})"""

# Who made what in a window: each tracker's models, each tracker (model '*'), and each
# model across trackers (tracker '*').
SQL_TRACKER_MODELS = f"""
SELECT tracker, model_version FROM predictions INDEXED BY predictions_created_at
WHERE created_at >= ?1 AND created_at < ?2
UNION SELECT tracker, '{ALL}' FROM predictions INDEXED BY predictions_created_at
WHERE created_at >= ?1 AND created_at < ?2
UNION SELECT '{ALL}', model_version FROM predictions INDEXED BY predictions_created_at
WHERE created_at >= ?1 AND created_at < ?2
UNION SELECT tracker, '{ALL}' FROM side_bets INDEXED BY side_bets_created_at
WHERE created_at >= ?1 AND created_at < ?2"""

SQL_LAST_ROLLUP = "SELECT max(hour_start) FROM metrics_hourly"
SQL_ROLLED = {3600: "SELECT hour_start FROM metrics_hourly WHERE hour_start BETWEEN ?1 AND ?2",
              86400: "SELECT day || ' 00:00:00.000' FROM metrics_daily WHERE day BETWEEN "
                     "substr(?1, 1, 10) AND substr(?2, 1, 10)"}
ROLLUP_HOURS_PER_WRITE = 24          # rollup rows saved per write transaction


def newest_complete_hour(now: float) -> int:
    """The start of the latest hour that ended at least ROLLUP_DELAY_SECONDS ago."""
    return hour_floor(now - ROLLUP_DELAY_SECONDS) - 3600


def newest_complete(now: float, period: int) -> int:
    """The start of the latest complete hour (period 3600) or UTC day (86400) to roll up."""
    return (newest_complete_hour(now) + 3600) // period * period - period


def rollup_floor(now: float, settings: Settings) -> int:
    """The oldest hour that can still hold rows: the longest retention of a rolled-up table."""
    days = max(getattr(settings, table.retention) for table in TABLES.values() if table.rolled)
    return hour_floor(now - days * 86400)


def hours_to_roll(conn: apsw.Connection, now: float, settings: Settings,
                  since: Optional[float] = None) -> list[int]:
    """Hours after the last rollup (revisiting the latest few), or from `since`, back to the
    retention horizon at most."""
    if since is not None:
        start = hour_floor(since)
    else:
        with store_errors("cannot find the hours to roll up"):
            done = conn.execute(SQL_LAST_ROLLUP).get
            oldest = conn.execute(SQL_NEXT_DATA, ("",)).get if done is None else None
        if done is not None:
            start = int(text_epoch(done)) + 3600 - ROLLUP_REVISIT_HOURS * 3600
        elif oldest is None:
            return []
        else:
            start = hour_floor(text_epoch(oldest))
    return list(range(max(start, rollup_floor(now, settings)), newest_complete_hour(now) + 1,
                      3600))


def rollup_hour(conn: apsw.Connection, hour: int, latency: Optional[LatencyHistogram],
                now: float) -> tuple[dict, list[dict]]:
    """One metrics_hourly row, every column as the README's "Hourly metrics" defines it,
    and the hour's metrics_hourly_by rows: each tracker's, and each of its models'."""
    start, end = utc_text(hour), utc_text(hour + 3600)
    everyone = measure(conn, start, end)
    groups = conn.execute(SQL_TRACKER_MODELS, (start, end)).fetchall()
    trackers, models = ({name for group in groups if (name := group[i]) != ALL} for i in (0, 1))
    alone = len(trackers) <= 1 and len(models) <= 1     # then every group's rows are everyone's
    by = [{"hour_start": start, "tracker": tracker, "model_version": model,
           **rolled_up("metrics_hourly_by", everyone if alone else measure(
               conn, start, end, None if tracker == ALL else tracker,
               None if model == ALL else model)),
           "created_at": utc_text(now)} for tracker, model in groups]
    return ({"hour_start": start, "hour_end": end, **rolled_up("metrics_hourly", everyone),
             "avg_commit_latency_ms": latency.mean if latency else None,
             "p99_commit_latency_ms": latency.quantile(0.99) if latency else None,
             "created_at": utc_text(now)}, by)


def rollup_day(conn: apsw.Connection, day: int, now: float) -> dict:
    """One metrics_daily row: the day's measures behind the daily views and the report."""
    return {"day": utc_text(day)[:10],
            **rolled_up("metrics_daily", measure(conn, utc_text(day), utc_text(day + 86400))),
            "created_at": utc_text(now)}


def run_rollups(conn: apsw.Connection, run_step: StepRunner, hours: list[int], now: float,
                latency_for: Callable[[int], Optional[LatencyHistogram]] = lambda hour: None,
                progress: Callable[[int], None] = lambda n: None,
                days: Iterable[int] = ()) -> dict:
    """Compute the hours, then the complete days among theirs and `days`, on `conn`, and
    save them through `run_step` a day's worth at a time, so that a long catch-up never
    holds the write lock for long."""
    last_day = newest_complete(now, 86400)
    days = sorted(day for day in {hour // 86400 * 86400 for hour in hours}.union(days)
                  if day <= last_day)
    with store_errors("cannot roll up the metrics"):
        for first in range(0, len(hours), ROLLUP_HOURS_PER_WRITE):
            rows = [rollup_hour(conn, hour, latency_for(hour), now)
                    for hour in hours[first:first + ROLLUP_HOURS_PER_WRITE]]
            run_step(lambda db, rows=rows: _save_hours(db, rows))
            progress(len(rows))
        for first in range(0, len(days), ROLLUP_HOURS_PER_WRITE):
            rows = [rollup_day(conn, day, now) for day in days[first:first + ROLLUP_HOURS_PER_WRITE]]
            run_step(lambda db, rows=rows: _save(db, SQL_SAVE_DAY, rows))
        listed = write_histograms(conn, run_step, now)
        detail = {"hours": len(hours), "days": len(days), "histogram_days": listed,
                  "through": utc_text(hours[-1] + 3600) if hours else None}
        if hours or days or listed:
            run_step(lambda db: record_job(db, "rollup", detail, now))
    return detail


def _save(db: apsw.Connection, sql: str, rows: list[dict]) -> None:
    with transaction(db):
        db.executemany(sql, rows)


def _save_hours(db: apsw.Connection, hours: list[tuple[dict, list[dict]]]) -> None:
    with transaction(db):
        db.executemany(SQL_SAVE_ROLLUP, [row for row, _ in hours])
        db.executemany(SQL_CLEAR_ROLLUP_BY, [(row["hour_start"],) for row, _ in hours])
        db.executemany(SQL_SAVE_ROLLUP_BY, [row for _, by in hours for row in by])


# The daily histograms (MEASURES: long windows) of each settled day with records, from the
# day after the oldest record's (retention may have cut that one), written when every
# record of the day is resolved; those of days at or before a table's oldest record go.
SQL_NEXT_RECORD = """
SELECT min(t) FROM (
    SELECT min(created_at) AS t FROM predictions INDEXED BY predictions_created_at
     WHERE created_at >= ?1
    UNION ALL SELECT min(created_at) FROM side_bets INDEXED BY side_bets_created_at
     WHERE created_at >= ?1)"""
SQL_ALL_LISTED_DAYS = "SELECT day FROM histogram_days"
SQL_DAY_PENDING = """
SELECT EXISTS (SELECT 1 FROM predictions INDEXED BY predictions_created_at
               WHERE created_at >= :start AND created_at < :end AND raw_error IS NULL)
    OR EXISTS (SELECT 1 FROM side_bets INDEXED BY side_bets_created_at
               WHERE created_at >= :start AND created_at < :end
                 AND actual_outcome = 'PENDING')"""
SQL_CLEAR_HISTOGRAMS = [f"DELETE FROM {h.table} INDEXED BY {h.table}_day WHERE day = :day"
                        for h in HISTOGRAMS] + ["DELETE FROM histogram_days WHERE day = :day"]
SQL_LIST_DAY = "INSERT INTO histogram_days (day, created_at) VALUES (:day, :now)"
SQL_DROP_OLD_HISTOGRAMS = [
    f"DELETE FROM {h.table} INDEXED BY {h.table}_day WHERE day <= coalesce(substr(("
    f"{SQL_OLDEST_RECORD[h.records]}), 1, 10), '9999')" for h in HISTOGRAMS] + [
    "DELETE FROM histogram_days WHERE day <= coalesce(substr((" + SQL_NEXT_RECORD.replace(
        "?1", "''") + "), 1, 10), '9999')"]


def histogram_days_due(conn: apsw.Connection, now: float) -> list[int]:
    """The settled days with records, after the oldest record's, that are not listed."""
    settled = int((now - SETTLED_HOURS * 3600) // 86400) * 86400 - 86400
    with store_errors("cannot find the days to write histograms of"):
        listed = {day for (day,) in conn.execute(SQL_ALL_LISTED_DAYS)}
        due, cursor = [], ""
        while (found := conn.execute(SQL_NEXT_RECORD, (cursor,)).get) is not None:
            day = int(text_epoch(found) // 86400) * 86400
            if day > settled:
                break
            if cursor and day_text(day) not in listed:
                due.append(day)
            cursor = utc_text(day + 86400)
    return due


def write_histograms(conn: apsw.Connection, run_step: StepRunner, now: float) -> int:
    """Write the histograms of the days due, a day to a transaction; the days listed."""
    listed = 0
    for day in histogram_days_due(conn, now):
        listed += run_step(lambda db, day=day: _write_day_histograms(db, day, now))
    run_step(_drop_old_histograms)
    return listed


def _write_day_histograms(db: apsw.Connection, day: int, now: float) -> int:
    params = {"day": day_text(day), "start": utc_text(day), "end": utc_text(day + 86400),
              "now": utc_text(now)}
    with transaction(db):
        for sql in SQL_CLEAR_HISTOGRAMS:
            db.execute(sql, params)
        if db.execute(SQL_DAY_PENDING, params).get:
            return 0
        for histogram in HISTOGRAMS:
            db.execute(histogram.sql_save, params)
        db.execute(SQL_LIST_DAY, params)
    return 1


def _drop_old_histograms(db: apsw.Connection) -> None:
    with transaction(db):
        for sql in SQL_DROP_OLD_HISTOGRAMS:
            db.execute(sql)


def unrolled(conn: apsw.Connection, before: str, now: float, period: int = 3600) -> list[int]:
    """Complete hours (or days) that hold data older than `before` but have no rollup yet.

    It steps from one period with data to the next through the time indexes, so old,
    sparse data costs a few lookups, not one rollup per empty hour since 1970.
    """
    found_periods, cursor = [], ""
    last = newest_complete(now, period)
    with store_errors("cannot find the periods to roll up"):
        while True:
            found = conn.execute(SQL_NEXT_DATA, (cursor,)).get
            if found is None or found >= before:
                break
            start = int(text_epoch(found)) // period * period
            if start > last:
                break
            found_periods.append(start)
            cursor = utc_text(start + period)
        if not found_periods:
            return []
        done = {row[0] for row in conn.execute(SQL_ROLLED[period], (
            utc_text(found_periods[0]), utc_text(found_periods[-1])))}
    return [start for start in found_periods if utc_text(start) not in done]


# Retention deletes the :limit oldest expired rows of a table (TABLES) at a time, found as
# ranges of its time index, whose entries are (time, rowid): the rows older than the
# :limit-th row's time, then those of its time up to its rowid (ties are common in bulk loads).
RETAINED = tuple(table for table in TABLES.values() if table.retention)


def _per_table(template: str) -> dict[str, str]:
    """A statement for each table with a retention, from {table} {column} {index} {more}."""
    return {table.name: template.format(table=table.name, column=table.time_column,
                                        index=table.time_index, more=table.expired_also)
            for table in RETAINED}


SQL_COUNT_EXPIRED = _per_table(
    "SELECT count(*) FROM {table} INDEXED BY {index} WHERE {column} < :cutoff{more}")
SQL_EXPIRED_BOUNDARY = _per_table(
    "SELECT {column}, rowid FROM {table} INDEXED BY {index} WHERE {column} < :cutoff{more} "
    "ORDER BY {column}, rowid LIMIT 1 OFFSET :limit - 1")
SQL_DELETE_EXPIRED = _per_table(
    "DELETE FROM {table} INDEXED BY {index} WHERE {column} < :upto{more}")
SQL_DELETE_EXPIRED_TIES = _per_table(
    "DELETE FROM {table} INDEXED BY {index} WHERE {column} = :upto AND rowid <= :upto_rowid{more}")


def retention_cutoffs(settings: Settings, now: float) -> dict[str, str]:
    """Per table, the time before which rows go. For the tables the rollup reads, never
    past the newest complete hour: retention rolls up everything before it first."""
    rolled_through = utc_text(newest_complete_hour(now) + 3600)
    cutoffs = {}
    for table in RETAINED:
        cutoff = utc_text(now - getattr(settings, table.retention) * 86400)
        cutoffs[table.name] = min(cutoff, rolled_through) if table.rolled else cutoff
    return cutoffs


def _expired(table: str, cutoffs: dict[str, str], limit: int = 0) -> dict:
    """The parameters of SQL_COUNT_EXPIRED and SQL_DELETE_EXPIRED for one table."""
    return {"cutoff": cutoffs[table], "limit": limit,
            "keep_predictions": cutoffs["predictions"], "keep_side_bets": cutoffs["side_bets"]}


def delete_expired(conn: apsw.Connection, table: str, cutoffs: dict[str, str],
                   limit: int) -> tuple[int, float]:
    """Delete the `limit` oldest expired rows in one short transaction: (rows, seconds)."""
    started = time.perf_counter()
    params = _expired(table, cutoffs, limit)
    with transaction(conn):
        boundary = conn.execute(SQL_EXPIRED_BOUNDARY[table], params).fetchone()
        if boundary is None:                   # fewer than `limit` left: all of them
            conn.execute(SQL_DELETE_EXPIRED[table], params | {"upto": cutoffs[table]})
            deleted = conn.changes()
        else:
            params |= {"upto": boundary[0], "upto_rowid": boundary[1]}
            conn.execute(SQL_DELETE_EXPIRED[table], params)
            deleted = conn.changes()
            conn.execute(SQL_DELETE_EXPIRED_TIES[table], params)
            deleted += conn.changes()
    return deleted, time.perf_counter() - started


def run_retention(conn: apsw.Connection, run_step: StepRunner, settings: Settings, now: float, *,
                  dry_run: bool = False,
                  latency_for: Callable[[int], Optional[LatencyHistogram]] = lambda hour: None,
                  progress: Callable[[str, int], None] = lambda table, n: None) -> dict[str, int]:
    """Roll up what is not rolled up yet, then delete expired rows in small transactions.

    A dry run counts exactly what a real run at the same `now` deletes: the cutoffs do
    not depend on what is rolled up, since a real run rolls up everything they cover.
    """
    cutoffs = retention_cutoffs(settings, now)
    with store_errors("retention failed"):
        if dry_run:
            return {table.name: conn.execute(SQL_COUNT_EXPIRED[table.name],
                                             _expired(table.name, cutoffs)).get
                    for table in RETAINED}
        before = max(cutoffs[table.name] for table in RETAINED if table.rolled)
        hours, days = unrolled(conn, before, now), unrolled(conn, before, now, 86400)
        if hours or days:
            run_rollups(conn, run_step, hours, now, latency_for, days=days)
        removed = {}
        for table in (table.name for table in RETAINED):
            removed[table], limit = 0, 1000
            while True:
                deleted, seconds = run_step(
                    lambda db, t=table, n=limit: delete_expired(db, t, cutoffs, n))
                removed[table] += deleted
                progress(table, deleted)
                if deleted < limit:
                    break
                if seconds < RETENTION_STEP_SECONDS / 2:
                    limit = min(limit * 2, 50_000)
                elif seconds > RETENTION_STEP_SECONDS * 2:
                    limit = max(limit // 2, 100)
        run_step(_drop_old_histograms)
        run_step(lambda db: record_job(db, "retention", {"deleted": removed}, now))
    return removed


_PARTIAL = re.compile(r"^\..+\.partial-(\d+)(?:-journal|-wal|-shm)?$")

# link() errors that mean "this filesystem has no hard links", not "you may not"
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP}


def backup_name(now: float) -> str:
    return f"{BACKUP_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}.db"


def backup_database(db_path: str, dest: str, now: Optional[float] = None) -> dict:
    """Copy the live database consistently, check the copy, and never overwrite.

    DEST may be a folder (the copy gets a dated name in it). The copy is made under a
    hidden name (.NAME.partial-PID) and appears under its own name only once checked, so
    an interrupted backup leaves nothing that looks like a backup; the next backup into
    the same folder removes such leftovers.
    """
    target = Path(dest)
    if target.is_dir():
        target = target / backup_name(time.time() if now is None else now)
    if os.path.lexists(target):
        raise StoreError(f"{target} already exists; tedstore backup never overwrites: "
                         f"remove it or choose another name")
    if not target.parent.is_dir():
        raise StoreError(f"folder {target.parent} does not exist: create it first")
    remove_partial_backups(target.parent)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    started = time.monotonic()
    source = connect(db_path, readonly=True)
    try:
        os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE_MODE))
    except OSError as exc:
        source.close()
        raise StoreError(f"cannot write the backup in {target.parent} ({exc.strerror}): check "
                         f"that uid {os.getuid()} may write there") from exc
    try:
        copy = apsw.Connection(str(partial))
        try:
            with copy.backup("main", source, "main") as backup:
                backup.step(-1)                # one step: one consistent snapshot
            copy.pragma("journal_mode", "delete")
            verdict = copy.execute(SQL_INTEGRITY_CHECK).get
        finally:
            copy.close()
        if verdict != "ok":
            raise StoreError(f"the copy of {db_path} failed its integrity check: {verdict}")
        _publish(partial, target)
    except apsw.Error as exc:
        raise StoreError(f"cannot back up {db_path} to {target}: {describe_error(exc)}",
                         exc) from exc
    except OSError as exc:
        raise StoreError(f"cannot write the backup {target}: {exc.strerror or exc}") from exc
    finally:
        source.close()
        for leftover in (partial, Path(f"{partial}-journal")):
            leftover.unlink(missing_ok=True)
    return {"path": str(target), "bytes": target.stat().st_size,
            "seconds": round(time.monotonic() - started, 3)}


def _publish(partial: Path, target: Path) -> None:
    """Give the checked copy its name, atomically and without overwriting anything."""
    try:
        os.link(partial, target)               # fails rather than overwrite
    except FileExistsError:
        raise StoreError(f"{target} appeared during the backup; it was left alone") from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(target):            # no hard links here: check, then rename
            raise StoreError(f"{target} appeared during the backup; it was left alone") from None
        os.rename(partial, target)
    _fsync_folder(target.parent)


def remove_partial_backups(folder: Path) -> list[str]:
    """Remove what interrupted backups left in `folder` (their processes are gone)."""
    removed = []
    for path in folder.iterdir():
        match = _PARTIAL.match(path.name)
        if match and not _process_exists(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # someone else's process
        pass
    return True


def restore_database(db_path: str, backup: str, now: float) -> dict:
    """Put a checked backup in place of a stopped daemon's database.

    What it checks is what it installs: the backup, with the -wal beside it if there is
    one, is copied under a hidden name, its WAL folded in, and that copy is checked
    (integrity, and exactly tedstore's schema for its version). The database it replaces
    is made whole first (its WAL folded in) and kept beside it under a name no restore took
    before (DB.replaced-STAMP, -2, -3...); then one rename puts the copy in its place. A
    restore killed at any point leaves the old database in place, whole, and the next
    restore or daemon start removes what it left. The lock a daemon takes is held
    throughout, so none starts halfway.
    """
    source, target = Path(backup), Path(db_path)
    if not source.is_file():
        raise ConfigError(f"there is no backup at {backup}")
    if not target.parent.is_dir():
        raise ConfigError(f"cannot restore to {db_path}: there is no folder {target.parent}")
    owner = (target if target.exists() else target.parent).stat()   # whom the files belong to
    lock = os.open(f"{db_path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        if os.geteuid() == 0:             # run with sudo: the daemon's user keeps its files
            os.fchown(lock, owner.st_uid, owner.st_gid)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _ = serving(db_path) or ("?", "")
            raise StoreError(f"tedstore (pid {pid}) is running on {db_path}: stop it first "
                             f"(systemctl stop tedstore.service tedstore.socket)") from None
        remove_restore_leftovers(target)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            version = _checked_copy(source, partial, owner)
            kept = _keep_replaced(target, now) if target.exists() else None
            for suffix in ("-wal", "-shm"):                # the old database's, now folded in
                Path(f"{target}{suffix}").unlink(missing_ok=True)
            os.replace(partial, target)
            _fsync_folder(target.parent)
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{partial}{suffix}").unlink(missing_ok=True)
    finally:
        os.close(lock)
    return {"path": str(target), "backup": str(source), "kept": str(kept) if kept else None,
            "bytes": target.stat().st_size, "schema_version": version}


def _checked_copy(source: Path, copy: Path, owner: os.stat_result) -> int:
    """Copy a backup (and its -wal) to `copy`, fold the WAL in, and check the result: its
    schema version, or StoreError saying why it is not a usable backup."""
    unusable = f"{source} is not a usable tedstore backup"
    wal = Path(f"{source}-wal")
    shutil.copyfile(source, copy)
    with_frames = wal.exists() and wal.stat().st_size > WAL_HEADER_BYTES
    if with_frames:
        shutil.copyfile(wal, f"{copy}-wal")
    for path in (copy, Path(f"{copy}-wal")):
        if path.exists():
            os.chmod(path, PRIVATE_FILE_MODE)
            if os.geteuid() == 0:
                os.chown(path, owner.st_uid, owner.st_gid)
    try:
        conn = apsw.Connection(str(copy), flags=apsw.SQLITE_OPEN_READWRITE)
        try:
            conn.execute(SQL_PROBE).fetchall()
            if with_frames and conn.wal_checkpoint()[1] <= 0:
                raise StoreError(f"{unusable}: {wal} beside it holds no WAL frame of this "
                                 f"database (it is damaged, or another database's): move it "
                                 f"away to restore the backup without it")
            verdict, version = conn.execute(SQL_INTEGRITY_CHECK).get, conn.pragma("user_version")
            differences = schema_differences(conn) if 1 <= version <= schema_version() else []
            conn.pragma("journal_mode", "delete")     # folds the WAL in: one file to install
        finally:
            conn.close()
    except apsw.Error as exc:
        raise StoreError(f"{unusable}: {describe_error(exc)}") from None
    if verdict != "ok" or not 1 <= version <= schema_version():
        raise StoreError(f"{unusable} (integrity: {verdict}; schema version {version}): "
                         f"pick another backup")
    if differences:
        raise StoreError(f"{unusable}: its schema is not tedstore's: {'; '.join(differences)}")
    if Path(f"{copy}-wal").exists():
        raise StoreError(f"{unusable}: its WAL could not be folded in")
    with open(copy, "rb+") as file:
        os.fsync(file.fileno())
    return version


WAL_HEADER_BYTES = 32                # a -wal no longer than this holds no frame


def _keep_replaced(target: Path, now: float) -> Path:
    """Fold the WAL of the database about to be replaced into it, and keep it beside it
    under a name nothing has yet (a hard link, so the database stays in place until the
    copy replaces it). A database too damaged to fold keeps its WAL beside the kept copy."""
    try:
        conn = apsw.Connection(str(target), flags=apsw.SQLITE_OPEN_READWRITE)
        try:
            if conn.pragma("journal_mode") == "wal":
                conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
        finally:
            conn.close()
    except apsw.Error as exc:
        log.warning("cannot fold the WAL of %s into it (%s): kept as it is", target,
                    describe_error(exc))
    stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))
    for attempt in itertools.count(1):
        kept = target.with_name(f"{target.name}.replaced-{stamp}"
                                + (f"-{attempt}" if attempt > 1 else ""))
        try:
            _link_or_copy(target, kept)
        except FileExistsError:
            continue
        break
    wal = Path(f"{target}-wal")
    if wal.exists() and wal.stat().st_size:
        _link_or_copy(wal, Path(f"{kept}-wal"))
    return kept


def _link_or_copy(source: Path, name: Path) -> None:
    """A second name for a file (FileExistsError if taken): a hard link, or a copy where
    the filesystem has none."""
    try:
        os.link(source, name)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        with open(source, "rb") as old, \
                open(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE_MODE),
                     "wb") as new:
            shutil.copyfileobj(old, new)
            new.flush()
            os.fsync(new.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make the names just given in `folder` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_restore_leftovers(target: Path) -> list[str]:
    """What a killed restore left beside the database: its hidden copy (the process is
    gone), and a kept name of the database it did not get to replace (the same file)."""
    removed = []
    try:
        inode = target.stat().st_ino
    except FileNotFoundError:
        inode = None
    for path in target.parent.iterdir():
        match = _PARTIAL.match(path.name)
        stale = (match is not None and path.name.startswith(f".{target.name}.partial-")
                 and not _process_exists(int(match.group(1))))
        if not stale and inode is not None and path.name.startswith(f"{target.name}.replaced-"):
            with contextlib.suppress(FileNotFoundError):
                stale = path.stat().st_ino == inode
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def nightly_backup(settings: Settings, now: float) -> dict:
    """A dated backup in TEDSTORE_BACKUP_DIR, keeping the newest TEDSTORE_BACKUP_KEEP."""
    folder = Path(settings.backup_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the backup folder {folder}: {exc.strerror}") from exc
    detail = backup_database(settings.db, str(folder), now)
    backups = sorted(folder.glob(f"{BACKUP_PREFIX}*.db"))
    for old in backups[:-settings.backup_keep]:
        old.unlink()
    detail["kept"] = min(len(backups), settings.backup_keep)
    return detail


def nightly_slot(now: float, hour_utc: int) -> float:
    """The most recent CLEANUP_HOUR_UTC at or before now."""
    slot = int(now // 86400 * 86400) + hour_utc * 3600
    return slot if slot <= now else slot - 86400


class Scheduler(threading.Thread):
    """Runs rollups, retention and backups when due, catching up at start on what was missed."""

    def __init__(self, settings: Settings, writer: Writer):
        super().__init__(name="tedstore-scheduler", daemon=True)
        self.settings = settings
        self.writer = writer
        self.stopped = threading.Event()
        self.last: dict[str, dict] = {}
        self.rolled_through: Optional[int] = None
        self.failing: Optional[str] = None     # why the last round of jobs failed
        self._conn: Optional[apsw.Connection] = None

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                try:
                    pause = self.run_due(time.time())
                    self.failing = None
                except Exception as exc:       # a job fails, the scheduler lives on
                    if self.stopped.is_set():
                        log.info("a scheduled job was interrupted by the shutdown: %s", exc)
                        return
                    self.failing = (str(exc) if isinstance(exc, TedstoreError)
                                    else f"{type(exc).__name__}: {exc}")
                    log.error("a scheduled job failed: %s; trying again in %g s", self.failing,
                              SCHEDULER_FAILURE_PAUSE, exc_info=not isinstance(exc, TedstoreError))
                    pause = SCHEDULER_FAILURE_PAUSE
                self.stopped.wait(min(pause, SCHEDULER_MAX_SLEEP))
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def stop(self) -> None:
        self.stopped.set()

    def _run_step(self, step: Step) -> Any:
        """Each write step of a job runs on the writer; a shutdown ends the job there."""
        if self.stopped.is_set():
            raise StoreError("tedstore is stopping")
        with store_errors("a scheduled job failed on the writer"):
            return self.writer.run_task(step)

    def run_due(self, now: float) -> float:
        """Run every job that is due at `now`; return the seconds until the next one."""
        if self._conn is None:
            self._conn = connect(self.settings.db, readonly=True)
            self.last.update(last_jobs(self._conn))
        conn, run_step = self._conn, self._run_step
        latency_for = self.writer.stats.latency_by_hour.get
        late = {hour for hour in self.writer.take_late_hours()
                if rollup_floor(now, self.settings) <= hour <= newest_complete_hour(now)}
        if late or self.rolled_through is None or newest_complete_hour(now) > self.rolled_through:
            hours = sorted(late.union(hours_to_roll(conn, now, self.settings)))
            days = unrolled(conn, utc_text(newest_complete(now, 86400) + 86400), now, 86400)
            if hours or days:
                self.last["rollup"] = {"at": utc_text(now), **run_rollups(
                    conn, run_step, hours, now, latency_for, days=days)}
                run_step(lambda db: db.pragma("optimize"))     # hourly, as SQLite advises
                log.info("rolled up %d hour(s) through %s, and the histograms of %d day(s)",
                         len(hours), self.last["rollup"]["through"],
                         self.last["rollup"]["histogram_days"])
            self.rolled_through = newest_complete_hour(now)
        slot = nightly_slot(now, self.settings.cleanup_hour_utc)
        if self.last.get("retention", {}).get("at", "") < utc_text(slot):
            removed = run_retention(conn, run_step, self.settings, now, latency_for=latency_for)
            self.last["retention"] = {"at": utc_text(now), "deleted": removed}
            log.info("retention removed %s", ", ".join(f"{n} {t}" for t, n in removed.items()))
        if self.settings.backup_dir and self.last.get("backup", {}).get("at", "") < utc_text(slot):
            detail = nightly_backup(self.settings, now)
            run_step(lambda db: record_job(db, "backup", detail, now))
            self.last["backup"] = {"at": utc_text(now), **detail}
            log.info("backed up to %s (%d bytes)", detail["path"], detail["bytes"])
        next_rollup = newest_complete_hour(now) + 2 * 3600 + ROLLUP_DELAY_SECONDS
        return max(1.0, min(next_rollup, slot + 86400) - now)


# ---------------------------------------------------------------------------
# SYSTEMD: sd_notify, the watchdog and socket activation, with the standard library
# ---------------------------------------------------------------------------

def sd_notify(message: str) -> bool:
    """Send one datagram to $NOTIFY_SOCKET (a leading '@' is the abstract namespace)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
        return False
    return True


def watchdog_interval() -> Optional[float]:
    """Half of WATCHDOG_USEC in seconds, if systemd wants watchdog pings from this process."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def inherited_socket() -> Optional[socket.socket]:
    """The listening socket systemd passed (LISTEN_FDS), if it passed one to this process."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise DaemonError("systemd passed a socket that is not a Unix stream socket: "
                          "use ListenStream=/path in tedstore.socket")
    return sock


# ---------------------------------------------------------------------------
# DAEMON: the writer, the server, the scheduler and systemd, started and drained
# ---------------------------------------------------------------------------

def stat_is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.lstat(path).st_mode)


def socket_answers(path: str) -> bool:
    """Whether something accepts connections on the Unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True            # e.g. a full backlog: someone is listening
        return True


class Daemon:
    """`tedstore serve`: run() blocks until SIGTERM/SIGINT or request_stop(), then drains."""

    def __init__(self, settings: Settings, *, vfs: Optional[str] = None):
        self.settings = settings
        self.vfs = vfs
        self.ready = threading.Event()
        self.started_at = time.time()
        self.schema = 0
        self.writer: Optional[Writer] = None
        self.server: Optional[Server] = None
        self.queries: Optional[QueryPool] = None
        self.scheduler: Optional[Scheduler] = None
        self.stopping = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._bound: Optional[tuple[str, int, int]] = None   # (path, device, inode)
        self.socket_path = settings.socket              # where it listens
        self._lock_fd: Optional[int] = None

    def run(self) -> int:
        """Serve until asked to stop; 0 after a clean drain, 1 if lines were given up on or
        the writer died (so that systemd's Restart=on-failure applies)."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):   # never fatal
                signal.signal(signum, signal.SIG_IGN)
        # The writer hands the GIL back at every statement it steps (every ROWS_PER_INSERT
        # rows); while the event loop or a query thread is busy, each time it waits a switch
        # interval to get it again.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        try:
            return self._run()
        finally:
            sys.setswitchinterval(switch_interval)

    def _run(self) -> int:
        created: list[str] = []                  # files this start made, gone if it fails
        try:
            listener = self._bind()              # first, so that a taken socket creates nothing
            self._lock_database(created)
            for name in remove_restore_leftovers(Path(self.settings.db)):
                log.info("removed %s, left by an interrupted restore", name)
            created += [self.settings.db + suffix for suffix in ("", "-wal", "-shm")
                        if not os.path.exists(self.settings.db + suffix)]
            conn = open_store(self.settings.db, vfs=self.vfs, synchronous=self.settings.synchronous,
                              checkpoint=self.settings.checkpoint)
            self.schema = conn.pragma("user_version")
            conn.close()
            listener.listen(1024)                # connections are refused until now
        except BaseException:
            self._unlink_socket()
            for path in created:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self._unlock()
            raise
        try:
            return asyncio.run(self._serve(listener))
        finally:
            self._unlink_socket()
            self._unlock()

    def request_stop(self) -> None:
        """Ask a running daemon to drain and exit; safe from any thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def _lock_database(self, created: list[str]) -> None:
        """One daemon per database: an exclusive flock on DB.lock, which holds our pid."""
        path = self.settings.db + ".lock"
        existed = os.path.exists(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        except OSError as exc:
            raise DaemonError(f"cannot create {path}: {exc.strerror}; check that the folder "
                              f"exists and is writable, or set TEDSTORE_DB") from exc
        if not existed:
            created.append(path)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS   # `status` may hold it for a moment
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                holder = os.read(fd, 32).decode(errors="replace").partition("\n")[0] or "?"
                os.close(fd)
                raise DaemonError(f"another tedstore (pid {holder}) is already serving "
                                  f"{self.settings.db}: stop it first or set TEDSTORE_DB") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{self.socket_path}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _bind(self) -> socket.socket:
        """The socket systemd passed, or our own, bound at TEDSTORE_SOCKET but not listening."""
        inherited = inherited_socket()
        if inherited is not None:
            self.socket_path = inherited.getsockname() or self.settings.socket
            log.info("serving the socket systemd passed, %s", self.socket_path)
            return inherited
        path = self.settings.socket
        if os.path.lexists(path):
            if not stat_is_socket(path):
                raise DaemonError(f"{path} exists and is not a socket: remove it or set "
                                  f"TEDSTORE_SOCKET")
            if socket_answers(path):
                raise DaemonError(f"another tedstore is already listening on {path}: "
                                  f"stop it first or set TEDSTORE_SOCKET")
            os.unlink(path)                                   # stale: its daemon is gone
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            bound = os.lstat(path)
            self._bound = (path, bound.st_dev, bound.st_ino)
            os.chmod(path, int(self.settings.socket_mode, 8))
        except OSError as exc:
            sock.close()
            self._unlink_socket()
            raise DaemonError(f"cannot listen on {path}: {exc.strerror}; check that its "
                              f"folder exists and is writable, or set TEDSTORE_SOCKET") from exc
        return sock

    def _unlink_socket(self) -> None:
        """Remove the socket file this daemon bound, and only that file: the same path may
        belong to another daemon by now."""
        if self._bound is None:
            return
        path, device, inode = self._bound
        self._bound = None
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return
        if (now.st_dev, now.st_ino) == (device, inode):
            os.unlink(path)
        else:
            log.info("left %s alone: it is not the socket this daemon created", path)

    async def _serve(self, listener: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        self._loop, self._stop = loop, asyncio.Event()
        self.writer = Writer(
            self.settings, vfs=self.vfs,
            on_commit=lambda results: loop.call_soon_threadsafe(self.server.deliver, results),
            on_room=lambda: loop.call_soon_threadsafe(self.server.room))
        self.writer.start()
        self.writer.started.wait()
        if self.writer.start_error is not None:
            listener.close()
            raise self.writer.start_error
        self.queries = QueryPool(self.settings, deliver=lambda session, line_no, reply:
                                 loop.call_soon_threadsafe(self.server.query_done, session,
                                                           line_no, reply))
        self.server = Server(self.settings, self.writer, self.status, self.queries)
        aserver = await loop.create_unix_server(lambda: Session(self.server), sock=listener)
        self.scheduler = Scheduler(self.settings, self.writer)
        self.scheduler.start()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, log.info,
                                    "SIGHUP: nothing to reload; tedstore reads its settings at start")
            loop.add_signal_handler(signal.SIGUSR1, lambda: log.info(
                "%s", status_lines(self.status(), time.time())[0]))
            loop.add_signal_handler(signal.SIGUSR2, log.info, "SIGUSR2: ignored")
        log.info("tedstore %s serving %s with database %s (schema %d, WAL, synchronous=%s)",
                 __version__, self.settings.socket, self.settings.db, self.schema,
                 self.settings.synchronous)
        sd_notify(f"READY=1\nSTATUS={self._status_line()}")
        self.ready.set()
        housekeeping = asyncio.ensure_future(self._housekeeping())
        await self._stop.wait()
        housekeeping.cancel()
        return await self._drain(aserver)

    async def _housekeeping(self) -> None:
        """Watchdog pings while the writer makes progress, STATUS= lines, idle sweeps."""
        watchdog = watchdog_interval()
        tick = min(watchdog or 1.0, 1.0)
        stale_after = max(watchdog or 0.0, 2 * WRITER_POLL_SECONDS)
        last_status = last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if not self.writer.is_alive():
                log.error("the writer thread died; stopping so that systemd restarts tedstore")
                self._stop.set()
                return
            if watchdog and now - self.writer.heartbeat < stale_after:
                sd_notify("WATCHDOG=1")
            if now - last_status >= STATUS_NOTIFY_SECONDS:
                sd_notify(f"STATUS={self._status_line()}")
                last_status = now
            if now - last_sweep >= min(IDLE_SWEEP_SECONDS, self.settings.idle_timeout / 2):
                self.server.sweep_idle()
                last_sweep = now

    async def _drain(self, aserver: asyncio.AbstractServer) -> int:
        self.stopping = True
        sd_notify("STOPPING=1")
        log.info("stopping: committing %d queued lines before exit", self.writer.queue.events)
        aserver.close()
        self.server.drain()
        self.scheduler.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._stop_writer)
        await asyncio.sleep(0)                 # deliver the acks of the last commits
        await self.server.close_all(timeout=5.0)
        self.scheduler.join(timeout=5.0)
        stats = self.writer.stats
        log.info("stopped after saving %d records", stats.records_saved)
        return 1 if stats.unsaved or self.writer.crashed else 0

    def _stop_writer(self) -> None:
        self.writer.stop()
        self.writer.join()
        self.queries.stop()

    def _status_line(self) -> str:
        stats = self.writer.stats
        age = f"{time.time() - stats.last_commit:.1f} s ago" if stats.last_commit else "none yet"
        line = f"queue {self.writer.queue.events} events, last commit {age}"
        return f"{line}, FAILING: {stats.failing}" if stats.failing else line

    def status(self) -> dict:
        """Everything `tedstore status` shows, as the daemon sees it now."""
        writer, server, settings = self.writer, self.server, self.settings
        stats, latency = writer.stats, writer.stats.latency
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "enabled": True,
            "repository": {"enabled": True,
                           "last_save": (utc_text(stats.last_commit)
                                         if stats.last_commit else None),
                           "records_saved": stats.records_saved,
                           "errors": stats.commit_errors},
            "manager": {"enabled": True, "running": writer.is_alive() and not self.stopping,
                        "persist_interval": settings.batch_interval},
            "writer": {"state": "failing" if stats.failing else "ok", "error": stats.failing,
                       "batches": stats.batches, "unsaved": stats.unsaved,
                       "checkpoint": settings.checkpoint, "checkpoints": writer.checkpoints,
                       "last_checkpoint": (utc_text(writer.last_checkpoint)
                                           if writer.last_checkpoint else None)},
            "queue": {"events": writer.queue.events, "bytes": writer.queue.bytes,
                      "max_events": settings.queue_events, "max_bytes": settings.queue_bytes,
                      "full": writer.queue.blocked},
            "connections": {"open": len(server.sessions), "total": server.connections_total,
                            "refused": dict(server.refused)},
            "queries": {"answered": self.queries.served, "refused": self.queries.refused,
                        "waiting": sum(len(s.queries) + s.running for s in server.sessions)},
            "events": dict(stats.events_by_type),
            "recent": stats.recent_events(time.time(), self.started_at),
            "duplicates": dict(stats.duplicates_by_type),
            "rejects": dict(stats.rejects_by_code),
            "commit_latency_ms": {"avg": latency.mean, "p50": latency.quantile(0.5),
                                  "p99": latency.quantile(0.99),
                                  "p99_by_hour": {utc_text(hour): measured.quantile(0.99)
                                                  for hour, measured in
                                                  sorted(stats.latency_by_hour.items())}},
            "scheduler": {"state": "failing" if self.scheduler.failing else "ok",
                          "error": self.scheduler.failing},
            "last_rollup": self.scheduler.last.get("rollup"),
            "last_retention": self.scheduler.last.get("retention"),
            "last_backup": self.scheduler.last.get("backup"),
            "database": database_facts(os.path.abspath(settings.db))
                        | {"schema_version": self.schema},
            "socket": settings.socket,
        }


def serving(db: str) -> Optional[tuple[str, str]]:
    """(pid, socket path) of the daemon serving database `db`, or None if none runs: a
    running daemon holds an exclusive lock on DB.lock, in which it wrote both."""
    try:
        fd = os.open(db + ".lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, path = os.read(fd, 4096).decode(errors="replace").partition("\n")
            return pid.strip() or "?", path.strip()
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# CLIENT: what trackers and the CLI send with
# ---------------------------------------------------------------------------

def connect_socket(path: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ProtocolError(f"cannot reach tedstore at {path}: {reason}; is the daemon running "
                            f"(tedstore serve), and is TEDSTORE_SOCKET right?") from exc
    return sock


def parse_reply(line: bytes, path: str) -> dict:
    """One reply from the daemon at `path`: an ack, a reject, or an answer (pong, status).
    A refusal of the whole connection raises Refused; a line that is not a tedstore reply
    means a stranger holds the socket."""
    try:
        reply = msgspec.json.decode(line)
    except msgspec.DecodeError:
        reply = None
    if not isinstance(reply, dict):
        raise ProtocolError(f"unexpected reply {line[:80]!r}: is tedstore what listens there?")
    if reply.get("rejected", 0) == 0 and "error" in reply:   # line 0: the connection itself
        raise Refused(path, str(reply["error"]))
    return reply


class Replies:
    """The daemon's replies on one connection, for every client in this module: bytes in
    (feed, for clients that select), or read from the socket (next, for those that block),
    reply objects out."""

    def __init__(self, path: str):
        self.path = path
        self._rest = b""
        self._ready: collections.deque = collections.deque()

    def feed(self, data: bytes) -> list[dict]:
        """The replies completed by data (the rest of a line waits for more)."""
        *complete, self._rest = (self._rest + data).split(b"\n")
        return [parse_reply(line, self.path) for line in complete]

    def next(self, sock: socket.socket, waiting_for: str = "an answer") -> dict:
        """The next reply, waiting for it; ProtocolError if the daemon hangs up first."""
        while not self._ready:
            try:
                data = sock.recv(1 << 20)
            except OSError as exc:
                raise ProtocolError(f"tedstore at {self.path} did not send {waiting_for}: "
                                    f"{exc.strerror or exc}") from exc
            if not data:
                raise ProtocolError(f"tedstore at {self.path} closed the connection instead "
                                    f"of sending {waiting_for}")
            self._ready.extend(self.feed(data))
        return self._ready.popleft()


def request(path: str, op: str, timeout: float = 5.0) -> dict:
    """Send one control line (ping, status) and return the answer."""
    with connect_socket(path, timeout) as sock:
        try:
            sock.sendall(msgspec.json.encode({"op": op}) + b"\n")
        except OSError:
            pass                 # it hung up at once: what it said first tells why
        return Replies(path).next(sock, f"an answer to {op}")


def stream_lines(path: str, blocks: Iterable[bytes], *, rate: Optional[float] = None,
                 measure_latency: bool = False, idle_timeout: float = 60.0,
                 progress: Callable[[int], None] = lambda acked: None) -> IngestResult:
    """Pipeline NDJSON over one connection and wait until every line is acknowledged; then
    ask what became of them (stored, duplicates).

    Each block holds one or more complete lines. With `rate`, lines leave at that many
    per second; with `measure_latency`, each line's send-to-ack time is recorded.
    """
    sock = connect_socket(path)
    sock.setblocking(False)
    result = IngestResult()
    replies = Replies(path)
    source, exhausted = iter(blocks), False
    outgoing = bytearray()
    hung_up: Optional[OSError] = None
    sent_at: collections.deque = collections.deque()       # (last line of block, time)
    started = last_heard = time.monotonic()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    try:
        while True:
            now = time.monotonic()
            wait = None
            while not exhausted and len(outgoing) < 262144:
                if rate and started + result.lines / rate > now:
                    wait = started + result.lines / rate - now
                    break
                block = next(source, None)
                if block is None:
                    exhausted = True
                    break
                if not block:                   # nothing more for now: send what we hold
                    break
                if not block.endswith(b"\n"):
                    block += b"\n"
                outgoing += block
                result.lines += block.count(b"\n")
                if measure_latency:
                    sent_at.append((result.lines, now))
            if exhausted and not outgoing and result.acked >= result.lines:
                break
            selector.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if outgoing else 0))
            events = selector.select(min(wait, 1.0) if wait is not None else 1.0)
            now = time.monotonic()
            for _, mask in events:
                if mask & selectors.EVENT_WRITE:
                    try:
                        del outgoing[:sock.send(outgoing)]
                    except BlockingIOError:
                        pass
                    except OSError as exc:      # it hung up: read what it said before
                        hung_up, exhausted = exc, True
                        outgoing.clear()
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(262144)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        data, hung_up = b"", hung_up or exc
                    if not data:
                        reason = f" ({hung_up.strerror or hung_up})" if hung_up else ""
                        raise ProtocolError(
                            f"tedstore closed the connection after acknowledging "
                            f"{result.acked:,} of the {result.lines:,} lines sent{reason}; "
                            f"send the rest again, duplicates are harmless")
                    last_heard = now
                    try:
                        for reply in replies.feed(data):
                            _take_reply(reply, result, sent_at, now)
                    except Refused as exc:
                        raise ProtocolError(f"tedstore refused the connection after "
                                            f"acknowledging {result.acked:,} of the "
                                            f"{result.lines:,} lines sent: {exc.reason}") from None
                    progress(result.acked)
            if result.acked < result.lines and not outgoing and now - last_heard > idle_timeout:
                raise ProtocolError(f"tedstore acknowledged nothing for {idle_timeout:g} s "
                                    f"({result.acked} of {result.lines} lines acknowledged)")
        _count_outcomes(sock, replies, result)
    finally:
        selector.close()
        sock.close()
    return result


def _take_reply(reply: dict, result: IngestResult, sent_at: collections.deque, now: float) -> None:
    if "ack" in reply:
        result.acked = reply["ack"]
        while sent_at and sent_at[0][0] <= result.acked:
            last, at = sent_at.popleft()
            result.latencies_ms.append((now - at) * 1000)
    elif "rejected" in reply:
        result.rejections.append((reply["rejected"], reply.get("code"), reply.get("error")))


def _count_outcomes(sock: socket.socket, replies: Replies, result: IngestResult) -> None:
    """Once every line is acknowledged, the connection's status line says how many of
    them changed rows (stored) and how many changed nothing (duplicates)."""
    sock.setblocking(True)
    sock.settimeout(30.0)
    try:
        sock.sendall(b'{"op":"status"}\n')
        while "status" not in (reply := replies.next(sock, "its status")):
            pass
    except (OSError, ProtocolError):
        return                           # everything is acknowledged; the split stays unknown
    counts = reply["status"].get("connection") or {}
    result.stored, result.duplicates = counts.get("stored"), counts.get("duplicates")


def as_tracker(blocks: Iterable[bytes], tracker: str) -> Iterator[bytes]:
    """NDJSON with every record line (prediction, side bet, state) made `tracker`'s; any
    other line, readable or not, passes as it is, for the daemon to judge."""
    for block in blocks:
        lines = block.split(b"\n")
        for number, line in enumerate(lines):
            if b'"event"' not in line:
                continue
            try:
                event = msgspec.json.decode(line)
            except (msgspec.MsgspecError, RecursionError, ValueError):
                continue
            if isinstance(event, dict) and event.get("event") in RECORD_EVENTS:
                lines[number] = msgspec.json.encode({**event, "tracker": tracker})
        yield b"\n".join(lines)


def daemon_serving(settings: Settings) -> Optional[str]:
    """The socket of the daemon that serves settings.db, if one runs: the one its lock file
    names, or settings.socket if the daemon answering there says it serves that file."""
    running = serving(settings.db)
    if running is not None and running[1] and socket_answers(running[1]):
        return running[1]
    try:
        status = request(settings.socket, "status")["status"]
    except ProtocolError:
        return None
    served = status.get("database", {}).get("path") or ""
    return settings.socket if os.path.realpath(served) == os.path.realpath(settings.db) else None


def replay(settings: Settings, blocks: Iterable[bytes],
           progress: Callable[[int], None] = lambda lines: None) -> tuple[IngestResult, str]:
    """NDJSON into settings.db and nowhere else: through the daemon that serves it (it rolls
    up what it takes), else straight into the file, rolling up the hours it touched.
    (the result, where the lines went)."""
    socket_path = daemon_serving(settings)
    if socket_path is not None:
        return stream_lines(socket_path, blocks, progress=progress), "the daemon"
    if not os.path.exists(settings.db):
        raise StoreError(f"database {settings.db} does not exist, and no tedstore serving it "
                         f"answers at {settings.socket}: start the daemon (tedstore serve), "
                         f"create the database (tedstore init), or fix --db/--socket")
    with contextlib.closing(open_store(settings.db, create=False,
                                       synchronous=settings.synchronous,
                                       checkpoint=settings.checkpoint)) as conn:
        done, touched = 0, set()

        def advance(lines: int) -> None:
            nonlocal done
            done += lines
            progress(done)
        result = ingest_offline(conn, blocks, settings, advance, touched)
        now = time.time()
        hours = sorted(hour for hour in touched
                       if rollup_floor(now, settings) <= hour <= newest_complete_hour(now))
        run_rollups(conn, lambda step: step(conn), hours, now)
    return result, settings.db


class Trouble:
    """One kind of trouble a client has: logged when it starts, then at most once every
    TROUBLE_LOG_SECONDS with a count, and once when it ends. Never a line per event, so a
    tracker that sends 100,000 bad events writes a handful of log lines."""

    def __init__(self, noun: str):
        self.noun = noun               # what is counted, in the plural: "rejected events"
        self.active = False
        self.total = 0                 # occurrences since it started
        self.unlogged = 0              # occurrences since the last log line
        self.latest = ""
        self.since = self.logged_at = 0.0
        self._lock = threading.Lock()

    def happened(self, detail: str, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.total += 1
            self.latest = detail
            if self.active:
                self.unlogged += 1
            else:
                self.active, self.since, self.logged_at = True, now, now
                log.warning("tedstore client: %s", detail)
        self.tick(now)

    def tick(self, now: Optional[float] = None) -> None:
        """Log the count so far, if the last line is TROUBLE_LOG_SECONDS old."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if not self.unlogged or now - self.logged_at < TROUBLE_LOG_SECONDS:
                return
            count, self.unlogged, self.logged_at = self.unlogged, 0, now
        log.warning("tedstore client: %d more %s in the last %.0f s; the latest: %s",
                    count, self.noun, TROUBLE_LOG_SECONDS, self.latest)

    def ended(self, how: str, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if not self.active:
                return
            self.active, total, self.total, self.unlogged = False, self.total, 0, 0
        log.warning("tedstore client: %s, after %d %s over %.0f s",
                    how, total, self.noun, now - self.since)


class Client:
    """Delivery for trackers: send() never blocks or raises; a thread does the rest.

    Lines wait in a bounded buffer until acknowledged; after a reconnect everything not
    yet acknowledged is sent again (the store is idempotent). When the buffer is full
    the oldest line is dropped and counted. Counters: sent (accepted by send), acked
    (stored), rejected (refused by tedstore), dropped (never delivered); `connected`
    says whether a connection is up.
    """

    def __init__(self, socket_path: Optional[str] = None, *, tracker: Optional[str] = None,
                 buffer_size: int = 100_000):
        settings = load_settings(socket=socket_path, tracker=tracker)
        self.enabled = settings.persistence_enabled
        self.socket_path = settings.socket
        self.tracker = settings.tracker          # put on every record event that names none
        self.buffer_size = buffer_size
        self.sent = self.acked = self.rejected = self.dropped = 0
        self.connected = False
        self._pending: collections.deque = collections.deque()   # unacknowledged lines
        self._in_flight = 0        # how many of them went out on the current connection
        self._first_line = 1       # that connection's number for _pending[0]
        self._rejected_unacked = 0
        self._closing = False
        self._settled = threading.Condition(threading.Lock())
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._troubles = {"connection": Trouble("failed connections"),
                          "rejected": Trouble("rejected events"),
                          "dropped": Trouble("dropped events")}
        self._thread = threading.Thread(target=self._run, name="tedstore-client", daemon=True)
        if self.enabled:
            self._thread.start()

    def send(self, event: Union[dict, Event]) -> None:
        """Queue one event for delivery; never blocks, never raises."""
        if not self.enabled:
            return
        try:
            line = msgspec.json.encode(self._of_tracker(event)) + b"\n"
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            with self._settled:
                self.dropped += 1
            self._troubles["dropped"].happened(f"dropped an event that cannot be encoded as "
                                               f"JSON ({exc})")
            return
        with self._settled:
            if self._closing:
                self.dropped += 1
                return
            full = len(self._pending) >= self.buffer_size
            if full:
                self._pending.popleft()
                self.dropped += 1
                if self._in_flight:
                    self._in_flight -= 1
                    self._first_line += 1
            self._pending.append(line)
            self.sent += 1
        if full:
            self._troubles["dropped"].happened(
                f"dropped the oldest event: the buffer is full ({self.buffer_size:,} events "
                f"not yet acknowledged)")
        self._wake()

    def _of_tracker(self, event: Union[dict, Event]) -> Union[dict, Event]:
        """The event, with this client's tracker if it is a record that names none."""
        if self.tracker is None:
            return event
        if isinstance(event, RECORD_TYPES):
            return (msgspec.structs.replace(event, tracker=self.tracker)
                    if event.tracker == DEFAULT_TRACKER else event)
        if isinstance(event, dict) and event.get("event") in RECORD_EVENTS \
                and "tracker" not in event:
            return {**event, "tracker": self.tracker}
        return event

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything sent so far is acknowledged; False on timeout."""
        if not self.enabled:
            return True
        with self._settled:
            return self._settled.wait_for(lambda: not self._pending, timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Flush for up to `timeout` seconds, then stop; True if nothing was left behind."""
        flushed = self.flush(timeout)
        with self._settled:
            self._closing = True
            left = len(self._pending)
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()
        self._troubles["connection"].ended(
            f"closed with {left:,} events not delivered" if left else "closed")
        self._troubles["rejected"].ended("closed")
        self._troubles["dropped"].ended("closed")
        return flushed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):   # a wake-up is already pending
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        backoff, sock = CLIENT_BACKOFF_MIN_SECONDS, None
        trouble = self._troubles["connection"]
        while True:
            with self._settled:
                if self._closing:
                    break
            for kind in self._troubles.values():
                kind.tick()
            if sock is None:
                try:
                    sock = connect_socket(self.socket_path, timeout=2.0)
                except ProtocolError as exc:
                    trouble.happened(f"{exc}; events wait in the client's buffer")
                    self._sleep(backoff)
                    backoff = min(backoff * 2, CLIENT_BACKOFF_MAX_SECONDS)
                    continue
                sock.setblocking(False)
                with self._settled:
                    self._in_flight, self._first_line, self._rejected_unacked = 0, 1, 0
                self.connected = True
            heard = self.acked + self.rejected
            try:
                self._exchange(sock)
            except (OSError, ProtocolError) as exc:
                if self.acked + self.rejected > heard:  # it worked for a while: retry soon
                    backoff = CLIENT_BACKOFF_MIN_SECONDS
                trouble.happened(str(exc) if isinstance(exc, ProtocolError) else
                                 f"lost the connection to tedstore at {self.socket_path} "
                                 f"({exc.strerror or exc}); reconnecting")
                self.connected = False
                sock.close()
                sock = None
                self._sleep(backoff)
                backoff = min(backoff * 2, CLIENT_BACKOFF_MAX_SECONDS)
        self.connected = False
        if sock is not None:
            sock.close()

    def _exchange(self, sock: socket.socket) -> None:
        """Run one connection until it breaks or the client closes."""
        outgoing, replies, hung_up = b"", Replies(self.socket_path), None
        while True:
            with self._settled:
                if self._closing:
                    return
                if not outgoing and not hung_up and self._in_flight < len(self._pending):
                    lines = list(itertools.islice(self._pending, self._in_flight,
                                                  self._in_flight + 1000))
                    outgoing = b"".join(lines)
                    self._in_flight += len(lines)
            readable, writable, _ = select.select([sock, self._wake_r],
                                                  [sock] if outgoing else [], [], 1.0)
            for kind in self._troubles.values():
                kind.tick()
            if self._wake_r in readable:
                self._wake_r.recv(4096)
            if writable:
                try:
                    outgoing = outgoing[sock.send(outgoing):]
                except BlockingIOError:
                    pass
                except OSError as exc:      # it hung up: read what it said before
                    hung_up, outgoing = exc, b""
            if sock in readable:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    raise hung_up or ProtocolError(f"tedstore at {self.socket_path} closed "
                                                   f"the connection; reconnecting")
                for reply in replies.feed(data):
                    self._take(reply)

    def _take(self, reply: dict) -> None:
        if "ack" in reply:
            with self._settled:
                done = max(0, min(reply["ack"] - self._first_line + 1, self._in_flight))
                for _ in range(done):
                    self._pending.popleft()
                self._in_flight -= done
                self._first_line += done
                self.acked += done - min(done, self._rejected_unacked)
                self._rejected_unacked = 0
                self._settled.notify_all()
            self._troubles["connection"].ended("tedstore acknowledges events again")
        elif "rejected" in reply:
            with self._settled:
                self.rejected += 1
                self._rejected_unacked += 1
            self._troubles["rejected"].happened(f"tedstore rejected an event "
                                                f"({reply.get('code')}): {reply.get('error')}")

    def _sleep(self, seconds: float) -> None:
        """Back off for `seconds`: new events do not bring the daemon back, so only close()
        cuts it short (a wake-up byte left unread would otherwise end every sleep at once)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self._wake_r], [], [], left)[0]:
                self._wake_r.recv(4096)
                with self._settled:
                    if self._closing:
                        return


# ---------------------------------------------------------------------------
# SIMULATOR: a synthetic tracker for demos, tests and benchmarks
# ---------------------------------------------------------------------------

PATTERN_NAMES = ("double_top", "slow_bleed", "moonshot", "flatline", "whipsaw")
GAMES_A_DAY = 500                    # TED's volume
BET_WINDOW_TICKS = 40                # a side bet wins if the game ends within this many ticks
GAME_LIFETIME_TICKS = 280            # past tick 20, a game ends at any tick with chance 1/280
WINDOW_CHANCE = 1 - math.exp(-BET_WINDOW_TICKS / GAME_LIFETIME_TICKS)   # of ending in a bet's


class SimulatedTracker(NamedTuple):
    """A tracker the simulator plays, imperfect in known ways: its predictions miss the end
    by `error_sd` ticks (a normal error), its uncertainty bounds are `bounds_shrink` times
    as wide as its stated confidence needs (so they cover less often than claimed), its
    side bets see the outcome through a noisy score (`signal` apart, in standard
    deviations, for games that end in the window and games that do not), and their
    probabilities are over-confident at the high end: calibrated q becomes
    q * (1 + overconfidence * q)."""

    name: str
    model: str
    error_sd: float
    bounds_shrink: float
    overconfidence: float
    signal: float


SIMULATED_TRACKERS = (
    SimulatedTracker(DEFAULT_TRACKER, "v2.1.0", 60, 0.7, 0.6, 0.5),
    SimulatedTracker("candidate", "v2.2.0", 45, 0.9, 0.2, 0.6),
    SimulatedTracker("challenger", "v3.0.0-rc1", 80, 0.6, 2.0, 0.4),
    SimulatedTracker("baseline", "v1.9.4", 100, 1.0, 0.0, 0.2),
    SimulatedTracker("experiment", "v3.1.0-dev", 70, 0.8, 0.9, 0.5),
)


def simulate_events(games: Optional[int] = None, *, events: Optional[int] = None,
                    seed: Optional[int] = None, start: Optional[float] = None,
                    latest: Optional[float] = None, mix: str = "game", prefix: str = "sim",
                    trackers: int = 1, days: Optional[float] = None) -> Iterator[dict]:
    """Crash-style games: a random-walk price that crashes at a random tick.

    Plays `games` games, or as many as `events` events need (stopping there), or TED's
    volume (GAMES_A_DAY) over the last `days`. mix="game" gives the tracker's full feed
    (ticks with features, a prediction every 20 ticks, a side bet every 40, start and
    end); mix="predictions" gives one prediction per tick and nothing else. With
    `trackers` K > 1, K trackers (SIMULATED_TRACKERS) predict and bet on the same games,
    each with its own model and its own flaws. Ticks are 250 ms apart and games 5 s apart
    (with `days`, spread evenly); without `start`, the games are placed so that the last
    one ends now. Game ids are SIM-SEED-N: without a seed, a fresh one makes them new.
    With `latest`, games that would end after it are a ValueError.
    """
    if games is None and events is None and days is None:
        raise ValueError("simulate_events needs games, events or days")
    if not 1 <= trackers <= len(SIMULATED_TRACKERS):
        raise ValueError(f"tedstore simulates 1 to {len(SIMULATED_TRACKERS)} trackers")
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    if days is not None:
        games = max(1, round(days * GAMES_A_DAY))
    lengths = random.Random(seed)
    end_ticks, planned = [], 0
    while (games is None or len(end_ticks) < games) and (events is None or planned < events):
        end_ticks.append(20 + int(lengths.expovariate(1 / GAME_LIFETIME_TICKS)))
        ticks = end_ticks[-1] - 1
        planned += ticks if mix == "predictions" else \
            ticks + trackers * (ticks // 20 + ticks // 40) + 2
    slot = 86400 / GAMES_A_DAY if days is not None else None
    length = (len(end_ticks) * slot + end_ticks[-1] * 0.25 - slot if slot else
              sum(end * 0.25 + 5 for end in end_ticks) - 5)
    if start is None:
        start = time.time() - 5 - length             # the last game ended 5 s ago
    if latest is not None and start + length > latest:
        raise ValueError(f"those games would end at {utc_text(start + length)} UTC, after "
                         f"{utc_text(latest)}, and tedstore refuses events from the future "
                         f"(TEDSTORE_MAX_CLOCK_SKEW): start earlier, or play fewer")
    played = _play(end_ticks, seed, start, mix, prefix, SIMULATED_TRACKERS[:trackers], slot)
    return played if events is None else itertools.islice(played, events)


def _play(end_ticks: list[int], seed: int, start: float, mix: str, prefix: str,
          trackers: tuple[SimulatedTracker, ...], slot: Optional[float]) -> Iterator[dict]:
    rng = random.Random(seed + 1)
    named = len(trackers) > 1            # one tracker: the default, named on no line
    clock_ms = int(start * 1000)
    for number, end_tick in enumerate(end_ticks):
        if slot is not None:
            clock_ms = int((start + number * slot) * 1000)
        game_id = f"{prefix}-{seed}-{number}"
        price, peak, peak_tick = 1.0, 1.0, 0
        if mix == "game":
            yield {"event": "gameStart", "gameId": game_id, "tick": 0, "price": 1.0, "ts": clock_ms}
        for tick in range(1, end_tick):
            ts = clock_ms + tick * 250
            if mix == "predictions":
                yield _simulated_prediction(rng, game_id, tick, end_tick, ts, trackers[0], named)
                continue
            price = round(price * math.exp(rng.gauss(0.003, 0.04)), 6)
            if price > peak:
                peak, peak_tick = price, tick
            yield {"event": "priceUpdate", "gameId": game_id, "tick": tick, "price": price,
                   "features": {"volatility_10": round(rng.uniform(0, 0.1), 4),
                                "volatility_40": round(rng.uniform(0, 0.1), 4),
                                "momentum": round(rng.gauss(0, 1), 4),
                                "rsi": round(rng.uniform(0, 100), 2),
                                "volume_ratio": round(rng.uniform(0.5, 2), 3)},
                   "ts": ts}
            for tracker in trackers:
                if tick % 20 == 0:
                    yield _simulated_prediction(rng, game_id, tick, end_tick, ts, tracker, named)
                if tick % 40 == 0:
                    yield _simulated_side_bet(rng, game_id, tick, end_tick, ts, tracker, named)
        clock_ms += end_tick * 250
        if mix == "game":
            yield {"event": "gameEnd", "gameId": game_id, "tick": end_tick,
                   "finalPrice": round(price * rng.uniform(0.01, 0.2), 6), "startTick": 0,
                   "peakPrice": peak, "peakTick": peak_tick,
                   "treasuryRemainder": rng.randint(0, 10_000),
                   "patterns": rng.sample(PATTERN_NAMES, rng.randint(0, 2)), "ts": clock_ms}
        clock_ms += 5000


def _whose(tracker: SimulatedTracker, named: bool) -> dict:
    return {"tracker": tracker.name, "model_version": tracker.model} if named else {}


def _simulated_prediction(rng: random.Random, game_id: str, tick: int, end_tick: int, ts: int,
                          tracker: SimulatedTracker, named: bool) -> dict:
    """A prediction `error_sd` off, with bounds for its confidence, `bounds_shrink` wide."""
    guess = max(tick, end_tick + int(rng.gauss(0, tracker.error_sd)))
    confidence = round(rng.uniform(0.5, 0.95), 3)
    half_width = round(statistics.NormalDist().inv_cdf((1 + confidence) / 2)
                       * tracker.error_sd * tracker.bounds_shrink)
    return {"event": "prediction", "game_id": game_id, "predicted_at_tick": tick,
            "predicted_end_tick": guess, "confidence": confidence,
            "uncertainty_bounds": {"lower": guess - half_width, "upper": guess + half_width},
            "features_used": {"epr_active": rng.random() < 0.3,
                              "peak_ratio": round(rng.uniform(0.5, 1), 3),
                              "volatility": round(rng.uniform(0, 0.1), 4),
                              "momentum": round(rng.gauss(0, 1), 4)},
            "ts": ts, **_whose(tracker, named)}


def _simulated_side_bet(rng: random.Random, game_id: str, tick: int, end_tick: int, ts: int,
                        tracker: SimulatedTracker, named: bool) -> dict:
    """A side bet on the game ending within BET_WINDOW_TICKS: a score that leans towards
    the real outcome gives the calibrated chance q (Bayes, from WINDOW_CHANCE and the
    score's likelihood), and the tracker states q made over-confident. A BET when the
    stated chance makes the bet's expected value (+5 or -1) positive."""
    ends = tick <= end_tick <= tick + BET_WINDOW_TICKS
    signal = tracker.signal
    score = rng.gauss(signal if ends else 0.0, 1.0)
    calibrated = 1 / (1 + math.exp(-(signal * score - signal * signal / 2
                                     + math.log(WINDOW_CHANCE / (1 - WINDOW_CHANCE)))))
    probability = round(min(0.99, calibrated * (1 + tracker.overconfidence * calibrated)), 4)
    expected_value = round(probability * 6 - 1, 4)
    return {"event": "sideBet", "game_id": game_id, "placed_at_tick": tick,
            "probability": probability, "expected_value": expected_value,
            "confidence": round(rng.uniform(0.3, 0.9), 3),
            "recommendation": "BET" if expected_value > 0 else "SKIP", "ts": ts,
            **_whose(tracker, named)}


# ---------------------------------------------------------------------------
# QUERIES: read-only answers over one connection
# ---------------------------------------------------------------------------
# One plain function per question of the read API. Each takes a read-only connection,
# its parameters and the time, and returns the answer as an object whose row arrays
# SQLite has already encoded as JSON (json_group_array, kept as msgspec.Raw). SQLite does
# that work with the GIL released, so a heavy query on the daemon's query threads leaves
# the writer thread free; run_query() encodes the object, and callers in Python decode it.

BOOLEAN_COLUMNS = ("had_predictions", "epr_active")
JSON_COLUMNS = ("patterns_detected", "value")

# The columns of each table (TABLES) and of the game_summary view as rows show them; a
# test checks them against the schema.
COLUMNS = {**{table.name: table.columns for table in TABLES.values()},
           "game_summary": ("game_id", "start_tick", "end_tick", "duration_ticks",
                            "peak_price", "final_price", "patterns_detected", "predictions",
                            "mean_absolute_error", "prediction_accuracy", "side_bets_placed",
                            "side_bets_won", "side_bet_payout", "started_at", "ended_at")}


# The columns that hold times: answers give them as answer_time() does.
TIME_COLUMNS = frozenset({"created_at", "updated_at", "started_at", "ended_at", "resolved_at",
                          "received_at", "ts", "hour_start", "hour_end"})
TIME_AS_ANSWERED = "strftime('%Y-%m-%dT%H:%M:%fZ', {})"


def answer_column(column: str, alias: str = "") -> str:
    """A column (of the table `alias` names, as in "g.") as an answer gives it: booleans
    as true/false, JSON text as JSON, times in RFC 3339."""
    name = alias + column
    if column in BOOLEAN_COLUMNS:
        return f"CASE WHEN {name} IS NULL THEN NULL WHEN {name} THEN json('true') " \
               f"ELSE json('false') END"
    if column in TIME_COLUMNS:
        return TIME_AS_ANSWERED.format(name)
    return f"json({name})" if column in JSON_COLUMNS else name


def row_json(source: str) -> str:
    """json_object() of a row of `source`, each column as answer_column gives it."""
    return "json_object(" + ", ".join(f"'{c}', {answer_column(c)}" for c in COLUMNS[source]) + ")"


def answer_window(params: dict) -> dict:
    """The since and until of an answer: the window a query's parameters hold."""
    return {"since": answer_time(params["since"]), "until": answer_time(params["until"])}


SQL_Q_GAME = f"""
SELECT (SELECT {row_json("games")} FROM games INDEXED BY sqlite_autoindex_games_1
        WHERE game_id = :id),
       (SELECT json_group_array({row_json("predictions")} ORDER BY predicted_at_tick, tracker,
                                model_version)
        FROM predictions INDEXED BY sqlite_autoindex_predictions_1
        WHERE game_id = :id AND {PREDICTIONS_OF.format(t="")}),
       (SELECT json_group_array({row_json("side_bets")} ORDER BY placed_at_tick, tracker)
        FROM side_bets INDEXED BY sqlite_autoindex_side_bets_1
        WHERE game_id = :id AND {SIDE_BETS_OF.format(t="")}),
       (SELECT json_object('samples', count(*), 'first_tick', min(tick), 'last_tick', max(tick))
        FROM tick_samples INDEXED BY sqlite_autoindex_tick_samples_1 WHERE game_id = :id)"""

# A game's summary as the game_summary view has it, of one tracker's (and model's) records
# if asked: each figure one lookup by game_id. The games picked are those ended in the
# window (with the pattern, and with records of that tracker or model, if asked).
_EACH_PREDICTION = (f"FROM predictions AS p INDEXED BY sqlite_autoindex_predictions_1 "
                    f"WHERE p.game_id = g.game_id AND {PREDICTIONS_OF.format(t='p.')}")
_EACH_SIDE_BET = (f"FROM side_bets AS s INDEXED BY sqlite_autoindex_side_bets_1 "
                  f"WHERE s.game_id = g.game_id AND {SIDE_BETS_OF.format(t='s.')}")
_EACH_BET = f"{_EACH_SIDE_BET} AND s.recommendation = 'BET'"
_UNFILTERED = ":tracker IS NULL AND :model IS NULL"
_HAS_RECORDS = (f"({_UNFILTERED} OR EXISTS (SELECT 1 {_EACH_PREDICTION}) "
                f"OR (:model IS NULL AND EXISTS (SELECT 1 {_EACH_SIDE_BET})))")
SQL_Q_GAMES = f"""
SELECT json_group_array(json_object(
         'game_id', g.game_id, 'start_tick', g.start_tick, 'end_tick', g.end_tick,
         'duration_ticks', g.duration_ticks, 'peak_price', g.peak_price,
         'final_price', g.final_price, 'patterns_detected', json(g.patterns_detected),
         'predictions', (SELECT count(*) {_EACH_PREDICTION}),
         'mean_absolute_error', (SELECT avg(abs(p.raw_error)) {_EACH_PREDICTION}),
         'prediction_accuracy', CASE WHEN {_UNFILTERED} THEN g.prediction_accuracy
                                     ELSE (SELECT 100.0 * avg(abs(p.raw_error) <= 40)
                                           {_EACH_PREDICTION}) END,
         'side_bets_placed', CASE WHEN :tracker IS NULL THEN g.side_bets_placed
                                  ELSE (SELECT count(*) {_EACH_BET}) END,
         'side_bets_won', (SELECT count(*) {_EACH_BET} AND s.actual_outcome = 'WON'),
         'side_bet_payout', (SELECT sum(s.payout) {_EACH_BET}),
         'started_at', {answer_column("started_at", "g.")},
         'ended_at', {answer_column("ended_at", "g.")}) ORDER BY g.ended_at DESC, g.game_id)
FROM (SELECT game_id FROM games AS g INDEXED BY games_ended_at
      WHERE ended_at >= :since AND ended_at < :until
        AND (:pattern IS NULL OR EXISTS (SELECT 1 FROM json_each(patterns_detected)
                                         WHERE value = :pattern))
        AND {_HAS_RECORDS}
      ORDER BY ended_at DESC, game_id LIMIT :limit) AS picked
     CROSS JOIN games AS g INDEXED BY sqlite_autoindex_games_1 ON g.game_id = picked.game_id"""

# The hourly rollups of a window: everyone's from metrics_hourly, one tracker's or model's
# from metrics_hourly_by (its rows look the same: the daemon's latency is everyone's).
HOURS = {
    "everyone": "metrics_hourly INDEXED BY sqlite_autoindex_metrics_hourly_1 "
                "WHERE hour_start >= :since AND hour_start < :until",
    "one": "metrics_hourly_by INDEXED BY sqlite_autoindex_metrics_hourly_by_1 "
           "WHERE hour_start >= :since AND hour_start < :until "
           "AND tracker = :tracker AND model_version = :model"}
_HOUR_OF_ONE = {"hour_end": "strftime('%Y-%m-%dT%H:%M:%fZ', hour_start, '+1 hour')",
                "avg_commit_latency_ms": "NULL", "p99_commit_latency_ms": "NULL"}
SQL_Q_METRICS = {
    "everyone": f"SELECT json_group_array({row_json('metrics_hourly')} ORDER BY hour_start) "
                f"FROM {HOURS['everyone']}",
    "one": "SELECT json_group_array(json_object(" + ", ".join(
        f"'{column}', {_HOUR_OF_ONE.get(column, answer_column(column))}"
        for column in COLUMNS["metrics_hourly"]) + f") ORDER BY hour_start) FROM {HOURS['one']}"}

SQL_Q_TRENDS_HOURLY = {source: f"""
SELECT json_group_array(json_object('hour_start', {answer_column("hour_start")},
                                    'predictions_made', predictions_made,
                                    'median_e40', median_e40,
                                    'within_2_windows', within_2_windows,
                                    'roi_percentage', roi_percentage) ORDER BY hour_start)
FROM {hours}""" for source, hours in HOURS.items()}

# A trend: n, mean, the newest value, and the least-squares slope against hour_start in
# days (counted from the window's start, so that the sums stay small and exact enough).
TRENDS = {"e40": "median_e40", "accuracy": "within_2_windows", "sidebet_roi": "roi_percentage"}
SQL_Q_TREND = {(column, source): f"""
SELECT count(*), avg(v),
       (SELECT {column} FROM {hours} AND {column} IS NOT NULL ORDER BY hour_start DESC LIMIT 1),
       CASE WHEN count(*) >= 2 THEN (count(*) * sum(x * v) - sum(x) * sum(v))
                                    / (count(*) * sum(x * x) - sum(x) * sum(x)) END
FROM (SELECT julianday(hour_start) - julianday(:since) AS x, {column} AS v
      FROM {hours} AND {column} IS NOT NULL)"""
               for column in TRENDS.values() for source, hours in HOURS.items()}

# Each game counts once per pattern (its list is made distinct on the way in); the ten
# newest games of a pattern come from walking games_ended_at backwards, not from a sort.
# Asked for one tracker (or model), a game counts if it has its records, with the share of
# its predictions within 40 ticks, worked out once per game (`played`), not once per pattern.
SQL_Q_PATTERNS = f"""
WITH played AS MATERIALIZED (
    SELECT g.game_id, g.patterns_detected, g.duration_ticks,
           CASE WHEN {_UNFILTERED} THEN g.prediction_accuracy
                ELSE (SELECT 100.0 * avg(abs(p.raw_error) <= 40) {_EACH_PREDICTION})
           END AS accuracy
    FROM games AS g INDEXED BY games_ended_at
    WHERE g.ended_at >= :since AND g.ended_at < :until AND g.patterns_detected <> '[]'
      AND {_HAS_RECORDS})
SELECT json_group_array(json_object('pattern', pattern, 'games', games,
                                    'avg_prediction_accuracy', accuracy,
                                    'avg_duration_ticks', duration,
                                    'recent_game_ids', json(recent))
                        ORDER BY games DESC, pattern),
       coalesce(sum(games), 0)
FROM (SELECT tag.value AS pattern, count(*) AS games, avg(played.accuracy) AS accuracy,
             avg(played.duration_ticks) AS duration,
             (SELECT json_group_array(game_id)
              FROM (SELECT g.game_id FROM games AS g INDEXED BY games_ended_at
                    WHERE g.ended_at >= :since AND g.ended_at < :until
                      AND EXISTS (SELECT 1 FROM json_each(g.patterns_detected)
                                  WHERE value = tag.value)
                      AND {_HAS_RECORDS}
                    ORDER BY g.ended_at DESC, g.game_id LIMIT 10)) AS recent
      FROM played,
           json_each((SELECT json_group_array(DISTINCT value)
                      FROM json_each(played.patterns_detected))) AS tag
      GROUP BY tag.value)"""

# The newest n rows of a table (of one tracker's, or model's), oldest first.
SQL_Q_RECENT = {name: f"""
SELECT json_group_array({row_json(name)} ORDER BY created_at, id)
FROM (SELECT * FROM {name} INDEXED BY {TABLES[name].time_index}
      WHERE {kept} ORDER BY created_at DESC, id DESC LIMIT :n)"""
                for name, kept in (("predictions", PREDICTIONS_OF.format(t="")),
                                   ("side_bets", SIDE_BETS_OF.format(t="")),
                                   ("tick_samples", "true"))}

SQL_Q_STATE = "SELECT json(value), updated_at FROM state WHERE tracker = :tracker AND key = :key"

# A refused line is a tracker's if its JSON names it (or names none: the default's).
SQL_Q_REJECTS = f"""
SELECT id, received_at, peer_pid, peer_uid, line_no, code, error, raw
FROM rejects INDEXED BY rejects_received_at
WHERE received_at >= :since AND received_at < :until
  AND (:tracker IS NULL OR coalesce(CASE WHEN json_valid(raw) THEN raw ->> 'tracker' END,
                                    '{DEFAULT_TRACKER}') = :tracker)
ORDER BY received_at DESC, id DESC LIMIT :limit"""

# Who sent what in a window, through the indexes that lead with the tracker: each tracker
# (and each model of a tracker) ever stored is found by one seek from the one before, and
# the window's rows of each are counted in order. Grouping the window's rows instead would
# sort all of them: seconds over a year.
SQL_NEXT_TRACKER = {
    table: f"SELECT min(tracker) FROM {table} INDEXED BY {table}_tracker WHERE tracker > ?1"
    for table in ("predictions", "side_bets")}
SQL_NEXT_MODEL = """
SELECT min(model_version) FROM predictions INDEXED BY predictions_tracker
WHERE tracker = ?1 AND model_version > ?2"""
_PREDICTOR = ("FROM predictions INDEXED BY predictions_tracker WHERE tracker = :tracker "
              "AND model_version = :model AND created_at >= :since AND created_at < :until")
_BETTOR = ("FROM side_bets INDEXED BY side_bets_tracker WHERE tracker = :tracker "
           "AND created_at >= :since AND created_at < :until")
# Apart, min and max are one seek each; together with count(*) they would be read per row.
SQL_Q_PREDICTOR, SQL_Q_BETTOR = (
    f"SELECT (SELECT count(*) {rows}), (SELECT min(created_at) {rows}), "
    f"(SELECT max(created_at) {rows})" for rows in (_PREDICTOR, _BETTOR))

# Forecast evaluation. A forecast in [0, 1] falls in bin k of `bins` equal parts when
# k/bins <= it < (k+1)/bins (the last part closed); the 1e-9 puts a forecast written on an
# edge (0.57 is 0.56999... as a float) in the part it opens. SQLite sums the window's
# records per forecast value (from the daily histograms over a long window), then per bin;
# the scores follow from the bins in Python.
_BIN = "min(CAST(v * :bins + 1e-9 AS INTEGER), :bins - 1)"
SQL_Q_CALIBRATION_BETS = f"""
SELECT {_BIN} AS bin, sum(n), total(v * n), sum(won), total(sq), total(ev), sum(pay)
FROM ({PROBABILITIES.per_value()})
WHERE v >= 0 GROUP BY bin ORDER BY bin"""
SQL_Q_CALIBRATION_INTERVALS = f"""
SELECT {_BIN} AS bin, sum(n), total(v * n), sum(covered), total(width)
FROM ({CONFIDENCES.per_value()})
WHERE v >= 0 GROUP BY bin ORDER BY bin"""

# The resolved BETs of a window in the order they were resolved: the bankroll's history.
SQL_Q_BANKROLL = f"""
SELECT resolved_at, payout, actual_outcome = 'LOST'
FROM side_bets INDEXED BY side_bets_created_at
WHERE created_at >= :since AND created_at < :until AND recommendation = 'BET'
  AND actual_outcome <> 'PENDING' AND {SIDE_BETS_OF.format(t="")}
ORDER BY resolved_at, game_id, placed_at_tick, tracker"""

# What the report adds to the queries: the games whose predictions made in the window
# have the largest mean absolute error, the daily rollups, each day's worst hourly p99,
# and the rejects by code.
WORST_GAME_MIN_PREDICTIONS = 3     # fewer say little about a model: such games are not ranked
SQL_Q_WORST_GAMES = f"""
SELECT g.game_id, g.ended_at, p.predictions, p.mae,
       CASE WHEN {_UNFILTERED} THEN g.prediction_accuracy ELSE p.accuracy END,
       g.patterns_detected
FROM (SELECT game_id, count(*) AS predictions, avg(abs(raw_error)) AS mae,
             100.0 * avg(abs(raw_error) <= 40) AS accuracy
      FROM predictions INDEXED BY predictions_created_at
      WHERE created_at >= :since AND created_at < :until AND raw_error IS NOT NULL
        AND {PREDICTIONS_OF.format(t="")}
      GROUP BY game_id HAVING count(*) >= {WORST_GAME_MIN_PREDICTIONS}
      ORDER BY mae DESC, game_id LIMIT 10) AS p
     CROSS JOIN games AS g INDEXED BY sqlite_autoindex_games_1 ON g.game_id = p.game_id
ORDER BY p.mae DESC, g.game_id"""
SQL_Q_DAYS = f"""
SELECT {", ".join(COLUMNS["metrics_daily"])}
FROM metrics_daily INDEXED BY sqlite_autoindex_metrics_daily_1
WHERE day >= substr(:since, 1, 10) AND day < substr(:until, 1, 10)"""
SQL_Q_DAILY_P99 = """
SELECT substr(hour_start, 1, 10), max(p99_commit_latency_ms)
FROM metrics_hourly INDEXED BY sqlite_autoindex_metrics_hourly_1
WHERE hour_start >= :since AND hour_start < :until GROUP BY 1"""
# With one max() aggregate, SQLite takes the bare columns from the row holding the max:
# each code's newest refusal. Refused lines are the daemon's: no tracker narrows them.
SQL_Q_REJECT_CODES = """
SELECT code, count(*), max(received_at), error, substr(raw, 1, 120)
FROM rejects INDEXED BY rejects_received_at
WHERE received_at >= :since AND received_at < :until GROUP BY code ORDER BY 2 DESC, code"""

Days = Annotated[float, Meta(gt=0, le=3660)]
Hours = Annotated[float, Meta(gt=0, le=3660 * 24)]
Rows = Annotated[int, Meta(ge=1, le=MAX_ROWS)]
When = Union[float, Annotated[str, Meta(max_length=64)]]


class Window(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A time window [since, until): the last `hours` or `days` up to now, or explicit
    `since`/`until` (ISO-8601 in UTC, a span such as 48h, or Unix seconds). Without any,
    the last DEFAULT_HOURS of each query's own parameters (its subclass); None means all
    time, from the first row to the last. `tracker` narrows the answer to one tracker's
    records (all trackers' without it)."""

    DEFAULT_HOURS: ClassVar[Optional[float]] = 24

    hours: Optional[Hours] = None
    days: Optional[Days] = None
    since: Optional[When] = None
    until: Optional[When] = None
    tracker: Optional[TrackerName] = None

    def bounds(self, now: float) -> tuple[float, float]:
        if (self.hours or self.days) and (self.since is not None or self.until is not None) \
                or (self.hours and self.days):
            raise QueryRejected("give the window as hours, days, or since/until: one of them")
        span = self.hours or (self.days or 0) * 24 or self.DEFAULT_HOURS
        if self.until is not None:
            until = _moment(self.until, now, "until")
        else:
            until = now if span or self.hours or self.days else MAX_EPOCH
        if self.since is not None:
            since = _moment(self.since, now, "since")
        else:
            since = until - span * 3600 if span else 0.0
        if since >= until:
            raise QueryRejected(f"since ({utc_text(since)}) is not before until "
                                f"({utc_text(until)})")
        return since, until

    def params(self, now: float) -> dict:
        """The named parameters of a query's SQL: the window's bounds as UTC text, and its
        filters (a model too, where the query has one)."""
        since, until = self.bounds(now)
        return {"since": utc_text(since), "until": utc_text(until), "tracker": self.tracker,
                "model": getattr(self, "model", None)}

    def described(self) -> str:
        """The default window in words, for --help."""
        if self.DEFAULT_HOURS is None:
            return "all time"
        days = self.DEFAULT_HOURS / 24
        return f"the last {days:g} days" if days >= 2 else f"the last {self.DEFAULT_HOURS:g} hours"


def _moment(value: When, now: float, name: str) -> float:
    try:
        moment = parse_when(value, now) if isinstance(value, str) else value
    except ConfigError:
        raise QueryRejected(f"{name} {value!r} is not a time: use ISO-8601 (2026-11-20, "
                            f"2026-11-20T08:00) or a span (48h, 7d)") from None
    if not 0 <= moment <= MAX_EPOCH:
        raise QueryRejected(f"{name} {value!r} is not a time between 1970 and 9999")
    return moment


class ModelWindow(Window, kw_only=True):
    """A window over predictions: `model` narrows them to one model_version."""
    model: Optional[ModelVersion] = None


class GameArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: Text
    tracker: Optional[TrackerName] = None
    model: Optional[ModelVersion] = None


class GamesArgs(ModelWindow, kw_only=True):
    limit: Rows = 50
    pattern: Optional[Annotated[str, Meta(min_length=1, max_length=128)]] = None


class PerformanceArgs(ModelWindow, kw_only=True):
    type: Literal["all", "predictions", "sidebets"] = "all"
    by: Optional[Literal["tracker", "model"]] = None


class WeekArgs(ModelWindow, kw_only=True):
    """A window of a week unless given: trends, patterns and the report look further back."""
    DEFAULT_HOURS: ClassVar[Optional[float]] = 7 * 24


class CalibrationArgs(WeekArgs, kw_only=True):
    bins: Annotated[int, Meta(ge=1, le=100)] = 10


class BankrollArgs(Window, kw_only=True):
    """A week of BETs unless given (side bets have no model)."""
    DEFAULT_HOURS: ClassVar[Optional[float]] = 7 * 24


class EverythingArgs(Window, kw_only=True):
    """A window over all time unless given: what export writes."""
    DEFAULT_HOURS: ClassVar[Optional[float]] = None


class RecentArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The newest n predictions (of a tracker, of a model): a tracker's buffer of them."""
    n: Rows = 200
    tracker: Optional[TrackerName] = None
    model: Optional[ModelVersion] = None


class RecentSideBetsArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The newest n side bets (of a tracker): a tracker's buffer of them."""
    n: Rows = 200
    tracker: Optional[TrackerName] = None


class RecentTicksArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The newest n tick samples: a tracker's buffer of ticks. Ticks are the feed's, the
    same whichever tracker asks, so `tracker` is taken (as by every query) and changes
    nothing."""
    n: Rows = 1200
    tracker: Optional[TrackerName] = None


class StateArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A state key is a tracker's own: the default tracker's unless one is named."""
    key: Text
    tracker: TrackerName = DEFAULT_TRACKER


class RejectsArgs(Window, kw_only=True):
    limit: Rows = 100


def _period(since: float, until: float) -> dict:
    return {"since": utc_text(since), "until": utc_text(until)}


def _raw(text: str) -> msgspec.Raw:
    """JSON that SQLite built, passed on as it is."""
    return msgspec.Raw(text.encode())


def q_game(conn: apsw.Connection, args: GameArgs, now: float) -> dict:
    """A game with its predictions, side bets and tick samples."""
    game, predictions, side_bets, ticks = conn.execute(SQL_Q_GAME, msgspec.structs.asdict(args)
                                                       ).fetchone()
    if game is None:
        raise QueryRejected(f"no game {args.id!r}")
    return {"game": _raw(game), "predictions": _raw(predictions), "side_bets": _raw(side_bets),
            "ticks": _raw(ticks)}


def q_games(conn: apsw.Connection, args: GamesArgs, now: float) -> dict:
    """Games ended in the window, newest first, summed up as the game_summary view does."""
    params = args.params(now)
    games = conn.execute(SQL_Q_GAMES, params | {"limit": args.limit, "pattern": args.pattern}).get
    return {**answer_window(params), "games": _raw(games)}


def _hours_of(params: dict) -> tuple[str, dict]:
    """Which hourly rollup answers: everyone's, or one tracker's or model's ('*': all)."""
    if params["tracker"] is None and params["model"] is None:
        return "everyone", params
    return "one", params | {"tracker": params["tracker"] or ALL, "model": params["model"] or ALL}


def q_metrics(conn: apsw.Connection, args: ModelWindow, now: float) -> dict:
    """The hourly rollups of the window, oldest first."""
    source, params = _hours_of(args.params(now))
    hours = conn.execute(SQL_Q_METRICS[source], params).get
    return {**answer_window(params), "hours": _raw(hours)}


def _as_answer(m: Measures) -> tuple[dict, dict]:
    """The measures as performance names them: (prediction metrics, side-bet metrics)."""
    return ({"predictions_made": m.predictions_made, "resolved": m.predictions_resolved,
             "median_e40": m.median_e40, "mean_absolute_error": m.mean_absolute_error,
             "within_1_window": m.within_1_window, "within_2_windows": m.within_2_windows,
             "within_3_windows": m.within_3_windows},
            {"recommended": m.bets, "positive_ev": m.positive_ev, "bets_won": m.bets_won,
             "bets_lost": m.bets_lost, "pending": m.bets_pending, "total_ev": m.total_ev,
             "roi_percentage": m.roi_percentage})


def q_performance(conn: apsw.Connection, args: PerformanceArgs, now: float) -> dict:
    """The rollup's measures over the whole window (the same statement computes both);
    with `by`, one group per tracker or per model in the window."""
    params = args.params(now)
    since, until = args.bounds(now)
    answer = {**answer_window(params),
              "period_hours": (until - since) / 3600}
    if args.by is None:
        m = measure(conn, params["since"], params["until"], args.tracker, args.model)
        predictions, side_bets = _as_answer(m)
        return {**answer, "games_analyzed": m.games_analyzed,
                "prediction_metrics": predictions if args.type != "sidebets" else None,
                "sidebet_metrics": side_bets if args.type != "predictions" else None}
    groups = []
    for row in who_sent_what(conn, params):
        names = [row["tracker"]] if args.by == "tracker" else row["models"]
        for name in names:
            if args.by == "model" and any(g["model_version"] == name for g in groups):
                continue                           # a model shared by trackers: once
            m = measure(conn, params["since"], params["until"],
                        row["tracker"] if args.by == "tracker" else args.tracker,
                        args.model if args.by == "tracker" else name)
            predictions, side_bets = _as_answer(m)
            groups.append({("tracker" if args.by == "tracker" else "model_version"): name,
                           "prediction_metrics": predictions if args.type != "sidebets" else None,
                           "sidebet_metrics": (side_bets if args.by == "tracker"
                                               and args.type != "predictions" else None)})
    key = "tracker" if args.by == "tracker" else "model_version"
    return {**answer, "by": args.by, "groups": sorted(groups, key=lambda g: g[key])}


def q_trends(conn: apsw.Connection, args: WeekArgs, now: float) -> dict:
    """Hourly e40, accuracy and ROI over the last days, and where each is heading."""
    since, until = args.bounds(now)
    source, params = _hours_of(args.params(now))
    trends = {}
    for name, column in TRENDS.items():
        n, mean, last, slope = conn.execute(SQL_Q_TREND[column, source], params).fetchone()
        trends[name] = {"column": column, "n": n, "mean": mean, "last": last,
                        "slope_per_day": slope}
    hourly = conn.execute(SQL_Q_TRENDS_HOURLY[source], params).get
    return {**answer_window(params),
            "period_days": (until - since) / 86400, "hourly": _raw(hourly),
            "trends": trends}


def q_patterns(conn: apsw.Connection, args: WeekArgs, now: float) -> dict:
    """The patterns of the games ended in the window (7 days), most games first."""
    params = args.params(now)
    patterns, total = conn.execute(SQL_Q_PATTERNS, params).fetchone()
    return {**answer_window(params),
            "total_patterns_detected": total, "patterns": _raw(patterns)}


def q_recent(table: str) -> Callable[[apsw.Connection, Any, float], dict]:
    def recent(conn: apsw.Connection, args: Any, now: float) -> dict:
        """The newest n rows, oldest first: what a tracker refills its buffers with."""
        params = {"tracker": None, "model": None, **msgspec.structs.asdict(args)}
        return {"rows": _raw(conn.execute(SQL_Q_RECENT[table], params).get)}
    return recent


def q_state(conn: apsw.Connection, args: StateArgs, now: float) -> dict:
    """A tracker's saved state under `key`."""
    row = conn.execute(SQL_Q_STATE, msgspec.structs.asdict(args)).fetchone()
    return {"key": args.key, "found": row is not None,
            "value": _raw(row[0]) if row else None,
            "updated_at": answer_time(row[1]) if row else None}


def q_rejects(conn: apsw.Connection, args: RejectsArgs, now: float) -> dict:
    """Refused lines of the window, newest first, with their raw text. Raw lines may be
    bytes, so the rows are built here, each encoded as it comes and counted against the
    connection's length limit (the answer limit on the query threads), as SQLite counts
    the JSON it builds for other answers."""
    params = args.params(now)
    budget, size, rows = conn.limit(apsw.SQLITE_LIMIT_LENGTH), 2, []
    for row in conn.execute(SQL_Q_REJECTS, params | {"limit": args.limit}):
        row = dict(zip(COLUMNS["rejects"], row))
        if isinstance(row["raw"], bytes):
            row["raw"] = row["raw"].decode("utf-8", "replace")
        row["received_at"] = answer_time(row["received_at"])
        rows.append(msgspec.json.encode(row))
        size += len(rows[-1]) + 1
        if size > budget:
            rows.clear()
            raise apsw.TooBigError("the answer is longer than the length limit")
    return {**answer_window(params),
            "rejects": msgspec.Raw(b"[" + b",".join(rows) + b"]")}


def _trackers_of(table: str, conn: apsw.Connection, wanted: Optional[str]) -> Iterator[str]:
    """The trackers with rows in `table` (only `wanted`, if given), by name."""
    if wanted is not None:
        yield wanted
        return
    name = ""
    while (name := conn.execute(SQL_NEXT_TRACKER[table], (name,)).get) is not None:
        yield name


def who_sent_what(conn: apsw.Connection, params: dict) -> list[dict]:
    """Each tracker with records in the window: its models, how many predictions and side
    bets it sent, and when it was first and last seen, by name."""
    found: dict[str, dict] = {}

    def tracker(name: str) -> dict:
        return found.setdefault(name, {"tracker": name, "models": [], "predictions": 0,
                                       "side_bets": 0, "first_seen": None, "last_seen": None})

    def seen(row: dict, first: str, last: str) -> None:
        row["first_seen"] = min(filter(None, (row["first_seen"], first)))
        row["last_seen"] = max(filter(None, (row["last_seen"], last)))

    for name in _trackers_of("predictions", conn, params["tracker"]):
        model = ""
        while (model := conn.execute(SQL_NEXT_MODEL, (name, model)).get) is not None:
            count, first, last = conn.execute(
                SQL_Q_PREDICTOR, {**params, "tracker": name, "model": model}).fetchone()
            if count:
                row = tracker(name)
                row["models"].append(model)
                row["predictions"] += count
                seen(row, first, last)
    for name in _trackers_of("side_bets", conn, params["tracker"]):
        count, first, last = conn.execute(SQL_Q_BETTOR, {**params, "tracker": name}).fetchone()
        if count:
            row = tracker(name)
            row["side_bets"] = count
            seen(row, first, last)
    for row in found.values():
        row["models"].sort()
    return [found[name] for name in sorted(found)]


def q_trackers(conn: apsw.Connection, args: Window, now: float) -> dict:
    """The trackers that sent predictions or side bets in the window."""
    params = args.params(now)
    return {**answer_window(params),
            "trackers": [{**row, "first_seen": answer_time(row["first_seen"]),
                          "last_seen": answer_time(row["last_seen"])}
                         for row in who_sent_what(conn, params)]}


def q_calibration(conn: apsw.Connection, args: CalibrationArgs, now: float) -> dict:
    """Are the side bets' probabilities honest (the Brier score and Murphy's decomposition
    of it, per bin), and do the predictions' bounds cover the end as often as their
    confidence says?"""
    params = {**args.params(now), "bins": args.bins}
    width = 100 / args.bins
    bets = conn.execute(SQL_Q_CALIBRATION_BETS, params | histogram_cover(
        conn, params["since"], params["until"], "side_bets")).fetchall()
    n = sum(row[1] for row in bets)
    side_bets: dict[str, Any] = dict.fromkeys(
        ("n", "base_rate", "brier", "reliability", "resolution", "uncertainty"))
    side_bets.update(n=n, bins=[], expected_value={"stated": None, "realized": None})
    if n:
        rate = sum(row[3] for row in bets) / n
        side_bets.update(
            base_rate=100 * rate, brier=sum(row[4] for row in bets) / n,
            reliability=sum(count * (p / count - won / count) ** 2
                            for _, count, p, won, *_ in bets) / n,
            resolution=sum(count * (won / count - rate) ** 2 for _, count, _, won, *_ in bets) / n,
            uncertainty=rate * (1 - rate),
            bins=[{"lower": k * width, "upper": (k + 1) * width, "n": count,
                   "mean_probability": 100 * p / count, "observed_rate": 100 * won / count}
                  for k, count, p, won, *_ in bets])
        stated = [row[5] for row in bets if row[6] is not None]
        if stated:
            side_bets["expected_value"] = {"stated": sum(stated), "realized": sum(
                row[6] for row in bets if row[6] is not None)}
    spans = conn.execute(SQL_Q_CALIBRATION_INTERVALS, params | histogram_cover(
        conn, params["since"], params["until"], "predictions")).fetchall()
    m = sum(row[1] for row in spans)
    intervals: dict[str, Any] = {"n": m, "coverage": None, "mean_confidence": None,
                                 "mean_width_ticks": None, "bins": []}
    if m:
        intervals.update(
            coverage=100 * sum(row[3] for row in spans) / m,
            mean_confidence=100 * sum(row[2] for row in spans) / m,
            mean_width_ticks=sum(row[4] for row in spans) / m,
            bins=[{"lower": k * width, "upper": (k + 1) * width, "n": count,
                   "mean_confidence": 100 * confidence / count, "coverage": 100 * covered / count}
                  for k, count, confidence, covered, _ in spans])
    return {**answer_window(params), "side_bets": side_bets,
            "intervals": intervals}


def q_bankroll(conn: apsw.Connection, args: BankrollArgs, now: float) -> dict:
    """A unit stake on every resolved BET of the window, in the order they were resolved:
    what the bankroll went through (its curve, its worst fall, its longest losing run)."""
    params = args.params(now)
    since, until = args.bounds(now)
    bucket = 13 if until - since <= 3 * 86400 else 10      # an hour's text, or a day's
    pnl = peak = 0.0
    peak_at: Optional[str] = params["since"]               # before the first bet: the start
    payouts: list[float] = []
    won = lost = streak = longest = 0
    fall, fall_from, fall_to = 0.0, None, None
    curve: dict[str, float] = {}
    for resolved_at, payout, was_lost in conn.execute(SQL_Q_BANKROLL, params):
        payouts.append(payout)
        pnl += payout
        lost, won = lost + was_lost, won + (not was_lost)
        streak = streak + 1 if was_lost else 0
        longest = max(longest, streak)
        if pnl >= peak:
            peak, peak_at = pnl, resolved_at
        elif peak - pnl > fall:
            fall, fall_from, fall_to = peak - pnl, peak_at, resolved_at
        curve[resolved_at[:bucket]] = pnl
    bets = len(payouts)
    mean = pnl / bets if bets else None
    stdev = (math.sqrt(sum((payout - mean) ** 2 for payout in payouts) / (bets - 1))
             if bets >= 2 else None)
    start = {13: ":00:00.000", 10: " 00:00:00.000"}[bucket]
    return {**answer_window(params), "bets": bets, "won": won,
            "lost": lost, "pnl": pnl, "roi_percentage": 100 * mean if bets else None,
            "mean_payout": mean, "stdev_payout": stdev,
            "sharpe_per_bet": mean / stdev if stdev else None,
            "max_drawdown": fall, "max_drawdown_from": answer_time(fall_from),
            "max_drawdown_to": answer_time(fall_to), "longest_losing_streak": longest,
            "curve": [{"t": answer_time(t + start), "pnl": value} for t, value in curve.items()]}


class Query(NamedTuple):
    args: type
    compute: Callable[[apsw.Connection, Any, float], dict]


QUERIES = {
    "game": Query(GameArgs, q_game),
    "games": Query(GamesArgs, q_games),
    "metrics": Query(ModelWindow, q_metrics),
    "performance": Query(PerformanceArgs, q_performance),
    "trends": Query(WeekArgs, q_trends),
    "patterns": Query(WeekArgs, q_patterns),
    "recent_predictions": Query(RecentArgs, q_recent("predictions")),
    "recent_side_bets": Query(RecentSideBetsArgs, q_recent("side_bets")),
    "recent_ticks": Query(RecentTicksArgs, q_recent("tick_samples")),
    "state": Query(StateArgs, q_state),
    "rejects": Query(RejectsArgs, q_rejects),
    "trackers": Query(Window, q_trackers),
    "calibration": Query(CalibrationArgs, q_calibration),
    "bankroll": Query(BankrollArgs, q_bankroll),
}


def query_args(name: Any, params: dict) -> tuple[str, Any]:
    """A query's name and its parameters as its struct; QueryRejected (bad_query) for an
    unknown name or a bad parameter."""
    if not isinstance(name, str):
        raise QueryRejected('a query line names its query: {"op":"query","q":"games"}')
    query = QUERIES.get(name)
    if query is None:
        raise QueryRejected(f"unknown query {name[:64]!r}; known: {', '.join(QUERIES)}")
    try:
        return name, msgspec.convert(params, query.args, strict=False)
    except msgspec.ValidationError as exc:
        problem = re.sub(r" - at `\$\.(\w+)`", r" (parameter \1)", str(exc))
        problem = problem.replace("Object contains unknown field", "unknown parameter")
        problem = problem.replace("Object missing required field", "missing parameter")
        raise QueryRejected(f"{name}: {problem}") from None


def read_query_line(line: bytes) -> tuple[str, Any]:
    """The query a {"op":"query","q":NAME,...} line asks, checked: (name, parameters)."""
    try:
        request = msgspec.json.decode(line)
    except (msgspec.MsgspecError, RecursionError, ValueError) as exc:
        raise QueryRejected(f"cannot read this query: {exc}") from None
    request.pop("op", None)
    return query_args(request.pop("q", None), request)


def run_query(conn: apsw.Connection, name: str, args: Any, now: float) -> bytes:
    """The answer to a checked query (query_args) as JSON, from one consistent snapshot."""
    with store_errors(f"the {name} query failed"), transaction(conn, "DEFERRED"):
        return msgspec.json.encode(QUERIES[name].compute(conn, args, now))


def run_query_within_limits(conn: apsw.Connection, name: str, args: Any,
                         max_bytes: Optional[int] = None) -> bytes:
    """run_query for the socket: QUERY_SECONDS of work and QUERY_MAX_BYTES of answer at
    most (or max_bytes, while clients leave many answers unread), both enforced while the
    answer is built (QueryRejected beyond)."""
    max_bytes = QUERY_MAX_BYTES if max_bytes is None else max_bytes
    limit = threading.Timer(QUERY_SECONDS, conn.interrupt)   # no callback per step
    conn.limit(apsw.SQLITE_LIMIT_LENGTH, max_bytes)
    limit.start()
    try:
        result = run_query(conn, name, args, time.time())
    except StoreError as exc:
        if isinstance(exc.orig, apsw.InterruptError):
            raise QueryRejected(f"{name} took more than {QUERY_SECONDS:g} s: narrow its "
                                f"window or lower its limit") from None
        if isinstance(exc.orig, apsw.TooBigError):
            raise _too_big(name, max_bytes) from None
        raise
    finally:
        limit.cancel()
    if len(result) > max_bytes:
        raise _too_big(name, max_bytes)
    return result


def _too_big(name: str, max_bytes: int) -> QueryRejected:
    if max_bytes == QUERY_MAX_BYTES:
        return QueryRejected(f"the answer to {name} is more than {max_bytes // 2**20} MiB: "
                             f"narrow its window or lower its limit")
    return QueryRejected(f"the answer to {name} is more than {max_bytes // 2**20} MiB, the "
                         f"most tedstore builds while clients leave "
                         f"{ANSWER_BYTES_TOTAL // 2**20} MiB of answers unread: ask again later")


HOURLY_UP_TO_DAYS = 3                # longer reports are bucketed by day


def report_data(path: str, since: float, until: float, now: float,
                tracker: Optional[str] = None, model: Optional[str] = None,
                live_latency: Optional[dict[str, float]] = None) -> dict:
    """Everything the report shows over [since, until), of one tracker's (and model's)
    records if asked: the performance, patterns, metrics, calibration and bankroll queries,
    per hour or day the same measures, and each tracker's and model's performance side by
    side. Its three heavy parts run at once on three read-only connections, which more than
    halves a year's time; each part reads one snapshot, so on a live database the parts may
    be a commit apart."""
    window = {"since": since, "until": until, "tracker": tracker, "model": model}
    params = WeekArgs(**window).params(now)

    def tables(conn: apsw.Connection) -> tuple[dict, list[dict], dict]:
        with transaction(conn, "DEFERRED"):
            patterns = q_patterns(conn, WeekArgs(**window), now)
            worst = [dict(zip(("game_id", "ended_at", "predictions", "mean_absolute_error",
                               "prediction_accuracy", "patterns_detected"), row))
                     for row in conn.execute(SQL_Q_WORST_GAMES, params)]
            senders = who_sent_what(conn, params)        # side by side only if several
            several = {"tracker": len(senders) > 1,
                       "model": len({m for row in senders for m in row["models"]}) > 1}
            by = {key: q_performance(conn, PerformanceArgs(**window, by=key), now)["groups"]
                  if several[key] else [] for key in ("tracker", "model")}
        return msgspec.json.decode(msgspec.json.encode(patterns)), worst, by

    def forecasts(conn: apsw.Connection) -> dict:
        with transaction(conn, "DEFERRED"):
            return {"calibration": q_calibration(conn, CalibrationArgs(**window), now),
                    "bankroll": q_bankroll(conn, BankrollArgs(since=since, until=until,
                                                              tracker=tracker), now)}

    hourly = until - since <= HOURLY_UP_TO_DAYS * 86400
    with (store_errors("cannot read the report's data"),
          contextlib.closing(connect(path, readonly=True)) as conn,
          contextlib.closing(connect(path, readonly=True)) as second,
          contextlib.closing(connect(path, readonly=True)) as third,
          ThreadPoolExecutor(2) as pool):
        parts = pool.submit(tables, second), pool.submit(forecasts, third)
        with transaction(conn, "DEFERRED"):
            performance = q_performance(conn, PerformanceArgs(**window), now)
            buckets = _buckets(conn, since, until, 3600 if hourly else 86400, tracker, model,
                               live_latency)
            codes = [dict(zip(("code", "lines", "newest_at", "newest_error", "newest_raw"), row))
                     for row in conn.execute(SQL_Q_REJECT_CODES, params)]
        (patterns, worst, by), answers = (part.result() for part in parts)
    for game in worst:
        game["patterns_detected"] = json.loads(game["patterns_detected"])
    for code in codes:
        if isinstance(code["newest_raw"], bytes):
            code["newest_raw"] = code["newest_raw"].decode("utf-8", "replace")
    return {**_period(since, until), "generated_at": utc_text(now), "version": __version__,
            "tracker": tracker, "model": model, "bucket": "hour" if hourly else "day",
            "buckets": buckets, "performance": performance, "patterns": patterns,
            "worst_games": worst, "rejects_by_code": codes, "trackers": by["tracker"],
            "models": by["model"], **answers}


def _buckets(conn: apsw.Connection, since: float, until: float, period: int,
             tracker: Optional[str] = None, model: Optional[str] = None,
             live_latency: Optional[dict[str, float]] = None) -> list[dict]:
    """The window cut at each hour or day, with the measures the charts draw (CHARTS) for
    each piece: read from the hourly or daily rollups (one tracker's or model's hours from
    metrics_hourly_by; its days measured now), or measured now for a piece not rolled up
    (yet) or cut short by the window's ends, so that the pieces add up to the whole. The
    commit latency is the daemon's, everyone's: rolled up, or `live_latency` (the hours a
    running daemon has measured, by their start) for the hours not rolled up yet."""
    boundaries = range(int(-(-since // period) * period), int(-(-until // period) * period), period)
    starts = sorted({since, *boundaries} - {until})
    params = ModelWindow(since=since, until=until, tracker=tracker, model=model).params(0)
    source, hours = _hours_of(params)
    rolled: dict[str, dict] = {}
    latency: dict[str, Optional[float]] = {}       # per hour, or the worst hour of each day
    if period == 3600:
        for row in msgspec.json.decode(conn.execute(SQL_Q_METRICS["everyone"], params).get):
            latency[stored_time(row["hour_start"])] = row[LATENCY]
        for row in msgspec.json.decode(conn.execute(SQL_Q_METRICS[source], hours).get):
            rolled[stored_time(row["hour_start"])] = from_rollup("metrics_hourly", row)
    else:
        latency = {day + " 00:00:00.000": p99
                   for day, p99 in conn.execute(SQL_Q_DAILY_P99, params)}
        for row in conn.execute(SQL_Q_DAYS, params) if source == "everyone" else ():
            day = dict(zip(COLUMNS["metrics_daily"], row))
            rolled[day["day"] + " 00:00:00.000"] = from_rollup("metrics_daily", day)
    for hour, p99 in (live_latency or {}).items():          # measured, not rolled up yet
        key = hour[:10] + " 00:00:00.000" if period == 86400 else hour
        if p99 is not None and (latency.get(key) is None
                                or (period == 86400 and p99 > latency[key])):
            latency[key] = p99
    buckets = []
    for start, end in zip(starts, starts[1:] + [until]):
        row = rolled.get(utc_text(start))
        if row is None or end - start < period:          # not rolled up, or cut by the window
            row = msgspec.structs.asdict(measure(conn, utc_text(start), utc_text(end),
                                                 tracker, model))
        row[LATENCY] = latency.get(utc_text(start // period * period) if period == 86400
                                   else utc_text(start))
        buckets.append({"start": utc_text(start), "end": utc_text(end),
                        **{key: row.get(key) for key in CHARTED}})
    return buckets


def rows_as_dicts(cursor: apsw.Cursor) -> list[dict]:
    """The rows of a just-executed query as dicts (apsw describes only a running statement)."""
    try:
        names = [d[0] for d in cursor.get_description()]
    except apsw.ExecutionCompleteError:
        return []                                # the query returned no rows
    return [dict(zip(names, row)) for row in cursor]


READER_IDLE_CONNECTIONS = 8          # connections a Reader keeps open between calls


class _DaemonLink:
    """One connection of a Reader to the daemon, used by one call at a time."""

    def __init__(self, path: str, timeout: float):
        self.sock = connect_socket(path, timeout)
        self.replies = Replies(path)
        self.line = 0

    def ask(self, request: dict) -> dict:
        """Send one control line and wait for its answer (acks may come in between)."""
        self.sock.sendall(msgspec.json.encode(request) + b"\n")
        self.line += 1
        while True:
            reply = self.replies.next(self.sock)
            if request["op"] == "status" and "status" in reply:
                return reply["status"]
            if reply.get("line") == self.line and "result" in reply:
                return reply["result"]
            if reply.get("rejected") == self.line:
                raise QueryRejected(str(reply.get("error")))

    def close(self) -> None:
        self.sock.close()


class Reader:
    """The read API for trackers and people: by default it asks the daemon over its socket
    (socket activation starts the daemon if needed); with db_path it reads the file.

    One Reader may be shared by the threads of a web server: each call borrows a
    connection of its own (opened on demand, READER_IDLE_CONNECTIONS kept between calls),
    so a call never sees another call's answer and a slow call never holds up the others.
    """

    def __init__(self, socket_path: Optional[str] = None, *, db_path: Optional[str] = None,
                 tracker: Optional[str] = None, timeout: float = 30.0):
        settings = load_settings(socket=socket_path, tracker=tracker)
        self.db_path = db_path
        self.socket_path = None if db_path else settings.socket
        self.tracker = settings.tracker      # whose buffers and state the warm start reads
        self.timeout = timeout
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        if db_path is not None:
            self._idle.append(connect(db_path, readonly=True))   # a missing file says so now

    def ask(self, name: str, **params: Any) -> Any:
        """The answer to query `name` as Python objects; QueryRejected if it has none."""
        params = {key: value for key, value in params.items() if value is not None}
        name, args = query_args(name, params)          # a bad query fails here, at once
        if self.db_path is not None:
            return msgspec.json.decode(self._call(
                lambda conn: run_query(conn, name, args, time.time())))
        return self._call(lambda link: link.ask({"op": "query", "q": name, **params}))

    def status(self) -> dict:
        """The daemon's status: the TED status object (`enabled`, `repository`, `manager`)
        and tedstore's own fields, as `tedstore status --json` shows them."""
        if self.db_path is None:
            return self._call(lambda link: link.ask({"op": "status"}))
        running = serving(self.db_path)
        if running is not None and running[1]:
            return request(running[1], "status", self.timeout)["status"]
        return {"enabled": True, "running": False,
                "repository": {"enabled": True, "last_save": None, "records_saved": 0,
                               "errors": 0},
                "manager": {"enabled": True, "running": False, "persist_interval": None},
                "database": database_facts(self.db_path)}

    def _call(self, use: Callable[[Any], Any]) -> Any:
        """use(a connection for this call alone); if an idle one turns out closed meanwhile
        (the daemon restarted, or closed it as idle), once more on a fresh one."""
        with self._lock:
            link = self._idle.pop() if self._idle else None
        if link is not None:
            try:
                return self._use(link, use)
            except (ProtocolError, ConnectionError):
                pass
        return self._use(connect(self.db_path, readonly=True) if self.db_path is not None
                         else _DaemonLink(self.socket_path, self.timeout), use)

    def _use(self, link: Any, use: Callable[[Any], Any]) -> Any:
        try:
            result = use(link)
        except (QueryRejected, StoreError):   # the query's fault: the connection is fine
            self._keep(link)
            raise
        except BaseException:
            link.close()
            raise
        self._keep(link)
        return result

    def _keep(self, link: Any) -> None:
        with self._lock:
            if len(self._idle) < READER_IDLE_CONNECTIONS:
                self._idle.append(link)
                return
        link.close()

    # The methods below ask their query; every parameter left out takes its query's own
    # default (the last 24 hours, the last week, 200 rows...), so that none is restated here.

    def recent_predictions(self, n: Optional[int] = None, **params: Any) -> list[dict]:
        """The newest n predictions (200) of this Reader's tracker (all trackers' if it has
        none), oldest first: ready to refill a deque."""
        return self.ask("recent_predictions", n=n, **{"tracker": self.tracker, **params})["rows"]

    def recent_side_bets(self, n: Optional[int] = None, **params: Any) -> list[dict]:
        """The newest n side bets (200) of this Reader's tracker, oldest first."""
        return self.ask("recent_side_bets", n=n, **{"tracker": self.tracker, **params})["rows"]

    def recent_ticks(self, n: Optional[int] = None) -> list[dict]:
        """The newest n stored tick samples (1,200; every TICK_SAMPLE_EVERY-th tick)."""
        return self.ask("recent_ticks", n=n)["rows"]

    def load_state(self, key: str, default: Any = None) -> Any:
        """The value this Reader's tracker (the default tracker) saved under `key`."""
        state = self.ask("state", key=key, tracker=self.tracker)
        return state["value"] if state["found"] else default

    def game(self, game_id: str) -> Optional[dict]:
        """A game with its predictions, side bets and samples, or None if it is unknown."""
        try:
            return self.ask("game", id=game_id)
        except QueryRejected:
            return None

    def games(self, **params: Any) -> dict:
        return self.ask("games", **params)

    def metrics(self, hours: Optional[float] = None, **window: Any) -> dict:
        return self.ask("metrics", hours=hours, **window)

    def performance(self, hours: Optional[float] = None, **params: Any) -> dict:
        return self.ask("performance", hours=hours, **params)

    def trends(self, days: Optional[float] = None, **window: Any) -> dict:
        return self.ask("trends", days=days, **window)

    def patterns(self, days: Optional[float] = None, **window: Any) -> dict:
        return self.ask("patterns", days=days, **window)

    def rejects(self, **params: Any) -> dict:
        return self.ask("rejects", **params)

    def trackers(self, **window: Any) -> dict:
        return self.ask("trackers", **window)

    def calibration(self, **params: Any) -> dict:
        return self.ask("calibration", **params)

    def bankroll(self, **params: Any) -> dict:
        return self.ask("bankroll", **params)

    def close(self) -> None:
        """Close the connections kept between calls (calls still running close their own)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for link in idle:
            link.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------
# EXPORT: a table's rows, or the wire events that rebuild them, streamed
# ---------------------------------------------------------------------------
# Both read one row at a time, so memory stays flat whatever the size. Events are the
# RECORDS Structs, so export and import share one definition of the wire.

SQL_EXPORT = {
    table.name: f"SELECT {', '.join(table.columns)} FROM {table.name}"
                f"{f' INDEXED BY {table.time_index}' if table.time_index else ''} "
                f"WHERE {table.time_column} >= ?1 AND {table.time_column} < ?2 "
                f"ORDER BY {table.time_column}, rowid"
    for table in TABLES.values()}
SQL_EXPORT_COUNT = {               # for a progress bar: the rows of the window, every tracker's
    table.name: f"SELECT count(*) FROM {table.name}"
                f"{f' INDEXED BY {table.time_index}' if table.time_index else ''} "
                f"WHERE {table.time_column} >= ?1 AND {table.time_column} < ?2"
    for table in TABLES.values()}
EXPORTED_LINES = {"games": 2, "tick_samples": 1, "predictions": 1, "side_bets": 1, "state": 1}
SQL_EXPORT_SAMPLES = """
SELECT tick, price, volatility_10, volatility_40, momentum, rsi, volume_ratio, ts
FROM tick_samples INDEXED BY sqlite_autoindex_tick_samples_1 WHERE game_id = ?1 ORDER BY tick"""


def export_rows(conn: apsw.Connection, table: str, since: str, until: str,
                tracker: Optional[str] = None) -> Iterator[tuple]:
    """The rows of `table` whose time column is in [since, until), oldest first (of one
    tracker, for the tables of a tracker's records)."""
    if table not in TABLES:
        raise ConfigError(f"no table {table!r}: choose one of {', '.join(TABLES)}")
    columns = TABLES[table].columns
    mine = columns.index("tracker") if tracker is not None and "tracker" in columns else None
    with store_errors(f"cannot read {table}"):
        for row in conn.execute(SQL_EXPORT[table], (since, until)):
            if mine is None or row[mine] == tracker:
                yield row


def export_size(conn: apsw.Connection, tables: dict[str, int], since: str, until: str) -> int:
    """About how many lines an export writes (its progress bar's length): each table's
    rows in the window, times its lines per row."""
    with store_errors("cannot count the rows to export"):
        return sum(conn.execute(SQL_EXPORT_COUNT[table], (since, until)).get * lines
                   for table, lines in tables.items())


def export_table(conn: apsw.Connection, table: str, since: str, until: str,
                 form: str, tracker: Optional[str] = None) -> Iterator[bytes]:
    """The rows as CSV (a header first) or as JSON lines; raw bytes as text."""
    columns = COLUMNS[table]
    if form == "csv":
        buffer = io.StringIO()
        out = csv.writer(buffer, lineterminator="\n")
        out.writerow(columns)
        for row in export_rows(conn, table, since, until, tracker):
            out.writerow(_text(value) for value in row)
            if buffer.tell() > 65536:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue().encode()
        return
    encode = msgspec.json.encode
    for row in export_rows(conn, table, since, until, tracker):
        yield encode(dict(zip(columns, map(_text, row)))) + b"\n"


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def export_events(conn: apsw.Connection, since: str, until: str,
                  tracker: Optional[str] = None) -> Iterator[Event]:
    """Wire events that `import` turns back into the same rows: each game created in the
    window with its stored tick samples, then the predictions, side bets and state
    written in it (of one tracker, if asked), each carrying its tracker. (With a window,
    predictions of games outside it come unresolved.)"""
    for row in export_rows(conn, "games", since, until):
        yield from _game_events(conn, dict(zip(COLUMNS["games"], row)))
    for row in export_rows(conn, "predictions", since, until, tracker):
        p = dict(zip(COLUMNS["predictions"], row))
        bounds = (UncertaintyBounds(p["bound_lower"], p["bound_upper"])
                  if p["bound_lower"] is not None or p["bound_upper"] is not None else None)
        used = (None if all(p[c] is None for c in ("epr_active", "peak_ratio", "volatility",
                                                    "momentum")) else
                FeaturesUsed(None if p["epr_active"] is None else bool(p["epr_active"]),
                             p["peak_ratio"], p["volatility"], p["momentum"]))
        yield Prediction(p["game_id"], p["predicted_at_tick"], p["predicted_end_tick"],
                         p["confidence"], bounds, used, p["model_version"], p["created_at"],
                         p["tracker"])
    for row in export_rows(conn, "side_bets", since, until, tracker):
        s = dict(zip(COLUMNS["side_bets"], row))
        yield SideBet(s["game_id"], s["placed_at_tick"], s["probability"], s["expected_value"],
                      s["confidence"], s["recommendation"],
                      s["window_end_tick"] - s["placed_at_tick"], s["created_at"], s["tracker"])
    for whose, key, value, updated_at in export_rows(conn, "state", since, until, tracker):
        yield StateWrite(key, msgspec.Raw(value.encode()), updated_at, whose)


def _game_events(conn: apsw.Connection, g: dict) -> Iterator[Event]:
    """A game's start, its stored samples and its end; the start price is not stored, so
    gameStart carries one that leaves the peak as it is."""
    game_id, peak, peak_tick = g["game_id"], g["peak_price"], g["peak_tick"]
    times = []
    if g["started_at"] is not None:
        price = peak if peak_tick == g["start_tick"] else peak / 2
        yield GameStart(game_id, g["start_tick"], price, g["started_at"])
        times.append(g["started_at"])
    seen_peak = peak_tick == g["start_tick"] and g["started_at"] is not None
    for tick, price, *features, ts in conn.execute(SQL_EXPORT_SAMPLES, (game_id,)):
        seen_peak = seen_peak or (tick == peak_tick and price == peak)
        yield PriceUpdate(game_id, tick, price,
                          TickFeatures(*features) if any(f is not None for f in features) else None,
                          ts)
        times.append(ts)
    if g["end_tick"] is not None:
        yield GameEnd(game_id, g["end_tick"], g["final_price"], g["start_tick"],
                      g["treasury_remainder"], json.loads(g["patterns_detected"]) or None,
                      peak, peak_tick, g["ended_at"])
        times.append(g["ended_at"])
        seen_peak = True
    if peak is not None and (not seen_peak or g["created_at"] < min(times, default="~")):
        # the peak (or the game's first moment) came from a tick that was not sampled
        yield PriceUpdate(game_id, peak_tick, peak, None, g["created_at"])


# ---------------------------------------------------------------------------
# REPORT: one self-contained HTML page with inline SVG charts
# ---------------------------------------------------------------------------
# render_report(data) turns report_data()'s object into the page: no SQL, no I/O, no
# script. The page template is a constant here, beside the code that fills it (as bottle
# keeps its templates); every stored string passes through _page_text() on its way in.
# Colours are the Okabe-Ito palette, which colour-blind readers tell apart, and follow
# the reader's light or dark scheme.

REPORT_PAGE = string.Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>$title</title>
<style>
:root { --bg: #ffffff; --fg: #1a1a1a; --muted: #5a5a5a; --grid: #d9d9d9; --panel: #f6f6f6;
        --c1: #0072b2; --c2: #d55e00; --c3: #009e73; --gain: #0072b2; --loss: #d55e00;
        color-scheme: light dark; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #121212; --fg: #ececec; --muted: #a8a8a8; --grid: #3a3a3a; --panel: #1d1d1d;
          --c1: #56b4e9; --c2: #e69f00; --c3: #2fbf8f; --gain: #56b4e9; --loss: #f08a4b; }
}
* { box-sizing: border-box; }
body { margin: 0 auto; padding: 16px; max-width: 1240px; background: var(--bg); color: var(--fg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 0 0 6px; }
p.meta { color: var(--muted); margin: 0 0 16px; }
.summary { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 8px; }
.figure { background: var(--panel); border-radius: 6px; padding: 8px 10px; }
.figure b { display: block; font-size: 18px; white-space: nowrap; }
.figure span { color: var(--muted); font-size: 12px; }
.panel { background: var(--panel); border-radius: 6px; padding: 12px; margin: 12px 0;
         break-inside: avoid; }
@media (max-width: 600px) { .summary { grid-template-columns: repeat(2, minmax(0, 1fr)); } }
.panel > div { min-width: 0; }
/* Scrolled sideways on a narrow screen, a chart opens at its right end: the newest data. */
.chart { overflow-x: auto; direction: rtl; }
.chart svg { width: 100%; min-width: 800px; height: auto; display: block; direction: ltr; }
.nowrap { white-space: nowrap; }
.chart.square svg { max-width: 440px; min-width: 0; margin: 0 auto; }
.nodata { color: var(--muted); font-style: italic; padding: 24px 0; }
details { font-size: 12px; }
details .scroll { max-height: 320px; overflow: auto; }
summary { cursor: pointer; color: var(--muted); }
.wide { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 3px 6px; border-bottom: 1px solid var(--grid); text-align: right;
         white-space: nowrap; }
th:first-child, td:first-child, td.text, th.text, th.long { text-align: left; }
td.long { text-align: left; white-space: normal; min-width: 16em; overflow-wrap: anywhere; }
svg text { fill: var(--fg); font-size: 11px; }
svg .muted { fill: var(--muted); }
svg .grid { stroke: var(--grid); stroke-width: 1; }
svg .axis { stroke: var(--muted); stroke-width: 1; }
svg .zero { stroke: var(--fg); stroke-width: 1.5; stroke-dasharray: 5 3; }
svg .line { fill: none; stroke-width: 2; }
svg .s1 { stroke: var(--c1); } svg .s2 { stroke: var(--c2); } svg .s3 { stroke: var(--c3); }
svg .f1 { fill: var(--c1); } svg .f2 { fill: var(--c2); } svg .f3 { fill: var(--c3); }
svg .gain { fill: var(--gain); } svg .loss { fill: var(--loss); }
svg .dash { stroke-dasharray: 6 3; } svg .dot { stroke-dasharray: 2 3; }
svg .band { fill: var(--loss); fill-opacity: 0.16; }
svg .partial { fill: var(--muted); fill-opacity: 0.12; }
svg .count { fill: var(--muted); fill-opacity: 0.45; }
@page { size: A4; margin: 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  .panel { grid-template-columns: minmax(0, 1fr); }
  .chart svg { min-width: 0; }
  details { display: none; }
}
</style>
</head>
<body>
<header>
<h1>$title</h1>
<p class="meta">$meta</p>
</header>
<section aria-label="summary">
<div class="summary">
$summary
</div>
</section>
$compared
$charts
<h2>Forecasts</h2>
$forecasts
<h2>Patterns</h2>
$patterns
<h2>The 10 games with the largest mean absolute error</h2>
<p class="meta">Of the games with at least $min_predictions predictions made in the period.</p>
$worst
<h2>Rejected lines by code</h2>
$rejects
</body>
</html>
""")

CHART_WIDTH, CHART_HEIGHT = 960, 270
CHART_LEFT, CHART_RIGHT, CHART_TOP, CHART_BOTTOM = 64, 64, 34, 56
MAX_TIME_LABELS = 9


class Series(NamedTuple):
    """One series as svg_chart draws it: a name for the legend, a value (or None: a gap)
    per bucket, its style (s1..s3: colour; dash and dot: line pattern) and its unit."""

    name: str
    values: list[Optional[float]]
    style: str
    unit: str
    digits: int = 1


class Plot(NamedTuple):
    """A series of a chart, declared: the measure it draws (a field of Measures, or the
    commit latency), its legend name, style, unit and digits, and the header of its column
    in the chart's table of numbers (its name and unit unless given)."""

    measure: str
    name: str
    style: str = "s1"
    unit: str = ""
    digits: int = 1
    header: str = ""

    def series(self, buckets: list[dict]) -> Series:
        return Series(self.name, [b[self.measure] for b in buckets], self.style, self.unit,
                      self.digits)

    @property
    def column(self) -> str:
        return self.header or (f"{self.name} ({self.unit})" if self.unit else self.name)


class Chart(NamedTuple):
    """A panel of the report over the buckets (hours or days) of its period: a chart, its
    question (`{per_day}` marks where a daily chart says how a day is summed up), and its
    numbers in a table beside it. `right` has an axis of its own; `extra` columns are in the
    table only; `unmeasured` is said when the first series has no value at all (the right
    one is then drawn alone). Adding a chart over an existing measure is one entry here."""

    title: str
    question: str
    series: tuple[Plot, ...]
    y_label: str
    bars: bool = False                   # one bar per bucket, gains and losses told apart
    zero_line: str = ""                  # the zero line's tooltip, if it is drawn
    floor: Optional[float] = None
    ceiling: Optional[float] = None
    right: Optional[Plot] = None
    right_label: str = ""
    extra: tuple[Plot, ...] = ()
    unmeasured: str = ""
    per_day: str = ""
    symmetric: float = 0.0               # an axis symmetric about zero, at least this far out

    @property
    def plots(self) -> tuple[Plot, ...]:
        return (*self.series, *((self.right,) if self.right else ()), *self.extra)


LATENCY = "p99_commit_latency_ms"        # measured by the daemon, kept in metrics_hourly
CHARTS = (
    Chart("Accuracy", "How often does the predicted end fall within one, two or three "
                      "40-tick windows of the real end?",
          (Plot("within_1_window", "within 1 window", "s1", "%"),
           Plot("within_2_windows", "within 2 windows", "s2 dash", "%"),
           Plot("within_3_windows", "within 3 windows", "s3 dot", "%")),
          "share of resolved predictions (%)", floor=0, ceiling=100),
    Chart("e40 bias", "Do predictions end too late (above zero) or too early (below)?",
          (Plot("median_e40", "median e40", digits=3),), "median e40 (40-tick windows)",
          zero_line="zero: no bias", symmetric=0.5),
    Chart("Side-bet ROI", "Did the recommended side bets gain or lose?",
          (Plot("roi_percentage", "side-bet ROI", unit="%", header="ROI (%)"),),
          "return on BETs (%)", bars=True,
          extra=(Plot("bets_won", "won"), Plot("bets_lost", "lost"))),
    Chart("Volume", "How many games ended, and how many predictions were made?",
          (Plot("games_analyzed", "games ended", digits=0),), "games ended (count)", floor=0,
          right=Plot("predictions_made", "predictions", "s2 dash", digits=0),
          right_label="predictions (count)"),
    Chart("Ingest health", "How long did commits take (p99{per_day}), and how many lines were "
                           "refused?",
          (Plot(LATENCY, "p99 commit latency", unit="ms", digits=2),),
          "p99 commit latency (ms)", floor=0,
          right=Plot("rejected_lines", "rejected lines", "s2 dash", digits=0),
          right_label="rejected lines", per_day=", the day's worst hour",
          unmeasured=" (No commit latency was measured: the daemon measures it while it runs.)"),
)
CHARTED = tuple(dict.fromkeys(plot.measure for chart in CHARTS for plot in chart.plots))


def _number(value: Optional[float], digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if isinstance(value, int) else f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip() if unit and unit != "%" else f"{text}{unit}"


def _nice_step(span: float) -> float:
    """A round step that cuts `span` into four to eight parts."""
    raw = span / 5 if span > 0 else 1
    power = 10 ** math.floor(math.log10(raw))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= raw)


def _scale(values: Iterable[Optional[float]], floor: Optional[float] = None,
           ceiling: Optional[float] = None, zero: bool = False,
           symmetric: float = 0.0) -> tuple[float, float, float]:
    """(low, high, step) of an axis that holds the values (and zero, if asked); with
    `symmetric`, centred on zero and reaching at least that far, so that a wobble of a
    tick does not fill the chart like an event."""
    present = [v for v in values if v is not None]
    if symmetric:
        reach = max([symmetric] + [abs(v) for v in present])
        step = _nice_step(2 * reach)
        return -math.ceil(reach / step) * step, math.ceil(reach / step) * step, step
    low = min(present + ([0.0] if zero else [])) if present else 0.0
    high = max(present + ([0.0] if zero else [])) if present else 1.0
    low, high = (floor if floor is not None else low), (ceiling if ceiling is not None else high)
    if high <= low:
        high = low + 1
    step = _nice_step(high - low)
    return math.floor(low / step) * step, math.ceil(high / step) * step, step


def _time_labels(starts: list[str], hourly: bool) -> list[tuple[int, str]]:
    """(bucket, label) for a readable UTC time axis: round hours (a date at midnight), every
    few days, half months, months or years; never more than MAX_TIME_LABELS, so none
    overlap."""
    stamps = [dt.datetime.fromisoformat(start) for start in starts]
    if hourly:
        stride = next(s for s in (1, 2, 3, 4, 6, 12, 24) if len(stamps) / s <= MAX_TIME_LABELS)
        return [(i, stamp.strftime("%b %d") if stamp.hour == 0 else stamp.strftime("%H:%M"))
                for i, stamp in enumerate(stamps) if stamp.hour % stride == 0 == stamp.minute]
    if len(stamps) <= 70:
        stride = math.ceil(len(stamps) / MAX_TIME_LABELS)
        return [(i, stamp.strftime("%b %d")) for i, stamp in enumerate(stamps) if i % stride == 0]
    if len(stamps) <= 140:
        return [(i, stamp.strftime("%b %d")) for i, stamp in enumerate(stamps)
                if stamp.day in (1, 16)]
    months = [(i, stamp) for i, stamp in enumerate(stamps) if stamp.day == 1]
    stride = math.ceil(len(months) / MAX_TIME_LABELS)
    if stride <= 3:
        return [(i, stamp.strftime("%b %Y" if n == 0 or stamp.month == 1 else "%b"))
                for n, (i, stamp) in enumerate(months[::stride])]
    years = [(i, stamp) for i, stamp in months if stamp.month == 1]
    return [(i, stamp.strftime("%Y"))
            for i, stamp in years[::math.ceil(len(years) / MAX_TIME_LABELS)]]


def svg_chart(title: str, starts: list[str], hourly: bool, series: list[Series], *,
              y_label: str, bars: bool = False, zero_line: str = "",
              floor: Optional[float] = None, ceiling: Optional[float] = None,
              right: Optional[Series] = None, right_label: str = "",
              band: Optional[tuple[int, int, str]] = None, symmetric: float = 0.0,
              partial: Iterable[int] = ()) -> str:
    """A line (or bar) chart of the series over the buckets, with axes, a legend and a
    <title> tooltip on every point and bar; None values leave gaps. `band` shades the
    buckets from one to another, with its label; `partial` buckets (cut by an end of the
    period) are shaded and labelled so, so that a part day does not read as a fall."""
    width = CHART_WIDTH - CHART_LEFT - CHART_RIGHT
    height = CHART_HEIGHT - CHART_TOP - CHART_BOTTOM
    count = max(len(starts), 1)
    low, high, step = _scale((v for s in series for v in s.values), floor, ceiling,
                             zero=bars or bool(zero_line), symmetric=symmetric)

    def x(i: float) -> float:
        return CHART_LEFT + (i + 0.5) * width / count

    def y(value: float, lo: float = low, hi: float = high) -> float:
        return CHART_TOP + height - (value - lo) / (hi - lo) * height

    when = [_bucket_name(start, hourly) for start in starts]
    parts = [f'<svg viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" '
             f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>']
    tick = low
    while tick <= high + step / 1000:
        parts.append(f'<line class="grid" x1="{CHART_LEFT}" x2="{CHART_LEFT + width}" '
                     f'y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>'
                     f'<text class="muted" x="{CHART_LEFT - 6}" y="{y(tick) + 4:.1f}" '
                     f'text-anchor="end">{_tick(tick, step)}</text>')
        tick += step
    slot = width / count
    for i in partial:
        parts.append(f'<rect class="partial" x="{x(i) - slot / 2:.1f}" y="{CHART_TOP}" '
                     f'width="{slot:.1f}" height="{height}"><title>{when[i]}: a partial '
                     f'{"hour" if hourly else "day"}, cut by the period</title></rect>'
                     f'<text class="muted" x="{x(i):.1f}" y="{CHART_TOP - 4}" '
                     f'text-anchor="{"start" if i == 0 and count > 1 else "end"}">partial</text>')
    if band is not None:
        first, last, label = band
        parts.append(f'<rect class="band" x="{x(first) - slot / 2:.1f}" y="{CHART_TOP}" '
                     f'width="{(last - first + 1) * slot:.1f}" height="{height}">'
                     f'<title>{html.escape(label)}</title></rect>')
        right_half = x((first + last) / 2) > CHART_LEFT + width / 2
        edge = x(last) + slot / 2 - 4 if right_half else x(first) - slot / 2 + 4
        parts.append(f'<text class="muted" x="{edge:.1f}" y="{CHART_TOP + 12}" '
                     f'text-anchor="{"end" if right_half else "start"}">'
                     f'{html.escape(label.split(",")[0])}</text>')
    if zero_line and low < 0 < high:
        parts.append(f'<line class="zero" x1="{CHART_LEFT}" x2="{CHART_LEFT + width}" '
                     f'y1="{y(0):.1f}" y2="{y(0):.1f}"><title>{zero_line}</title></line>')
    parts.append(f'<line class="axis" x1="{CHART_LEFT}" x2="{CHART_LEFT + width}" '
                 f'y1="{CHART_TOP + height}" y2="{CHART_TOP + height}"/>')
    for i, label in _time_labels(starts, hourly):
        parts.append(f'<line class="axis" x1="{x(i):.1f}" x2="{x(i):.1f}" '
                     f'y1="{CHART_TOP + height}" y2="{CHART_TOP + height + 4}"/>'
                     f'<text x="{x(i):.1f}" y="{CHART_TOP + height + 17}" '
                     f'text-anchor="middle">{label}</text>')
    parts.append(f'<text class="muted" x="{CHART_LEFT + width / 2}" y="{CHART_HEIGHT - 8}" '
                 f'text-anchor="middle">time (UTC), one {"hour" if hourly else "day"} per '
                 f'{"bar" if bars else "point"}</text>')
    parts.append(f'<text class="muted" transform="rotate(-90)" x="{-(CHART_TOP + height / 2)}" '
                 f'y="14" text-anchor="middle">{html.escape(y_label)}</text>')
    for s in series:
        if bars:
            zero = y(max(low, 0.0))
            for i, value in enumerate(s.values):
                if value is None:
                    continue
                top = min(y(value), zero)
                parts.append(f'<rect class="{"gain" if value >= 0 else "loss"}" '
                             f'x="{x(i) - slot * 0.4:.1f}" y="{top:.1f}" '
                             f'width="{max(slot * 0.8, 0.8):.1f}" '
                             f'height="{max(abs(y(value) - zero), 0.8):.1f}">'
                             f'<title>{when[i]}: {html.escape(s.name)} '
                             f'{_number(value, s.digits, s.unit)}</title></rect>')
        else:
            parts.append(_svg_line(s, [None if v is None else (x(i), y(v))
                                       for i, v in enumerate(s.values)], when))
    if right is not None:
        r_low, r_high, r_step = _scale(right.values, floor=0)
        tick = r_low
        while tick <= r_high + r_step / 1000:
            parts.append(f'<text class="muted" x="{CHART_LEFT + width + 6}" '
                         f'y="{y(tick, r_low, r_high) + 4:.1f}">{_tick(tick, r_step)}</text>')
            tick += r_step
        parts.append(f'<text class="muted" transform="rotate(90)" x="{CHART_TOP + height / 2}" '
                     f'y="{-(CHART_WIDTH - 14)}" text-anchor="middle">'
                     f'{html.escape(right_label)}</text>')
        parts.append(_svg_line(right, [None if v is None else (x(i), y(v, r_low, r_high))
                                       for i, v in enumerate(right.values)], when))
    legend = series + ([right] if right is not None else [])
    if len(legend) > 1:
        place = CHART_LEFT
        for s in legend:
            parts.append(f'<line class="line {s.style}" x1="{place}" x2="{place + 18}" '
                         f'y1="14" y2="14"/><text x="{place + 22}" y="18">'
                         f'{html.escape(s.name)}</text>')
            place += 34 + 7 * len(s.name)
    elif bars:
        parts.append(f'<rect class="gain" x="{CHART_LEFT}" y="8" width="10" height="10"/>'
                     f'<text x="{CHART_LEFT + 14}" y="17">gain</text>'
                     f'<rect class="loss" x="{CHART_LEFT + 52}" y="8" width="10" height="10"/>'
                     f'<text x="{CHART_LEFT + 66}" y="17">loss</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_line(series: Series, points: list[Optional[tuple[float, float]]],
              when: list[str]) -> str:
    """A series as line segments between the gaps, a dot with its tooltip per value."""
    parts, run = [], []
    for point in points + [None]:
        if point is None:
            if len(run) > 1:
                parts.append(f'<polyline class="line {series.style}" points="'
                             + " ".join(f"{px:.1f},{py:.1f}" for px, py in run) + '"/>')
            run = []
        else:
            run.append(point)
    fill = "f" + series.style.split()[0][1:]
    radius = 2.4 if len(points) <= 96 else 1.4              # a year of days stays legible
    for i, point in enumerate(points):
        if point is not None:
            parts.append(f'<circle class="{fill}" cx="{point[0]:.1f}" cy="{point[1]:.1f}" '
                         f'r="{radius}">'
                         f'<title>{when[i]}: {html.escape(series.name)} '
                         f'{_number(series.values[i], series.digits, series.unit)}'
                         '</title></circle>')
    return "".join(parts)


def _tick(value: float, step: float) -> str:
    value = 0.0 if abs(value) < step / 1000 else value       # not "-0.0" from float steps
    digits = 0 if step >= 1 else max(0, -math.floor(math.log10(step)) + (step * 10 % 1 > 0))
    return f"{value:,.{digits}f}"


def _page_text(value: str) -> str:
    """A stored string as page text: escaped, and its control and format characters
    (a NUL, a right-to-left override) written out as \\x00 or \\u202e."""
    return html.escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in value))


def _page_list(values: list[str]) -> str:
    """Stored strings, one <span> each, so that a comma inside one stays unambiguous."""
    return ", ".join(f'<span class="nowrap">{_page_text(value)}</span>' for value in values)


def _bucket_name(start: str, hourly: bool) -> str:
    """An hour or a day by its start; a piece cut by the window's start says when it began."""
    if hourly or shown_time(start)[11:] != "00:00:00":
        return f"{shown_time(start, 16)} UTC"
    return start[:10]


def html_table(headers: list[str], rows: list[list[str]], text_columns: Iterable[int] = (0,),
               long_columns: Iterable[int] = ()) -> str:
    """An HTML table of already escaped cells, scrolling sideways on a narrow screen; text
    columns align left, and long ones wrap."""
    texts, longs = set(text_columns), set(long_columns)

    def css(i: int) -> str:
        return " class=long" if i in longs else " class=text" if i in texts else ""
    head = "".join(f"<th{css(i)}>{h}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{css(i)}>{cell}</td>" for i, cell in enumerate(row))
                   + "</tr>" for row in rows)
    return ('<div class="wide"><table><thead><tr>' + head + "</tr></thead><tbody>" + body
            + "</tbody></table></div>")


def _panel(title: str, question: str, chart: Optional[str], headers: list[str],
           rows: list[list[str]]) -> str:
    """A chart with its question, and its numbers in a collapsible table below it."""
    if chart is None:
        return (f'<section class="panel"><div><h3>{title}</h3><p class="meta">{question}</p>'
                f'<p class="nodata">no data in this period</p></div></section>')
    return (f'<section class="panel"><div><h3>{title}</h3><p class="meta">{question}</p>'
            f'<div class="chart">{chart}</div></div><div><details><summary>Numbers</summary>'
            f'<div class="scroll">{html_table(headers, rows)}</div></details></div></section>')


def partial_buckets(buckets: list[dict], hourly: bool) -> list[int]:
    """The buckets cut short by either end of the period (at most the first and the last)."""
    period = 3600 if hourly else 86400
    return [i for i, b in enumerate(buckets)
            if text_epoch(b["end"]) - text_epoch(b["start"]) < period - 0.001]


def bucket_names(buckets: list[dict], hourly: bool) -> list[str]:
    """Each bucket's name in a table of numbers, a partial one said to be so."""
    partial = set(partial_buckets(buckets, hourly))
    return [_bucket_name(b["start"], hourly) + (" (partial)" if i in partial else "")
            for i, b in enumerate(buckets)]


def chart_panel(chart: Chart, buckets: list[dict], hourly: bool) -> str:
    """A chart of CHARTS over the buckets, with its question and its table of numbers."""
    starts = [b["start"] for b in buckets]
    when = bucket_names(buckets, hourly)
    drawn = [plot.series(buckets) for plot in chart.series]
    right = chart.right.series(buckets) if chart.right else None
    question = chart.question.format(per_day="" if hourly else chart.per_day)
    y_label, right_label = chart.y_label, chart.right_label
    if chart.unmeasured and all(value is None for value in drawn[0].values):
        question += chart.unmeasured
        if right is not None:                 # the right series alone, on the main axis
            drawn, right, y_label, right_label = [right], None, chart.right_label, ""
    present = any(b[plot.measure] not in (None, 0) for b in buckets for plot in chart.plots)
    svg = svg_chart(chart.title, starts, hourly, drawn, y_label=y_label, bars=chart.bars,
                    zero_line=chart.zero_line, floor=chart.floor, ceiling=chart.ceiling,
                    right=right, right_label=right_label, symmetric=chart.symmetric,
                    partial=partial_buckets(buckets, hourly)) if present else None
    columns = [plot.series(buckets) for plot in chart.plots]
    rows = [[when[i]] + [_number(x.values[i], x.digits, x.unit) for x in columns]
            for i in range(len(buckets))]
    return _panel(chart.title, question, svg,
                  [f"{'hour' if hourly else 'day'} (UTC)"] + [p.column for p in chart.plots], rows)


SQUARE, SQUARE_LEFT, SQUARE_TOP, STRIP = 300, 58, 22, 46     # the reliability diagrams


def _wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson interval (in %) of a rate (in %) observed over n trials: how far a
    bin of a few bets may honestly be off the diagonal."""
    p, spread = rate / 100, z * z / n
    centre = (p + spread / 2) / (1 + spread)
    half = z / (1 + spread) * math.sqrt(p * (1 - p) / n + spread / (4 * n))
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def _compact(count: int) -> str:
    """A count in at most four characters: 812, 5.2k, 10k, 1.3M."""
    for limit, unit in ((1e6, "M"), (1e3, "k")):
        if count >= limit:
            value = count / limit
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(count)


def svg_reliability(title: str, bins: list[dict], x_key: str, y_key: str, *, x_label: str,
                    y_label: str, noun: str, diagonal: str) -> str:
    """A reliability diagram: each bin's mean forecast against what happened, on a square
    of 0..100 % by 0..100 %, the diagonal (a perfectly honest forecast) marked, each point
    with its 95 % interval, and below it a strip of bars with each bin's count, so that a
    bin of 3 and a bin of 3,000 are told apart at a glance."""
    width, height = SQUARE_LEFT + SQUARE + 16, SQUARE_TOP + SQUARE + 56 + STRIP + 20

    def x(value: float) -> float:
        return SQUARE_LEFT + value / 100 * SQUARE

    def y(value: float) -> float:
        return SQUARE_TOP + SQUARE - value / 100 * SQUARE

    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">'
             f'<title>{html.escape(title)}</title>']
    for tick in range(0, 101, 20):
        parts.append(f'<line class="grid" x1="{x(0)}" x2="{x(100)}" y1="{y(tick)}" y2="{y(tick)}"/>'
                     f'<line class="grid" x1="{x(tick)}" x2="{x(tick)}" y1="{y(0)}" y2="{y(100)}"/>'
                     f'<text class="muted" x="{x(0) - 6}" y="{y(tick) + 4}" '
                     f'text-anchor="end">{tick}</text>'
                     f'<text x="{x(tick)}" y="{y(0) + 16}" text-anchor="middle">{tick}</text>')
    parts.append(f'<line class="zero" x1="{x(0)}" y1="{y(0)}" x2="{x(100)}" y2="{y(100)}">'
                 f'<title>{html.escape(diagonal)}</title></line>'
                 f'<text class="muted" x="{x(0) + SQUARE / 2}" y="{y(0) + 32}" '
                 f'text-anchor="middle">{html.escape(x_label)}</text>'
                 f'<text class="muted" transform="rotate(-90)" x="{-(SQUARE_TOP + SQUARE / 2)}" '
                 f'y="14" text-anchor="middle">{html.escape(y_label)}</text>')
    most = max(b["n"] for b in bins)
    strip = y(0) + 56
    for b in bins:
        left, right = x(b["lower"]) + 1, x(b["upper"]) - 1
        tall = max(1.0, STRIP * b["n"] / most)
        parts.append(f'<rect class="count" x="{left:.1f}" y="{strip + STRIP - tall:.1f}" '
                     f'width="{max(right - left, 1):.1f}" height="{tall:.1f}">'
                     f'<title>{b["lower"]:g} to {b["upper"]:g} %: {b["n"]:,} {noun}</title></rect>'
                     f'<text class="muted" x="{(left + right) / 2:.1f}" '
                     f'y="{strip + STRIP - tall - 3:.1f}" text-anchor="middle" '
                     f'font-size="{min(11, max(7, (right - left) / 3)):.0f}">'
                     f'{_compact(b["n"])}</text>')
    parts.append(f'<text class="muted" x="{x(0)}" y="{strip + STRIP + 15}">{noun} per bin of '
                 f'the forecast</text>')
    points = [(x(b[x_key]), y(b[y_key])) for b in bins]
    parts.append('<polyline class="line s1" points="'
                 + " ".join(f"{px:.1f},{py:.1f}" for px, py in points) + '"/>')
    for b, (px, py) in zip(bins, points):
        low, high = _wilson(b[y_key], b["n"])
        parts.append(f'<line class="line s1" x1="{px:.1f}" x2="{px:.1f}" y1="{y(low):.1f}" '
                     f'y2="{y(high):.1f}" stroke-width="1"/>'
                     f'<circle class="f1" cx="{px:.1f}" cy="{py:.1f}" r="3.5"><title>'
                     f'{b["lower"]:g} to {b["upper"]:g} %: {b["n"]:,} {noun}, '
                     f'{html.escape(x_label.split(" (")[0])} {_number(b[x_key], 1, "%")}, '
                     f'{html.escape(y_label.split(" (")[0])} {_number(b[y_key], 1, "%")} '
                     f'(95 % interval {low:.0f} to {high:.0f} %)</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def _square_panel(title: str, question: str, chart: Optional[str], headers: list[str],
                  rows: list[list[str]]) -> str:
    return _panel(title, question, chart, headers, rows).replace(
        '<div class="chart">', '<div class="chart square">', 1)


def reliability_panel(calibration: dict) -> str:
    """The side bets' reliability diagram, with its scores in words."""
    bets = calibration["side_bets"]
    question = ("When a side bet's probability said p %, did its game end inside the window p % "
                "of the time? On the diagonal, the forecasts are honest; below it, "
                "over-confident.")
    if bets["n"]:
        question += (f" {bets['n']:,} resolved bets; Brier score {_number(bets['brier'], 4)} = "
                     f"reliability {_number(bets['reliability'], 4)} (lower is better) − "
                     f"resolution {_number(bets['resolution'], 4)} (higher is better) + "
                     f"uncertainty {_number(bets['uncertainty'], 4)}.")
    return _diagram_panel("Reliability of the side-bet probabilities", question, bets,
                          ("mean_probability", "forecast", "forecast probability"),
                          ("observed_rate", "observed", "observed rate"),
                          noun="bets", diagonal="honest forecasts")


def coverage_panel(calibration: dict) -> str:
    """How often the predictions' bounds held the real end, against their confidence."""
    spans = calibration["intervals"]
    held = (f" {spans['n']:,} resolved predictions with bounds: coverage "
            f"{_number(spans['coverage'], 1, '%')} for a stated "
            f"{_number(spans['mean_confidence'], 1, '%')}, "
            f"{_number(spans['mean_width_ticks'], 1, 'ticks')} wide on average."
            ) if spans["n"] else ""
    question = ("Did the predicted bounds hold the real end as often as their stated confidence "
                "claimed? On the diagonal, they did; below it, the bounds are too narrow." + held)
    return _diagram_panel("Bounds coverage against stated confidence", question, spans,
                          ("mean_confidence", "confidence", "stated confidence"),
                          ("coverage", "coverage", "coverage"),
                          noun="predictions", diagonal="bounds as wide as claimed")


def _diagram_panel(title: str, question: str, part: dict, forecast: tuple[str, str, str],
                   outcome: tuple[str, str, str], noun: str, diagonal: str) -> str:
    """A reliability diagram of calibration's bins and their table. `forecast` and `outcome`
    name a bin's key, its column in the table and its axis."""
    (x_key, x_column, x_axis), (y_key, y_column, y_axis) = forecast, outcome
    chart = svg_reliability(title, part["bins"], x_key, y_key, x_label=f"{x_axis} (%)",
                            y_label=f"{y_axis} (%)", noun=noun,
                            diagonal=diagonal) if part["n"] else None
    return _square_panel(
        title, question, chart,
        [f"{x_column} bin (%)", noun, f"mean {x_column} (%)", f"{y_column} (%)"],
        [[f"{b['lower']:g}–{b['upper']:g}", _number(b["n"]), _number(b[x_key], 1),
          _number(b[y_key], 1)] for b in part["bins"]])


def bankroll_panel(bankroll: dict, buckets: list[dict], hourly: bool) -> str:
    """The bankroll curve of a unit stake on every BET, its worst fall shaded."""
    starts = [answer_time(b["start"]) for b in buckets]     # as the answer's times read
    question = ("What would a unit stake on every recommended BET have made, and how deep did "
                "it fall?")
    if not bankroll["bets"]:
        return _panel("Bankroll", question, None, [], [])
    question += (f" {bankroll['bets']:,} BETs resolved, {_number(bankroll['pnl'], 1)} units "
                 f"(ROI {_number(bankroll['roi_percentage'], 1, '%')}, Sharpe per bet "
                 f"{_number(bankroll['sharpe_per_bet'], 3)}); longest losing streak "
                 f"{bankroll['longest_losing_streak']:,}.")

    def bucket_of(moment: str) -> int:
        return max(bisect.bisect_right(starts, moment) - 1, 0)

    values: list[Optional[float]] = []
    curve, total = iter(bankroll["curve"]), 0.0
    point = next(curve, None)
    for i in range(len(starts)):
        while point is not None and bucket_of(point["t"]) <= i:
            total, point = point["pnl"], next(curve, None)
        values.append(total)
    band = None
    if bankroll["max_drawdown_to"] is not None:
        band = (bucket_of(bankroll["max_drawdown_from"]), bucket_of(bankroll["max_drawdown_to"]),
                f"max drawdown {_number(bankroll['max_drawdown'], 1)} units, "
                f"{shown_time(bankroll['max_drawdown_from'], 16)} to "
                f"{shown_time(bankroll['max_drawdown_to'], 16)} UTC")
        question += f" The shaded span is the {band[2]}."
    chart = svg_chart("Bankroll", [b["start"] for b in buckets], hourly,
                      [Series("profit", values, "s1", "units", 1)],
                      y_label="profit of a unit stake per BET (units)", zero_line="break even",
                      band=band, partial=partial_buckets(buckets, hourly))
    return _panel("Bankroll", question, chart,
                  [f"{'hour' if hourly else 'day'} (UTC)", "profit (units)"],
                  [[_bucket_name(p["t"], hourly), _number(p["pnl"], 1)]
                   for p in bankroll["curve"]])


def compared_panel(trackers: list[dict], models: list[dict]) -> str:
    """Trackers and models side by side, when the period holds more than one of either:
    each figure with the number of predictions or bets behind it."""
    if len(trackers) < 2 and len(models) < 2:
        return ""
    rows = []
    for kind, groups in (("tracker", trackers), ("model", models)):
        for group in groups if len(groups) > 1 else ():
            p, s = group["prediction_metrics"], group["sidebet_metrics"]
            name = group.get("tracker", group.get("model_version"))
            rows.append([kind, _page_text(name), _number(p["predictions_made"]),
                         _number(p["resolved"]), _number(p["within_1_window"], 1, "%"),
                         _number(p["median_e40"], 3), _number(p["mean_absolute_error"], 1),
                         "-" if s is None else f"{s['bets_won'] + s['bets_lost']:,}",
                         "-" if s is None else _number(s["roi_percentage"], 1, "%")])
    return ("<h2>Trackers and models side by side</h2>\n" + html_table(
        ["", "name", "predictions", "resolved", "within 1 window", "median e40",
         "mean absolute error (ticks)", "settled BETs", "side-bet ROI"], rows, (0, 1)))


def period_words(seconds: float) -> str:
    """A period as it was asked for: '7 days', '2 days', '24 hours', '90 minutes'."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        count = seconds / size
        if count >= 2 or unit == "minute":
            whole = round(count)
            if unit == "minute" or abs(count - whole) < 0.001:
                return f"{whole:,} {unit}{'' if whole == 1 else 's'}"
    return f"{seconds / 3600:,.1f} hours"


def render_report(data: dict, database: str) -> str:
    """The report page for report_data()'s object."""
    buckets, hourly = data["buckets"], data["bucket"] == "hour"
    title = f"tedstore report: {data['since'][:16]} to {data['until'][:16]} UTC"
    narrowed = "".join(f" · {what} {_page_text(data[what])} only"
                       for what in ("tracker", "model") if data.get(what))
    meta = (f"{period_words(text_epoch(data['until']) - text_epoch(data['since']))}"
            f"{narrowed} · generated "
            f"{data['generated_at'][:19]} UTC · database {_page_text(database)} · "
            f"tedstore {html.escape(data['version'])}")
    p = data["performance"]["prediction_metrics"]
    s = data["performance"]["sidebet_metrics"]
    rejected = sum(code["lines"] for code in data["rejects_by_code"])
    figures = [("games ended", _number(data["performance"]["games_analyzed"])),
               (f"predictions ({p['resolved']:,} resolved)", f"{p['predictions_made']:,}"),
               ("within 1 window", _number(p["within_1_window"], 1, "%")),
               ("median e40", _number(p["median_e40"], 3)),
               ("mean absolute error", _number(p["mean_absolute_error"], 1, "ticks")),
               ("side-bet ROI", _number(s["roi_percentage"], 1, "%")),
               ("bets won / lost", f"{s['bets_won']:,} / {s['bets_lost']:,}"),
               ("rejected lines", f"{rejected:,}")]
    summary = "\n".join(f'<div class="figure"><b>{value}</b><span>{name}</span></div>'
                        for name, value in figures)
    charts = [chart_panel(chart, buckets, hourly) for chart in CHARTS]
    compared = compared_panel(data["trackers"], data["models"])
    forecasts = "\n".join((reliability_panel(data["calibration"]),
                           coverage_panel(data["calibration"]),
                           bankroll_panel(data["bankroll"], buckets, hourly)))
    patterns = data["patterns"]["patterns"]
    return REPORT_PAGE.substitute(
        title=html.escape(title), meta=meta, summary=summary, compared=compared,
        min_predictions=WORST_GAME_MIN_PREDICTIONS,
        charts="\n".join(charts), forecasts=forecasts,
        patterns=html_table(
            ["pattern", "games", "within 1 window (%)", "mean duration (ticks)", "newest games"],
            [[_page_text(x["pattern"]), _number(x["games"]),
              _number(x["avg_prediction_accuracy"], 1),
              _number(x["avg_duration_ticks"], 1),
              _page_list(x["recent_game_ids"])] for x in patterns], (0,), (4,))
        if patterns else '<p class="nodata">no data in this period</p>',
        worst=html_table(
            ["game", "ended (UTC)", "predictions", "mean absolute error (ticks)",
             "within 1 window (%)", "patterns"],
            [[_page_text(g["game_id"]), g["ended_at"][:19], _number(g["predictions"]),
              _number(g["mean_absolute_error"], 1),
              _number(g["prediction_accuracy"], 1),
              _page_list(g["patterns_detected"])] for g in data["worst_games"]],
            (0, 5))
        if data["worst_games"] else '<p class="nodata">no data in this period</p>',
        rejects=html_table(
            ["code", "lines", "newest (UTC)", "its error", "its line (start)"],
            [[_page_text(c["code"]), _number(c["lines"]), c["newest_at"][:19],
              _page_text(c["newest_error"]), f'<code>{_page_text(c["newest_raw"])}</code>']
             for c in data["rejects_by_code"]], (0,), (3, 4))
        if data["rejects_by_code"] else '<p class="nodata">no data in this period</p>')


# ---------------------------------------------------------------------------
# CHECKS: what is wrong with a deployment, and what to do about it
# ---------------------------------------------------------------------------

SQL_NEWEST_PREDICTION = "SELECT max(created_at) FROM predictions"


def check_database(path: str) -> list[str]:
    """What is wrong with the database at path, each with what to do about it."""
    if not os.path.exists(path):
        return [f"{path} does not exist: run tedstore init, or start the daemon"]
    try:
        with contextlib.closing(connect(path, readonly=True)) as conn:
            problems = []
            version = conn.pragma("user_version")
            if version != schema_version():
                problems.append(f"{path} is at schema version {version}, not "
                                f"{schema_version()}: run tedstore init to upgrade it")
            elif schema_differences(conn):
                problems.append(f"{path} has a schema tedstore did not make: "
                                f"{'; '.join(schema_differences(conn))}; undo that with sqlite3 "
                                f"(DROP ...), or restore a backup")
            if conn.pragma("journal_mode") != "wal":
                problems.append(f"{path} is not in WAL mode: run tedstore init")
            verdict = conn.execute(SQL_INTEGRITY_CHECK).get
            if verdict != "ok":
                problems.append(f"{path} failed its integrity check ({verdict}): restore the "
                                f"newest backup (see README, Backups)")
            return problems
    except (StoreError, apsw.Error) as exc:
        return [f"{path} cannot be read: {exc}"]


def why_unreachable(settings: Settings, exc: ProtocolError) -> tuple[Optional[str], str]:
    """When the socket does not answer: (the pid of a daemon running anyway, one line)."""
    running = serving(settings.db)
    if running is None:
        return None, f"tedstore is not running: {exc}"
    pid, path = running
    if path and path != settings.socket:
        return pid, (f"tedstore (pid {pid}) serves {settings.db} on {path}, not on "
                     f"{settings.socket}: use --socket {path} or set TEDSTORE_SOCKET")
    if not os.path.lexists(settings.socket):
        return pid, (f"tedstore (pid {pid}) is running on {settings.db}, but its socket "
                     f"{settings.socket} is gone: restart tedstore to listen again")
    return pid, f"tedstore (pid {pid}) is running on {settings.db}, but does not answer: {exc}"


def offline_status(settings: Settings, exc: ProtocolError) -> dict:
    """What `status` shows when the daemon does not answer: why, and what the database knows."""
    pid, why = why_unreachable(settings, exc)
    offline = {"running": pid is not None, "answering": False, "pid": pid, "error": why,
               "database": database_facts(settings.db)}
    if os.path.exists(settings.db):
        with contextlib.closing(connect(settings.db, readonly=True)) as conn, \
                store_errors(f"cannot read {settings.db}"):
            offline["database"]["schema_version"] = conn.pragma("user_version")
            offline["jobs"] = last_jobs(conn)
    return offline


def diagnose(settings: Settings, now: float) -> Iterator[tuple[bool, str]]:
    """(ok, message) for each thing a working deployment needs."""
    folder = os.path.dirname(os.path.abspath(settings.db))
    if not os.path.isdir(folder):
        yield False, f"database folder {folder} is missing: create it or set TEDSTORE_DB"
        return
    yield (os.access(folder, os.W_OK | os.X_OK),
           f"database folder {folder} is writable" if os.access(folder, os.W_OK | os.X_OK)
           else f"database folder {folder} is not writable by uid {os.getuid()}: "
                f"chown it to the tedstore user")
    problems = check_database(settings.db)
    yield (not problems, problems[0] if problems else
           f"database {settings.db} is intact, schema version {schema_version()}")
    for problem in problems[1:]:
        yield False, problem
    try:
        pong = request(settings.socket, "ping", timeout=3.0)
        yield pong.get("pong") is True, f"daemon answers on {settings.socket}"
    except ProtocolError as exc:
        yield False, why_unreachable(settings, exc)[1]
    wal = database_facts(settings.db)["wal_bytes"] or 0
    yield (wal <= WAL_WARNING_BYTES, f"WAL is {wal / 1e6:.1f} MB" + (
        "" if wal <= WAL_WARNING_BYTES else f": {wal_held_back(settings.checkpoint)}"))
    usage = shutil.disk_usage(folder)
    free_ok = usage.free >= 1e9 and usage.free >= 0.05 * usage.total
    yield (free_ok, f"{usage.free / 1e9:.1f} GB free on the database's disk"
           + ("" if free_ok else ": free some space, or lower the retention days"))
    clock_ok = now > 1.7e9
    newest = None
    if not problems:
        with contextlib.closing(connect(settings.db, readonly=True)) as conn, \
                store_errors(f"cannot read {settings.db}"):
            newest = conn.execute(SQL_NEWEST_PREDICTION).get
    if newest is not None and text_epoch(newest) > now + settings.max_clock_skew:
        clock_ok = False
    yield (clock_ok, f"clock reads {utc_text(now)} UTC" + ("" if clock_ok else
           f": it is behind the newest stored event ({newest}) or implausible; fix NTP"))
    if settings.backup_dir:
        writable = os.access(settings.backup_dir, os.W_OK)
        yield (writable, f"backup folder {settings.backup_dir} is "
               + ("writable" if writable else "missing or not writable: create it"))


# ---------------------------------------------------------------------------
# CLI: the tedstore command, a thin layer over all of the above
# ---------------------------------------------------------------------------
# A thin layer: each command reads its options, calls the library, and formats what it
# gets back. Shared options are decorators that hand the command a ready Settings.

class TedstoreGroup(click.Group):
    """Every error a user can cause ends as one line and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TedstoreError as exc:
            raise click.ClickException(str(exc)) from None
        except BrokenPipeError:          # `| head` has what it wanted: stop quietly, as
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # SIGPIPE would
            ctx.exit(128 + signal.SIGPIPE)
        except OSError as exc:           # a file or pipe the user named, not a bug of ours
            where = f": {exc.filename}" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


SETTING_OPTIONS = {
    "db": click.option("--db", help="Database path [env TEDSTORE_DB; default ./tedstore.db, "
                                    "or $STATE_DIRECTORY/tedstore.db under systemd]."),
    "socket": click.option("--socket", help="Daemon socket [env TEDSTORE_SOCKET; default "
                                            "./tedstore.sock, or $RUNTIME_DIRECTORY/"
                                            "tedstore.sock under systemd]."),
}
CONFIG_OPTION = click.option("--config", type=click.Path(dir_okay=False),
                             help=f"TOML settings file [default: {DEFAULT_CONFIG_FILE} if "
                                  f"present].")


def with_settings(*names: str) -> Callable[[Callable], Callable]:
    """--config and the named setting flags (db, socket); the command gets `settings`."""
    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def run(config: Optional[str], **options: Any) -> Any:
            flags = {name: options.pop(name) for name in names}
            return command(settings=load_settings(config, **flags), **options)
        for name in reversed(names):
            run = SETTING_OPTIONS[name](run)
        return CONFIG_OPTION(run)
    return decorate


class Output:
    """Where a command's result goes: as JSON (--json), or as the command's lines."""

    def __init__(self, as_json: bool):
        self.as_json = as_json

    def show(self, result: Any, lines: Callable[[Any], Iterable[str]]) -> None:
        if self.as_json:
            click.echo(json.dumps(result, indent=2, default=str))
        else:
            for line in lines(result):
                click.echo(line)


def with_output(command: Callable) -> Callable:
    """--json; the command gets `output`."""
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @functools.wraps(command)
    def run(as_json: bool, **options: Any) -> Any:
        return command(output=Output(as_json), **options)
    return run


def closed_at_exit(conn: apsw.Connection) -> apsw.Connection:
    """The connection, closed when the command ends, however it ends."""
    click.get_current_context().call_on_close(conn.close)
    return conn


def with_reader(command: Callable) -> Callable:
    """--config, --db and --socket for a read command, which gets a `reader`: the database
    file when it can be read (or --db names it), else the daemon over its socket."""
    @functools.wraps(command)
    def run(config: Optional[str], **options: Any) -> Any:
        db, socket_path = options.pop("db"), options.pop("socket")
        settings = load_settings(config, db=db, socket=socket_path)
        use_file = db is not None or (socket_path is None and readable(settings.db))
        reader = Reader(db_path=settings.db) if use_file else Reader(settings.socket)
        click.get_current_context().call_on_close(reader.close)
        return command(reader=reader, **options)
    for name in ("socket", "db"):
        run = SETTING_OPTIONS[name](run)
    return CONFIG_OPTION(run)


def readable(path: str) -> bool:
    """Whether this user may read the database file (its WAL needs the folder, too)."""
    return os.access(path, os.R_OK) and os.access(os.path.dirname(os.path.abspath(path)), os.X_OK)


def filter_options(args: type) -> Callable:
    """--tracker, and --model where the query reads predictions: the command gets them in
    `filters` (the ones given)."""
    fields = {field.name for field in msgspec.structs.fields(args)}

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def run(**options: Any) -> Any:
            given = {name: options.pop(name) for name in ("tracker", "model") if name in fields}
            return command(filters={k: v for k, v in given.items() if v is not None}, **options)
        if "model" in fields:
            run = click.option("--model", help="Only this model's predictions (a "
                                               "model_version) [default: all].")(run)
        return click.option("--tracker", help="Only this tracker's records [default: all "
                                              "trackers'].")(run)
    return decorate


def window_options(args: type[Window]) -> Callable:
    """--hours, --days, --since and --until, the same for every command over a time window,
    and its filters; the command gets `window`, the ones given (the query's parameters
    default the rest)."""
    span = click.FloatRange(min=0, min_open=True)

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def run(hours: Optional[float], days: Optional[float], since: Optional[str],
                until: Optional[str], filters: dict, **options: Any) -> Any:
            given = {name: value for name, value in (("hours", hours), ("days", days),
                                                     ("since", since), ("until", until))
                     if value is not None}
            if len(given.keys() & {"hours", "days"}) + bool(given.keys() & {"since", "until"}) > 1:
                first, second, *_ = given
                raise click.UsageError(f"give --{first} or --{second}, not both")
            now = time.time()
            for name in given.keys() & {"since", "until"}:    # CLI times: UTC, or spans back
                given[name] = parse_when(given[name], now)
            if given.get("since", -math.inf) >= given.get("until", math.inf):
                raise ConfigError(f"the window starts ({utc_text(given['since'])}) after it "
                                  f"ends ({utc_text(given['until'])})")
            return command(window={**given, **filters}, **options)
        for option in (
                click.option("--until", help="End of the window (2026-11-22T08:00, 1h) "
                                             "[default: now]."),
                click.option("--since", help="Start of the window: an ISO-8601 date or time "
                                             "in UTC (2026-11-20) or a span back (48h, 7d)."),
                click.option("--days", type=span, help="The last N days."),
                click.option("--hours", type=span, help=f"The last N hours [default: "
                                                        f"{args().described()}].")):
            run = option(run)
        return filter_options(args)(run)
    return decorate


def read_command(name: str) -> Callable:
    """A read command (section 7's queries): --json, --db or --socket (it gets a `reader`),
    and its query's window and filters (--tracker, --model) when it has them."""
    args = QUERIES[name].args

    def decorate(command: Callable) -> Callable:
        command = (window_options(args) if issubclass(args, Window)
                   else filter_options(args))(command)
        return cli.command(name)(with_reader(with_output(command)))
    return decorate


def listing(rows: list[dict], empty: str, heading: str,
            columns: list[tuple[str, str, Callable[[Any], str]]]) -> list[str]:
    """A read command's lines: one that says the window holds nothing, or a heading and
    the rows as a table."""
    return [empty] if not rows else [heading, *table(rows, columns)]


def fmt(digits: int = 1, unit: str = "") -> Callable[[Any], str]:
    """A number rounded to `digits`, with its unit; '-' for nothing."""
    def show(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}{unit}"
        return f"{value:,.{digits}f}{unit}"
    show.numeric = True                  # type: ignore[attr-defined]
    return show


def text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str, Callable[[Any], str]]]) -> list[str]:
    """Rows as aligned columns under their headers; numbers to the right."""
    cells = [[show(row.get(key)) for key, _, show in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max([len(header)] + [len(line[i]) for line in cells])
              for i, header in enumerate(headers)]
    numeric = [getattr(show, "numeric", False) for _, _, show in columns]
    def line(values: list[str]) -> str:
        return "  ".join(value.rjust(width) if right else value.ljust(width)
                         for value, width, right in zip(values, widths, numeric)).rstrip()
    return [line(headers), *map(line, cells)]


def period(result: dict) -> str:
    return f"{shown_time(result['since'])} to {shown_time(result['until'])} UTC"


class TrackerOption(click.ParamType):
    """A tracker's name as the wire allows it, refused by click otherwise (usage error)."""

    name = "NAME"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
            self.fail(f"{value!r} is not a tracker name: 1 to 64 letters, digits, dots, "
                      f"dashes or underscores", param, ctx)
        return value


TRACKER_OPTION = TrackerOption()


def outcomes(result: IngestResult) -> str:
    """'3 stored, 1 duplicate, 0 rejected' for the lines a command sent or imported."""
    rejected = f"{len(result.rejections):,} rejected"
    if result.stored is None:
        return f"{result.acked:,} acknowledged, {rejected}"
    return (f"{result.stored:,} stored, {result.duplicates:,} "
            f"duplicate{'' if result.duplicates == 1 else 's'}, {rejected}")


class InputFiles:
    """NDJSON from files or '-' (stdin) in blocks of whole lines, numbered as one stream,
    so that a rejected line can be named FILE:LINE."""

    def __init__(self, paths: Iterable[str]):
        self.paths = list(paths) or ["-"]
        self.starts: list[tuple[int, str]] = []     # (number of a file's first line, name)
        self.lines = 0

    def blocks(self, block_size: int = 1 << 20) -> Iterator[bytes]:
        """Blocks of whole lines. From a pipe, also b"" whenever nothing more has arrived
        yet: what was read so far can then leave before the next read waits."""
        for path in self.paths:
            self.starts.append((self.lines + 1, "<stdin>" if path == "-" else path))
            stream = sys.stdin.buffer if path == "-" else open(path, "rb")
            try:
                try:
                    piped = not stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
                except (OSError, ValueError):            # an in-memory stream in tests
                    piped = False
                rest = b""
                while True:
                    if piped:
                        if not select.select([stream], [], [], 0)[0]:
                            yield b""
                        data = os.read(stream.fileno(), block_size)
                    else:
                        data = stream.read(block_size)
                    if not data:
                        break
                    data = rest + data
                    end = data.rfind(b"\n") + 1
                    if end:
                        self.lines += data.count(b"\n", 0, end)
                        yield data[:end]
                    rest = data[end:]
                if rest:                                 # a last line without its newline
                    self.lines += 1
                    yield rest + b"\n"
            finally:
                if stream is not sys.stdin.buffer:
                    stream.close()

    def count(self) -> int:
        """Lines in the named files, for a progress bar; 0 for stdin or off a terminal."""
        if not sys.stderr.isatty() or "-" in self.paths:
            return 0
        return sum(block.count(b"\n") for block in InputFiles(self.paths).blocks())

    def where(self, line: int) -> str:
        first, name = max((start for start in self.starts if start[0] <= line),
                          default=(1, "<input>"))
        return f"{name}:{line - first + 1}"

    def report(self, rejections: list) -> None:
        for line, code, error in rejections:
            click.echo(f"{self.where(line)}: {code}: {error}", err=True)


def write_stdout(blocks: Iterable[bytes]) -> None:
    """Write blocks to stdout; a reader that leaves early (`| head`) ends the command
    quietly (TedstoreGroup)."""
    out = sys.stdout.buffer
    for block in blocks:
        out.write(block)
    out.flush()


class Progress:
    """A progress bar on stderr when it is a terminal and the work is long, else nothing."""

    def __init__(self, bar: Any = None):
        self.bar = bar
        self.done = 0

    def advance(self, steps: int) -> None:
        self.advance_to(self.done + steps)

    def advance_to(self, done: int) -> None:
        if self.bar is not None and done > self.done:
            self.bar.update(done - self.done)
        self.done = max(self.done, done)


@contextlib.contextmanager
def progress_bar(length: int, label: str) -> Iterator[Progress]:
    if sys.stderr.isatty() and length > 1:
        with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
            yield Progress(bar)
    else:
        yield Progress()


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    # journald stamps each line itself; a terminal needs the time
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") \
        else "%(asctime)s tedstore %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


@click.group(cls=TedstoreGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.version_option(__version__, prog_name="tedstore")
def cli() -> None:
    """tedstore: the durable store for TED trackers.

    Start the daemon with `tedstore serve`; trackers send NDJSON events to its Unix
    socket; ask questions with `tedstore status` or the sqlite3 CLI.
    """


@cli.command("serve")
@with_settings("db", "socket")
def serve_command(settings: Settings) -> None:
    """Run the daemon in the foreground.

    It creates or upgrades the database and listens on the socket (or on the one systemd
    passes). On SIGTERM or Ctrl-C it stops reading, commits and acknowledges what it
    accepted, and exits.

    Example: tedstore serve --db /var/lib/tedstore/tedstore.db
    """
    setup_logging()
    sys.exit(Daemon(settings).run())


@cli.command("init")
@with_settings("db")
@click.option("--check", is_flag=True, help="Only check the database; exit 1 if it is not ready.")
def init_command(settings: Settings, check: bool) -> None:
    """Create, upgrade or check the database.

    With --check it changes nothing and exits 1 if the database is not ready.

    Example: tedstore init --check --db /var/lib/tedstore/tedstore.db
    """
    if not check:
        before = init_store(settings.db)
        upgraded = f", upgraded from {before}" if before and before < schema_version() else ""
        click.echo(f"database {settings.db} is ready (schema version {schema_version()}{upgraded})")
        return
    problems = check_database(settings.db)
    for problem in problems:
        click.echo(f"FAIL {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"ok: {settings.db} is at schema version {schema_version()} and intact")


@cli.command("status")
@with_settings("db", "socket")
@click.option("--format", "form", type=click.Choice(["prometheus"]),
              help="prometheus: the counters in Prometheus's text format (tedstore_up 0 when "
                   "the daemon does not answer; exit status 0 either way).")
@with_output
def status_command(settings: Settings, output: Output, form: Optional[str]) -> None:
    """Show what the daemon is doing.

    If the daemon is not running, it says so, shows what the database knows and exits 1.

    Example: tedstore status --json
    """
    try:
        status = {"running": True, **request(settings.socket, "status")["status"]}
    except ProtocolError as exc:
        if form == "prometheus":
            click.echo("\n".join(prometheus_lines(None)))
            return
        output.show(offline_status(settings, exc),
                    lambda offline: offline_lines(offline, time.time()))
        sys.exit(1)
    if form == "prometheus":
        click.echo("\n".join(prometheus_lines(status)))
        return
    output.show(status, lambda status: status_lines(status, time.time()))


def _label(value: str) -> str:
    """A label value as the Prometheus text format writes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_lines(status: Optional[dict]) -> list[str]:
    """The status's counters in the Prometheus text exposition format (for node_exporter's
    textfile collector); None means the daemon did not answer."""
    lines: list[str] = []

    def family(name: str, kind: str, about: str, samples: Iterable[tuple[dict, Any]]) -> None:
        lines.extend([f"# HELP tedstore_{name} {about}", f"# TYPE tedstore_{name} {kind}"])
        for labels, value in samples:
            inside = ",".join(f'{key}="{_label(str(v))}"' for key, v in labels.items())
            number = int(value) if isinstance(value, (bool, int)) or value is None \
                else repr(float(value))                      # exact: no 1.79e+09 for a time
            lines.append(f"tedstore_{name}{{{inside}}} {number}" if inside
                         else f"tedstore_{name} {number}")

    family("up", "gauge", "1 if the daemon answered.", [({}, status is not None)])
    if status is None:
        return lines

    def when(text: Optional[str]) -> float:
        return parse_when(text, 0) if text else 0

    writer, queue, db = status["writer"], status["queue"], status["database"]
    latency, connections = status["commit_latency_ms"], status["connections"]
    family("info", "gauge", "The version and the checkpoint mode.",
           [({"version": status["version"], "checkpoint": writer["checkpoint"]}, 1)])
    family("uptime_seconds", "gauge", "Seconds since the daemon started.",
           [({}, status["uptime_s"])])
    family("events_total", "counter", "Lines that changed rows, by event type.",
           [({"type": k}, v) for k, v in status["events"].items()])
    family("duplicates_total", "counter", "Lines that changed nothing, by event type.",
           [({"type": k}, v) for k, v in status["duplicates"].items()])
    family("rejects_total", "counter", "Refused lines, by code.",
           [({"code": k}, v) for k, v in status["rejects"].items()])
    family("records_saved_total", "counter", "Rows inserted or updated.",
           [({}, status["repository"]["records_saved"])])
    family("commits_total", "counter", "Committed batches.", [({}, writer["batches"])])
    family("commit_errors_total", "counter", "Failed commit attempts.",
           [({}, status["repository"]["errors"])])
    family("writer_failing", "gauge", "1 while commits are failing and being retried.",
           [({}, writer["state"] != "ok")])
    family("commit_latency_seconds", "gauge", "Commit latency since start, by quantile.",
           [({"quantile": q}, (latency[key] or 0) / 1000) for q, key in
            (("0.5", "p50"), ("0.99", "p99"))])
    family("queue_events", "gauge", "Lines waiting for a commit.", [({}, queue["events"])])
    family("queue_bytes", "gauge", "Bytes waiting for a commit.", [({}, queue["bytes"])])
    family("queue_full", "gauge", "1 while clients wait for room.", [({}, queue["full"])])
    family("connections_open", "gauge", "Open client connections.",
           [({}, connections["open"])])
    family("connections_total", "counter", "Client connections since start.",
           [({}, connections["total"])])
    family("database_bytes", "gauge", "Size of the database file.", [({}, db["size_bytes"])])
    family("wal_bytes", "gauge", "Size of the WAL file.", [({}, db["wal_bytes"])])
    family("checkpoints_total", "counter", "Idle checkpoints completed.",
           [({}, writer["checkpoints"])])
    family("last_timestamp_seconds", "gauge", "When each job last ran, in Unix time (0: never).",
           [({"job": "rollup"}, when((status["last_rollup"] or {}).get("at"))),
            ({"job": "retention"}, when((status["last_retention"] or {}).get("at"))),
            ({"job": "backup"}, when((status["last_backup"] or {}).get("at"))),
            ({"job": "checkpoint"}, when(writer["last_checkpoint"])),
            ({"job": "commit"}, when(status["repository"]["last_save"]))])
    return lines


def ago(when: Optional[str], now: float) -> str:
    """'3 min ago' for a stored UTC time, 'never' for none."""
    if not when:
        return "never"
    return f"{duration(max(0.0, now - parse_when(when, now)))} ago"


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def megabytes(size: Optional[int]) -> str:
    return "-" if size is None else f"{size / 1e6:,.1f} MB"


def counts(by_name: dict) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in by_name.items()) or "none"


def wal_held_back(checkpoint: str) -> str:
    """What to do about a WAL past WAL_WARNING_BYTES, given TEDSTORE_CHECKPOINT."""
    if checkpoint == "off":
        return "checkpoints are left to a replicator (TEDSTORE_CHECKPOINT=off): is it running?"
    return "a long-open reader (a sqlite3 session?) holds it back; close it"


def offline_lines(offline: dict, now: float) -> list[str]:
    """What status says for people when the daemon does not answer, in units."""
    db, jobs = offline["database"], offline.get("jobs") or {}
    lines = [offline["error"],
             f"database:     {db['path']}, {megabytes(db['size_bytes'])}, WAL "
             f"{megabytes(db['wal_bytes'])}, schema {db.get('schema_version', '-')}"]
    for name in ("rollup", "retention", "backup"):
        job = jobs.get(name) or {}
        lines.append(f"{name + ':':<14}{ago(job.get('at'), now)}"
                     + (f", through {job['through']}" if job.get("through") else "")
                     + (f", {job['path']}" if job.get("path") else ""))
    return lines


def status_lines(status: dict, now: float) -> list[str]:
    """The daemon's status for people: a one-line summary, then a line per subject, in
    units; `status --json` has every field."""
    writer, queue, db = status["writer"], status["queue"], status["database"]
    repository, latency = status["repository"], status["commit_latency_ms"]
    jobs = status.get("scheduler") or {}
    trouble = (f"; WRITER FAILING: {writer['error']}" if writer["state"] != "ok" else
               f"; JOBS FAILING: {jobs['error']}" if jobs.get("error") else
               "; QUEUE FULL: clients wait" if queue["full"] else
               f"; WAL LARGE: {wal_held_back(writer['checkpoint'])}"
               if (db["wal_bytes"] or 0) > WAL_WARNING_BYTES else "")
    ms = fmt(1, " ms")
    rollup, retention, backup = (status["last_rollup"] or {}, status["last_retention"] or {},
                                 status["last_backup"] or {})
    deleted = sum((retention.get("deleted") or {}).values())
    recent = status["recent"]
    return [
        f"tedstore {status['version']} is running (pid {status['pid']}, up "
        f"{duration(status['uptime_s'])}): {recent['events']:,} events in the last "
        f"{duration(recent['seconds'])}, last commit {ago(repository['last_save'], now)}, queue "
        f"{queue['events']:,}, WAL {megabytes(db['wal_bytes'])}{trouble}",
        f"writer:       {writer['state']}, {repository['records_saved']:,} rows saved in "
        f"{writer['batches']:,} commits, {repository['errors']:,} commit errors, "
        f"{writer['unsaved']:,} lines unsaved",
        f"checkpoints:  {writer['checkpoint']}, {writer['checkpoints']:,} idle checkpoints, "
        f"last {ago(writer['last_checkpoint'], now)}",
        f"queue:        {queue['events']:,} of {queue['max_events']:,} events, "
        f"{megabytes(queue['bytes'])} of {megabytes(queue['max_bytes'])}"
        + (" (full)" if queue["full"] else ""),
        f"commits:      avg {ms(latency['avg'])}, p50 {ms(latency['p50'])}, "
        f"p99 {ms(latency['p99'])}, batches wait at most "
        f"{status['manager']['persist_interval'] * 1000:g} ms",
        f"events:       {counts(status['events'])}",
        f"duplicates:   {counts(status['duplicates'])}",
        f"rejects:      {counts(status['rejects'])}",
        f"connections:  {status['connections']['open']:,} open, "
        f"{status['connections']['total']:,} since start, refused: "
        f"{counts(status['connections']['refused'])}",
        f"queries:      {status['queries']['answered']:,} answered, "
        f"{status['queries']['refused']:,} refused, {status['queries']['waiting']:,} waiting",
        f"rollup:       {ago(rollup.get('at'), now)}"
        + (f", through {rollup['through']}" if rollup.get("through") else ""),
        f"retention:    {ago(retention.get('at'), now)}"
        + (f", {deleted:,} rows deleted" if retention else ""),
        f"backup:       {ago(backup.get('at'), now)}"
        + (f", {backup['path']}" if backup.get("path") else ""),
        f"database:     {db['path']}, {megabytes(db['size_bytes'])}, WAL "
        f"{megabytes(db['wal_bytes'])}, schema {db['schema_version']}",
        f"socket:       {status['socket']}",
    ]


@cli.command("doctor")
@with_settings("db", "socket")
def doctor_command(settings: Settings) -> None:
    """Check a deployment and say what to fix.

    Paths and permissions, database integrity and schema, the socket, the WAL, free
    disk and the clock; exits 1 if anything is wrong.

    Example: sudo -u tedstore tedstore doctor --config /etc/tedstore.toml
    """
    failures = 0
    for ok, message in diagnose(settings, time.time()):
        click.echo(f"{'ok  ' if ok else 'FAIL'} {message}")
        failures += not ok
    if failures:
        click.echo(f"{failures} problem(s) found", err=True)
        sys.exit(1)


@cli.command("send")
@with_settings("socket")
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, allow_dash=True))
def send_command(settings: Settings, files: tuple[str, ...]) -> None:
    """Send NDJSON events and wait for the acks.

    Reads FILES, or stdin without them. Rejected lines are listed as FILE:LINE: code:
    reason, and the exit status is 1 if any line was rejected.

    Example: tedstore send events-2026-11-21.ndjson
    """
    source = InputFiles(files)
    with progress_bar(source.count(), "sending") as bar:
        result = stream_lines(settings.socket, source.blocks(), progress=bar.advance_to)
    source.report(result.rejections)
    click.echo(f"sent {result.lines:,} lines: {outcomes(result)}", err=True)
    if result.rejections:
        sys.exit(1)


@cli.command("import")
@with_settings("db", "socket")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--tracker", type=TRACKER_OPTION,
              help="Make every prediction, side bet and state line this tracker's (merging "
                   "hosts whose trackers were all `default`).")
def import_command(settings: Settings, files: tuple[str, ...], tracker: Optional[str]) -> None:
    """Replay NDJSON logs into the database.

    Through the daemon if it runs, else straight into the database. Replaying is
    idempotent, and the hourly metrics of the hours the logs cover are rolled up again.

    Example: tedstore import tracker-2026-11-*.ndjson
    """
    source = InputFiles(files)
    blocks = source.blocks() if tracker is None else as_tracker(source.blocks(), tracker)
    with progress_bar(source.count(), "importing") as bar:
        result, via = replay(settings, blocks, bar.advance_to)
    source.report(result.rejections)
    click.echo(f"imported {result.lines:,} lines into {via}: {outcomes(result)}", err=True)
    if result.rejections:
        sys.exit(1)


SIMULATED_PERCENT = 100      # the simulator's progress bar counts percent of the played time


def simulated_lines(played: Iterable[dict], bar: Progress) -> Iterator[bytes]:
    """The simulator's events as lines, moving the bar through the time they span: the
    games are played in time order, so each event's time says how far it got."""
    start, end = None, time.time()
    for event in played:
        ts = event.get("ts")
        if isinstance(ts, (int, float)):
            start = ts / 1000 if start is None else start
            if end > start:
                bar.advance_to(int(SIMULATED_PERCENT * min(1.0, (ts / 1000 - start)
                                                             / (end - start))))
        yield msgspec.json.encode(event) + b"\n"
    bar.advance_to(SIMULATED_PERCENT)


@cli.command("simulate")
@with_settings("socket")
@click.option("--games", type=click.IntRange(min=1),
              help="How many games to play [default: 10, or as many as --events needs].")
@click.option("--days", type=click.FloatRange(min=0, min_open=True, max=366),
              help=f"Fill the last N days up to now at TED's volume ({GAMES_A_DAY} games a "
                   f"day).")
@click.option("--events", type=click.IntRange(min=1), help="Stop after this many events.")
@click.option("--trackers", type=click.IntRange(1, len(SIMULATED_TRACKERS)), default=1,
              show_default=True,
              help="Trackers with different models (and flaws) playing the same games: "
                   + ", ".join(f"{t.name} ({t.model})" for t in SIMULATED_TRACKERS) + ".")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True),
              help="Events per second [default: as fast as possible].")
@click.option("--mix", type=click.Choice(["game", "predictions"]), default="game",
              show_default=True, help="The full game feed, or predictions only.")
@click.option("--seed", type=int, help="Random seed: the same seed plays the same games, "
                                       "ids included [default: a new seed, so new game ids].")
@click.option("--start", help="When the first game starts (2026-11-20T08:00, 48h) "
                              "[default: so that the last game ends now].")
@click.option("--stdout", "to_stdout", is_flag=True, help="Print the NDJSON instead of sending it.")
def simulate_command(settings: Settings, games: Optional[int], days: Optional[float],
                     events: Optional[int], trackers: int, rate: Optional[float], mix: str,
                     seed: Optional[int], start: Optional[str], to_stdout: bool) -> None:
    """Play a synthetic tracker.

    Games with crash-style price paths, ticks with features, predictions and side bets,
    sent to the daemon (or printed with --stdout).

    Example: tedstore simulate --days 3 --trackers 2
    """
    if days and (games or start):
        raise click.UsageError("give --days, or --games and --start, not both")
    first = parse_when(start, time.time()) if start else None
    try:
        played = simulate_events(games if games or events or days else 10, events=events,
                                 seed=seed, mix=mix, start=first, trackers=trackers, days=days,
                                 latest=time.time() + settings.max_clock_skew)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if to_stdout:
        write_stdout(msgspec.json.encode(event) + b"\n" for event in played)
        return
    started = time.monotonic()
    with progress_bar(SIMULATED_PERCENT, "simulating") as bar:
        result = stream_lines(settings.socket, simulated_lines(played, bar), rate=rate)
    seconds = time.monotonic() - started
    click.echo(f"simulated {result.lines:,} events in {seconds:,.1f} s "
               f"({result.lines / seconds:,.0f}/s): {outcomes(result)}", err=True)
    if result.rejections:
        sys.exit(1)


@cli.command("backup")
@with_settings("db")
@click.argument("dest", type=click.Path())
def backup_command(settings: Settings, dest: str) -> None:
    """Copy the live database to DEST, a file or a folder.

    The copy is one consistent snapshot, checked with PRAGMA integrity_check. Safe while the
    daemon runs; never overwrites. In a folder it is named tedstore-YYYYmmddTHHMMSSZ.db.

    Example: tedstore backup /srv/backups
    """
    detail = backup_database(settings.db, dest)
    click.echo(f"backed up {settings.db} to {detail['path']} ({detail['bytes']:,} bytes, "
               f"integrity ok) in {detail['seconds']:.2f} s")


@cli.command("restore")
@with_settings("db")
@click.argument("backup", type=click.Path(dir_okay=False))
def restore_command(settings: Settings, backup: str) -> None:
    """Replace the database with BACKUP (the daemon must be stopped).

    The backup is checked first; the replaced database is kept beside it as
    DB.replaced-YYYYmmddTHHMMSSZ, and no stale -wal or -shm stays behind.

    Example: tedstore restore /srv/backups/tedstore-20261122T031500Z.db
    """
    detail = restore_database(settings.db, backup, time.time())
    kept = f"; the replaced database is kept as {detail['kept']}" if detail["kept"] else ""
    click.echo(f"restored {settings.db} from {backup} ({detail['bytes']:,} bytes, integrity "
               f"ok){kept}")


@cli.command("retention")
@with_settings("db")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@with_output
def retention_command(settings: Settings, dry_run: bool, output: Output) -> None:
    """Delete rows past their retention.

    Hours not rolled up yet are rolled up first. Runs in small transactions, so a running
    daemon keeps ingesting meanwhile.

    Example: tedstore retention --dry-run
    """
    conn = closed_at_exit(open_store(settings.db, create=False, synchronous=settings.synchronous,
                              checkpoint=settings.checkpoint))
    removed = run_retention(conn, yielding_steps(conn), settings, time.time(), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    output.show({"dry_run": dry_run, "would_delete" if dry_run else "deleted": removed},
                lambda result: [f"{table}: {verb} {count:,} rows"
                                for table, count in removed.items()])


@cli.command("rollup")
@with_settings("db")
@click.option("--since", help="Recompute from this time (2026-11-20, 48h) instead of "
                              "from the last rollup.")
@with_output
def rollup_command(settings: Settings, since: Optional[str], output: Output) -> None:
    """Compute the hourly metrics and the daily histograms.

    Every completed hour since the last rollup, or since --since, and every settled day whose
    histograms long windows lack.

    Example: tedstore rollup --since 2026-11-20   (after importing old logs)
    """
    now = time.time()
    start = parse_when(since, now) if since else None
    conn = closed_at_exit(open_store(settings.db, create=False, synchronous=settings.synchronous,
                              checkpoint=settings.checkpoint))
    hours = hours_to_roll(conn, now, settings, since=start)
    with progress_bar(len(hours), "rolling up") as bar:
        detail = run_rollups(conn, yielding_steps(conn), hours, now, progress=bar.advance)
    days = detail["histogram_days"]
    output.show(detail, lambda detail: [
        (f"rolled up {len(hours):,} hour(s) from {utc_text(hours[0])} to {detail['through']}"
         if hours else "no hour to roll up") + (f", and wrote the histograms of {days:,} day(s)"
                                               if days else "")
        if hours or days else "nothing to roll up"])


PREDICTION_COLUMNS = [("predicted_at_tick", "at tick", fmt()),
                      ("predicted_end_tick", "predicted end", fmt()),
                      ("actual_end_tick", "actual end", fmt()), ("raw_error", "error (ticks)", fmt()),
                      ("e40", "e40", fmt(3)), ("confidence", "confidence", fmt(2)),
                      ("model_version", "model", text)]
SIDE_BET_COLUMNS = [("placed_at_tick", "placed at tick", fmt()),
                    ("window_end_tick", "window end", fmt()),
                    ("probability", "probability", fmt(3)), ("expected_value", "EV", fmt(3)),
                    ("recommendation", "advice", text), ("actual_outcome", "outcome", text),
                    ("payout", "payout", fmt(2))]


@read_command("game")
@click.argument("game_id")
def game_command(reader: Reader, output: Output, filters: dict, game_id: str) -> None:
    """One game: its outcome, predictions, side bets and tick samples.

    Example: tedstore game sim-1-42
    """
    found = reader.ask("game", id=game_id, **filters)
    def lines(found: dict) -> Iterator[str]:
        game, ticks = found["game"], found["ticks"]
        yield (f"game {game['game_id']}: ticks {text(game['start_tick'])} to "
               f"{text(game['end_tick'])} ({fmt()(game['duration_ticks'])} ticks), peak "
               f"{fmt(4)(game['peak_price'])} at tick {text(game['peak_tick'])}, final "
               f"{fmt(4)(game['final_price'])}")
        yield (f"started {shown_time(game['started_at'])}, ended {shown_time(game['ended_at'])} UTC; "
               f"patterns {text(game['patterns_detected'])}; within 1 window "
               f"{fmt(1)(game['prediction_accuracy'])} %")
        yield ""
        yield f"{len(found['predictions'])} prediction(s)"
        if found["predictions"]:
            yield from table(found["predictions"], PREDICTION_COLUMNS)
        yield ""
        yield f"{len(found['side_bets'])} side bet(s)"
        if found["side_bets"]:
            yield from table(found["side_bets"], SIDE_BET_COLUMNS)
        yield ""
        yield (f"{ticks['samples']} tick sample(s)" + (f", ticks {ticks['first_tick']} to "
               f"{ticks['last_tick']}" if ticks["samples"] else ""))
    output.show(found, lines)


@read_command("games")
@click.option("--limit", type=click.IntRange(1, MAX_ROWS), default=50, show_default=True,
              help="The most games to show.")
@click.option("--pattern", help="Only games with this pattern.")
def games_command(reader: Reader, output: Output, window: dict, limit: int,
                  pattern: Optional[str]) -> None:
    """Games that ended in a window, newest first.

    Example: tedstore games --since 2026-11-21 --pattern moonshot
    """
    result = reader.games(**window, limit=limit, pattern=pattern)
    output.show(result, lambda result: listing(
        result["games"], f"no games ended from {period(result)}",
        f"{len(result['games'])} game(s) ended from {period(result)}", [
            ("ended_at", "ended (UTC)", shown_time), ("game_id", "game", text),
            ("duration_ticks", "ticks", fmt()), ("peak_price", "peak", fmt(3)),
            ("predictions", "predictions", fmt()), ("mean_absolute_error", "MAE (ticks)", fmt()),
            ("prediction_accuracy", "within 1 (%)", fmt(1)), ("side_bets_placed", "BETs", fmt()),
            ("side_bets_won", "won", fmt()), ("side_bet_payout", "payout", fmt(1)),
            ("patterns_detected", "patterns", text)]))


@read_command("metrics")
def metrics_command(reader: Reader, output: Output, window: dict) -> None:
    """The hourly metrics of a window, oldest first.

    Example: tedstore metrics --hours 48
    """
    result = reader.ask("metrics", **window)
    output.show(result, lambda result: listing(
        result["hours"], f"no hourly metrics from {period(result)} (each hour is rolled up a "
                         f"minute after it ends)",
        f"hourly metrics from {period(result)}", [
            ("hour_start", "hour (UTC)", shown_time), ("games_analyzed", "games", fmt()),
            ("predictions_made", "predictions", fmt()), ("median_e40", "median e40", fmt(3)),
            ("mean_absolute_error", "MAE (ticks)", fmt()),
            ("within_1_window", "within 1 (%)", fmt()), ("within_2_windows", "within 2 (%)", fmt()),
            ("within_3_windows", "within 3 (%)", fmt()), ("bets_won", "won", fmt()),
            ("bets_lost", "lost", fmt()), ("roi_percentage", "ROI (%)", fmt()),
            ("p99_commit_latency_ms", "commit p99 (ms)", fmt(2)),
            ("rejected_lines", "rejects", fmt())]))


@read_command("performance")
@click.option("--type", "kind", type=click.Choice(["all", "predictions", "sidebets"]),
              default="all", show_default=True, help="Which measures.")
@click.option("--by", type=click.Choice(["tracker", "model"]),
              help="One row per tracker, or per model (predictions only: side bets have none).")
def performance_command(reader: Reader, output: Output, window: dict, kind: str,
                        by: Optional[str]) -> None:
    """How the predictions and side bets did over a window.

    Example: tedstore performance --hours 24 --type predictions --by tracker
    """
    result = reader.ask("performance", **window, type=kind, by=by)

    def lines(result: dict) -> Iterator[str]:
        if by is not None:
            yield from listing(
                [{by: group.get("tracker", group.get("model_version")),
                  **(group["prediction_metrics"] or {}), **(group["sidebet_metrics"] or {})}
                 for group in result["groups"]],
                f"nothing from {period(result)}", f"by {by}, from {period(result)}",
                [(by, by, text)] + ([] if kind == "sidebets" else PERFORMANCE_PREDICTIONS)
                + ([] if kind == "predictions" or by == "model" else PERFORMANCE_SIDE_BETS))
            return
        yield f"from {period(result)}: {result['games_analyzed']:,} game(s) ended"
        p, s = result["prediction_metrics"], result["sidebet_metrics"]
        if p is not None:
            yield (f"predictions: {p['predictions_made']:,} made, {p['resolved']:,} resolved; "
                   f"median e40 {fmt(3)(p['median_e40'])}; mean absolute error "
                   f"{fmt(1, ' ticks')(p['mean_absolute_error'])}; within 1/2/3 windows "
                   f"{fmt()(p['within_1_window'])} / {fmt()(p['within_2_windows'])} / "
                   f"{fmt(1, ' %')(p['within_3_windows'])}")
        if s is not None:
            yield (f"side bets: {s['recommended']:,} recommended (BET), {s['positive_ev']:,} "
                   f"with positive EV; {s['bets_won']:,} won, {s['bets_lost']:,} lost, "
                   f"{s['pending']:,} pending; ROI {fmt(1, ' %')(s['roi_percentage'])}; "
                   f"total EV {fmt(2)(s['total_ev'])}")
    output.show(result, lines)


PERFORMANCE_PREDICTIONS = [
    ("predictions_made", "predictions", fmt()), ("resolved", "resolved", fmt()),
    ("median_e40", "median e40", fmt(3)), ("mean_absolute_error", "MAE (ticks)", fmt()),
    ("within_1_window", "within 1 (%)", fmt()), ("within_2_windows", "within 2 (%)", fmt()),
    ("within_3_windows", "within 3 (%)", fmt())]
PERFORMANCE_SIDE_BETS = [
    ("recommended", "BETs", fmt()), ("bets_won", "won", fmt()), ("bets_lost", "lost", fmt()),
    ("pending", "pending", fmt()), ("roi_percentage", "ROI (%)", fmt()),
    ("total_ev", "total EV", fmt(2))]


@read_command("trackers")
def trackers_command(reader: Reader, output: Output, window: dict) -> None:
    """Which trackers sent predictions and side bets in a window, and with which models.

    Example: tedstore trackers --days 7
    """
    result = reader.ask("trackers", **window)
    output.show(result, lambda result: listing(
        result["trackers"], f"no tracker sent anything from {period(result)}",
        f"{len(result['trackers'])} tracker(s) from {period(result)}", [
            ("tracker", "tracker", text), ("models", "models", text),
            ("predictions", "predictions", fmt()), ("side_bets", "side bets", fmt()),
            ("first_seen", "first seen (UTC)", shown_time),
            ("last_seen", "last seen (UTC)", shown_time)]))


@read_command("trends")
def trends_command(reader: Reader, output: Output, window: dict) -> None:
    """Whether e40 bias, accuracy and side-bet ROI drift, hour by hour.

    Example: tedstore trends --days 14
    """
    result = reader.ask("trends", **window)
    rows = [{"measure": name, **trend} for name, trend in result["trends"].items()]
    output.show(result, lambda result: listing(
        result["hourly"] and rows, f"no rolled-up hours from {period(result)}",
        f"trends over {len(result['hourly'])} hour(s) from {period(result)}", [
            ("measure", "measure", text), ("column", "column", text), ("n", "hours", fmt()),
            ("mean", "mean", fmt(3)), ("last", "latest", fmt(3)),
            ("slope_per_day", "slope per day", fmt(4))]))


@read_command("patterns")
def patterns_command(reader: Reader, output: Output, window: dict) -> None:
    """Which patterns the games of the last days had, and how the predictions did on them.

    Example: tedstore patterns --days 30
    """
    result = reader.ask("patterns", **window)
    output.show(result, lambda result: listing(
        result["patterns"], f"no game with a pattern ended from {period(result)}",
        f"{result['total_patterns_detected']:,} pattern detection(s) in the games ended from "
        f"{period(result)}", [
            ("pattern", "pattern", text), ("games", "games", fmt()),
            ("avg_prediction_accuracy", "within 1 (%)", fmt(1)),
            ("avg_duration_ticks", "avg ticks", fmt()),
            ("recent_game_ids", "newest games", text)]))


@read_command("calibration")
@click.option("--bins", type=click.IntRange(1, 100), default=10, show_default=True,
              help="How many equal parts [0, 1] is cut into.")
def calibration_command(reader: Reader, output: Output, window: dict, bins: int) -> None:
    """Are the side-bet probabilities honest, and do the bounds cover as often as claimed?

    Example: tedstore calibration --days 7 --tracker candidate
    """
    result = reader.ask("calibration", **window, bins=bins)

    def lines(result: dict) -> Iterator[str]:
        bets, spans = result["side_bets"], result["intervals"]
        if not bets["n"]:
            yield f"no resolved side bet from {period(result)}"
        else:
            ev = bets["expected_value"]
            yield (f"side bets from {period(result)}: {bets['n']:,} resolved, "
                   f"{fmt(1, ' %')(bets['base_rate'])} ended in their window")
            yield (f"Brier {fmt(4)(bets['brier'])} (lower is better) = reliability "
                   f"{fmt(4)(bets['reliability'])} - resolution {fmt(4)(bets['resolution'])} "
                   f"+ uncertainty {fmt(4)(bets['uncertainty'])}")
            yield f"BETs: expected {fmt(2)(ev['stated'])}, returned {fmt(2)(ev['realized'])}"
            yield from table(bets["bins"], [
                ("lower", "from (%)", fmt(0)), ("upper", "to (%)", fmt(0)),
                ("n", "bets", fmt()), ("mean_probability", "forecast (%)", fmt()),
                ("observed_rate", "observed (%)", fmt())])
        if not spans["n"]:
            yield f"no resolved prediction with bounds from {period(result)}"
            return
        yield (f"bounds: {spans['n']:,} resolved predictions, coverage "
               f"{fmt(1, ' %')(spans['coverage'])} against a stated confidence of "
               f"{fmt(1, ' %')(spans['mean_confidence'])}, mean width "
               f"{fmt(1, ' ticks')(spans['mean_width_ticks'])}")
        yield from table(spans["bins"], [
            ("lower", "from (%)", fmt(0)), ("upper", "to (%)", fmt(0)),
            ("n", "predictions", fmt()), ("mean_confidence", "confidence (%)", fmt()),
            ("coverage", "coverage (%)", fmt())])
    output.show(result, lines)


@read_command("bankroll")
def bankroll_command(reader: Reader, output: Output, window: dict) -> None:
    """What a unit stake on every BET would have gone through: its curve and worst fall.

    Example: tedstore bankroll --days 30 --tracker candidate
    """
    result = reader.ask("bankroll", **window)

    def lines(result: dict) -> Iterator[str]:
        if not result["bets"]:
            yield f"no resolved BET from {period(result)}"
            return
        yield (f"{result['bets']:,} BETs resolved from {period(result)}: {result['won']:,} won, "
               f"{result['lost']:,} lost; profit {fmt(2)(result['pnl'])} units, ROI "
               f"{fmt(1, ' %')(result['roi_percentage'])}, per bet mean "
               f"{fmt(3)(result['mean_payout'])}, stdev {fmt(3)(result['stdev_payout'])}, "
               f"Sharpe {fmt(3)(result['sharpe_per_bet'])}")
        drawdown = (f"max drawdown {fmt(2)(result['max_drawdown'])} units, from "
                    f"{shown_time(result['max_drawdown_from'])} to "
                    f"{shown_time(result['max_drawdown_to'])} UTC" if result["max_drawdown_to"]
                    else "no drawdown")
        yield f"{drawdown}; longest losing streak {result['longest_losing_streak']:,}"
        yield from table(result["curve"], [("t", "from (UTC)", shown_time),
                                           ("pnl", "profit (units)", fmt(2))])
    output.show(result, lines)


@read_command("rejects")
@click.option("--limit", type=click.IntRange(1, MAX_ROWS), default=100, show_default=True,
              help="The most lines to show.")
def rejects_command(reader: Reader, output: Output, window: dict, limit: int) -> None:
    """Lines tedstore refused, newest first, and why.

    Example: tedstore rejects --since 1h
    """
    result = reader.rejects(**window, limit=limit)
    output.show(result, lambda result: listing(
        result["rejects"], f"no rejected lines from {period(result)}",
        f"{len(result['rejects'])} rejected line(s) from {period(result)}", [
            ("received_at", "received (UTC)", shown_time), ("line_no", "line", fmt()),
            ("code", "code", text), ("peer_uid", "uid", fmt()),
            ("error", "error", lambda error: text(error)[:70]),
            ("raw", "raw", lambda raw: text(raw)[:40])]))


@contextlib.contextmanager
def output_file(path: str) -> Iterator[io.BufferedWriter]:
    """A file that appears under `path` only once complete: written beside it under a
    hidden name, renamed over it at the end, removed if anything fails."""
    target = Path(path)
    if not target.parent.is_dir():
        raise ConfigError(f"cannot write {path}: there is no folder {target.parent}")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as out:
            yield out
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@cli.command("export")
@with_settings("db")
@click.option("--table", type=click.Choice(list(TABLES)), help="Export this table's rows.")
@click.option("--events", is_flag=True, help="Export wire events that `tedstore import` "
                                             "replays into the same rows.")
@window_options(EverythingArgs)
@click.option("--format", "form", type=click.Choice(["csv", "jsonl"]),
              help="Table rows as CSV or JSON lines [default: csv; events are always NDJSON].")
@click.option("-o", "--output", "path", type=click.Path(dir_okay=False),
              help="Write to this file (it appears once complete) [default: stdout].")
def export_command(settings: Settings, table: Optional[str], events: bool, window: dict,
                   form: Optional[str], path: Optional[str]) -> None:
    """Export a table's rows, or the events that rebuild the store, streamed.

    It reads the database file (run it as the tedstore user). Rows keep their stored
    values; a window filters on created_at (games, predictions, side bets, tick samples),
    hour_start, day, updated_at (state) or received_at (rejects).

    Example: tedstore export --table predictions --since 7d --format csv -o predictions.csv
    """
    if bool(table) == events:
        raise click.UsageError("give --table NAME or --events")
    if events and form == "csv":
        raise click.UsageError("events are NDJSON: --format csv is for --table")
    start, end = map(utc_text, EverythingArgs(**window).bounds(time.time()))
    tracker = window.get("tracker")
    conn = closed_at_exit(connect(settings.db, readonly=True))
    if events:
        blocks = (msgspec.json.encode(event) + b"\n"
                  for event in export_events(conn, start, end, tracker))
    else:
        blocks = export_table(conn, table, start, end, form or "csv", tracker)
    if path is None:
        write_stdout(blocks)
        return
    size = export_size(conn, EXPORTED_LINES if events else {table: 1}, start, end) \
        if sys.stderr.isatty() else 0
    written = 0
    with output_file(path) as out, progress_bar(size, "exporting") as bar:
        for block in blocks:
            out.write(block)
            written += block.count(b"\n")
            bar.advance_to(min(written, size))
    click.echo(f"exported {written:,} lines to {path}", err=True)


def live_latency(settings: Settings) -> Optional[dict[str, float]]:
    """The p99 commit latency of each hour the daemon of this database has measured, if it
    is running: the hours not rolled up yet are in no table."""
    try:
        status = request(settings.socket, "status")["status"]
    except (TedstoreError, OSError):
        return None                                  # not running: the rollups are all there is
    if status["database"]["path"] != os.path.abspath(settings.db):
        return None                                  # a daemon of another database
    return status["commit_latency_ms"]["p99_by_hour"]


@cli.command("report")
@with_settings("db")
@click.option("-o", "--output", "path", required=True, type=click.Path(dir_okay=False),
              help="The HTML file to write; - writes it to standard output.")
@window_options(WeekArgs)
def report_command(settings: Settings, path: str, window: dict) -> None:
    """Write a self-contained HTML report: summary, charts, forecasts, tables.

    Hourly buckets up to 3 days, daily beyond. The page needs no network and no script.
    It reads the database file (run it as the tedstore user).

    Example: tedstore report --days 30 -o tedstore-report.html
    """
    now = time.time()
    start, end = WeekArgs(**window).bounds(now)
    page = render_report(report_data(settings.db, start, end, now, window.get("tracker"),
                                     window.get("model"), live_latency(settings)),
                         settings.db).encode()
    if path == "-":
        write_stdout([page])
        return
    with output_file(path) as out:
        out.write(page)
    click.echo(f"wrote {path} ({len(page) / 1e6:.2f} MB) for {utc_text(start)[:16]} to "
               f"{utc_text(end)[:16]} UTC", err=True)


def main() -> None:
    cli(prog_name="tedstore")


if __name__ == "__main__":
    main()
