//! The orchestrator on real KVM (the KVM lab on hosts whose KVM cannot boot Linux), driven
//! through reapctl as a user drives it: deploy helloworld with REAP, a cold start that
//! records, a warm one, scale to zero, a cold start that prefetches; concurrent invocations
//! over a capped number of instances; an instance's VM killed under reapd; reapd stopped
//! with SIGTERM and killed with SIGKILL, and what each leaves behind; a deploy whose
//! function does not exist.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use test_support::reapd::{Binaries, Ran, Reapd};
use test_support::{check, reapvm_bin, run_kvm_suite, Failed, GuestArtifacts, Scratch, Trial};

fn bins() -> Binaries {
    Binaries {
        reapd: PathBuf::from(env!("CARGO_BIN_EXE_reapd")),
        reapctl: PathBuf::from(env!("CARGO_BIN_EXE_reapctl")),
    }
}

fn start_reapd(scratch: &Scratch) -> Result<Reapd, String> {
    let guest = GuestArtifacts::locate()?;
    let extra = vec![
        "--reapvm".to_string(),
        reapvm_bin().display().to_string(),
        "--kernel".into(),
        guest.vmlinux.display().to_string(),
        "--rootfs".into(),
        guest.rootfs.display().to_string(),
    ];
    Reapd::start(&bins(), &scratch.dir, &extra)
}

/// `cold (MODE) latency=..us LoadVMM=..us ... RecPages=N Total=..us` into its fields.
fn served(ran: &Ran) -> (String, BTreeMap<String, u64>) {
    let line = ran.stderr.lines().last().unwrap_or("");
    let start = line.split_whitespace().next().unwrap_or("").to_string();
    let fields = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim_end_matches("us").parse().ok()?)))
        .collect();
    (start, fields)
}

fn mode(ran: &Ran) -> String {
    let line = ran.stderr.lines().last().unwrap_or("");
    line.split_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(m, _)| m.to_string())
        .unwrap_or_default()
}

fn invoke(reapd: &Reapd, data: &str) -> Result<Ran, Failed> {
    let ran = reapd.ctl(&["invoke", "hello", data]);
    check(ran.ok && ran.stdout == format!("Hello, {data}!"), || {
        format!("invoke: {}\n{}", ran.describe(), reapd.log_text())
    })?;
    Ok(ran)
}

fn show(reapd: &Reapd) -> Result<serde_json::Value, String> {
    let (status, body) = reapd.raw("GET", "/functions/hello", b"")?;
    if status != 200 {
        return Err(format!("GET /functions/hello: {status} {body}"));
    }
    serde_json::from_str(&body).map_err(|e| e.to_string())
}

fn instances(reapd: &Reapd) -> Result<Vec<serde_json::Value>, String> {
    Ok(show(reapd)?["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// reapvm processes whose command line names a path under `dir` (reapd's own names it
/// too, and is not counted).
fn reapvms_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline);
            let argv0 = text.split('\0').next().unwrap_or("");
            argv0.rsplit('/').next() == Some("reapvm") && text.contains(&needle)
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn namespaces(instances: &[serde_json::Value]) -> Vec<String> {
    instances
        .iter()
        .filter_map(|i| i["netns"].as_str().map(str::to_string))
        .collect()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<(), Failed> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            return Err(format!("{what}: not within {timeout:?}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn reap_life_cycle() -> Result<(), Failed> {
    let scratch = Scratch::new("reapd");
    let mut reapd = start_reapd(&scratch)?;
    let ran = reapd.ctl(&[
        "deploy",
        "hello",
        "--function",
        "helloworld",
        "--max-instances",
        "2",
        "--keep-alive",
        "600",
    ]);
    check(ran.ok && ran.stdout.starts_with("deployed hello"), || {
        format!("deploy: {}\n{}", ran.describe(), reapd.log_text())
    })?;

    // First cold start: records the WS.
    let first = invoke(&reapd, "first")?;
    let (start, fields) = served(&first);
    check(start == "cold" && mode(&first) == "record", || {
        first.describe()
    })?;
    println!("first invocation: {}", first.stderr.trim());
    let recorded = fields.get("RecPages").copied().unwrap_or(0);
    check(recorded > 100, || {
        format!("RecPages {recorded}: {}", first.describe())
    })?;
    for name in [
        "LoadVMM",
        "FetchState",
        "InstallWS",
        "ConnectFuncClient",
        "FuncInvocation",
        "ServeUnique",
        "Total",
    ] {
        check(fields.contains_key(name), || {
            format!("no {name}: {}", first.describe())
        })?;
    }
    // Then warm.
    let warm = invoke(&reapd, "again")?;
    check(warm.stderr.starts_with("warm latency="), || warm.describe())?;
    let view = show(&reapd)?;
    check(
        view["cold_starts"] == 1
            && view["warm_starts"] == 1
            && view["ws_bytes"].as_u64().unwrap_or(0) > 0,
        || format!("show after two invocations: {view}"),
    )?;

    // Scale to zero, then a cold start that prefetches the WS.
    let ran = reapd.ctl(&["scale-to-zero", "hello"]);
    check(ran.ok && ran.stdout.contains("stopped 1 idle"), || {
        ran.describe()
    })?;
    check(instances(&reapd)?.is_empty(), || {
        "instances left after scale-to-zero".to_string()
    })?;
    let prefetched = invoke(&reapd, "third")?;
    let (start, fields) = served(&prefetched);
    println!("after scale-to-zero: {}", prefetched.stderr.trim());
    let misses = fields.get("ServeUnique").copied().unwrap_or(u64::MAX);
    check(start == "cold" && mode(&prefetched) == "prefetch", || {
        prefetched.describe()
    })?;
    check(misses * 100 <= recorded * 3, || {
        format!("{misses} faults on demand after the prefetch, over 3% of the {recorded} recorded")
    })?;

    // Four at once over at most two instances: two cold starts, two served warm after them.
    reapd.ctl(&["scale-to-zero", "hello"]);
    let runs: Vec<Ran> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                s.spawn({
                    let reapd = &reapd;
                    move || reapd.ctl(&["invoke", "hello", &format!("c{i}")])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, ran) in runs.iter().enumerate() {
        check(ran.ok && ran.stdout == format!("Hello, c{i}!"), || {
            ran.describe()
        })?;
    }
    let colds = runs.iter().filter(|r| r.stderr.starts_with("cold")).count();
    let live = instances(&reapd)?;
    check(colds == 2 && live.len() == 2, || {
        format!(
            "{colds} cold starts and {} instances for 4 concurrent invocations",
            live.len()
        )
    })?;

    // An idle instance's reapvm killed: reapd notices, and the next invocation is answered.
    let victim = live[0]["pid"].as_u64().unwrap_or(0) as u32;
    let victim_ns = live[0]["netns"].as_str().unwrap_or("").to_string();
    // SAFETY: kill(2) on a pid reapd reported as one of its instances' reapvm.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    wait_until(
        "reapd removing the killed instance",
        Duration::from_secs(20),
        || instances(&reapd).map(|i| i.len() == 1).unwrap_or(false),
    )?;
    check(!netns_exists(&victim_ns), || {
        format!("namespace {victim_ns} left")
    })?;
    invoke(&reapd, "after-kill")?;

    // Breakdown rows and metrics.
    let (status, body) = reapd.raw("GET", "/functions/hello/invocations", b"")?;
    let rows: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let cold_rows: Vec<_> = rows
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["start"] == "cold")
        .collect();
    check(status == 200 && cold_rows.len() >= 4, || {
        format!("invocations: {status} {body}")
    })?;
    check(
        cold_rows.iter().all(|r| {
            r["breakdown"]["LoadVMM"].as_u64().unwrap_or(0) > 0
                && r["breakdown"]["Total"].as_u64().is_some()
        }),
        || body.clone(),
    )?;
    let (_, metrics) = reapd.raw("GET", "/metrics", b"")?;
    check(
        metrics.contains(r#"reapd_invocations_total{function="hello",start="warm"}"#)
            && metrics.contains(
                r#"reapd_cold_start_phase_seconds_count{function="hello",phase="LoadVMM"}"#,
            ),
        || metrics.clone(),
    )?;

    // SIGTERM: every VM and namespace goes, exit code 0.
    let before = namespaces(&instances(&reapd)?);
    check(!before.is_empty(), || {
        "no instance running before SIGTERM".to_string()
    })?;
    let code = reapd.signal_and_wait(libc::SIGTERM)?;
    check(code == Some(0), || {
        format!("reapd exited {code:?} on SIGTERM\n{}", reapd.log_text())
    })?;
    check(
        reapvms_under(&scratch.dir).is_empty() && before.iter().all(|n| !netns_exists(n)),
        || {
            format!(
                "after SIGTERM: reapvms {:?}, namespaces {before:?}",
                reapvms_under(&scratch.dir)
            )
        },
    )?;

    // Restarted: it still knows hello and cold-starts it from the WS, with no boot.
    reapd.restart()?;
    let again = invoke(&reapd, "restarted")?;
    check(
        again.stderr.starts_with("cold") && mode(&again) == "prefetch",
        || again.describe(),
    )?;

    // SIGKILL: the VM it ran is stopped and its namespace removed by the next reapd.
    let left = instances(&reapd)?;
    let (pid, ns) = (
        left[0]["pid"].as_u64().unwrap_or(0) as u32,
        namespaces(&left),
    );
    reapd.signal_and_wait(libc::SIGKILL)?;
    check(alive(pid), || {
        "the instance died with reapd (it should outlive a SIGKILL)".to_string()
    })?;
    reapd.restart()?;
    check(!alive(pid) && ns.iter().all(|n| !netns_exists(n)), || {
        format!(
            "after a SIGKILL and a restart: reapvm {pid} alive {}, namespaces {ns:?}\n{}",
            alive(pid),
            reapd.log_text()
        )
    })?;
    check(
        reapd.log_text().contains("left by a previous reapd"),
        || reapd.log_text(),
    )?;
    invoke(&reapd, "after-crash")?;

    let ran = reapd.ctl(&["rm", "hello"]);
    check(ran.ok, || ran.describe())?;
    let ran = reapd.ctl(&["invoke", "hello"]);
    check(!ran.ok && ran.stderr.contains("(404)"), || ran.describe())?;
    Ok(())
}

fn a_deploy_of_a_missing_function_fails_and_leaves_nothing() -> Result<(), Failed> {
    let scratch = Scratch::new("reapd-missing");
    let reapd = start_reapd(&scratch)?;
    let ran = reapd.ctl(&["deploy", "ghost", "--function", "no_such_function"]);
    check(
        !ran.ok
            && ran
                .stderr
                .contains("the warm-up invocation of no_such_function answered 404"),
        || format!("{}\n{}", ran.describe(), reapd.log_text()),
    )?;
    let ls = reapd.ctl(&["ls"]);
    check(ls.ok && ls.stdout.lines().count() == 1, || ls.describe())?;
    for sub in ["functions", "instances"] {
        let left: Vec<_> = std::fs::read_dir(reapd.state_dir.join(sub))
            .map_err(|e| e.to_string())?
            .collect();
        check(left.is_empty(), || format!("{sub}: {left:?}"))?;
    }
    check(reapvms_under(&scratch.dir).is_empty(), || {
        "a reapvm is left".to_string()
    })?;
    Ok(())
}

fn main() -> ExitCode {
    run_kvm_suite("reapd_lab", || {
        vec![
            Trial::test("reap_life_cycle", reap_life_cycle),
            Trial::test(
                "a_deploy_of_a_missing_function_fails_and_leaves_nothing",
                a_deploy_of_a_missing_function_fails_and_leaves_nothing,
            ),
        ]
    })
}
