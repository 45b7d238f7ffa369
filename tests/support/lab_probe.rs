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
        out.push_str(&rips_in_lab_kernel(&exits));
    } else {
        let _ = writeln!(out, "lab KVM exits: tracing not available");
    }
    out
}

/// The nested guest's kernel is built without modules, yet stalled guests were seen at
/// RIPs in the module area (0xffffffffc0...): names each traced RIP that lies in the lab
/// kernel's own code (its /proc/kallsyms, modules included; root sees the addresses). A
/// guest running at the lab hypervisor's own address has been handed the lab's state: the
/// emulation's doing, as reapvm never sets a RIP after boot.
fn rips_in_lab_kernel(exits: &[&str]) -> String {
    let mut rips: Vec<u64> = exits
        .iter()
        .filter_map(|line| {
            let word = line.split_whitespace().skip_while(|w| *w != "rip").nth(1)?;
            u64::from_str_radix(word.trim_start_matches("0x"), 16).ok()
        })
        .collect();
    rips.sort_unstable();
    rips.dedup();
    if rips.is_empty() {
        return String::new();
    }
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    let mut out = String::new();
    for rip in rips {
        let _ = match symbol_at(&kallsyms, rip) {
            Some(symbol) => writeln!(out, "guest rip {rip:#x} is the lab kernel's {symbol}"),
            None => writeln!(out, "guest rip {rip:#x} is not in the lab kernel's symbols"),
        };
    }
    out
}

/// The function of a kallsyms listing ("addr type name [module]" per line) that holds
/// `addr`, as "name+0xoff [module]": the nearest text symbol at or below it, within 1 MiB,
/// and not the last one listed (past the last symbol lies no code a name can be given).
fn symbol_at(kallsyms: &str, addr: u64) -> Option<String> {
    let mut below: Option<(u64, &str, &str)> = None;
    let mut above_exists = false;
    for line in kallsyms.lines() {
        let mut words = line.split_whitespace();
        let (Some(at), Some(kind), Some(name)) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let Ok(at) = u64::from_str_radix(at, 16) else {
            continue;
        };
        if at == 0 || !matches!(kind, "t" | "T") {
            continue;
        }
        if at <= addr {
            if below.is_none_or(|(b, ..)| at > b) {
                below = Some((at, name, words.next().unwrap_or("")));
            }
        } else {
            above_exists = true;
        }
    }
    let (at, name, module) = below?;
    let offset = addr - at;
    (above_exists && offset < 0x10_0000).then(|| {
        format!("{name}+{offset:#x} {module}")
            .trim_end()
            .to_string()
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS: &str = "\
ffffffff81000000 T _stext
ffffffff81000100 T startup_64
ffffffffc05cd000 t svm_vcpu_load\t[kvm_amd]
ffffffffc05cf000 t svm_vcpu_run\t[kvm_amd]
ffffffffc05cf400 t svm_handle_exit\t[kvm_amd]
ffffffffc05cf300 d some_data\t[kvm_amd]
0000000000000000 T hidden_from_non_root
";

    #[test]
    fn a_rip_is_named_by_the_function_that_holds_it() {
        assert_eq!(
            symbol_at(KALLSYMS, 0xffff_ffff_c05c_f20c).as_deref(),
            Some("svm_vcpu_run+0x20c [kvm_amd]")
        );
        assert_eq!(
            symbol_at(KALLSYMS, 0xffff_ffff_8100_0104).as_deref(),
            Some("startup_64+0x4")
        );
        // Below every symbol, above every symbol, or with the addresses hidden: no name.
        assert_eq!(symbol_at(KALLSYMS, 0xffff_ffff_8000_0000), None);
        assert_eq!(symbol_at(KALLSYMS, 0xffff_ffff_ff00_0000), None);
        assert_eq!(symbol_at("0000000000000000 T a\n", 0x10), None);
    }

    #[test]
    fn traced_exits_give_their_rips() {
        let exits = [
            "  kvm_exit: vcpu 0 reason npf rip 0xffffffffc05cf20c info1 0x000000020000000e",
            "  kvm_exit: vcpu 0 reason npf rip 0xffffffffc05cf20c info1 0x000000020000000e",
        ];
        let out = rips_in_lab_kernel(&exits);
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.starts_with("guest rip 0xffffffffc05cf20c "), "{out}");
    }
}
