//! What the KVM lab looked like when a guest stalled: the VMM's threads (state, where each
//! waits in the lab's kernel) and each lab CPU's next timer event, so that a stall's report
//! says whether the vCPU waited for an interrupt that never came.

use std::fmt::Write;

/// The state of process `pid`'s threads and of the lab kernel's per-CPU timers.
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
    match std::fs::read_to_string("/proc/timer_list") {
        Ok(list) => {
            for (cpu, overdue_ms) in overdue_timers(&list) {
                let _ = writeln!(
                    out,
                    "lab cpu {cpu}: next timer event {}",
                    match overdue_ms {
                        Some(ms) if ms > 0 => format!("overdue by {ms} ms"),
                        Some(_) => "ahead".to_string(),
                        None => "none set".to_string(),
                    }
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "/proc/timer_list: {e}");
        }
    }
    out
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

/// Each CPU's clock event device in `/proc/timer_list`: how far its next event lies in the
/// past, in ms (negative: ahead), or None when none is set.
pub fn overdue_timers(timer_list: &str) -> Vec<(u32, Option<i64>)> {
    let mut now: Option<i64> = None;
    let mut cpu: Option<u32> = None;
    let mut found = Vec::new();
    for line in timer_list.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["now", "at", ns, ..] => now = ns.parse().ok(),
            ["Per", "CPU", "device:", n, ..] => cpu = n.parse().ok(),
            ["next_event:", ns, ..] => {
                if let (Some(c), Some(now)) = (cpu.take(), now) {
                    let next: i64 = ns.parse().unwrap_or(i64::MAX);
                    let overdue = (next != i64::MAX).then(|| (now - next) / 1_000_000);
                    found.push((c, overdue));
                }
            }
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #[test]
    fn overdue_timers_per_cpu() {
        let list = "\
Timer List Version: v0.9
now at 8230491443 nsecs

Tick Device: mode:     1
Broadcast device
Clock Event Device: hpet
 next_event:     9223372036854775807 nsecs

Tick Device: mode:     1
Per CPU device: 0
Clock Event Device: lapic
 next_event:     8000000000 nsecs

Tick Device: mode:     1
Per CPU device: 1
Clock Event Device: lapic
 next_event:     8236000000 nsecs

Tick Device: mode:     1
Per CPU device: 2
Clock Event Device: lapic
 next_event:     9223372036854775807 nsecs
";
        assert_eq!(
            super::overdue_timers(list),
            [(0, Some(230)), (1, Some(-5)), (2, None)]
        );
    }
}
