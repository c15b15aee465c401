"""The wire events: decoding, every validation rule, reject codes, and `ts` forms."""

from __future__ import annotations

import datetime as dt
import json
import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tedstore
from tedstore import LineRejected, decode_chunk, decode_line

GOOD = {
    "gameStart": {"event": "gameStart", "gameId": "g", "tick": 0, "price": 1.0},
    "priceUpdate": {"event": "priceUpdate", "gameId": "g", "tick": 3, "price": 1.2,
                    "features": {"volatility_10": 0.1, "volatility_40": 0.2, "momentum": 0.3,
                                 "rsi": 55.0, "volume_ratio": 1.1}},
    "gameEnd": {"event": "gameEnd", "gameId": "g", "tick": 90, "finalPrice": 0.1,
                "startTick": 0, "treasuryRemainder": 7, "patterns": ["a"], "peakPrice": 2.0,
                "peakTick": 40},
    "prediction": {"event": "prediction", "game_id": "g", "predicted_at_tick": 10,
                   "predicted_end_tick": 100, "confidence": 0.5,
                   "uncertainty_bounds": {"lower": 80, "upper": 120},
                   "features_used": {"epr_active": True, "peak_ratio": 0.8, "volatility": 0.1,
                                     "momentum": 0.2}},
    "sideBet": {"event": "sideBet", "game_id": "g", "placed_at_tick": 40, "probability": 0.3,
                "expected_value": 0.8, "confidence": 0.6, "recommendation": "BET"},
    "state": {"event": "state", "key": "model", "value": {"weights": [1, 2, 3]}},
}


def line(obj) -> bytes:
    return json.dumps(obj).encode()


def rejected(raw: bytes) -> LineRejected:
    with pytest.raises(LineRejected) as info:
        decode_line(raw)
    return info.value


@pytest.mark.parametrize("name", sorted(GOOD))
def test_each_event_type_decodes_to_its_struct(name):
    event = decode_line(line(GOOD[name]))
    assert type(event).__struct_config__.tag == name


def test_defaults_of_optional_fields():
    p = decode_line(line({k: v for k, v in GOOD["prediction"].items()
                          if k not in ("uncertainty_bounds", "features_used")}))
    assert p.model_version == "v2.1.0" and p.uncertainty_bounds is None
    assert decode_line(line(GOOD["sideBet"])).window_ticks == 40


def test_unknown_fields_are_ignored():
    event = decode_line(line({**GOOD["gameStart"], "newField": {"x": [1, 2]}, "other": None}))
    assert event.gameId == "g"


def test_state_keeps_any_json_value_verbatim():
    event = decode_line(b'{"event":"state","key":"k","value":[1,{"a":null},"x"]}')
    assert bytes(event.value) == b'[1,{"a":null},"x"]'


@pytest.mark.parametrize("raw, code", [
    (b"{not json", "bad_json"),
    (b'{"event":"gameStart","gameId":"g","tick":0,"price":NaN}', "bad_json"),
    (b'{"event":"gameStart","gameId":"g","tick":0,"price":Infinity}', "bad_json"),
    (b'{"event":"gameStart","gameId":"g","tick":0,"price":-Infinity}', "bad_json"),
    (b"", "bad_json"),
    (b"   ", "bad_json"),
    (b'{"event":"gameStart","gameId":"g","tick":0,"price":1} trailing', "bad_json"),
    (b'{"event":"gameStart","gameId":"g","tick":0,"price":1,"deep":' + b"[" * 5000 + b"]" * 5000
     + b"}", "bad_json"),
    (b'{"event":"gameStart","gameId":"g\xff","tick":0,"price":1}', "bad_utf8"),
    (b'{"event":"gameStart","gameId":"g","tick":0,"price":1,"x":"\xc3"}', "bad_utf8"),
    (b"[1, 2]", "bad_event"),
    (b'"a string"', "bad_event"),
    (b"42", "bad_event"),
    (b'{"gameId":"g"}', "bad_event"),
    (b'{"event":"gameStart","gameId":"g","tick":0,"price":1e999}', "bad_event"),
    (b'{"event":"gameStart","gameId":"g","tick":99999999999999999999999,"price":1}', "bad_event"),
    (b'{"event":"gameStart","gameId":"g","tick":-1,"price":1}', "bad_event"),
    (b'{"event":"gameStart","gameId":"g","tick":1.5,"price":1}', "bad_event"),
    (b'{"event":"gameStart","gameId":"g","tick":true,"price":1}', "bad_event"),
    (b'{"event":"gameStart","gameId":"g","tick":"1","price":1}', "bad_event"),
    (b'{"event":"gameStart","gameId":"g","tick":0,"price":0}', "bad_event"),
    (b'{"event":"gameStart","gameId":"","tick":0,"price":1}', "bad_event"),
    (b'{"event":"gameStart","gameId":"g","price":1}', "bad_event"),
    (b'{"event":"prediction","game_id":"g","predicted_at_tick":1,"predicted_end_tick":5,'
     b'"confidence":1.5}', "bad_event"),
    (b'{"event":"sideBet","game_id":"g","placed_at_tick":1,"probability":0.1,'
     b'"expected_value":0,"confidence":0.5,"recommendation":"MAYBE"}', "bad_event"),
    (b'{"event":"state","key":"' + b"k" * 257 + b'","value":1}', "bad_event"),
    (b'{"event":"state","key":"k"}', "bad_event"),
    (b'{"event":"gameEnd","gameId":"g","tick":5,"finalPrice":1,"startTick":9}', "bad_event"),
    (b'{"event":"prediction","game_id":"g","predicted_at_tick":50,"predicted_end_tick":40,'
     b'"confidence":0.5}', "bad_event"),
    (b'{"event":"prediction","game_id":"g","predicted_at_tick":5,"predicted_end_tick":40,'
     b'"confidence":0.5,"uncertainty_bounds":{"lower":50,"upper":40}}', "bad_event"),
    (b'{"event":"gameTeleport","gameId":"g"}', "unknown_event"),
    (b'{"event":7}', "unknown_event"),
    (b'{"op":"reboot"}', "unknown_event"),
])
def test_every_validation_rule_has_its_code(raw, code):
    exc = rejected(raw)
    assert exc.code == code, str(exc)
    assert str(exc) and "\n" not in str(exc) and len(str(exc)) <= tedstore.MAX_ERROR_CHARS


def test_error_text_names_the_field_and_the_rule():
    exc = rejected(b'{"event":"gameStart","gameId":"g","tick":-1,"price":1}')
    assert "gameStart" in str(exc) and "tick" in str(exc) and ">= 0" in str(exc)
    assert "known events" in str(rejected(b'{"event":"nope"}'))


def test_control_lines():
    assert decode_line(b'{"op":"ping"}') == "ping"
    assert decode_line(b'{"op":"status"}') == "status"


def test_decode_chunk_takes_clean_chunks_whole():
    data = b"".join(line(GOOD[name]) + b"\n" for name in sorted(GOOD))
    events = decode_chunk(data)
    assert [type(e).__struct_config__.tag for e in events] == sorted(GOOD)


@pytest.mark.parametrize("data", [
    b'{"event":"state","key":"a","value":1}{"event":"state","key":"b","value":2}\n  \n',
    b'{"event":"state","key":"a","value":1} {"event":"state","key":"b","value":2}\n',
    b'{"event":"state","key":"a","value":1}\n\n',
    b'\n{"event":"state","key":"a","value":1}\n',
    b'{"event":"state","key":"a","value":1}\n \t\r\n',
    b'{"event":"state","key":"a","value":1}\n{"op":"ping"}\n',
    b'{"event":"state","key":"a","value":1}\n{"event":"state","key":"\xff","value":1}\n',
    b'{"event":"state","key":"a","value":1}\n{"event":"state","key":"b","value":1,"x":"\xc3"}\n',
])
def test_decode_chunk_leaves_doubtful_chunks_to_line_by_line(data):
    """decode_lines splits on whitespace: two values on one line must not pass as two lines."""
    assert decode_chunk(data) is None


# -- ts ---------------------------------------------------------------------------------

INSTANT = "2026-11-22 09:30:15.250"
EPOCH = tedstore.text_epoch(INSTANT)


@pytest.mark.parametrize("ts", [
    EPOCH,                                   # seconds
    int(EPOCH * 1000),                       # milliseconds
    "2026-11-22T09:30:15.250Z",
    "2026-11-22T09:30:15.250+00:00",
    "2026-11-22T11:30:15.250+02:00",         # a non-UTC offset
    "2026-11-22T04:00:15.250-05:30",
    "2026-11-22 09:30:15.250",               # no offset: UTC
])
def test_every_ts_form_lands_on_the_same_utc_instant(ts):
    assert tedstore.wire_ts(ts) == INSTANT


@pytest.mark.parametrize("ts", ["yesterday", "2026-13-01", -5.0, 1e20])
def test_impossible_ts_is_refused(ts):
    with pytest.raises(ValueError):
        tedstore.wire_ts(ts)


def test_utc_text_compares_like_sqlite_datetime():
    """The stored format sorts against sqlite's datetime('now', ...) text."""
    assert tedstore.utc_text(EPOCH) > "2026-11-22 09:30:15"
    assert tedstore.utc_text(EPOCH) < "2026-11-22 09:30:16"
    assert tedstore.utc_text(0) == "1970-01-01 00:00:00.000"
    assert tedstore.utc_text(1.9996) == "1970-01-01 00:00:02.000"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=tedstore.MAX_EPOCH - 1), min_size=1,
                max_size=40))
def test_utc_text_is_the_calendar_time_to_the_millisecond(epochs):
    """From its cache of minutes' text (emptied first) and again from the filled cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tedstore, "_MINUTE_TEXT", {})
        for epoch in epochs + epochs[::-1]:
            milli = int(epoch * 1000.0 + 0.5)
            truth = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=milli)
            assert tedstore.utc_text(epoch) == truth.strftime("%Y-%m-%d %H:%M:%S.") + \
                f"{milli % 1000:03d}"


def test_parse_when_reads_spans_and_dates():
    now = 1_800_000_000.0
    assert tedstore.parse_when("48h", now) == now - 48 * 3600
    assert tedstore.parse_when("7d", now) == now - 7 * 86400
    assert tedstore.parse_when("2026-11-20", now) == tedstore.text_epoch("2026-11-20 00:00:00.000")
    with pytest.raises(tedstore.ConfigError, match="ISO-8601"):
        tedstore.parse_when("last tuesday", now)


# -- settings ---------------------------------------------------------------------------

def test_settings_precedence_flag_over_env_over_file(tmp, monkeypatch):
    config = tmp / "t.toml"
    config.write_text('db = "from-file.db"\nbatch_size = 10\ntick_sample_every = 3\n')
    monkeypatch.setenv("PERSISTENCE_BATCH_SIZE", "20")
    monkeypatch.setenv("TEDSTORE_DB", "from-env.db")
    settings = tedstore.load_settings(str(config), db="from-flag.db")
    assert settings.db == "from-flag.db"
    assert settings.batch_size == 20
    assert settings.tick_sample_every == 3
    assert settings.cleanup_hour_utc == 3


def test_settings_follow_systemd_directories(monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/tedstore")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/tedstore")
    for name in ("TEDSTORE_DB", "TEDSTORE_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    settings = tedstore.load_settings()
    assert settings.db == "/var/lib/tedstore/tedstore.db"
    assert settings.socket == "/run/tedstore/tedstore.sock"


def test_allow_uids_and_booleans_from_the_environment(monkeypatch):
    monkeypatch.setenv("TEDSTORE_ALLOW_UIDS", "1000, 1001")
    monkeypatch.setenv("PERSISTENCE_ENABLED", "false")
    settings = tedstore.load_settings()
    assert settings.allow_uids == [1000, 1001] and settings.persistence_enabled is False


@pytest.mark.parametrize("env, value, words", [
    ("PERSISTENCE_BATCH_SIZE", "lots", "PERSISTENCE_BATCH_SIZE"),
    ("TEDSTORE_SYNCHRONOUS", "SOMETIMES", "TEDSTORE_SYNCHRONOUS"),
    ("CLEANUP_HOUR_UTC", "25", "CLEANUP_HOUR_UTC"),
])
def test_bad_settings_name_the_variable(monkeypatch, env, value, words):
    monkeypatch.setenv(env, value)
    with pytest.raises(tedstore.ConfigError, match=words):
        tedstore.load_settings()


@pytest.mark.parametrize("spelling, value", [
    ("true", True), ("YES", True), ("On", True), ("1", True),
    ("false", False), ("no", False), ("OFF", False), ("0", False)])
def test_booleans_accept_the_usual_spellings_in_any_case(monkeypatch, spelling, value):
    monkeypatch.setenv("PERSISTENCE_ENABLED", spelling)
    assert tedstore.load_settings().persistence_enabled is value


def test_enumerations_are_case_insensitive(tmp, monkeypatch):
    monkeypatch.setenv("TEDSTORE_SYNCHRONOUS", "full")
    assert tedstore.load_settings().synchronous == "FULL"
    config = tmp / "t.toml"
    config.write_text('synchronous = "Normal"\n')
    monkeypatch.delenv("TEDSTORE_SYNCHRONOUS")
    assert tedstore.load_settings(str(config)).synchronous == "NORMAL"


def test_a_bad_value_names_its_true_source_and_what_is_accepted(tmp, monkeypatch):
    config = tmp / "t.toml"
    config.write_text('synchronous = "sometimes"\npersistence_enabled = "perhaps"\n')
    with pytest.raises(tedstore.ConfigError) as from_file:
        tedstore.load_settings(str(config))
    assert str(from_file.value) == (f"invalid value 'sometimes' for synchronous (key synchronous "
                                    f"in {config}): expected one of FULL, NORMAL (any case)")
    monkeypatch.setenv("TEDSTORE_SYNCHRONOUS", "always")   # the environment overrides the file
    with pytest.raises(tedstore.ConfigError) as from_env:
        tedstore.load_settings(str(config))
    assert str(from_env.value) == ("invalid value 'always' for synchronous (environment "
                                   "variable TEDSTORE_SYNCHRONOUS): expected one of FULL, "
                                   "NORMAL (any case)")
    with pytest.raises(tedstore.ConfigError) as next_in_file:
        tedstore.load_settings(str(config), synchronous="full")     # a flag overrides both
    assert str(next_in_file.value) == (
        f"invalid value 'perhaps' for persistence_enabled (key persistence_enabled in "
        f"{config}): expected true or false (also yes/no, on/off, 1/0)")
    with pytest.raises(tedstore.ConfigError) as from_flag:
        tedstore.load_settings(synchronous="FULL", batch_size=0)
    assert str(from_flag.value) == ("invalid value 0 for batch_size (--batch-size): expected "
                                    "an integer from 1 to 100000")
    monkeypatch.setenv("TEDSTORE_ALLOW_UIDS", "tracker,1001")
    with pytest.raises(tedstore.ConfigError, match="'tracker,1001' for allow_uids .* a list of "
                                                   "uids"):
        tedstore.load_settings(synchronous="FULL")


def test_unknown_key_in_config_file_is_an_error(tmp):
    config = tmp / "t.toml"
    config.write_text("bach_size = 10\n")
    with pytest.raises(tedstore.ConfigError, match="unknown setting 'bach_size'"):
        tedstore.load_settings(str(config))


def test_struct_events_encode_with_their_tag():
    event = tedstore.GameStart(gameId="g", tick=0, price=1.0)
    assert msgspec.json.decode(msgspec.json.encode(event))["event"] == "gameStart"


def test_receipt_time_is_now_when_ts_is_absent():
    batch = tedstore.IngestBatch([tedstore.Chunk(None, 1, 1, line(GOOD["gameStart"]) + b"\n",
                                                 time.time())], tedstore.load_settings())
    ts = batch.lifecycle[0][0].ts
    assert abs(tedstore.text_epoch(ts) - time.time()) < 5
