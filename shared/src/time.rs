//! Wall-clock helpers: epoch seconds for expiry, and Celery's `date_done`
//! format (ISO 8601, microseconds, `+00:00`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn now_epoch() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Now, as Celery writes `date_done`: `2026-11-22T23:15:35.403592+00:00`.
pub fn now_celery() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    celery_datetime(d.as_secs() as i64, d.subsec_micros())
}

/// `seconds` from now, in the same format (a message's `eta` or `expires`
/// from a `countdown` or a relative `expires`).
pub fn celery_datetime_in(seconds: f64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let at = now + std::time::Duration::from_secs_f64(seconds.clamp(0.0, 1e10));
    celery_datetime(at.as_secs() as i64, at.subsec_micros())
}

/// Formats a UTC instant as Celery's `date_done`.
pub fn celery_datetime(epoch_secs: i64, micros: u32) -> String {
    let days = epoch_secs.div_euclid(86_400);
    let secs = epoch_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}+00:00", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_celery() {
        assert_eq!(celery_datetime(0, 0), "1970-01-01T00:00:00.000000+00:00");
        // 2026-11-22T23:15:35.403592+00:00, the example in docs/CELERY_WIRE.md
        assert_eq!(celery_datetime(1_795_389_335, 403_592), "2026-11-22T23:15:35.403592+00:00");
        // a leap day
        assert_eq!(celery_datetime(951_782_400, 1), "2000-02-29T00:00:00.000001+00:00");
    }
}
