//! What the KVM lab looked like when a guest stalled: the VMM's threads (state, where each
//! waits in the lab's kernel) and what the lab's KVM did for the VM meanwhile, so that a
//! stall's report says whether the vCPU waited, looped in the guest or kept exiting. (A lost
//! timer is lab-init's watchers' to report: they stop the lab long before a boot's deadline.)

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

/// The state of process `pid`'s threads and its VM's activity in the lab's KVM.
pub fn describe_stall(pid: u32) -> String {
    let mut out = String::from("--- lab state at the stall ---\n");
    let tasks = format!("/proc/{pid}/task");
    match std::fs::read_dir(&tasks) {
        Ok(entries) => {
            let mut tids: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            tids.sort();
            for tid in tids {
                let _ = writeln!(out, "{}", describe_thread(&format!("{tasks}/{tid}")));
            }
        }
        Err(e) => {
            let _ = writeln!(out, "{tasks}: {e}");
        }
    }
    out.push_str(&kvm_activity(pid));
    out
}

/// What the lab's KVM does for the VM of process `pid` over one second: the counters of its
/// debugfs folder that moved (exits and their kinds), and the guest exits KVM traced (reason
/// and guest RIP), so a running-but-stuck vCPU shows whether it loops in the guest or exits.
fn kvm_activity(pid: u32) -> String {
    let mut out = String::new();
    let debug = Path::new("/sys/kernel/debug/kvm");
    let vm_dir = std::fs::read_dir(debug).ok().and_then(|entries| {
        entries
            .filter_map(|e| e.ok())
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{pid}-"))
            })
            .map(|e| e.path())
    });
    let tracing = Path::new("/sys/kernel/tracing");
    let exit_event = tracing.join("events/kvm/kvm_exit/enable");
    let traced = std::fs::write(tracing.join("trace"), "").is_ok()
        && std::fs::write(&exit_event, "1").is_ok();
    let before = vm_dir.as_deref().map(counters).unwrap_or_default();
    std::thread::sleep(Duration::from_secs(1));
    let after = vm_dir.as_deref().map(counters).unwrap_or_default();
    if traced {
        let _ = std::fs::write(&exit_event, "0");
    }
    match &vm_dir {
        Some(dir) => {
            let moved: Vec<String> = after
                .iter()
                .filter_map(|(name, v)| {
                    let d = v.saturating_sub(*before.get(name)?);
                    (d > 0).then(|| format!("{name} +{d}"))
                })
                .collect();
            let _ = writeln!(
                out,
                "lab KVM counters over 1 s ({}): {}",
                dir.display(),
                if moved.is_empty() {
                    "none moved".to_string()
                } else {
                    moved.join(", ")
                }
            );
        }
        None => {
            let _ = writeln!(
                out,
                "lab KVM counters: no {}/{pid}-* folder",
                debug.display()
            );
        }
    }
    if traced {
        let trace = std::fs::read_to_string(tracing.join("trace")).unwrap_or_default();
        let exits: Vec<&str> = trace.lines().filter(|l| l.contains("kvm_exit:")).collect();
        let _ = writeln!(out, "lab KVM exits traced over 1 s: {}", exits.len());
        for line in exits.iter().take(12) {
            let at = line.find("kvm_exit:").unwrap_or(0);
            let _ = writeln!(out, "  {}", line[at..].trim());
        }
    } else {
        let _ = writeln!(out, "lab KVM exits: tracing not available");
    }
    out
}

/// Every counter file under `dir` (one level of subfolders: the vCPUs'), by relative path.
fn counters(dir: &Path) -> BTreeMap<String, u64> {
    let mut found = BTreeMap::new();
    let mut folders = vec![(dir.to_path_buf(), String::new())];
    while let Some((folder, prefix)) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            let path = entry.path();
            if path.is_dir() {
                if prefix.is_empty() {
                    folders.push((path, format!("{name}/")));
                }
            } else if let Some(v) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                found.insert(name, v);
            }
        }
    }
    found
}

fn describe_thread(dir: &str) -> String {
    let read = |name: &str| std::fs::read_to_string(format!("{dir}/{name}")).unwrap_or_default();
    let comm = read("comm");
    // stat: "tid (comm) S ...": the state follows the last ')'.
    let stat = read("stat");
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .unwrap_or("?")
        .to_string();
    let wchan = read("wchan");
    // The kernel stack's first frames say where a blocked thread waits (root only).
    let stack: Vec<String> = read("stack")
        .lines()
        .take(6)
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .unwrap_or(l)
                .split('+')
                .next()
                .unwrap_or(l)
                .to_string()
        })
        .collect();
    format!(
        "thread {} state {} wchan {} stack [{}]",
        comm.trim(),
        state,
        if wchan.is_empty() { "-" } else { wchan.trim() },
        stack.join(" < ")
    )
}
