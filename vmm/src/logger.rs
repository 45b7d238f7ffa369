//! The VMM's log, in Firecracker's line format:
//! `2026-11-27T14:56:23.123456789 [instance-id:thread:LEVEL] message`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("invalid log level {0:?} (Error, Warning, Info, Debug, Trace or Off)")]
    Level(String),
    #[error("cannot open log file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the logger is already initialized")]
    AlreadySet,
}

pub fn parse_level(s: &str) -> Result<LevelFilter, LoggerError> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Ok(LevelFilter::Off),
        "error" => Ok(LevelFilter::Error),
        "warning" | "warn" => Ok(LevelFilter::Warn),
        "info" => Ok(LevelFilter::Info),
        "debug" => Ok(LevelFilter::Debug),
        "trace" => Ok(LevelFilter::Trace),
        _ => Err(LoggerError::Level(s.to_string())),
    }
}

enum Sink {
    Stderr,
    File(File),
}

struct Options {
    show_level: bool,
    show_origin: bool,
    sink: Sink,
}

struct Logger {
    instance_id: String,
    options: Mutex<Options>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

fn open_sink(path: Option<&Path>) -> Result<Sink, LoggerError> {
    Ok(match path {
        Some(path) => Sink::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LoggerError::Open {
                    path: path.to_path_buf(),
                    source,
                })?,
        ),
        None => Sink::Stderr,
    })
}

/// Logs go to `path` (appended; a FIFO works too) or to stderr.
pub fn init(
    instance_id: &str,
    level: LevelFilter,
    path: Option<&Path>,
    show_level: bool,
    show_origin: bool,
) -> Result<(), LoggerError> {
    let sink = open_sink(path)?;
    let logger = LOGGER.get_or_init(|| Logger {
        instance_id: instance_id.to_string(),
        options: Mutex::new(Options {
            show_level,
            show_origin,
            sink,
        }),
    });
    log::set_logger(logger).map_err(|_| LoggerError::AlreadySet)?;
    log::set_max_level(level);
    Ok(())
}

/// Changes where and what the running logger writes (`PUT /logger`). `None` keeps a setting.
pub fn reconfigure(
    level: Option<LevelFilter>,
    path: Option<&Path>,
    show_level: Option<bool>,
    show_origin: Option<bool>,
) -> Result<(), LoggerError> {
    let new_sink = path.map(|p| open_sink(Some(p))).transpose()?;
    if let Some(logger) = LOGGER.get() {
        let mut options = logger.options.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sink) = new_sink {
            options.sink = sink;
        }
        if let Some(v) = show_level {
            options.show_level = v;
        }
        if let Some(v) = show_origin {
            options.show_origin = v;
        }
    }
    if let Some(level) = level {
        log::set_max_level(level);
    }
    Ok(())
}

/// UTC civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

pub fn timestamp(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        since.subsec_nanos()
    )
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let thread = std::thread::current();
        let mut options = self.options.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = format!(
            "{} [{}:{}",
            timestamp(SystemTime::now()),
            self.instance_id,
            thread.name().unwrap_or("?")
        );
        if options.show_level {
            line.push(':');
            line.push_str(level_name(record.level()));
        }
        if options.show_origin {
            line.push_str(&format!(
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!("] {}\n", record.args()));
        // Logging must never stop the VMM: a full pipe or disk loses the line.
        let _ = match &mut options.sink {
            Sink::Stderr => std::io::stderr().write_all(line.as_bytes()),
            Sink::File(f) => f.write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {
        if let Sink::File(f) = &mut self.options.lock().unwrap_or_else(|p| p.into_inner()).sink {
            let _ = f.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn levels_parse_like_firecracker() {
        assert_eq!(parse_level("Warning").unwrap(), LevelFilter::Warn);
        assert_eq!(parse_level("debug").unwrap(), LevelFilter::Debug);
        assert_eq!(parse_level("Off").unwrap(), LevelFilter::Off);
        assert!(matches!(parse_level("loud"), Err(LoggerError::Level(_))));
    }

    #[test]
    fn timestamps_are_utc_iso8601() {
        let t = UNIX_EPOCH + Duration::new(1_795_790_183, 5);
        assert_eq!(timestamp(t), "2026-11-27T14:36:23.000000005");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000");
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
