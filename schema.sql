-- tedstore schema.
--
-- Each "-- version: N" block upgrades a database at PRAGMA user_version N-1 to N, and
-- tedstore runs only the blocks above a database's version. Blocks are forward-only; run
-- as it is, the whole file makes a new database:  sqlite3 new.db < schema.sql
--
-- Every timestamp is UTC text 'YYYY-MM-DD HH:MM:SS.SSS', so that comparisons such
-- as  created_at > datetime('now', '-1 hour')  are correct in the sqlite3 CLI.

-- version: 1
-- The record tables, each with its natural key as a UNIQUE constraint.

CREATE TABLE IF NOT EXISTS games (
    id                  INTEGER PRIMARY KEY,
    game_id             TEXT NOT NULL UNIQUE,
    start_tick          INTEGER,
    end_tick            INTEGER,
    duration_ticks      INTEGER,
    peak_price          REAL,
    peak_tick           INTEGER,
    final_price         REAL,
    treasury_remainder  INTEGER,
    patterns_detected   TEXT NOT NULL DEFAULT '[]',   -- JSON array of pattern names
    had_predictions     INTEGER,                      -- set when the game ends
    prediction_accuracy REAL,                         -- share 0..1 with |raw_error| <= 40
    side_bets_placed    INTEGER,                      -- side bets recommended BET
    started_at          TEXT,                         -- ts of gameStart
    ended_at            TEXT,                         -- ts of gameEnd
    created_at          TEXT NOT NULL,                -- earliest ts seen for the game
    updated_at          TEXT NOT NULL                 -- receipt time of the last change
);

CREATE TABLE IF NOT EXISTS predictions (
    id                 INTEGER PRIMARY KEY,
    game_id            TEXT NOT NULL,
    predicted_at_tick  INTEGER NOT NULL,
    predicted_end_tick INTEGER NOT NULL,
    actual_end_tick    INTEGER,                       -- NULL until the game ends
    confidence         REAL NOT NULL,
    bound_lower        REAL,
    bound_upper        REAL,
    epr_active         INTEGER,
    peak_ratio         REAL,
    volatility         REAL,
    momentum           REAL,
    raw_error          INTEGER,                       -- predicted_end_tick - actual_end_tick
    signed_error       INTEGER,
    e40                REAL,                          -- raw_error / 40
    within_windows     INTEGER,                       -- floor(|raw_error| / 40)
    model_version      TEXT NOT NULL,
    created_at         TEXT NOT NULL,
    resolved_at        TEXT,
    UNIQUE (game_id, predicted_at_tick, model_version)
);

CREATE TABLE IF NOT EXISTS side_bets (
    id              INTEGER PRIMARY KEY,
    game_id         TEXT NOT NULL,
    placed_at_tick  INTEGER NOT NULL,
    window_end_tick INTEGER NOT NULL,
    probability     REAL NOT NULL,
    expected_value  REAL NOT NULL,
    confidence      REAL NOT NULL,
    recommendation  TEXT NOT NULL CHECK (recommendation IN ('BET', 'SKIP')),
    actual_outcome  TEXT NOT NULL DEFAULT 'PENDING'
                    CHECK (actual_outcome IN ('PENDING', 'WON', 'LOST')),
    payout          REAL,
    created_at      TEXT NOT NULL,
    resolved_at     TEXT,
    UNIQUE (game_id, placed_at_tick)
);

CREATE TABLE IF NOT EXISTS tick_samples (
    id            INTEGER PRIMARY KEY,
    game_id       TEXT NOT NULL,
    tick          INTEGER NOT NULL,
    price         REAL NOT NULL,
    volatility_10 REAL,
    volatility_40 REAL,
    momentum      REAL,
    rsi           REAL,
    volume_ratio  REAL,
    ts            TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    UNIQUE (game_id, tick)
);

CREATE TABLE IF NOT EXISTS metrics_hourly (
    hour_start            TEXT PRIMARY KEY,
    hour_end              TEXT NOT NULL,
    games_analyzed        INTEGER NOT NULL,
    predictions_made      INTEGER NOT NULL,
    median_e40            REAL,
    mean_absolute_error   REAL,
    within_1_window       REAL,
    within_2_windows      REAL,
    within_3_windows      REAL,
    sidebets_recommended  INTEGER NOT NULL,
    sidebets_positive_ev  INTEGER NOT NULL,
    bets_won              INTEGER NOT NULL,
    bets_lost             INTEGER NOT NULL,
    total_ev              REAL,
    roi_percentage        REAL,
    avg_commit_latency_ms REAL,
    p99_commit_latency_ms REAL,
    rejected_lines        INTEGER NOT NULL,
    created_at            TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS state (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,                         -- JSON text
    updated_at TEXT NOT NULL                          -- ts of the winning write
);

CREATE TABLE IF NOT EXISTS rejects (
    id          INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    peer_pid    INTEGER,
    peer_uid    INTEGER,
    line_no     INTEGER NOT NULL,                     -- 0: the connection itself
    code        TEXT NOT NULL,
    error       TEXT NOT NULL,
    raw         BLOB                                  -- the line, at most 4 KiB
);

PRAGMA user_version = 1;

-- version: 2
-- Indexes for the queries the CLI, the views and the background jobs run,
-- the views people ask in sqlite3, and the jobs table the scheduler keeps.

CREATE INDEX IF NOT EXISTS games_created_at ON games (created_at);
CREATE INDEX IF NOT EXISTS games_ended_at ON games (ended_at);
CREATE INDEX IF NOT EXISTS predictions_created_at ON predictions (created_at);
CREATE INDEX IF NOT EXISTS side_bets_created_at ON side_bets (created_at);
CREATE INDEX IF NOT EXISTS tick_samples_created_at ON tick_samples (created_at);
CREATE INDEX IF NOT EXISTS rejects_received_at ON rejects (received_at);

CREATE TABLE IF NOT EXISTS jobs (
    name        TEXT PRIMARY KEY,                     -- rollup, retention, backup
    last_run_at TEXT NOT NULL,
    detail      TEXT NOT NULL                         -- JSON object
);

-- Per UTC day: how close the resolved predictions came to the real end tick.
CREATE VIEW IF NOT EXISTS prediction_accuracy_daily AS
SELECT substr(created_at, 1, 10)                                  AS day,
       count(*)                                                   AS predictions,
       count(actual_end_tick)                                     AS resolved,
       round(avg(abs(raw_error)), 2)                              AS mean_absolute_error,
       round(avg(e40), 3)                                         AS mean_e40,
       round(100.0 * avg(abs(raw_error) <= 40), 1)                AS within_1_window_pct,
       round(100.0 * avg(abs(raw_error) <= 80), 1)                AS within_2_windows_pct,
       round(100.0 * avg(abs(raw_error) <= 120), 1)               AS within_3_windows_pct
FROM predictions
GROUP BY day;

-- Per UTC day: what the recommended (BET) side bets earned per unit staked.
CREATE VIEW IF NOT EXISTS side_bet_roi_daily AS
SELECT substr(created_at, 1, 10)                                  AS day,
       count(*)                                                   AS bets,
       sum(actual_outcome = 'WON')                                AS won,
       sum(actual_outcome = 'LOST')                               AS lost,
       sum(actual_outcome = 'PENDING')                            AS pending,
       round(sum(payout), 2)                                      AS total_payout,
       round(100.0 * sum(payout) / nullif(sum(actual_outcome <> 'PENDING'), 0), 1)
                                                                  AS roi_percentage
FROM side_bets
WHERE recommendation = 'BET'
GROUP BY day;

-- One line per game: its outcome next to how the predictions and side bets did.
CREATE VIEW IF NOT EXISTS game_summary AS
SELECT g.game_id,
       g.start_tick,
       g.end_tick,
       g.duration_ticks,
       g.peak_price,
       g.final_price,
       g.patterns_detected,
       (SELECT count(*) FROM predictions p WHERE p.game_id = g.game_id)          AS predictions,
       (SELECT round(avg(abs(p.raw_error)), 1) FROM predictions p
         WHERE p.game_id = g.game_id)                                          AS mean_absolute_error,
       g.prediction_accuracy,
       g.side_bets_placed,
       (SELECT count(*) FROM side_bets s
         WHERE s.game_id = g.game_id AND s.recommendation = 'BET'
           AND s.actual_outcome = 'WON')                                       AS side_bets_won,
       (SELECT sum(s.payout) FROM side_bets s
         WHERE s.game_id = g.game_id AND s.recommendation = 'BET')             AS side_bet_payout,
       g.started_at,
       g.ended_at
FROM games g;

PRAGMA user_version = 2;

-- version: 3
-- A daily rollup beside the hourly one, so that the daily views read a row per day
-- instead of every prediction ever stored; the views add the days not rolled up yet
-- (today, and yesterday for its first hour) from the base tables, through their
-- created_at index. game_summary names the indexes its subqueries use.

CREATE TABLE IF NOT EXISTS metrics_daily (
    day                  TEXT PRIMARY KEY,                -- 'YYYY-MM-DD', UTC
    games_analyzed       INTEGER NOT NULL,                -- games ended that day
    predictions          INTEGER NOT NULL,                -- created that day
    resolved             INTEGER NOT NULL,
    median_e40           REAL,
    mean_absolute_error  REAL,                            -- ticks
    mean_e40             REAL,
    within_1_window      REAL,                            -- share 0..100 of the resolved
    within_2_windows     REAL,
    within_3_windows     REAL,
    bets                 INTEGER NOT NULL,                -- side bets recommended BET
    bets_won             INTEGER NOT NULL,
    bets_lost            INTEGER NOT NULL,
    bets_pending         INTEGER NOT NULL,
    total_payout         REAL,                            -- over the resolved BETs
    roi_percentage       REAL,
    rejected_lines       INTEGER NOT NULL,
    created_at           TEXT NOT NULL
);

DROP VIEW IF EXISTS prediction_accuracy_daily;
CREATE VIEW prediction_accuracy_daily AS
SELECT day, predictions, resolved,
       round(mean_absolute_error, 2)                              AS mean_absolute_error,
       round(mean_e40, 3)                                         AS mean_e40,
       round(within_1_window, 1)                                  AS within_1_window_pct,
       round(within_2_windows, 1)                                 AS within_2_windows_pct,
       round(within_3_windows, 1)                                 AS within_3_windows_pct
FROM metrics_daily
UNION ALL
SELECT substr(created_at, 1, 10),
       count(*),
       count(actual_end_tick),
       round(avg(abs(raw_error)), 2),
       round(avg(e40), 3),
       round(100.0 * avg(abs(raw_error) <= 40), 1),
       round(100.0 * avg(abs(raw_error) <= 80), 1),
       round(100.0 * avg(abs(raw_error) <= 120), 1)
FROM predictions
WHERE created_at >= coalesce((SELECT date(max(day), '+1 day') FROM metrics_daily), '')
GROUP BY substr(created_at, 1, 10);

DROP VIEW IF EXISTS side_bet_roi_daily;
CREATE VIEW side_bet_roi_daily AS
SELECT day, bets, bets_won AS won, bets_lost AS lost, bets_pending AS pending,
       round(total_payout, 2)                                     AS total_payout,
       round(roi_percentage, 1)                                   AS roi_percentage
FROM metrics_daily
UNION ALL
SELECT substr(created_at, 1, 10),
       count(*),
       sum(actual_outcome = 'WON'),
       sum(actual_outcome = 'LOST'),
       sum(actual_outcome = 'PENDING'),
       round(sum(payout), 2),
       round(100.0 * sum(payout) / nullif(sum(actual_outcome <> 'PENDING'), 0), 1)
FROM side_bets
WHERE recommendation = 'BET'
  AND created_at >= coalesce((SELECT date(max(day), '+1 day') FROM metrics_daily), '')
GROUP BY substr(created_at, 1, 10);

DROP VIEW IF EXISTS game_summary;
CREATE VIEW game_summary AS
SELECT g.game_id,
       g.start_tick,
       g.end_tick,
       g.duration_ticks,
       g.peak_price,
       g.final_price,
       g.patterns_detected,
       (SELECT count(*) FROM predictions p INDEXED BY sqlite_autoindex_predictions_1
         WHERE p.game_id = g.game_id)                                          AS predictions,
       (SELECT round(avg(abs(p.raw_error)), 1)
          FROM predictions p INDEXED BY sqlite_autoindex_predictions_1
         WHERE p.game_id = g.game_id)                                          AS mean_absolute_error,
       g.prediction_accuracy,
       g.side_bets_placed,
       (SELECT count(*) FROM side_bets s INDEXED BY sqlite_autoindex_side_bets_1
         WHERE s.game_id = g.game_id AND s.recommendation = 'BET'
           AND s.actual_outcome = 'WON')                                       AS side_bets_won,
       (SELECT sum(s.payout) FROM side_bets s INDEXED BY sqlite_autoindex_side_bets_1
         WHERE s.game_id = g.game_id AND s.recommendation = 'BET')             AS side_bet_payout,
       g.started_at,
       g.ended_at
FROM games g;

PRAGMA user_version = 3;

-- version: 4
-- Trackers as a dimension: predictions, side bets and state carry the tracker that made
-- them, part of their natural keys, so that two trackers on one feed (a production model
-- and a candidate in shadow mode, or hosts merged into one database) never swallow or
-- overwrite each other's records. SQLite cannot change a UNIQUE constraint in place, so
-- each table is rebuilt with every row it holds, each given the tracker 'default'. (The
-- game_id comes first in each key, so that lookups by game keep using it.) The views that
-- read the tables are dropped first and made again below, unchanged but for game_summary's
-- index names. metrics_hourly_by keeps the hourly measures per tracker and per model
-- (tracker or model_version '*': all of them). games.prediction_accuracy becomes a
-- percentage 0..100, like every other share tedstore keeps (within_1_window, ROI).

UPDATE games SET prediction_accuracy = 100.0 * prediction_accuracy
WHERE prediction_accuracy IS NOT NULL;

DROP VIEW IF EXISTS game_summary;
DROP VIEW IF EXISTS prediction_accuracy_daily;
DROP VIEW IF EXISTS side_bet_roi_daily;

CREATE TABLE predictions_v4 (
    id                 INTEGER PRIMARY KEY,
    game_id            TEXT NOT NULL,
    tracker            TEXT NOT NULL DEFAULT 'default',   -- who predicted it
    predicted_at_tick  INTEGER NOT NULL,
    predicted_end_tick INTEGER NOT NULL,
    actual_end_tick    INTEGER,                           -- NULL until the game ends
    confidence         REAL NOT NULL,
    bound_lower        REAL,
    bound_upper        REAL,
    epr_active         INTEGER,
    peak_ratio         REAL,
    volatility         REAL,
    momentum           REAL,
    raw_error          INTEGER,                           -- predicted_end_tick - actual_end_tick
    signed_error       INTEGER,
    e40                REAL,                              -- raw_error / 40
    within_windows     INTEGER,                           -- floor(|raw_error| / 40)
    model_version      TEXT NOT NULL,
    created_at         TEXT NOT NULL,
    resolved_at        TEXT,
    UNIQUE (game_id, tracker, predicted_at_tick, model_version)
);
INSERT INTO predictions_v4 (id, game_id, predicted_at_tick, predicted_end_tick, actual_end_tick,
                            confidence, bound_lower, bound_upper, epr_active, peak_ratio,
                            volatility, momentum, raw_error, signed_error, e40, within_windows,
                            model_version, created_at, resolved_at)
SELECT id, game_id, predicted_at_tick, predicted_end_tick, actual_end_tick, confidence,
       bound_lower, bound_upper, epr_active, peak_ratio, volatility, momentum, raw_error,
       signed_error, e40, within_windows, model_version, created_at, resolved_at
FROM predictions;
DROP TABLE predictions;
ALTER TABLE predictions_v4 RENAME TO predictions;
-- By time, with what the measures read, so that a window's measures never read the table.
CREATE INDEX predictions_created_at ON predictions (created_at, tracker, model_version, raw_error);
-- By error, the resolved ones: over a long window the measures read their histogram of
-- errors in order instead of sorting months of predictions (a year: 0.2 s, not 1 s).
CREATE INDEX predictions_raw_error ON predictions (raw_error, created_at, tracker, model_version)
    WHERE raw_error IS NOT NULL;
-- By tracker and model: who sent what in a window, without sorting the window's rows.
CREATE INDEX predictions_tracker ON predictions (tracker, model_version, created_at);
-- By confidence, the resolved ones with bounds: over a long window, calibration reads them in
-- the order of its bins instead of sorting months of predictions.
CREATE INDEX predictions_confidence ON predictions (confidence, created_at, tracker, model_version,
                                                   predicted_end_tick, raw_error, bound_lower,
                                                   bound_upper)
    WHERE raw_error IS NOT NULL AND bound_lower IS NOT NULL AND bound_upper IS NOT NULL;

CREATE TABLE side_bets_v4 (
    id              INTEGER PRIMARY KEY,
    game_id         TEXT NOT NULL,
    tracker         TEXT NOT NULL DEFAULT 'default',      -- who recommended it
    placed_at_tick  INTEGER NOT NULL,
    window_end_tick INTEGER NOT NULL,
    probability     REAL NOT NULL,
    expected_value  REAL NOT NULL,
    confidence      REAL NOT NULL,
    recommendation  TEXT NOT NULL CHECK (recommendation IN ('BET', 'SKIP')),
    actual_outcome  TEXT NOT NULL DEFAULT 'PENDING'
                    CHECK (actual_outcome IN ('PENDING', 'WON', 'LOST')),
    payout          REAL,
    created_at      TEXT NOT NULL,
    resolved_at     TEXT,
    UNIQUE (game_id, tracker, placed_at_tick)
);
INSERT INTO side_bets_v4 (id, game_id, placed_at_tick, window_end_tick, probability,
                          expected_value, confidence, recommendation, actual_outcome, payout,
                          created_at, resolved_at)
SELECT id, game_id, placed_at_tick, window_end_tick, probability, expected_value, confidence,
       recommendation, actual_outcome, payout, created_at, resolved_at
FROM side_bets;
DROP TABLE side_bets;
ALTER TABLE side_bets_v4 RENAME TO side_bets;
CREATE INDEX side_bets_created_at ON side_bets (created_at, tracker, recommendation,
                                                actual_outcome, expected_value, payout);
CREATE INDEX side_bets_tracker ON side_bets (tracker, created_at);
-- By probability, the resolved ones: the same for the side bets' calibration.
CREATE INDEX side_bets_probability ON side_bets (probability, created_at, tracker, actual_outcome,
                                                 recommendation, expected_value, payout)
    WHERE actual_outcome <> 'PENDING';

CREATE TABLE state_v4 (
    tracker    TEXT NOT NULL DEFAULT 'default',           -- whose state it is
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,                             -- JSON text
    updated_at TEXT NOT NULL,                             -- ts of the winning write
    PRIMARY KEY (tracker, key)
);
INSERT INTO state_v4 (key, value, updated_at) SELECT key, value, updated_at FROM state;
DROP TABLE state;
ALTER TABLE state_v4 RENAME TO state;

CREATE TABLE IF NOT EXISTS metrics_hourly_by (
    hour_start            TEXT NOT NULL,
    tracker               TEXT NOT NULL,                  -- '*': all trackers
    model_version         TEXT NOT NULL,                  -- '*': all the tracker's models
    games_analyzed        INTEGER NOT NULL,
    predictions_made      INTEGER NOT NULL,
    median_e40            REAL,
    mean_absolute_error   REAL,
    within_1_window       REAL,
    within_2_windows      REAL,
    within_3_windows      REAL,
    sidebets_recommended  INTEGER NOT NULL,               -- side bets have no model: the
    sidebets_positive_ev  INTEGER NOT NULL,               -- tracker's, in every row of it
    bets_won              INTEGER NOT NULL,
    bets_lost             INTEGER NOT NULL,
    total_ev              REAL,
    roi_percentage        REAL,
    rejected_lines        INTEGER NOT NULL,
    created_at            TEXT NOT NULL,
    PRIMARY KEY (hour_start, tracker, model_version)
);

CREATE VIEW prediction_accuracy_daily AS
SELECT day, predictions, resolved,
       round(mean_absolute_error, 2)                              AS mean_absolute_error,
       round(mean_e40, 3)                                         AS mean_e40,
       round(within_1_window, 1)                                  AS within_1_window_pct,
       round(within_2_windows, 1)                                 AS within_2_windows_pct,
       round(within_3_windows, 1)                                 AS within_3_windows_pct
FROM metrics_daily
UNION ALL
SELECT substr(created_at, 1, 10),
       count(*),
       count(actual_end_tick),
       round(avg(abs(raw_error)), 2),
       round(avg(e40), 3),
       round(100.0 * avg(abs(raw_error) <= 40), 1),
       round(100.0 * avg(abs(raw_error) <= 80), 1),
       round(100.0 * avg(abs(raw_error) <= 120), 1)
FROM predictions
WHERE created_at >= coalesce((SELECT date(max(day), '+1 day') FROM metrics_daily), '')
GROUP BY substr(created_at, 1, 10);

CREATE VIEW side_bet_roi_daily AS
SELECT day, bets, bets_won AS won, bets_lost AS lost, bets_pending AS pending,
       round(total_payout, 2)                                     AS total_payout,
       round(roi_percentage, 1)                                   AS roi_percentage
FROM metrics_daily
UNION ALL
SELECT substr(created_at, 1, 10),
       count(*),
       sum(actual_outcome = 'WON'),
       sum(actual_outcome = 'LOST'),
       sum(actual_outcome = 'PENDING'),
       round(sum(payout), 2),
       round(100.0 * sum(payout) / nullif(sum(actual_outcome <> 'PENDING'), 0), 1)
FROM side_bets
WHERE recommendation = 'BET'
  AND created_at >= coalesce((SELECT date(max(day), '+1 day') FROM metrics_daily), '')
GROUP BY substr(created_at, 1, 10);

CREATE VIEW game_summary AS
SELECT g.game_id,
       g.start_tick,
       g.end_tick,
       g.duration_ticks,
       g.peak_price,
       g.final_price,
       g.patterns_detected,
       (SELECT count(*) FROM predictions p INDEXED BY sqlite_autoindex_predictions_1
         WHERE p.game_id = g.game_id)                                          AS predictions,
       (SELECT round(avg(abs(p.raw_error)), 1)
          FROM predictions p INDEXED BY sqlite_autoindex_predictions_1
         WHERE p.game_id = g.game_id)                                          AS mean_absolute_error,
       g.prediction_accuracy,
       g.side_bets_placed,
       (SELECT count(*) FROM side_bets s INDEXED BY sqlite_autoindex_side_bets_1
         WHERE s.game_id = g.game_id AND s.recommendation = 'BET'
           AND s.actual_outcome = 'WON')                                       AS side_bets_won,
       (SELECT sum(s.payout) FROM side_bets s INDEXED BY sqlite_autoindex_side_bets_1
         WHERE s.game_id = g.game_id AND s.recommendation = 'BET')             AS side_bet_payout,
       g.started_at,
       g.ended_at
FROM games g;

PRAGMA user_version = 4;

-- version: 5
-- Daily histograms instead of the value-ordered indexes. Every write paid for those three
-- indexes: a prediction or side bet entered them when its game ended, at a place its value
-- decided, so each commit dirtied a page per resolved record (three times the WAL). Long
-- windows read them to aggregate months of errors, confidences and probabilities in value
-- order. The scheduler now writes the same counts once a day has settled, ordered by value,
-- and a long window adds up its whole settled days from them and reads the rest from the
-- records (README: "Long windows").
DROP INDEX IF EXISTS predictions_raw_error;
DROP INDEX IF EXISTS predictions_confidence;
DROP INDEX IF EXISTS side_bets_probability;

-- The days whose histograms are complete: every prediction and side bet created that day
-- was resolved when they were written, and none has arrived since (a late arrival removes
-- its day's row in the transaction that stores it).
CREATE TABLE IF NOT EXISTS histogram_days (
    day        TEXT PRIMARY KEY,                          -- 'YYYY-MM-DD', UTC
    created_at TEXT NOT NULL
);
-- The resolved predictions of a day by error, per tracker and model.
CREATE TABLE IF NOT EXISTS errors_daily (
    raw_error     INTEGER NOT NULL,
    day           TEXT NOT NULL,
    tracker       TEXT NOT NULL,
    model_version TEXT NOT NULL,
    n             INTEGER NOT NULL,
    PRIMARY KEY (raw_error, day, tracker, model_version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS errors_daily_day ON errors_daily (day);
-- The resolved predictions with both bounds by confidence: how many the bounds covered,
-- and their total width.
CREATE TABLE IF NOT EXISTS confidences_daily (
    confidence    REAL NOT NULL,
    day           TEXT NOT NULL,
    tracker       TEXT NOT NULL,
    model_version TEXT NOT NULL,
    n             INTEGER NOT NULL,
    covered       INTEGER NOT NULL,
    width         REAL NOT NULL,
    PRIMARY KEY (confidence, day, tracker, model_version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS confidences_daily_day ON confidences_daily (day);
-- The resolved side bets by probability: won, the squared errors of the forecasts, and the
-- stated and realized value of the BETs among them.
CREATE TABLE IF NOT EXISTS probabilities_daily (
    probability REAL NOT NULL,
    day         TEXT NOT NULL,
    tracker     TEXT NOT NULL,
    n           INTEGER NOT NULL,
    won         INTEGER NOT NULL,
    sq          REAL NOT NULL,
    ev          REAL NOT NULL,
    pay         REAL,                                     -- NULL: no BET among them
    PRIMARY KEY (probability, day, tracker)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS probabilities_daily_day ON probabilities_daily (day);

PRAGMA user_version = 5;
