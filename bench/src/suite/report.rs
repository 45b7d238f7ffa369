//! The suite's results: every run as CSV, the summary tables in markdown beside the paper's.

use std::fmt::Write as _;

use super::functions::paper;
use super::options::Mode;

/// One measured run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub function: String,
    /// "boot", "warm", "record" (REAP's first restore), or a mode's label.
    pub kind: String,
    /// "cold" (snapshot files dropped from the page cache), "hot", or "-" (no snapshot).
    pub page_cache: &'static str,
    pub run: usize,
    pub load_ms: f64,
    pub invoke_ms: f64,
    pub latency_ms: f64,
    pub faults_on_demand: u64,
    pub bytes_read: u64,
    pub ws_bytes: u64,
    pub vmm_rss_overhead_kib: u64,
}

pub const CSV_HEADER: &str = "function,kind,page_cache,run,load_to_resumed_ms,invocation_ms,latency_ms,faults_on_demand,bytes_read,ws_bytes,vmm_rss_overhead_kib";

pub fn csv(samples: &[Sample]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for s in samples {
        let _ = writeln!(
            out,
            "{},{},{},{},{:.3},{:.3},{:.3},{},{},{},{}",
            s.function,
            s.kind,
            s.page_cache,
            s.run,
            s.load_ms,
            s.invoke_ms,
            s.latency_ms,
            s.faults_on_demand,
            s.bytes_read,
            s.ws_bytes,
            s.vmm_rss_overhead_kib
        );
    }
    out
}

/// Reads back what `csv` wrote.
pub fn parse_csv(text: &str) -> Result<Vec<Sample>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(CSV_HEADER) {
        return Err("not a runs.csv of this benchmark (header differs)".into());
    }
    lines
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, line)| {
            let f: Vec<&str> = line.split(',').collect();
            let bad = || format!("runs.csv line {}: {line:?}", i + 2);
            if f.len() != 11 {
                return Err(bad());
            }
            let num = |k: usize| f[k].parse::<f64>().map_err(|_| bad());
            let int = |k: usize| f[k].parse::<u64>().map_err(|_| bad());
            Ok(Sample {
                function: f[0].to_string(),
                kind: f[1].to_string(),
                page_cache: match f[2] {
                    "cold" => "cold",
                    "hot" => "hot",
                    _ => "-",
                },
                run: int(3)? as usize,
                load_ms: num(4)?,
                invoke_ms: num(5)?,
                latency_ms: num(6)?,
                faults_on_demand: int(7)?,
                bytes_read: int(8)?,
                ws_bytes: int(9)?,
                vmm_rss_overhead_kib: int(10)?,
            })
        })
        .collect()
}

/// Median, min and max.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn spread(values: &[f64]) -> Option<Spread> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

pub fn geomean(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|&v| v <= 0.0 || !v.is_finite()) {
        return None;
    }
    Some((values.iter().map(|v| v.ln()).sum::<f64>() / values.len() as f64).exp())
}

fn select<'a>(
    samples: &'a [Sample],
    function: &'a str,
    kind: &'a str,
) -> impl Iterator<Item = &'a Sample> {
    samples
        .iter()
        .filter(move |s| s.function == function && s.kind == kind)
}

pub fn spread_of(
    samples: &[Sample],
    function: &str,
    kind: &str,
    value: fn(&Sample) -> f64,
) -> Option<Spread> {
    spread(
        &select(samples, function, kind)
            .map(value)
            .collect::<Vec<_>>(),
    )
}

fn cell(s: Option<Spread>) -> String {
    match s {
        Some(s) if s.min == s.max => format!("{:.0}", s.median),
        Some(s) => format!("{:.0} ({:.0}-{:.0})", s.median, s.min, s.max),
        None => "-".into(),
    }
}

fn ratio(a: Option<Spread>, b: Option<Spread>) -> Option<f64> {
    Some(a?.median / b?.median)
}

fn x(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}x"))
}

/// The markdown report: the latency table beside the paper's, geometric-mean speedups,
/// faults, WS sizes, and the per-function costs (boot, load-to-resumed, RSS, recording).
pub fn markdown(
    samples: &[Sample],
    functions: &[String],
    modes: &[Mode],
    place: &str,
    command: &str,
) -> String {
    let latency = |s: &Sample| s.latency_ms;
    let mut out = String::new();
    let _ = writeln!(out, "Ran on: {place}. Command: `{command}`.\n");
    let _ = writeln!(out, "Cold-start latency in ms (PUT /snapshot/load to the first invocation's answer), median (min-max); warm: a booted VM's invocation.\n");
    let mut head = String::from("| function | warm |");
    for m in modes {
        let _ = write!(head, " {} |", m.label());
    }
    // Every mode against File (when it ran), and REAP against Uffd, the mechanism it builds on.
    let vs_file: Vec<Mode> = if modes.contains(&Mode::File) {
        modes.iter().copied().filter(|&m| m != Mode::File).collect()
    } else {
        Vec::new()
    };
    let with_uffd = modes.contains(&Mode::Uffd);
    let reap_vs_uffd = with_uffd && modes.contains(&Mode::Reap);
    for m in &vs_file {
        let _ = write!(head, " {} vs File |", m.label());
    }
    if reap_vs_uffd {
        head.push_str(" REAP vs Uffd |");
    }
    head.push_str(if with_uffd {
        " faults on demand Uffd -> REAP |"
    } else {
        " faults on demand REAP |"
    });
    head.push_str(" WS (MB) | paper: warm / cold / REAP (speedup) |");
    let _ = writeln!(out, "{head}");
    let columns = 2 + modes.len() + vs_file.len() + usize::from(reap_vs_uffd) + 3;
    let _ = writeln!(out, "|{}", "---|".repeat(columns));
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); vs_file.len()];
    let (mut vs_uffd, mut fault_cut) = (vec![], vec![]);
    for f in functions {
        let med = |m: Mode| spread_of(samples, f, m.label(), latency);
        let faults = |m: Mode| spread_of(samples, f, m.label(), |s| s.faults_on_demand as f64);
        let mut row = format!("| {f} | {} |", cell(spread_of(samples, f, "warm", latency)));
        for &m in modes {
            let _ = write!(row, " {} |", cell(med(m)));
        }
        for (i, &m) in vs_file.iter().enumerate() {
            let r = ratio(med(Mode::File), med(m));
            ratios[i].extend(r);
            let _ = write!(row, " {} |", x(r));
        }
        if reap_vs_uffd {
            let r = ratio(med(Mode::Uffd), med(Mode::Reap));
            vs_uffd.extend(r);
            let _ = write!(row, " {} |", x(r));
        }
        let fault_cell = match (with_uffd, faults(Mode::Uffd), faults(Mode::Reap)) {
            (true, Some(u), Some(r)) => {
                if u.median > 0.0 {
                    fault_cut.push(1.0 - r.median / u.median);
                }
                format!("{:.0} -> {:.0}", u.median, r.median)
            }
            (false, _, Some(r)) => format!("{:.0}", r.median),
            _ => "-".into(),
        };
        let ws_mb = select(samples, f, "record")
            .map(|s| s.ws_bytes as f64 / 1e6)
            .next();
        let p = paper(f).map_or("-".into(), |(w, c, r, x)| {
            format!("{w:.0} / {c:.0} / {r:.0} ({x}x)")
        });
        let _ = writeln!(
            row,
            " {fault_cell} | {} | {p} |",
            ws_mb.map_or("-".into(), |m| format!("{m:.1}"))
        );
        out.push_str(&row);
    }
    let _ = writeln!(out);
    let mut means: Vec<String> = vs_file
        .iter()
        .zip(&ratios)
        .map(|(m, r)| format!("{} vs File {}", m.label(), x(geomean(r))))
        .collect();
    if reap_vs_uffd {
        means.push(format!("REAP vs Uffd {}", x(geomean(&vs_uffd))));
    }
    if !fault_cut.is_empty() {
        means.push(format!(
            "faults on demand removed by REAP (vs Uffd): {:.2}% (mean)",
            100.0 * fault_cut.iter().sum::<f64>() / fault_cut.len() as f64
        ));
    }
    let _ = writeln!(
        out,
        "Geometric means over {} functions: {}. The paper: 3.7x over its cold (File-like) restores, 97% of faults removed.\n",
        functions.len(),
        if means.is_empty() { "-".to_string() } else { means.join(", ") }
    );
    let mut head =
        String::from("| function | boot to ready (ms) | first invocation after boot (ms) |");
    for m in modes {
        let _ = write!(head, " load-to-resumed {} (ms) |", m.label());
    }
    head.push_str(" REAP recording invocation (ms) | recording vs REAP | VMM RSS overhead (MiB) |");
    let _ = writeln!(out, "{head}");
    let _ = writeln!(out, "|{}", "---|".repeat(modes.len() + 6));
    for f in functions {
        let boot = spread_of(samples, f, "boot", |s| s.latency_ms);
        let first = spread_of(samples, f, "boot", |s| s.invoke_ms);
        let mut row = format!("| {f} | {} | {} |", cell(boot), cell(first));
        for &m in modes {
            let _ = write!(
                row,
                " {} |",
                cell(spread_of(samples, f, m.label(), |s| s.load_ms))
            );
        }
        let record = spread_of(samples, f, "record", latency);
        let rss = select(samples, f, "boot")
            .map(|s| s.vmm_rss_overhead_kib as f64 / 1024.0)
            .next();
        let _ = writeln!(
            row,
            " {} | {} | {} |",
            cell(record),
            x(ratio(
                record,
                spread_of(samples, f, Mode::Reap.label(), latency)
            )),
            rss.map_or("-".into(), |r| format!("{r:.1}"))
        );
        out.push_str(&row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(function: &str, kind: &str, latency_ms: f64, faults: u64) -> Sample {
        Sample {
            function: function.into(),
            kind: kind.into(),
            page_cache: "cold",
            run: 1,
            load_ms: 1.0,
            invoke_ms: latency_ms - 1.0,
            latency_ms,
            faults_on_demand: faults,
            bytes_read: 0,
            ws_bytes: 2_000_000,
            vmm_rss_overhead_kib: 4096,
        }
    }

    #[test]
    fn spread_and_geomean() {
        assert_eq!(
            spread(&[3.0, 1.0, 2.0]),
            Some(Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            })
        );
        assert_eq!(spread(&[4.0, 1.0]).unwrap().median, 2.5);
        assert_eq!(spread(&[]), None);
        assert!((geomean(&[2.0, 8.0]).unwrap() - 4.0).abs() < 1e-12);
        assert_eq!(geomean(&[2.0, 0.0]), None);
    }

    #[test]
    fn table_has_speedups_faults_and_the_paper() {
        let samples = vec![
            sample("helloworld", "warm", 2.0, 0),
            sample("helloworld", "File", 400.0, 100),
            sample("helloworld", "File", 600.0, 100),
            sample("helloworld", "Uffd", 1000.0, 800),
            sample("helloworld", "REAP", 100.0, 8),
            sample("helloworld", "record", 1500.0, 800),
        ];
        let md = markdown(
            &samples,
            &["helloworld".into()],
            &[Mode::File, Mode::Uffd, Mode::Reap],
            "test",
            "cmd",
        );
        assert!(
            md.contains(
                "| Uffd vs File | REAP vs File | REAP vs Uffd | faults on demand Uffd -> REAP |"
            ),
            "{md}"
        );
        assert!(md.contains("| helloworld | 2 | 500 (400-600) | 1000 | 100 | 0.50x | 5.00x | 10.00x | 800 -> 8 | 2.0 | 1 / 232 / 60 (3.9x) |"), "{md}");
        assert!(
            md.contains("|---|---|---|---|---|---|---|---|---|---|---|\n"),
            "{md}"
        );
        assert!(
            md.contains("Uffd vs File 0.50x, REAP vs File 5.00x, REAP vs Uffd 10.00x"),
            "{md}"
        );
        assert!(md.contains("99.00% (mean)"), "{md}");
        assert!(
            md.contains("| 1500 | 15.00x | - |"),
            "no boot row: no RSS figure; {md}"
        );
        // Without Uffd: each REAP mode against File, and REAP's own faults.
        let mut no_uffd = samples.clone();
        no_uffd.retain(|s| s.kind != "Uffd");
        no_uffd.push(sample("helloworld", "REAP-stream", 80.0, 2));
        let md2 = markdown(
            &no_uffd,
            &["helloworld".into()],
            &[Mode::File, Mode::Reap, Mode::ReapStream],
            "test",
            "cmd",
        );
        assert!(
            md2.contains("| 500 (400-600) | 100 | 80 | 5.00x | 6.25x | 8 | 2.0 |"),
            "{md2}"
        );
        assert!(
            md2.contains("REAP vs File 5.00x, REAP-stream vs File 6.25x."),
            "{md2}"
        );
        let csv = csv(&samples);
        assert_eq!(csv.lines().count(), 7);
        let back = parse_csv(&csv).unwrap();
        assert_eq!(back.len(), 6);
        assert_eq!(
            (
                back[1].kind.as_str(),
                back[1].latency_ms,
                back[1].faults_on_demand
            ),
            ("File", 400.0, 100)
        );
        assert!(parse_csv("x,y\n").is_err());
        assert!(csv
            .lines()
            .nth(2)
            .unwrap()
            .starts_with("helloworld,File,cold,1,1.000,399.000,400.000,100,"));
    }
}
