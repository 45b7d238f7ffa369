//! The compute between a replay trace's touches, measured at this machine's real speed: the
//! function's own handler, run by the suite rootfs's own python3 and libraries (a chroot of
//! the rootfs image mounted read-only), timed over warm invocations on one CPU as the
//! one-vCPU guest runs it. This replaces the estimate "lab warm latency / the lab's
//! slowdown", which applies one factor alike to the interpreter and to SIMD-heavy code.
//!
//! The mount lives in a private mount namespace (`unshare --mount`) that ends with the
//! command: nothing stays mounted, whatever happens to this process.

use std::path::Path;
use std::process::{Command, Stdio};

/// Imports the handler as the agent's worker does (guest/src/worker.py), answers one
/// invocation (the first, which the replay does not time), then times `runs` more and
/// prints their durations in microseconds as a JSON list on the first line of stdout.
/// `print()` in a handler goes to stderr, as in the guest.
const TIMING_SCRIPT: &str = r#"
import importlib.util, json, os, sys, time
name, body, runs = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
out = sys.stdout
sys.stdout = sys.stderr
d = "/functions/" + name
os.chdir(d)
sys.path.insert(0, d)
spec = importlib.util.spec_from_file_location("handler", d + "/handler.py")
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
m.handler(body)
us = []
for _ in range(runs):
    t = time.perf_counter_ns()
    m.handler(body)
    us.append((time.perf_counter_ns() - t) // 1000)
out.write(json.dumps(us) + "\n")
out.flush()
"#;

/// Mounts the image (read-only, no journal replay: nothing is written to it), gives it
/// /proc, /dev and a private /tmp, and runs the script pinned to one CPU with the guest
/// worker's environment (one OpenMP thread: the guest has one vCPU).
const CHROOT_RUN: &str = r#"set -e
mount -o ro,noload,loop "$1" "$2"
mount -t proc proc "$2/proc"
mount -t tmpfs -o size=512m tmpfs "$2/tmp"
mount --rbind /dev "$2/dev"
exec taskset -c "$3" chroot "$2" env -i HOME=/root LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin OMP_NUM_THREADS=1 python3 - "$4" "$5" "$6"
"#;

/// Warm invocations of `function` (request `body`) timed `runs` times in a chroot of the
/// suite rootfs image `rootfs`; `mount_dir` is an empty folder to mount it on. Returns the
/// durations in milliseconds, in the order they ran.
pub fn warm_invocations_ms(
    rootfs: &Path,
    mount_dir: &Path,
    function: &str,
    body: &[u8],
    runs: usize,
) -> Result<Vec<f64>, String> {
    std::fs::create_dir_all(mount_dir).map_err(|e| format!("{}: {e}", mount_dir.display()))?;
    let body_hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
    let cpu = last_allowed_cpu();
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            CHROOT_RUN,
            "sh",
        ])
        .arg(rootfs)
        .arg(mount_dir)
        .arg(cpu.to_string())
        .args([function, &body_hex, &runs.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start unshare (util-linux): {e}"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(TIMING_SCRIPT.as_bytes())
            .map_err(|e| format!("{function}: writing the timing script: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{function}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(format!(
            "{function}: timing its handler in a chroot of {} failed ({}):\n{}",
            rootfs.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    parse_timings(stdout.lines().next().unwrap_or(""), runs)
        .map_err(|e| format!("{function}: {e}; the script printed {stdout:?}"))
}

/// The highest CPU this process may run on: away from CPU 0, where most of a host's
/// interrupts land.
fn last_allowed_cpu() -> usize {
    // SAFETY: sched_getaffinity fills the zeroed set it is given, of the size given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 0;
        }
        (0..libc::CPU_SETSIZE as usize)
            .rev()
            .find(|&cpu| libc::CPU_ISSET(cpu, &set))
            .unwrap_or(0)
    }
}

/// The script's JSON list of microseconds, as milliseconds; exactly `runs` of them.
fn parse_timings(line: &str, runs: usize) -> Result<Vec<f64>, String> {
    let us: Vec<u64> =
        serde_json::from_str(line).map_err(|e| format!("not a list of timings: {e}"))?;
    if us.len() != runs {
        return Err(format!("{} timings, {runs} expected", us.len()));
    }
    Ok(us.into_iter().map(|u| u as f64 / 1e3).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_are_read_as_milliseconds_and_counted() {
        assert_eq!(
            parse_timings("[1500, 2000, 250]", 3).unwrap(),
            vec![1.5, 2.0, 0.25]
        );
        assert!(parse_timings("[1500, 2000]", 3)
            .unwrap_err()
            .contains("2 timings, 3 expected"));
        assert!(parse_timings("Traceback", 3).is_err());
        assert!(parse_timings("", 1).is_err());
    }
}
