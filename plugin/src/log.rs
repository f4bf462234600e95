//! Plugin logging: one JSON line per event on stderr (stdout is the CNI result).

use std::io::Write;

use crate::conf::LogLevel;

/// A stderr logger with a level threshold.
#[derive(Debug, Clone, Copy)]
pub struct Log {
    level: LogLevel,
}

impl Log {
    /// A logger printing `level` and more severe.
    pub fn new(level: LogLevel) -> Self {
        Self { level }
    }

    /// Logs `msg` with key/value fields if `level` is enabled.
    pub fn log(&self, level: LogLevel, msg: &str, fields: &[(&str, &str)]) {
        if level > self.level || level == LogLevel::Off {
            return;
        }
        let mut obj = serde_json::Map::new();
        let name = match level {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            _ => "debug",
        };
        obj.insert(
            "time".into(),
            rfc3339_utc(std::time::SystemTime::now()).into(),
        );
        obj.insert("level".into(), name.into());
        obj.insert("scope".into(), "ambient-cni".into());
        obj.insert("msg".into(), msg.into());
        for (k, v) in fields {
            obj.insert((*k).into(), (*v).into());
        }
        let _ = writeln!(std::io::stderr(), "{}", serde_json::Value::Object(obj));
    }
}

/// `t` as RFC 3339 UTC with milliseconds (`2026-12-05T11:46:18.123Z`), without a date crate:
/// the plugin stays small.
pub fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339_utc;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_123, "2000-02-29T00:00:00.123Z"),
            (1_796_471_178_001, "2026-12-05T11:46:18.001Z"),
            (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
        ];
        for (ms, want) in cases {
            assert_eq!(
                rfc3339_utc(UNIX_EPOCH + Duration::from_millis(ms)),
                want,
                "{ms}"
            );
        }
    }
}
