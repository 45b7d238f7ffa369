//! reapd's API and reapctl without a VM (fast tier, any host): bad input gets the right
//! status and a message naming what was wrong, a failed deploy leaves nothing behind, a
//! live socket is not taken over, SIGTERM ends reapd cleanly.

use std::path::{Path, PathBuf};

use test_support::reapd::{Binaries, Reapd};

fn bins() -> Binaries {
    Binaries {
        reapd: PathBuf::from(env!("CARGO_BIN_EXE_reapd")),
        reapctl: PathBuf::from(env!("CARGO_BIN_EXE_reapctl")),
    }
}

/// Guest paths that do not exist: reapd starts, and every deploy fails.
const NO_GUEST: [&str; 6] = [
    "--reapvm",
    "/bin/true",
    "--kernel",
    "/nonexistent/vmlinux",
    "--rootfs",
    "/nonexistent/rootfs.ext4",
];

/// reapd whose guest kernel does not exist: everything but a deploy works.
fn reapd(dir: &tempfile::TempDir) -> Reapd {
    Reapd::start(&bins(), dir.path(), &NO_GUEST.map(String::from)).expect("reapd starts")
}

#[test]
fn unknown_functions_and_endpoints_answer_404() {
    let dir = tempfile::tempdir().unwrap();
    let reapd = reapd(&dir);
    let ran = reapd.ctl(&["invoke", "nope", "data"]);
    assert!(!ran.ok, "{}", ran.describe());
    assert!(ran.stdout.is_empty(), "{}", ran.describe());
    assert!(
        ran.stderr
            .contains(r#"no function named "nope" is deployed (404)"#),
        "{}",
        ran.describe()
    );
    for ran in [
        reapd.ctl(&["show", "nope"]),
        reapd.ctl(&["rm", "nope"]),
        reapd.ctl(&["scale-to-zero", "nope"]),
    ] {
        assert!(ran.stderr.contains("(404)"), "{}", ran.describe());
    }
    let (status, body) = reapd.raw("GET", "/nowhere", b"").unwrap();
    assert_eq!(
        (status, body.as_str()),
        (404, r#"{"error":"no such endpoint"}"#)
    );
}

#[test]
fn bad_deploy_bodies_answer_400_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let reapd = reapd(&dir);
    for (body, expected) in [
        (&br#"{"name": "a", "function": "#[..], "EOF while parsing"),
        (br#"{"name": "a"}"#, "missing field `function`"),
        (
            br#"{"name": "a", "function": "f", "vcpus": 0}"#,
            "field `vcpus`: 1 to 32 (got 0)",
        ),
        (br#"{"name": "A b", "function": "f"}"#, "field `name`"),
        (
            br#"{"name": "a", "function": "f", "cold_start": "warm"}"#,
            "unknown variant `warm`",
        ),
        (
            br#"{"name": "a", "function": "f", "memory": 1}"#,
            "unknown field `memory`",
        ),
        (
            br#"{"name": "a", "function": "f", "keep_alive_s": -1}"#,
            "field `keep_alive_s`: invalid value",
        ),
    ] {
        let (status, answer) = reapd.raw("POST", "/functions", body).unwrap();
        assert_eq!(status, 400, "{}: {answer}", String::from_utf8_lossy(body));
        assert!(
            answer.contains(expected),
            "{}: {answer}",
            String::from_utf8_lossy(body)
        );
    }
    let (status, answer) = reapd
        .raw("GET", "/functions/a/invocations?limit=many", b"")
        .unwrap();
    assert_eq!(status, 400, "{answer}");
    let ran = reapd.ctl(&["deploy", "a", "--function", "f", "--cold-start", "warm"]);
    assert!(
        !ran.ok && ran.stderr.contains("one of reap, file, lazy, boot"),
        "{}",
        ran.describe()
    );
}

#[test]
fn a_body_over_the_limit_answers_413() {
    let dir = tempfile::tempdir().unwrap();
    let reapd = reapd(&dir);
    let big = vec![b'x'; 2 << 20];
    let (status, _) = reapd.raw("POST", "/functions/nope/invoke", &big).unwrap();
    assert_eq!(status, 413);
    // And reapd goes on serving.
    let ran = reapd.ctl(&["ls"]);
    assert!(ran.ok, "{}", ran.describe());
}

#[test]
fn a_deploy_without_its_kernel_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let reapd = reapd(&dir);
    let ran = reapd.ctl(&["deploy", "hello", "--function", "helloworld"]);
    assert!(!ran.ok, "{}", ran.describe());
    assert!(
        ran.stderr
            .contains("the guest kernel /nonexistent/vmlinux does not exist (500)"),
        "{}",
        ran.describe()
    );
    let ran = reapd.ctl(&["ls"]);
    assert!(ran.ok, "{}", ran.describe());
    assert_eq!(
        ran.stdout.lines().count(),
        1,
        "only the header: {}",
        ran.describe()
    );
    for sub in ["functions", "instances"] {
        let left: Vec<_> = std::fs::read_dir(reapd.state_dir.join(sub))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
}

/// Runs a reapd that must refuse to start; returns what it printed.
fn refused(socket: &Path, state_dir: &Path) -> String {
    let out = std::process::Command::new(bins().reapd)
        .args(NO_GUEST)
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "reapd started: {stderr}");
    stderr
}

#[test]
fn a_live_socket_is_not_taken_over_and_sigterm_ends_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = reapd(&dir);
    let stderr = refused(&first.socket, &dir.path().join("state2"));
    assert!(stderr.contains("another reapd listens on"), "{stderr}");
    assert!(first.ctl(&["ls"]).ok, "the first still serves");
    // Nor is its state dir, through another socket: it would take the first's VMs for
    // leftovers.
    let stderr = refused(&dir.path().join("other.sock"), &first.state_dir);
    assert!(
        stderr.contains("another reapd uses the state dir"),
        "{stderr}"
    );
    assert_eq!(first.signal_and_wait(libc::SIGTERM).unwrap(), Some(0));
    assert!(!first.socket.exists(), "the socket is removed");
    // A path that is not a socket is never replaced.
    let not_socket = dir.path().join("precious.db");
    std::fs::write(&not_socket, b"data").unwrap();
    let stderr = refused(&not_socket, &dir.path().join("state4"));
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&not_socket).unwrap(), b"data");
    // A socket file left by a killed reapd is replaced.
    first.restart().unwrap();
    assert_eq!(first.signal_and_wait(libc::SIGKILL).unwrap(), None);
    assert!(first.socket.exists());
    first.restart().unwrap();
    assert!(first.ctl(&["ls"]).ok);
}
