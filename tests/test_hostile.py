"""Hostile input: every line judged on its own, a writer that data cannot kill, ts bounds."""

from __future__ import annotations

import itertools
import json
import time
import uuid

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tedstore
from conftest import (Conn, game_end, game_start, prediction, price_update, query, side_bet,
                      state_write, wait_for)

# -- generated streams ---------------------------------------------------------------------

DEPTHS = (500, 900, 980, 990, 994, 998, 1000, 1010, 1100, 5000)
ODD_NUMBERS = (b"1e400", b"-1e400", b"1e-400", b"9" * 400, b"0." + b"1" * 600,
               b"9007199254740993", b"-0", b"5e-324", b"123456789012345678901234567890")
ODD_TS = ("2026-02-30T00:00:00", "0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01",
          "yesterday", "", "2026-11-22t10:00:00z", "2026-11-22T10", 1e11, 1e11 + 1, 0, -1,
          1e20, 2.6e14)


@st.composite
def valid_events(draw, tag: str) -> list[dict]:
    """Events that must be stored: unique keys, recent ts in each accepted form."""
    now = time.time()
    ts = draw(st.sampled_from([None, now - 60, (now - 120) * 1000,
                               time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 30))]))
    extra = {} if ts is None else {"ts": ts}
    n = draw(st.integers(0, 10**6))
    game = f"{tag}-{n}"
    kind = draw(st.sampled_from(["prediction", "sideBet", "state", "game"]))
    if kind == "prediction":
        return [prediction(game, n % 1000, n % 1000 + 40, **extra)]
    if kind == "sideBet":
        return [side_bet(game, n % 1000, **extra)]
    if kind == "state":
        return [{"event": "state", "key": game, "value": {"n": n, "s": "é\u2028"}, **extra}]
    return [{"event": "gameStart", "gameId": game, "tick": 0, "price": 1.0, **extra},
            {"event": "priceUpdate", "gameId": game, "tick": 10, "price": 2.5, **extra},
            {"event": "gameEnd", "gameId": game, "tick": 30, "finalPrice": 0.5, **extra}]


def encode(event: dict) -> bytes:
    return msgspec.json.encode(event)


@st.composite
def hostile_lines(draw, tag: str) -> list[bytes]:
    """One or more lines that are not a valid event on their own, or barely are."""
    base = encode(draw(valid_events(tag))[0])
    kind = draw(st.sampled_from(["fragments", "two values", "nesting", "number", "utf8",
                                 "escape", "ts", "not an object", "blank", "ping"]))
    if kind == "fragments":
        shares = draw(st.lists(st.floats(0.01, 0.99), min_size=1, max_size=3))
        cuts = sorted({int(share * len(base)) for share in shares})
        return [base[a:b] for a, b in zip([0, *cuts], [*cuts, len(base)])]
    if kind == "two values":
        other = encode(draw(valid_events(tag))[0])
        return [base + draw(st.sampled_from([b",", b" ", b"", b"\t,"])) + other]
    if kind == "nesting":
        depth = draw(st.sampled_from(DEPTHS))
        number = draw(st.sampled_from([b"1", b"1e400"]))
        nest = b"[" * depth + number + b"]" * depth
        where = draw(st.sampled_from(["field", "value", "alone"]))
        if where == "alone":
            return [nest]
        if where == "value":
            return [b'{"event":"state","key":"k","value":' + nest + b"}"]
        return [base[:-1] + b',"deep":' + nest + b"}"]
    if kind == "number":
        number = draw(st.sampled_from(ODD_NUMBERS))
        field = draw(st.sampled_from([b'"confidence":', b'"tick":', b'"price":', b'"ts":',
                                      b'"predicted_end_tick":', b'"x":']))
        return [base[:-1] + b"," + field + number + b"}"]
    if kind == "utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80",
                                     b"\xf4\x90\x80\x80", b"\x80"]))
        at = int(draw(st.floats(0, 1)) * len(base))
        return [base[:at] + junk + base[at:]]
    if kind == "escape":
        escape = draw(st.sampled_from([b"\\ud800", b"\\udfff", b"\\u0000", b"\\uD83D\\uDE00",
                                       b"\\x41"]))
        return [base[:-1] + b',"note":"' + escape + b'"}']
    if kind == "ts":
        ts = draw(st.sampled_from(ODD_TS + (time.time() + 86400, time.time() - 400 * 86400)))
        return [encode({**json.loads(base), "ts": ts})]
    if kind == "not an object":
        return [draw(st.sampled_from([b"[]", b"null", b'"x"', b"42", b"true", b"[{}]"]))]
    if kind == "blank":
        return [draw(st.sampled_from([b"", b" ", b"\t"]))]
    return [b'{"op":"ping"}']


@st.composite
def streams(draw) -> tuple[list[bytes], set[int], bool, bool]:
    """(lines, numbers of the lines that must be stored, CRLF endings, byte order mark)."""
    tag = uuid.uuid4().hex[:8]
    lines, valid = [], set()
    for _ in range(draw(st.integers(1, 12))):
        if draw(st.booleans()):
            for event in draw(valid_events(tag)):
                lines.append(encode(event))
                valid.add(len(lines))
        else:
            lines.extend(draw(hostile_lines(tag)))
    return lines, valid, draw(st.booleans()), draw(st.booleans())


# -- what happened to a line -----------------------------------------------------------------

def outcomes(socket: str, data: bytes, lines: int) -> dict[int, str]:
    """{line: reject code} for the lines of one connection, once all are acknowledged."""
    conn = Conn(socket)
    try:
        conn.sock.sendall(data)
        return {r["rejected"]: r["code"] for r in conn.wait_ack(lines)}
    finally:
        conn.close()


def stored(db: str, event: dict) -> bool:
    kind = event["event"]
    if kind == "prediction":
        sql, key = "SELECT count(*) FROM predictions WHERE game_id = ?", event["game_id"]
    elif kind == "sideBet":
        sql, key = "SELECT count(*) FROM side_bets WHERE game_id = ?", event["game_id"]
    elif kind == "state":
        sql, key = "SELECT count(*) FROM state WHERE key = ?", event["key"]
    elif kind == "gameEnd":
        sql, key = "SELECT count(*) FROM games WHERE game_id = ? AND end_tick = 30", event["gameId"]
    else:
        sql, key = "SELECT count(*) FROM games WHERE game_id = ?", event["gameId"]
    return query(db, sql, (key,)) == [(1,)]


def kept_raw(line: bytes) -> bytes:
    return line[:tedstore.MAX_RAW_BYTES]


def test_a_lines_fate_never_depends_on_its_neighbours(daemon):
    """Hostile lines amid valid ones: the daemon stays up; each line ends as it does when
    sent alone on a fresh connection; each reject names its own line and raw text; every
    valid line is stored."""

    @settings(max_examples=40, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(streams())
    def check(stream):
        lines, valid, crlf, bom = stream
        end = b"\r\n" if crlf else b"\n"
        before = query(daemon.db, "SELECT coalesce(max(id), 0) FROM rejects")[0][0]
        together = outcomes(daemon.socket, (tedstore._BOM if bom else b"")
                            + b"".join(line + end for line in lines), len(lines))
        assert daemon.proc.poll() is None, daemon.log()
        recorded = query(daemon.db, "SELECT line_no, code, raw FROM rejects WHERE id > ? "
                                    "ORDER BY line_no", (before,))
        assert [(n, c) for n, c, _ in recorded] == sorted(together.items())
        for number, _, raw in recorded:
            kept = raw.encode() if isinstance(raw, str) else raw
            assert kept == kept_raw(lines[number - 1]), number
        for number, line in enumerate(lines, 1):
            first = tedstore._BOM if bom and number == 1 else b""
            alone = outcomes(daemon.socket, first + line + end, 1)
            assert together.get(number) == alone.get(1), (number, line[:200])
            if number in valid:
                assert number not in together, together[number]
                assert stored(daemon.db, json.loads(line)), line
        assert daemon.proc.poll() is None, daemon.log()

    check()


@settings(max_examples=300, deadline=None)
@given(streams())
def test_the_fast_decode_path_never_decides_a_line_differently(stream):
    """decode_chunk takes a chunk whole only when that gives what each line alone gives."""
    lines, _, crlf, _ = stream
    data = b"".join(line + (b"\r\n" if crlf else b"\n") for line in lines)
    fast = tedstore.decode_chunk(data)
    alone = []
    for line in data.split(b"\n")[:-1]:
        try:
            alone.append(tedstore.decode_line(line))
        except tedstore.LineRejected as exc:
            alone.append(exc.code)
    if fast is not None:
        assert fast == alone
    assert all(isinstance(a, (tedstore.Event, str)) for a in alone)


# -- the writer --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store_for_examples(tmp_path_factory):
    conn = tedstore.open_store(str(tmp_path_factory.mktemp("rows") / "rows.db"))
    yield conn
    conn.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 5),
                          st.sampled_from(["a", "b"]), st.sampled_from(["t1", "t2"])),
                max_size=200))
def test_many_rows_to_a_statement_store_and_count_what_one_at_a_time_does(store_for_examples,
                                                                          rows):
    """insert_rows (ROWS_PER_INSERT rows to a statement) against executemany of one row each:
    the same rows kept (the first of two duplicates) and the same count of rows changed by
    each session's run, which is what tells a client "stored" from "duplicate"."""
    conn = store_for_examples
    table = [(f"g{game}", tick, tick + 10, session / 4, None, None, None, None, None, None,
              model, f"2026-12-07 10:00:0{session}.000", tracker)
             for session, game, tick, model, tracker in rows]
    runs = [list(run) for _, run in itertools.groupby(table, key=lambda row: row[3])]

    def capture(insert):
        try:
            with tedstore.transaction(conn):
                changed = []
                for run in runs:
                    before = conn.total_changes()
                    insert(run)
                    changed.append(conn.total_changes() - before)
                kept = conn.execute(
                    "SELECT game_id, predicted_at_tick, confidence, model_version, tracker, "
                    "created_at FROM predictions ORDER BY id").fetchall()
                raise Rollback(kept, changed)
        except Rollback as done:
            return done.args

    many = capture(lambda run: tedstore.insert_rows(conn, tedstore.SQL_SAVE_PREDICTIONS, run))
    one = capture(lambda run: conn.executemany(tedstore.SQL_SAVE_PREDICTIONS, run))
    assert many == one
    assert len(many[0]) == len({(r[0], r[1], r[10], r[12]) for r in table})


@pytest.mark.parametrize("sql, table, row", [
    (tedstore.SQL_SAVE_SIDE_BETS, "side_bets",        # window_end_tick is ?2 + ?3
     lambda n: (f"g{n % 7}", n % 11, 40 + n, n / 100, 0.5, 0.6, "BET", f"t{n}", "default")),
    (tedstore.SQL_SAVE_TICKS, "tick_samples",         # ts is both ts and created_at (?9)
     lambda n: (f"g{n % 7}", n % 13, 1.0 + n, None, 0.2, None, 50.0, None, f"t{n}")),
])
def test_many_rows_give_every_statement_the_rows_one_at_a_time_gives(store_for_examples, sql,
                                                                   table, row):
    """The statements whose parameters repeat or combine, at every length up to 70 rows."""
    conn = store_for_examples
    for length in range(71):
        rows = [row(n) for n in range(length)]
        outcomes = []
        for insert in (tedstore.insert_rows, lambda c, q, r: c.executemany(q, r)):
            try:
                with tedstore.transaction(conn):
                    insert(conn, sql, rows)
                    raise Rollback(conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall())
            except Rollback as done:
                outcomes.append(done.args[0])
        assert outcomes[0] == outcomes[1], length


class Rollback(Exception):
    """Raised inside a transaction to undo what a test wrote there."""


def test_whatever_goes_wrong_with_one_line_is_only_that_lines_reject(inprocess, monkeypatch):
    """A failure while turning one line into rows (here: injected, while reading its ts
    and while building its game row) rejects that line; its neighbours are stored."""
    real_epoch, real_row = tedstore.wire_epoch, tedstore.GameRow.row

    def epoch(value):
        if value == "2026-11-22T00:00:00+13:37":
            raise RuntimeError("injected while reading ts")
        return real_epoch(value)

    def row(game):
        if game.game_id == "boom":
            raise RuntimeError("injected while building the row")
        return real_row(game)

    monkeypatch.setattr(tedstore, "wire_epoch", epoch)
    monkeypatch.setattr(tedstore.GameRow, "row", row)
    daemon = inprocess()
    conn = Conn(daemon.socket)
    lines = [prediction("ok", i, i + 5) for i in range(40)]
    lines[10] = prediction("ts", 1, 5, ts="2026-11-22T00:00:00+13:37")
    lines[25] = game_start("boom", 0, 1.0)
    conn.send(*lines)
    rejected = conn.wait_ack(40)
    assert [(r["rejected"], r["code"]) for r in rejected] == [(11, "bad_event"), (26, "bad_event")]
    assert "injected while reading ts" in rejected[0]["error"]
    assert "injected while building the row" in rejected[1]["error"]
    assert query(daemon.db, "SELECT count(*) FROM predictions WHERE game_id = 'ok'") == [(38,)]
    conn.send(prediction("after", 1, 2))
    assert conn.wait_ack(41) == []
    assert daemon.daemon.writer.is_alive()


def test_a_writer_that_dies_for_another_reason_stops_the_daemon_non_zero(inprocess, caplog):
    daemon = inprocess()
    writer = daemon.daemon.writer

    def broken(*args, **kwargs):
        raise SystemError("injected: not the data's fault")

    writer.queue.take = broken
    wait_for(lambda: not daemon.thread.is_alive(), what="the daemon to stop")
    assert daemon.code == 1
    assert "the writer thread stopped: SystemError: injected: not the data's fault" in caplog.text


# -- timestamp bounds -------------------------------------------------------------------------

def test_ts_ahead_of_the_clock_is_refused_with_how_far(daemon_factory):
    daemon = daemon_factory(env={"TEDSTORE_MAX_CLOCK_SKEW": "60"})
    now = time.time()
    conn = daemon.connect()
    conn.send(prediction("near", 1, 9, ts=now + 30), prediction("far", 1, 9, ts=now + 3600),
              state_write("frozen", 1, ts=now + 10 * 365 * 86400))
    rejected = conn.wait_ack(3)
    assert [(r["rejected"], r["code"]) for r in rejected] == [(2, "bad_event"), (3, "bad_event")]
    ahead = int(rejected[0]["error"].split(" is ")[1].split(" s ")[0].replace(",", ""))
    assert 3590 <= ahead <= 3600
    assert "TEDSTORE_MAX_CLOCK_SKEW (60 s)" in rejected[0]["error"]
    assert "fix the sender's clock" in rejected[0]["error"]
    # no write from the far future froze the key: a write made now still wins
    conn.send(state_write("frozen", 2))
    assert conn.wait_ack(4) == []
    assert daemon.query("SELECT value FROM state WHERE key = 'frozen'") == [("2",)]


@pytest.mark.parametrize("event, days, table, setting", [
    (prediction("p", 1, 9), 91, "predictions", "PREDICTION_RETENTION_DAYS"),
    (side_bet("s", 1), 91, "side_bets", "SIDEBET_RETENTION_DAYS"),
    (game_start("g", 0, 1.0), 181, "games",
     "GAME_RETENTION_DAYS"),
    (price_update("g", 10, 1.0), 181, "games",
     "GAME_RETENTION_DAYS"),
    (game_end("g", at=10, final=1.0), 181, "games",
     "GAME_RETENTION_DAYS"),
])
def test_ts_older_than_its_tables_retention_is_refused(store, event, days, table, setting):
    store.settings = tedstore.load_settings(db=store.path)      # the default retentions
    ts = (time.time() - days * 86400) * 1000
    [(line, code, error)] = store.send({**event, "ts": ts})
    assert (line, code) == (1, "bad_event")
    assert f"older than the {days - 1}-day retention of {table} ({setting})" in error
    assert store.send({**event, "ts": ts + 2 * 86400 * 1000}) == []   # a day younger: stored


def test_old_price_updates_update_their_game_but_store_no_sample(store):
    store.settings = tedstore.load_settings(db=store.path)
    now = time.time()
    assert store.send(price_update("old", 10, 9.0, ts=(now - 8 * 86400) * 1000),
                      price_update("old", 20, 2.0, ts=(now - 6 * 86400) * 1000)) == []
    assert store.rows("SELECT peak_price, peak_tick FROM games") == [(9.0, 10)]
    assert store.rows("SELECT tick FROM tick_samples") == [(20,)]


def test_state_has_no_lower_bound(store):
    store.settings = tedstore.load_settings(db=store.path)
    assert store.send(state_write("k", 1, ts=86400.0)) == []
    assert store.rows("SELECT updated_at FROM state") == [("1970-01-02 00:00:00.000",)]


def test_rejects_keep_their_own_line_number_and_raw_text_in_a_big_chunk(daemon):
    """Far-apart rejects in one chunk, each found by its own number, CRLF stripped."""
    lines = [json.dumps(prediction("big", i, i + 1)).encode() for i in range(3000)]
    bad = {7: b'{"event":"prediction","game_id":"x"}', 1500: b"{oops",
           2999: json.dumps(prediction("late", 1, 2, ts=time.time() + 86400)).encode()}
    for number, line in bad.items():
        lines[number - 1] = line
    conn = daemon.connect()
    conn.sock.sendall(b"".join(line + b"\r\n" for line in lines))
    rejected = conn.wait_ack(len(lines))
    assert [r["rejected"] for r in rejected] == sorted(bad)
    raws = dict(daemon.query("SELECT line_no, raw FROM rejects"))
    assert {n: raws[n].encode() for n in bad} == bad
    assert daemon.query("SELECT count(*) FROM predictions WHERE game_id = 'big'") == [(2997,)]


def test_a_byte_order_mark_counts_only_at_the_start_of_a_connection(daemon):
    conn = daemon.connect()
    conn.sock.sendall(tedstore._BOM + json.dumps(prediction("bom", 1, 2)).encode() + b"\n"
                      + tedstore._BOM + json.dumps(prediction("bom", 2, 3)).encode() + b"\n")
    assert [(r["rejected"], r["code"]) for r in conn.wait_ack(2)] == [(2, "bad_json")]
    # a mark that arrives one byte at a time is a mark too
    later = daemon.connect()
    for byte in itertools.chain(tedstore._BOM, [None]):
        later.sock.sendall(bytes([byte]) if byte is not None else
                           json.dumps(prediction("bom", 3, 4)).encode() + b"\n")
        time.sleep(0.01)
    assert later.wait_ack(1) == []
