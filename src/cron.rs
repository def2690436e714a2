//! Cron schedules: the ticks of a 5-field pattern (or `@hourly`, `@daily`,
//! `@weekly`, `@monthly`, `@yearly`/`@annually`) in an IANA time zone, for
//! `sql/schedule.sql`. Parsing and the calendar are croner's; the zones are
//! chrono-tz's, so a tick is right across daylight-saving changes: a local
//! time skipped by a jump forward fires at the first time after the jump; a
//! fixed local time that happens twice (a jump back) fires once, and a
//! wildcard-hour pattern (hourly, every 15 minutes) fires every real hour,
//! in both occurrences of the repeated one.
//!
//! Times cross the SQL boundary as seconds since the Unix epoch (float8),
//! which the SQL side turns into timestamptz. Every problem is an ERROR with
//! SQLSTATE 22023 naming the field.

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::{Cron, Direction};
use pgrx::prelude::*;

fn fail(msg: String) -> ! {
    ereport!(ERROR, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, msg);
}

fn parse(cron: &str) -> Cron {
    let parser = CronParser::builder().seconds(Seconds::Disallowed).build();
    match parser.parse(cron) {
        Ok(c) => c,
        Err(e) => fail(format!(
            "cron \"{cron}\" is not a valid schedule: {e} (5 fields: minute hour day-of-month month day-of-week, or @hourly, @daily, @weekly, @monthly, @yearly)"
        )),
    }
}

fn zone(timezone: &str) -> Tz {
    timezone.parse::<Tz>().unwrap_or_else(|_| {
        fail(format!(
            "timezone \"{timezone}\" is not a known IANA time zone name (such as \"UTC\" or \"Europe/Berlin\")"
        ))
    })
}

/// Times a schedule can be computed for: years 1 to 9999 (chrono's range is
/// narrower than PostgreSQL's, and 'infinity' has no tick).
const EARLIEST_S: f64 = -62_135_596_800.0;
const LATEST_S: f64 = 253_402_300_799.0;

fn at(epoch: f64) -> DateTime<Tz> {
    if !(EARLIEST_S..=LATEST_S).contains(&epoch) {
        fail(format!(
            "time {epoch} (seconds since 1970) is out of range for a schedule (years 1 to 9999)"
        ));
    }
    let secs = epoch.floor();
    let nanos = ((epoch - secs) * 1e9).round().min(999_999_999.0) as u32;
    match Utc.timestamp_opt(secs as i64, nanos).single() {
        Some(t) => t.with_timezone(&Tz::UTC),
        None => fail(format!("time {epoch} is out of range for a schedule")),
    }
}

fn epoch<T: TimeZone>(t: DateTime<T>) -> f64 {
    t.timestamp() as f64 + f64::from(t.timestamp_subsec_micros()) / 1e6
}

/// How far before a time the tick searches start. croner reads a pattern in
/// local time; walking its ticks forward from a little earlier (longer than
/// any daylight-saving shift) gives every tick in real-time order, both
/// occurrences of a repeated hour for a wildcard-hour pattern, and the time
/// right after a skipped hour for a fixed-time one. Its one-shot searches do
/// not: the next tick after the first 01:00 of a repeated hour skipped the
/// second, and the previous tick on a jump-forward day was the last second
/// before the jump, which is no tick.
const LOOKBACK_S: i64 = 3 * 3600;
/// Most ticks walked in one search (a minutely pattern walks 180 to cover
/// the look-back): a bound, not a limit any pattern reaches.
const MAX_WALK: usize = 10_000;

/// Ticks of `c` in `tz` from `from` (inclusive), in real-time order.
fn ticks(c: &Cron, tz: Tz, from: i64) -> impl Iterator<Item = DateTime<Tz>> {
    c.clone()
        .iter_from(at(from as f64).with_timezone(&tz), Direction::Forward)
        .take(MAX_WALK)
}

/// The first tick strictly after `after` (ticks are whole seconds: the
/// fraction of `after` is dropped, as croner would carry it into the tick).
#[pg_extern(immutable, parallel_safe, name = "_cron_next_epoch")]
fn cron_next(cron: &str, timezone: &str, after: f64) -> f64 {
    let (c, tz) = (parse(cron), zone(timezone));
    let after = after.floor() as i64;
    match ticks(&c, tz, after.saturating_sub(LOOKBACK_S)).find(|t| t.timestamp() > after) {
        Some(t) => epoch(t),
        None => fail(format!("cron \"{cron}\" has no tick after that time")),
    }
}

/// The last tick at or before `at` (NULL if there is none).
#[pg_extern(immutable, parallel_safe, name = "_cron_prev_epoch")]
fn cron_prev(cron: &str, timezone: &str, at_epoch: f64) -> Option<f64> {
    let (c, tz) = (parse(cron), zone(timezone));
    let at_s = at_epoch.floor() as i64;
    // croner's answer is near the right one (off by at most a shift): walk
    // forward from a little before it
    let near = c
        .find_previous_occurrence(&at(at_s as f64).with_timezone(&tz), true)
        .ok()?;
    ticks(&c, tz, near.timestamp().saturating_sub(LOOKBACK_S))
        .take_while(|t| t.timestamp() <= at_s)
        .last()
        .map(epoch)
}
