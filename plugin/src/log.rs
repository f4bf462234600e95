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
        obj.insert("level".into(), name.into());
        obj.insert("scope".into(), "ambient-cni".into());
        obj.insert("msg".into(), msg.into());
        for (k, v) in fields {
            obj.insert((*k).into(), (*v).into());
        }
        let _ = writeln!(std::io::stderr(), "{}", serde_json::Value::Object(obj));
    }
}
