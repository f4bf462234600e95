//! Log setup: text or JSON lines on stderr, level from flag/env (`RUST_LOG` syntax),
//! changeable at run time (the admin API's SetLogLevel).

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

struct Live {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

static LIVE: OnceLock<Live> = OnceLock::new();

/// Installs the global subscriber; `level` is an `EnvFilter` directive such as `info` or `ambient_cni_agent=debug`.
pub fn init(level: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| anyhow::anyhow!("invalid log level {level:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let res = match format {
        // Colour only on a terminal: a log file or the kubelet's log capture gets plain text.
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    res.map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))?;
    let _ = LIVE.set(Live {
        handle,
        current: Mutex::new(level.to_owned()),
    });
    Ok(())
}

/// Replaces the log filter; returns the previous one.
pub fn set_level(level: &str) -> Result<String, String> {
    let live = LIVE.get().ok_or("logging is not initialised")?;
    let filter =
        EnvFilter::try_new(level).map_err(|e| format!("invalid log level {level:?}: {e}"))?;
    live.handle.reload(filter).map_err(|e| e.to_string())?;
    let mut cur = live.current.lock().unwrap_or_else(|e| e.into_inner());
    Ok(std::mem::replace(&mut *cur, level.to_owned()))
}
