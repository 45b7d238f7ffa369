//! The VMM's log, in Firecracker's line format:
//! `2026-11-27T14:56:23.123456789 [instance-id:thread:LEVEL] message`.
//!
//! A guest makes the VMM log (a bad request, a register write out of order) as often as it
//! likes, and a slow reader can stop a blocking write: so each place in the code writes a
//! burst of `SITE_BURST` lines and then one every `SITE_REFILL` (the rest are counted and
//! the count reported with the next line that gets through), and the log file is written
//! without blocking (a full pipe loses lines, counted too). Debug and Trace lines, which a
//! user asks for to see everything, are not limited.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Lines one place in the code may write at once, and how often it earns another.
const SITE_BURST: u32 = 10;
const SITE_REFILL: Duration = Duration::from_secs(6);

enum Sink {
    Stderr,
    File(File),
}

impl Sink {
    /// Writes one line; false when it was lost (a full pipe, a full disk).
    fn write_line(&mut self, line: &[u8]) -> bool {
        match self {
            Sink::Stderr => std::io::stderr().write_all(line).is_ok(),
            // One write: a line shorter than PIPE_BUF reaches a FIFO whole or not at all.
            Sink::File(f) => matches!(f.write(line), Ok(n) if n == line.len()),
        }
    }
}

/// How many lines one place in the code may still write: a token bucket.
struct SiteBudget {
    tokens: u32,
    /// When the bucket last earned a token (or was last found full).
    refilled: Instant,
    suppressed: u64,
}

/// What the rate limit lets a line do.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Write it, saying how many lines from its place were suppressed since the last one.
    Write {
        suppressed_before: u64,
    },
    /// Write it, the last before its place is limited to one line every `SITE_REFILL`.
    WriteLast,
    Suppress,
}

impl SiteBudget {
    fn new(now: Instant) -> Self {
        Self {
            tokens: SITE_BURST,
            refilled: now,
            suppressed: 0,
        }
    }

    fn admit(&mut self, now: Instant) -> Admit {
        let earned = now.duration_since(self.refilled).as_nanos() / SITE_REFILL.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(SITE_BURST);
            self.refilled = if self.tokens == SITE_BURST {
                now
            } else {
                self.refilled + SITE_REFILL * earned
            };
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return Admit::Suppress;
        }
        self.tokens -= 1;
        let suppressed_before = std::mem::take(&mut self.suppressed);
        if self.tokens == 0 && suppressed_before == 0 {
            Admit::WriteLast
        } else {
            Admit::Write { suppressed_before }
        }
    }
}

struct Options {
    show_level: bool,
    show_origin: bool,
    /// Only records of modules whose path starts with this are written (Firecracker's
    /// `--module` and `PUT /logger` `module`).
    module: Option<String>,
    sink: Sink,
    /// Keyed by source file and line.
    sites: HashMap<(&'static str, u32), SiteBudget>,
    /// Lines the sink could not take since the last one it took.
    lost: u64,
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
                // Read too: a FIFO opened for writing alone waits (or, non-blocking, fails)
                // until someone reads it, and vHive opens its reader after starting us.
                .read(true)
                .create(true)
                .append(true)
                .custom_flags(libc::O_NONBLOCK)
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
    module: Option<String>,
) -> Result<(), LoggerError> {
    let sink = open_sink(path)?;
    let logger = LOGGER.get_or_init(|| Logger {
        instance_id: instance_id.to_string(),
        options: Mutex::new(Options {
            show_level,
            show_origin,
            module,
            sink,
            sites: HashMap::new(),
            lost: 0,
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
    module: Option<String>,
) -> Result<(), LoggerError> {
    let new_sink = path.map(|p| open_sink(Some(p))).transpose()?;
    if let Some(logger) = LOGGER.get() {
        logger.change(new_sink, show_level, show_origin, module);
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

impl Logger {
    /// What `reconfigure` changes of a logger: `None` keeps a setting; an empty module
    /// lifts the module filter.
    fn change(
        &self,
        sink: Option<Sink>,
        show_level: Option<bool>,
        show_origin: Option<bool>,
        module: Option<String>,
    ) {
        let mut options = self.options.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sink) = sink {
            options.sink = sink;
        }
        if let Some(v) = show_level {
            options.show_level = v;
        }
        if let Some(v) = show_origin {
            options.show_origin = v;
        }
        if let Some(m) = module {
            options.module = Some(m).filter(|m| !m.is_empty());
        }
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
        let mut options = self.options.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(module) = &options.module {
            if !record
                .module_path()
                .unwrap_or("")
                .starts_with(module.as_str())
            {
                return;
            }
        }
        let now = Instant::now();
        let site = (
            record.file_static().unwrap_or("?"),
            record.line().unwrap_or(0),
        );
        let admit = if record.level() <= Level::Info {
            options
                .sites
                .entry(site)
                .or_insert_with(|| SiteBudget::new(now))
                .admit(now)
        } else {
            Admit::Write {
                suppressed_before: 0,
            }
        };
        if admit == Admit::Suppress {
            return;
        }
        let thread = std::thread::current();
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
        line.push_str(&format!("] {}", record.args()));
        match admit {
            Admit::Write {
                suppressed_before: n @ 1..,
            } => line.push_str(&format!(
                " ({n} more lines from this place were suppressed before this one)"
            )),
            Admit::WriteLast => line.push_str(&format!(
                " (further lines from this place are suppressed: one every {}s gets through)",
                SITE_REFILL.as_secs()
            )),
            _ => {}
        }
        if options.lost > 0 {
            line.push_str(&format!(
                " ({} earlier lines lost: the log could not take them)",
                options.lost
            ));
        }
        line.push('\n');
        // Logging must never stop the VMM: a full pipe or disk loses the line.
        if options.sink.write_line(line.as_bytes()) {
            options.lost = 0;
        } else {
            options.lost += 1;
        }
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
    fn each_place_writes_a_burst_then_one_line_per_refill() {
        let t0 = Instant::now();
        let mut site = SiteBudget::new(t0);
        for _ in 0..SITE_BURST - 1 {
            assert_eq!(
                site.admit(t0),
                Admit::Write {
                    suppressed_before: 0
                }
            );
        }
        assert_eq!(site.admit(t0), Admit::WriteLast);
        let almost = t0 + SITE_REFILL - Duration::from_millis(1);
        for _ in 0..1000 {
            assert_eq!(site.admit(almost), Admit::Suppress);
        }
        assert_eq!(
            site.admit(t0 + SITE_REFILL),
            Admit::Write {
                suppressed_before: 1000
            }
        );
        assert_eq!(site.admit(t0 + SITE_REFILL), Admit::Suppress);
        // A quiet place earns its whole burst back, no more.
        let later = t0 + SITE_REFILL * 100;
        assert_eq!(
            site.admit(later),
            Admit::Write {
                suppressed_before: 1
            }
        );
        for _ in 0..SITE_BURST - 2 {
            assert_eq!(
                site.admit(later),
                Admit::Write {
                    suppressed_before: 0
                }
            );
        }
        assert_eq!(site.admit(later), Admit::WriteLast);
        assert_eq!(site.admit(later), Admit::Suppress);
    }

    fn test_logger(sink: Sink) -> Logger {
        log::set_max_level(LevelFilter::Trace);
        Logger {
            instance_id: "test".into(),
            options: Mutex::new(Options {
                show_level: true,
                show_origin: false,
                module: None,
                sink,
                sites: HashMap::new(),
                lost: 0,
            }),
        }
    }

    fn log_from(logger: &Logger, file: &'static str, message: &str) {
        logger.log(
            &Record::builder()
                .level(Level::Warn)
                .file_static(Some(file))
                .line(Some(1))
                .args(format_args!("{message}"))
                .build(),
        );
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("reapvm-logger-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_flood_from_one_place_stays_a_few_lines() {
        let path = scratch("flood").join("log");
        let logger = test_logger(open_sink(Some(&path)).unwrap());
        for i in 0..100_000 {
            log_from(&logger, "flood.rs", &format!("bad register write {i}"));
        }
        log_from(&logger, "other.rs", "another place still logs");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), SITE_BURST as usize + 1, "{text}");
        assert!(
            lines[SITE_BURST as usize - 1].contains("further lines from this place are suppressed")
        );
        assert!(lines.last().unwrap().contains("another place still logs"));
    }

    /// `--module` (and `PUT /logger` `module`): only the records of modules whose path
    /// starts with it; an empty module lifts the filter.
    #[test]
    fn a_module_filter_keeps_that_module_s_records_only() {
        let path = scratch("module").join("log");
        let logger = test_logger(open_sink(Some(&path)).unwrap());
        logger.change(None, None, None, Some("vmm::api".into()));
        let from = |module: &'static str, line: u32, message: &str| {
            logger.log(
                &Record::builder()
                    .level(Level::Warn)
                    .module_path_static(Some(module))
                    .file_static(Some("m.rs"))
                    .line(Some(line))
                    .args(format_args!("{message}"))
                    .build(),
            );
        };
        from("vmm::api::server", 1, "kept: the API's");
        from("devices::virtio::block", 2, "dropped: a device's");
        from("vmm::builder", 3, "dropped: the builder's");
        // A PUT /logger without a module keeps the filter; an empty one lifts it.
        logger.change(None, Some(true), None, None);
        from("vmm::builder", 5, "dropped: still filtered");
        logger.change(None, None, None, Some(String::new()));
        from("devices::virtio::block", 4, "kept: no filter any more");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("kept: the API's") && text.contains("kept: no filter"),
            "{text}"
        );
        assert!(!text.contains("dropped"), "{text}");
    }

    /// Runs `f` on a thread; a call that blocks fails the test instead of hanging it.
    fn within(seconds: u64, f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(seconds))
            .expect("the logger blocked");
    }

    #[test]
    fn a_fifo_nobody_reads_neither_blocks_the_open_nor_the_writes() {
        let path = scratch("fifo").join("log.fifo");
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the file.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        within(5, move || {
            let logger = test_logger(open_sink(Some(&path)).unwrap());
            // Far more than a pipe holds (64 KiB), from many places so the rate limit
            // lets them through.
            let long = "x".repeat(2000);
            let sites: Vec<&'static str> = (0..200)
                .map(|i| &*Box::leak(format!("site{i}.rs").into_boxed_str()))
                .collect();
            for site in &sites {
                log_from(&logger, site, &long);
            }
            let lost = logger.options.lock().unwrap().lost;
            assert!(lost > 100, "the full pipe lost {lost} lines");
        });
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
