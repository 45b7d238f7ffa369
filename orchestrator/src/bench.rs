//! `reapctl bench`: an open-loop load generator against reapd, as vHive's invoker.
//! Arrivals are a Poisson process (exponential gaps, seeded so a run can be repeated);
//! each request is sent at its time whatever the earlier ones are doing. At most
//! `concurrency` requests are in flight: an arrival beyond that is counted as skipped, not
//! delayed, so the schedule stays open-loop.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plotters::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp};

use crate::api::{BREAKDOWN_HEADER, MODE_HEADER, START_HEADER};
use crate::breakdown::{Breakdown, CSV_HEADER};
use crate::http::unix_request;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("--rate {0}: must be above 0 and at most 10000 per second")]
    Rate(f64),
    #[error("--duration {0}: must be 1 to 86400 seconds")]
    Duration(u64),
    #[error("--concurrency 0: at least 1")]
    Concurrency,
    #[error("--rate {rate} for {secs} s is {arrivals:.0} arrivals: at most {MAX_ARRIVALS}")]
    TooMany { rate: f64, secs: u64, arrivals: f64 },
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
}

/// The schedule is made up front, so a run is bounded: a million requests.
pub const MAX_ARRIVALS: u64 = 1_000_000;

#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub socket: PathBuf,
    pub name: String,
    pub rate_per_s: f64,
    pub duration: Duration,
    pub concurrency: usize,
    pub data: Vec<u8>,
    pub seed: u64,
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Scheduled send time, seconds from the start.
    pub at_s: f64,
    /// `cold`, `warm`, or `error` (no answer from the function).
    pub start: String,
    pub mode: String,
    pub status: u16,
    pub latency_us: u64,
    pub breakdown: Option<Breakdown>,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub samples: Vec<Sample>,
    pub skipped: usize,
    pub elapsed: Duration,
}

/// Arrival times in [0, duration): gaps drawn from Exp(rate).
pub fn poisson_schedule(rate_per_s: f64, duration: Duration, seed: u64) -> Vec<Duration> {
    let mut rng = StdRng::seed_from_u64(seed);
    let gaps = Exp::new(rate_per_s).expect("a positive rate");
    let mut at = 0.0f64;
    let mut times = Vec::new();
    loop {
        at += gaps.sample(&mut rng);
        if at >= duration.as_secs_f64() {
            return times;
        }
        times.push(Duration::from_secs_f64(at));
    }
}

impl BenchSpec {
    pub fn check(&self) -> Result<(), BenchError> {
        if !(self.rate_per_s > 0.0 && self.rate_per_s <= 10_000.0) {
            return Err(BenchError::Rate(self.rate_per_s));
        }
        let secs = self.duration.as_secs();
        if !(1..=86_400).contains(&secs) {
            return Err(BenchError::Duration(secs));
        }
        if self.concurrency == 0 {
            return Err(BenchError::Concurrency);
        }
        let arrivals = self.rate_per_s * secs as f64;
        if arrivals > MAX_ARRIVALS as f64 {
            return Err(BenchError::TooMany {
                rate: self.rate_per_s,
                secs,
                arrivals,
            });
        }
        Ok(())
    }
}

/// One request due at `due` (its place in the schedule): its latency counts from then, so
/// a generator that falls behind shows as latency, not as missing load.
async fn one(spec: &BenchSpec, at: Duration, due: Instant) -> Sample {
    let sent = due;
    let answer = unix_request(
        &spec.socket,
        "POST",
        &format!("/functions/{}/invoke", spec.name),
        spec.data.clone(),
        Duration::from_secs(3600),
    )
    .await;
    let latency_us = sent.elapsed().as_micros() as u64;
    let mut sample = Sample {
        at_s: at.as_secs_f64(),
        start: "error".into(),
        mode: String::new(),
        status: 0,
        latency_us,
        breakdown: None,
        error: None,
    };
    match answer {
        Ok(a) => {
            let header = |h: &str| {
                a.headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            sample.status = a.status;
            match header(START_HEADER) {
                Some(start) => sample.start = start,
                None => sample.error = Some(a.text().trim().to_string()),
            }
            sample.mode = header(MODE_HEADER).unwrap_or_default();
            sample.breakdown = header(BREAKDOWN_HEADER).and_then(|l| Breakdown::parse_line(&l));
        }
        Err(e) => sample.error = Some(e.to_string()),
    }
    sample
}

/// Runs the schedule against reapd.
pub async fn run(spec: BenchSpec) -> Report {
    let spec = Arc::new(spec);
    let schedule = poisson_schedule(spec.rate_per_s, spec.duration, spec.seed);
    let samples = Arc::new(Mutex::new(Vec::with_capacity(schedule.len())));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(spec.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let mut skipped = 0;
    let start = tokio::time::Instant::now();
    for at in schedule {
        let due = start + at;
        tokio::time::sleep_until(due).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let (spec, samples) = (spec.clone(), samples.clone());
        tasks.spawn(async move {
            let sample = one(&spec, at, due.into_std()).await;
            samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sample);
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    samples.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    Report {
        samples,
        skipped,
        elapsed: start.elapsed(),
    }
}

/// The nearest-rank percentile `p` (0..=100) of `values`, which it sorts.
pub fn percentile(values: &mut [u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    Some(values[rank.clamp(1, values.len()) - 1])
}

fn ms(us: Option<u64>) -> String {
    us.map(|v| format!("{:.1}", v as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

impl Report {
    fn answered(s: &Sample) -> bool {
        s.start != "error" && (200..300).contains(&s.status)
    }

    /// Latencies of the invocations the function answered with 2xx (of one start kind).
    fn latencies(&self, start: Option<&str>) -> Vec<u64> {
        self.samples
            .iter()
            .filter(|s| Self::answered(s) && start.is_none_or(|st| s.start == st))
            .map(|s| s.latency_us)
            .collect()
    }

    /// The summary table reapctl prints.
    pub fn table(&self, spec: &BenchSpec) -> String {
        let mut out = String::new();
        let failed = self.samples.iter().filter(|s| !Self::answered(s)).count();
        let _ = writeln!(
            out,
            "bench {}: Poisson arrivals at {}/s for {} s (seed {}), at most {} in flight; ran {:.1} s",
            spec.name,
            spec.rate_per_s,
            spec.duration.as_secs(),
            spec.seed,
            spec.concurrency,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "requests: {} sent, {} answered 2xx, {} failed, {} skipped (in-flight cap)",
            self.samples.len(),
            self.samples.len() - failed,
            failed,
            self.skipped
        );
        let _ = writeln!(
            out,
            "{:<6} {:>7} {:>10} {:>10} {:>10}",
            "start", "count", "p50 ms", "p90 ms", "p99 ms"
        );
        for (label, start) in [
            ("all", None),
            ("warm", Some("warm")),
            ("cold", Some("cold")),
        ] {
            let mut l = self.latencies(start);
            let _ = writeln!(
                out,
                "{:<6} {:>7} {:>10} {:>10} {:>10}",
                label,
                l.len(),
                ms(percentile(&mut l, 50.0)),
                ms(percentile(&mut l, 90.0)),
                ms(percentile(&mut l, 99.0))
            );
        }
        let mut modes: Vec<(String, usize)> = Vec::new();
        for s in self.samples.iter().filter(|s| s.start == "cold") {
            match modes.iter_mut().find(|(m, _)| *m == s.mode) {
                Some((_, n)) => *n += 1,
                None => modes.push((s.mode.clone(), 1)),
            }
        }
        if !modes.is_empty() {
            let list: Vec<String> = modes.iter().map(|(m, n)| format!("{m} {n}")).collect();
            let _ = writeln!(out, "cold starts by mode: {}", list.join(", "));
        }
        if let Some(s) = self.samples.iter().find(|s| !Self::answered(s)) {
            let why = match (&s.error, s.start.as_str()) {
                (Some(e), _) => e.clone(),
                (None, start) => format!("the function answered {} ({start} start)", s.status),
            };
            let _ = writeln!(out, "first failure: {why}");
        }
        out
    }

    /// `invocations.csv`, `breakdown.csv` (cold starts, vHive's columns) and
    /// `latency.svg` (the latency CDF of warm and cold starts) in `dir`.
    pub fn write(&self, dir: &Path, function: &str) -> Result<Vec<PathBuf>, BenchError> {
        let fail = |path: &Path, reason: String| BenchError::Write {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(dir, e.to_string()))?;
        let mut invocations = String::from("at_s,start,mode,status,latency_us\n");
        let mut breakdown = format!("function,mode,{CSV_HEADER}\n");
        for s in &self.samples {
            let _ = writeln!(
                invocations,
                "{:.6},{},{},{},{}",
                s.at_s, s.start, s.mode, s.status, s.latency_us
            );
            if let Some(b) = &s.breakdown {
                let _ = writeln!(breakdown, "{function},{},{}", s.mode, b.csv_row());
            }
        }
        let paths = [
            dir.join("invocations.csv"),
            dir.join("breakdown.csv"),
            dir.join("latency.svg"),
        ];
        std::fs::write(&paths[0], invocations).map_err(|e| fail(&paths[0], e.to_string()))?;
        std::fs::write(&paths[1], breakdown).map_err(|e| fail(&paths[1], e.to_string()))?;
        self.plot(&paths[2], function)
            .map_err(|e| fail(&paths[2], e))?;
        Ok(paths.to_vec())
    }

    fn plot(&self, path: &Path, function: &str) -> Result<(), String> {
        let series: Vec<(&str, Vec<u64>, RGBColor)> = [
            ("warm", RGBColor(31, 119, 180)),
            ("cold", RGBColor(214, 39, 40)),
        ]
        .into_iter()
        .map(|(start, colour)| {
            let mut l = self.latencies(Some(start));
            l.sort_unstable();
            (start, l, colour)
        })
        .filter(|(_, l, _)| !l.is_empty())
        .collect();
        let all: Vec<u64> = series
            .iter()
            .flat_map(|(_, l, _)| l.iter().copied())
            .collect();
        let lo = all.iter().copied().min().unwrap_or(100).max(1) as f64 / 1000.0;
        let hi = all.iter().copied().max().unwrap_or(1000).max(2) as f64 / 1000.0;
        let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{function}: invocation latency CDF (reapctl bench)"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0f64..1f64)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("latency (ms, log scale)")
            .y_desc("fraction of invocations")
            .draw()
            .map_err(|e| e.to_string())?;
        for (label, latencies, colour) in series {
            let n = latencies.len() as f64;
            let points = latencies
                .iter()
                .enumerate()
                .map(|(i, us)| (*us as f64 / 1000.0, (i + 1) as f64 / n));
            let points: Vec<(f64, f64)> = points.collect();
            // A marker per invocation: a series of one (a run's single cold start) would
            // otherwise be a line of no length.
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(format!("{label} ({} invocations)", latencies.len()))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_poisson_at_the_asked_rate_and_repeatable() {
        let a = poisson_schedule(200.0, Duration::from_secs(50), 7);
        assert_eq!(a, poisson_schedule(200.0, Duration::from_secs(50), 7));
        assert_ne!(a, poisson_schedule(200.0, Duration::from_secs(50), 8));
        // 10,000 expected arrivals: within 3% of the rate.
        assert!((9_700..=10_300).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|w| w[0] <= w[1]) && a.last().unwrap() < &Duration::from_secs(50));
        // Exponential gaps: their standard deviation is about their mean (1/rate).
        let gaps: Vec<f64> = a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
        assert!((sd / mean - 1.0).abs() < 0.05, "mean {mean} sd {sd}");
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&mut v, 50.0), Some(50));
        assert_eq!(percentile(&mut v, 90.0), Some(90));
        assert_eq!(percentile(&mut v, 99.0), Some(99));
        assert_eq!(percentile(&mut v, 100.0), Some(100));
        assert_eq!(percentile(&mut [7], 99.0), Some(7));
        assert_eq!(percentile(&mut [], 50.0), None);
    }

    #[test]
    fn bad_bench_settings_are_refused() {
        let spec = |rate: f64, secs: u64, c: usize| BenchSpec {
            socket: PathBuf::from("/x"),
            name: "f".into(),
            rate_per_s: rate,
            duration: Duration::from_secs(secs),
            concurrency: c,
            data: Vec::new(),
            seed: 1,
        };
        assert!(spec(5.0, 10, 4).check().is_ok());
        assert!(matches!(spec(0.0, 10, 4).check(), Err(BenchError::Rate(_))));
        assert!(matches!(
            spec(f64::NAN, 10, 4).check(),
            Err(BenchError::Rate(_))
        ));
        assert!(matches!(
            spec(5.0, 0, 4).check(),
            Err(BenchError::Duration(0))
        ));
        assert!(matches!(
            spec(5.0, 10, 0).check(),
            Err(BenchError::Concurrency)
        ));
        assert!(matches!(
            spec(10_000.0, 86_400, 4).check(),
            Err(BenchError::TooMany { .. })
        ));
    }

    #[test]
    fn a_report_writes_its_csvs_and_chart() {
        let sample = |start: &str, mode: &str, us: u64| Sample {
            at_s: 0.5,
            start: start.into(),
            mode: mode.into(),
            status: 200,
            latency_us: us,
            breakdown: (start == "cold").then(|| Breakdown {
                load_vmm_us: 10,
                total_us: us,
                ..Breakdown::default()
            }),
            error: None,
        };
        let report = Report {
            samples: vec![
                sample("cold", "record", 90_000),
                sample("warm", "", 900),
                sample("warm", "", 1100),
                // The function's own error: a failure, and not in the percentiles.
                Sample {
                    status: 500,
                    ..sample("warm", "", 50)
                },
            ],
            skipped: 1,
            elapsed: Duration::from_secs(2),
        };
        let dir = tempfile::tempdir().unwrap();
        let paths = report.write(dir.path(), "hello").unwrap();
        let breakdown = std::fs::read_to_string(&paths[1]).unwrap();
        assert_eq!(
            breakdown,
            format!("function,mode,{CSV_HEADER}\nhello,record,10,0,0,0,0,0,0,90000\n")
        );
        let invocations = std::fs::read_to_string(&paths[0]).unwrap();
        assert_eq!(invocations.lines().count(), 5);
        let svg = std::fs::read_to_string(&paths[2]).unwrap();
        assert!(
            svg.contains("<svg")
                && svg.contains("warm (2 invocations)")
                && svg.contains("cold (1 invocations)")
        );
        let spec = BenchSpec {
            socket: PathBuf::from("/x"),
            name: "hello".into(),
            rate_per_s: 2.0,
            duration: Duration::from_secs(1),
            concurrency: 1,
            data: Vec::new(),
            seed: 3,
        };
        let table = report.table(&spec);
        assert!(
            table.contains("4 sent, 3 answered 2xx, 1 failed, 1 skipped"),
            "{table}"
        );
        assert!(table.contains("cold starts by mode: record 1"), "{table}");
        assert!(
            table.contains("first failure: the function answered 500 (warm start)"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("warm") && l.contains(" 2 ") && l.contains("0.9")),
            "{table}"
        );
    }
}
