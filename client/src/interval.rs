//! `Duration` to and from PostgreSQL intervals, exactly: as whole
//! microseconds (an interval's resolution), never through a float, and never
//! in days (`interval '1 day'` is 23 or 25 hours across a DST change; a
//! `Duration` is not).

use std::time::Duration;

/// `d` as interval input text (`$n::text::interval`), truncated to the
/// microsecond. A `Duration` longer than an interval can hold (292,000
/// years) becomes the longest one: `make_interval(secs => ..)` would wrap
/// around to a negative interval instead.
pub(crate) fn to_sql(d: Duration) -> String {
    let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    format!("{micros} microseconds")
}

/// The SQL expression that reads an interval column `expr` as whole
/// microseconds (bigint), for `from_micros`. Months count 30 days, as
/// `extract(epoch ...)` counts them.
pub(crate) fn micros_sql(expr: &str) -> String {
    format!("(extract(epoch FROM {expr}) * 1000000)::bigint")
}

/// Microseconds read by `micros_sql` as a `Duration` (a negative interval,
/// which pg_baton never stores in the columns read here, is zero).
pub(crate) fn from_micros(micros: i64) -> Duration {
    Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_saturating() {
        assert_eq!(to_sql(Duration::from_millis(1500)), "1500000 microseconds");
        assert_eq!(to_sql(Duration::from_nanos(1999)), "1 microseconds");
        assert_eq!(to_sql(Duration::MAX), format!("{} microseconds", i64::MAX));
        assert_eq!(from_micros(2_500_000), Duration::from_millis(2500));
        assert_eq!(from_micros(-1), Duration::ZERO);
    }
}
