//! Boot tests on real KVM: the project's kernel (vmlinux and bzImage) with the agent
//! initramfs, vCPU and memory configurations, exit codes, and every start-up error.

use test_support as support;

use std::process::{Command, ExitCode};
use std::time::Duration;

use support::*;

const BOOT_DEADLINE: Duration = Duration::from_secs(240);
const MPTABLE_START: u64 = 0x9fc00;
const HIMEM_START: u64 = 0x10_0000;
const MMIO_GAP_START: u64 = 0xc000_0000;
const PAGE: u64 = 4096;

/// "System RAM" the guest kernel reports for `mem_mib`: the e820 RAM less page 0, which
/// Linux always reserves.
fn expected_system_ram(mem_mib: u64) -> u64 {
    let ram = mem_mib << 20;
    let low = ram.min(MMIO_GAP_START);
    let high = ram.saturating_sub(MMIO_GAP_START);
    MPTABLE_START + (low - HIMEM_START) + high - PAGE
}

/// Boots the agent with `kernel`, which reboots at once; checks what it saw.
fn boot_and_check(
    kernel_of: fn(&GuestArtifacts) -> std::path::PathBuf,
    vcpus: u32,
    mem_mib: u64,
) -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new(&format!("boot-{vcpus}-{mem_mib}"));
    let config = scratch.write(
        "vm.json",
        vm_config(
            &kernel_of(&guest),
            Some(&guest.initramfs),
            vcpus,
            mem_mib,
            &test_boot_args("reapvm.exit=reboot"),
        ),
    );
    let out = run_reapvm(
        &[
            "--no-api",
            "--boot-timer",
            "--config-file",
            config.to_str().unwrap(),
        ],
        BOOT_DEADLINE,
    );
    check(out.code == Some(0), || {
        format!(
            "reapvm should exit 0 after the guest reboots; {}",
            out.describe()
        )
    })?;
    check(out.stdout.contains("reapvm-agent: rebooting"), || {
        format!("the agent never reached its reboot; {}", out.describe())
    })?;
    let cpus = out.agent_value("cpus");
    check(cpus == Some(vcpus.to_string()), || {
        format!(
            "guest saw cpus={cpus:?}, configured {vcpus}; {}",
            out.describe()
        )
    })?;
    let ram: Option<u64> = out
        .agent_value("system_ram_bytes")
        .and_then(|v| v.parse().ok());
    check(ram == Some(expected_system_ram(mem_mib)), || {
        format!(
            "guest saw System RAM {ram:?}, expected {} for {mem_mib} MiB; {}",
            expected_system_ram(mem_mib),
            out.describe()
        )
    })?;
    let total: Option<u64> = out
        .agent_value("mem_total_kib")
        .and_then(|v| v.parse().ok());
    check(
        total.is_some_and(|kib| kib <= mem_mib << 10 && kib >= (mem_mib << 10) * 8 / 10),
        || format!("MemTotal {total:?} KiB is not within 80..100% of {mem_mib} MiB"),
    )?;
    check(out.stderr.contains("Guest-boot-time ="), || {
        format!("--boot-timer should log the boot time; {}", out.describe())
    })
}

/// The guest stays up when not told to reboot: the VMM is still running once the guest
/// has signalled boot completion.
fn guest_stays_up() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("stay");
    let config = scratch.write(
        "vm.json",
        vm_config(
            &guest.vmlinux,
            Some(&guest.initramfs),
            1,
            128,
            &test_boot_args("reapvm.exit=stay"),
        ),
    );
    let (mut child, booted) = start_until_booted(&config, BOOT_DEADLINE)?;
    std::thread::sleep(Duration::from_secs(2));
    let still_running = child.try_wait()?.is_none();
    let _ = child.kill();
    let _ = child.wait();
    check(booted.is_some(), || {
        "the guest never signalled boot completion".into()
    })?;
    check(still_running, || {
        "the VMM exited although the guest was told to stay".into()
    })
}

/// Runs reapvm on a config that must be refused; checks the exit code and the one-line
/// message on stderr.
fn refused(config_json: &str, want_code: i32, want_msg: &str) -> Result<(), Failed> {
    let scratch = Scratch::new("refused");
    let config = scratch.write("vm.json", config_json);
    let out = run_reapvm(
        &["--no-api", "--config-file", config.to_str().unwrap()],
        Duration::from_secs(30),
    );
    check(out.code == Some(want_code), || {
        format!("expected exit code {want_code}; {}", out.describe())
    })?;
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("reapvm: error:"))
        .collect();
    check(errors.len() == 1 && errors[0].contains(want_msg), || {
        format!(
            "expected one error line containing {want_msg:?}; {}",
            out.describe()
        )
    })?;
    check(
        !out.stderr.contains("panicked") && !out.stderr.contains("backtrace"),
        || format!("reapvm panicked; {}", out.describe()),
    )
}

fn error_trials() -> Vec<Trial> {
    let guest = GuestArtifacts::locate();
    let (vmlinux, initrd) = match &guest {
        Ok(g) => (g.vmlinux.clone(), g.initramfs.clone()),
        Err(_) => Default::default(),
    };
    let cfg = move |kernel: &str, initrd: Option<&str>, vcpus: u32, mem: u64| {
        vm_config(
            std::path::Path::new(kernel),
            initrd.map(std::path::Path::new),
            vcpus,
            mem,
            "console=ttyS0",
        )
    };
    let k = vmlinux.to_string_lossy().into_owned();
    let i = initrd.to_string_lossy().into_owned();
    let host_mib = {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(1 << 30)
            >> 10
    };
    let cases: Vec<(&str, String, i32, &str)> = vec![
        (
            "error_missing_kernel",
            cfg("/nonexistent/vmlinux", None, 1, 128),
            1,
            "cannot open kernel image /nonexistent/vmlinux",
        ),
        (
            "error_missing_initrd",
            cfg(&k, Some("/nonexistent/initrd"), 1, 128),
            1,
            "cannot open initrd /nonexistent/initrd",
        ),
        (
            "error_not_a_kernel",
            cfg("/etc/os-release", None, 1, 128),
            1,
            "is neither an ELF vmlinux nor a bzImage",
        ),
        (
            "error_zero_vcpus",
            cfg(&k, Some(&i), 0, 128),
            152,
            "vcpu_count 0 is out of range",
        ),
        (
            "error_too_many_vcpus",
            cfg(&k, Some(&i), 33, 128),
            152,
            "vcpu_count 33 is out of range",
        ),
        (
            "error_memory_too_small",
            cfg(&k, Some(&i), 1, 8),
            152,
            "below the minimum",
        ),
        (
            "error_memory_too_large",
            cfg(&k, Some(&i), 1, host_mib * 2),
            152,
            "more than this host's",
        ),
        (
            "error_malformed_json",
            "{\"boot-source\": {".into(),
            152,
            "EOF while parsing",
        ),
        (
            "error_unknown_key",
            format!("{{\"boot-source\": {{\"kernel_image_path\": \"{k}\"}}, \"bogus\": 1}}"),
            152,
            "unknown field `bogus`",
        ),
        (
            "error_missing_boot_source",
            "{\"machine-config\": {\"vcpu_count\": 1, \"mem_size_mib\": 128}}".into(),
            152,
            "`boot-source` is missing",
        ),
    ];
    let mut trials: Vec<Trial> = cases
        .into_iter()
        .map(|(name, json, code, msg)| Trial::test(name, move || refused(&json, code, msg)))
        .collect();
    trials.push(Trial::test("error_missing_config_file", || {
        let out = run_reapvm(
            &["--no-api", "--config-file", "/nonexistent/vm.json"],
            Duration::from_secs(30),
        );
        check(
            out.code == Some(152)
                && out
                    .stderr
                    .contains("cannot read config file /nonexistent/vm.json"),
            || out.describe(),
        )
    }));
    trials.push(Trial::test("error_no_dev_kvm", move || {
        no_kvm_device(&vmlinux)
    }));
    trials.push(Trial::test(
        "error_kvm_permission_denied",
        kvm_permission_denied,
    ));
    trials
}

/// /dev/kvm hidden in a private mount namespace.
fn no_kvm_device(kernel: &std::path::Path) -> Result<(), Failed> {
    let scratch = Scratch::new("nokvm");
    let config = scratch.write("vm.json", vm_config(kernel, None, 1, 128, "console=ttyS0"));
    let script = format!(
        "mount -t tmpfs none /dev && exec {} --no-api --config-file {}",
        reapvm_bin().display(),
        config.display()
    );
    let out = run_command(
        Command::new("unshare").args(["--mount", "sh", "-c", &script]),
        Duration::from_secs(30),
    );
    check(
        out.code == Some(1)
            && out
                .stderr
                .contains("cannot open /dev/kvm: No such file or directory"),
        || out.describe(),
    )
}

/// An unprivileged user may not open /dev/kvm (mode 0600 root).
fn kvm_permission_denied() -> Result<(), Failed> {
    use std::os::unix::fs::PermissionsExt;
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("perm");
    let kernel = scratch.path("vmlinux");
    std::fs::copy(&guest.vmlinux, &kernel)?;
    let config = scratch.write("vm.json", vm_config(&kernel, None, 1, 128, "console=ttyS0"));
    for p in [&scratch.dir, &kernel, &config] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    }
    let bin = scratch.path("reapvm");
    std::fs::copy(reapvm_bin(), &bin)?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    let out = run_command(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args(["--no-api", "--config-file", config.to_str().unwrap()]),
        Duration::from_secs(30),
    );
    check(
        out.code == Some(1)
            && out
                .stderr
                .contains("cannot open /dev/kvm: Permission denied"),
        || out.describe(),
    )
}

fn main() -> ExitCode {
    run_kvm_suite("boot", || {
        let mut trials = vec![
            Trial::test("boot_vmlinux_1_vcpu_128_mib", || {
                boot_and_check(|g| g.vmlinux.clone(), 1, 128)
            }),
            Trial::test("boot_bzimage_2_vcpus_256_mib", || {
                boot_and_check(|g| g.bzimage.clone(), 2, 256)
            }),
            Trial::test("boot_vmlinux_2_vcpus_ram_above_4_gib", || {
                boot_and_check(|g| g.vmlinux.clone(), 2, 3328)
            }),
            Trial::test("guest_stays_up_without_reboot", guest_stays_up),
        ];
        trials.extend(error_trials());
        trials
    })
}
