//! Function VMs on real KVM: the Debian rootfs on virtio-block, the agent answering over
//! virtio-net from inside a network namespace the test creates, block writes reaching the
//! image, read-only roots, bulk transfers, and device errors.

use test_support as support;

use std::process::{Command, ExitCode};
use std::time::Duration;

use support::function_vm::{config_json, private_rootfs, Drive, FunctionVm, VmSpec};
use support::netns::NetNs;
use support::*;

fn invoke_helloworld_100_times() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let mut spec = VmSpec::read_only(&guest);
    spec.function = Some("helloworld".into());
    let scratch = Scratch::new("hello");
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    check(
        vm.console().contains("reapvm-agent: ready: functions=")
            && !vm.console().contains("listening on vsock"),
        || {
            format!(
                "ready, and no vsock listener without a vsock device:\n{}",
                vm.describe()
            )
        },
    )?;
    // 90 on one kept-alive connection, 10 on fresh connections, all through POST /invoke.
    let mut conn = vm.conn()?;
    for i in 0..100 {
        let name = format!("reapvm-{i}");
        let (status, body) = if i < 90 {
            conn.request("POST", "/invoke", name.as_bytes())?
        } else {
            vm.conn()?.request("POST", "/invoke", name.as_bytes())?
        };
        check(
            status == 200 && body == format!("Hello, {name}!").as_bytes(),
            || {
                format!(
                    "invocation {i}: {status} {:?}",
                    String::from_utf8_lossy(&body)
                )
            },
        )?;
    }
    let (status, body) = conn.request("POST", "/invoke/nosuchfunction", b"")?;
    check(status == 404, || {
        format!("unknown function answered {status} {body:?}")
    })
}

fn function_writes_file_and_host_reads_image() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("write");
    let mut spec = VmSpec::read_only(&guest);
    spec.rootfs = private_rootfs(&guest, &scratch)?;
    spec.root_read_only = false;
    let image = spec.rootfs.clone();
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let content = format!(
        "written by the guest at {:?}\n",
        std::time::SystemTime::now()
    );
    let (status, body) = vm.invoke("writefile", content.as_bytes())?;
    check(status == 200, || {
        format!("writefile: {status} {}", String::from_utf8_lossy(&body))
    })?;
    let code = vm.shutdown(Duration::from_secs(120))?;
    check(code == Some(0), || {
        format!("reapvm exit code {code:?} after the guest shut down")
    })?;
    let fsck = Command::new("e2fsck").args(["-fn"]).arg(&image).output()?;
    check(fsck.status.success(), || {
        format!(
            "e2fsck -fn found problems:\n{}",
            String::from_utf8_lossy(&fsck.stdout)
        )
    })?;
    let cat = Command::new("debugfs")
        .args(["-R", "cat /var/lib/reapvm-test/out.txt"])
        .arg(&image)
        .output()?;
    let got = String::from_utf8_lossy(&cat.stdout);
    check(got == content, || {
        format!("file in the image: {got:?}, expected {content:?}")
    })
}

fn read_only_root_refuses_writes() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("ro");
    let vm = FunctionVm::boot(&guest, &VmSpec::read_only(&guest), &scratch)?;
    let (status, body) = vm.invoke("writefile", b"nope")?;
    let msg = String::from_utf8_lossy(&body);
    check(
        status == 500 && msg.contains("Read-only file system"),
        || format!("writefile on a read-only root answered {status} {msg:?}"),
    )
}

/// Deterministic bytes, the same generator as resources/functions/blob.
fn blob(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 256) as u8).collect()
}

fn sha256_hex(data: &[u8]) -> Result<String, Failed> {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), data)?;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

fn network_64_mib_each_way() -> Result<(), Failed> {
    const SIZE: usize = 64 << 20;
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("net64");
    let mut spec = VmSpec::read_only(&guest);
    // Room for the 64 MiB body, which the agent and the Python worker each hold (and the
    // worker's result for the other direction).
    spec.mem_mib = 512;
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let mut payload = blob(SIZE);
    // Not just the generator's pattern: mix in a position-dependent byte stream.
    let mut x: u32 = 0x1234_5678;
    for b in payload.iter_mut().step_by(7) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let want = sha256_hex(&payload)?;
    let started = std::time::Instant::now();
    let (status, body) = vm.invoke("sha256", &payload)?;
    eprintln!("64 MiB host->guest in {:?}", started.elapsed());
    check(status == 200 && body == want.as_bytes(), || {
        format!(
            "host->guest: guest hashed {:?}, host {want}",
            String::from_utf8_lossy(&body)
        )
    })?;
    let started = std::time::Instant::now();
    let (status, body) = vm.invoke("blob", SIZE.to_string().as_bytes())?;
    eprintln!("64 MiB guest->host in {:?}", started.elapsed());
    check(status == 200 && body.len() == SIZE, || {
        format!("guest->host: {status}, {} bytes", body.len())
    })?;
    check(body == blob(SIZE), || {
        "guest->host: the bytes differ from the generator".into()
    })
}

/// The network interface's rate limiters hold each direction to its bandwidth: 8 MiB into
/// the guest under `rx_rate_limiter`, 8 MiB out of it under `tx_rate_limiter`, both 4 MiB/s
/// (512 KiB every 125 ms). Frames carry TCP/IP and virtio-net headers on top of the
/// payload, so the payload takes a little longer than its size alone says.
fn network_rate_limiters_hold_each_direction_to_its_bandwidth() -> Result<(), Failed> {
    const SIZE: usize = 8 << 20;
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("netrate");
    let mut spec = VmSpec::read_only(&guest);
    let (size, refill_ms) = (512u64 << 10, 125u64);
    let bucket = serde_json::json!({"bandwidth": {"size": size, "refill_time": refill_ms}});
    spec.net_rate_limiters = [bucket.clone(), bucket];
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let rate = size as f64 * 1000.0 / refill_ms as f64;
    let expected = (SIZE as u64 - size) as f64 / rate;
    let within = |what: &str, took: f64| {
        check(took >= 0.8 * expected && took <= 1.5 * expected, || {
            format!("{what}: {SIZE} bytes took {took:.2} s; at {rate} B/s, {expected:.2} s")
        })
    };
    let payload = blob(SIZE);
    let want = sha256_hex(&payload)?;
    let started = std::time::Instant::now();
    let (status, body) = vm.invoke("sha256", &payload)?;
    let took = started.elapsed().as_secs_f64();
    check(status == 200 && body == want.as_bytes(), || {
        format!("host->guest: {status} {:?}", String::from_utf8_lossy(&body))
    })?;
    within("host->guest (the guest's receive limiter)", took)?;
    let started = std::time::Instant::now();
    let (status, body) = vm.invoke("blob", SIZE.to_string().as_bytes())?;
    let took = started.elapsed().as_secs_f64();
    check(status == 200 && body == blob(SIZE), || {
        format!("guest->host: {status}, {} bytes", body.len())
    })?;
    within("guest->host (the guest's transmit limiter)", took)
}

/// The entropy device in a Linux guest: the kernel's hw_random core takes virtio-rng as its
/// source, and /dev/hwrng hands out bytes that differ from read to read. Without the device
/// there is no /dev/hwrng source (the read fails with the reason).
fn the_entropy_device_is_the_guest_s_hwrng() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("hwrng");
    let mut spec = VmSpec::read_only(&guest);
    spec.entropy = true;
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (status, body) = vm.invoke("hwrng", b"64")?;
        let text = String::from_utf8_lossy(&body).into_owned();
        let words: Vec<&str> = text.split(' ').collect();
        check(
            status == 200
                && words.len() == 3
                && words[0].starts_with("virtio_rng")
                && words[1] == "64"
                && words[2].len() == 128,
            || format!("hwrng: {status} {text}"),
        )?;
        seen.push(words[2].to_string());
    }
    check(
        seen[0] != seen[1] && !seen[0].chars().all(|c| c == '0'),
        || format!("two reads of /dev/hwrng gave {seen:?}"),
    )?;
    drop(vm);
    let scratch = Scratch::new("no-hwrng");
    let spec = VmSpec::read_only(&guest);
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let (status, body) = vm.invoke("hwrng", b"64")?;
    check(status == 500, || {
        format!(
            "without an entropy device hwrng answered {status} {}",
            String::from_utf8_lossy(&body)
        )
    })
}

/// A field of the guest's /proc/cpuinfo (its first processor), through `cpuinfo`.
fn cpuinfo_field(vm: &FunctionVm, field: &str) -> Result<String, String> {
    let (status, body) = vm.invoke("cpuinfo", b"")?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if status != 200 {
        return Err(format!("cpuinfo answered {status}: {text}"));
    }
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == field).then(|| v.trim().to_string())
        })
        .ok_or_else(|| format!("no {field:?} in the guest's cpuinfo:\n{text}"))
}

/// A CPU template changes the CPU the guest sees: a custom template from the config file
/// sets the stepping to 9 (the static templates' tables are checked by unit tests; booted
/// here, T2A's Intel family and model on the lab's emulated AMD CPU met more triple faults
/// than other boots, docs/api.md).
fn cpu_templates_change_the_cpu_the_guest_sees() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("cpu-config");
    let mut spec = VmSpec::read_only(&guest);
    spec.cpu_config = Some(
        serde_json::json!({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0",
        "flags": 0, "modifiers": [{"register": "eax", "bitmap": "0b1001"}]}]}),
    );
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let stepping = cpuinfo_field(&vm, "stepping")?;
    check(stepping == "9", || {
        format!("with a custom template setting stepping 9 the guest sees {stepping}")
    })
}

/// A loop device over a file, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &std::path::Path) -> Result<Self, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup --find --show {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Self(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// The root drive given as a block device (vHive's container drives are devmapper devices;
/// a user's may be a disk): the guest sees the device's size, not its inode's (0), boots
/// from it and reads it.
fn a_block_device_as_the_root_drive() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("blockdev-root");
    let device = LoopDevice::attach(&guest.rootfs)?;
    check(std::fs::metadata(&device.0)?.len() == 0, || {
        format!(
            "{} reports a size in its metadata: the test proves nothing",
            device.0
        )
    })?;
    let mut spec = VmSpec::read_only(&guest);
    spec.rootfs = device.0.clone().into();
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let (status, body) = vm.invoke("blockdevs", b"")?;
    let list = String::from_utf8_lossy(&body);
    let root_sectors = std::fs::metadata(&guest.rootfs)?.len() / 512;
    let want = format!("vda {root_sectors} ro");
    check(status == 200 && list == want, || {
        format!(
            "guest block devices from {}:\n{list}\nexpected:\n{want}",
            device.0
        )
    })?;
    let (status, body) = vm.invoke("helloworld", b"loop")?;
    check(status == 200 && body == b"Hello, loop!", || {
        format!("helloworld from a block-device root: {status} {body:?}")
    })
}

fn several_drives_with_their_modes() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("drives");
    let data_rw = scratch.write("data-rw.img", vec![0u8; 3 << 20]);
    let data_ro = scratch.write("data-ro.img", vec![0u8; 1 << 20]);
    let mut spec = VmSpec::read_only(&guest);
    spec.extra_drives = vec![
        Drive {
            id: "data1".into(),
            path: data_rw,
            read_only: false,
            rate_limiter: None,
        },
        Drive {
            id: "data2".into(),
            path: data_ro,
            read_only: true,
            rate_limiter: None,
        },
    ];
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let (status, body) = vm.invoke("blockdevs", b"")?;
    let list = String::from_utf8_lossy(&body);
    let root_sectors = std::fs::metadata(&guest.rootfs)?.len() / 512;
    let want = format!("vda {root_sectors} ro\nvdb 6144 rw\nvdc 2048 ro");
    check(status == 200 && list == want, || {
        format!("guest block devices:\n{list}\nexpected:\n{want}")
    })
}

/// Deterministic bytes for a drive: `len` bytes of a pattern seeded by `seed`.
fn drive_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
        .collect()
}

/// `PATCH /drives` after boot swaps a drive's backing file: the guest is told (a
/// configuration change), sees the new size, and reads the new file's bytes.
fn a_drive_swapped_after_boot_shows_its_new_contents() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("swap");
    let before = drive_bytes(1 << 20, 0x11);
    let after = drive_bytes(2 << 20, 0x5c);
    let path_before = scratch.write("before.img", before.clone());
    let path_after = scratch.write("after.img", after.clone());
    let mut spec = VmSpec::read_only(&guest);
    spec.api = true;
    spec.extra_drives = vec![Drive {
        id: "data".into(),
        path: path_before,
        read_only: true,
        rate_limiter: None,
    }];
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let read = |what: &str| -> Result<String, Failed> {
        let (status, body) = vm.invoke("readblock", b"sha256 /dev/vdb")?;
        let text = String::from_utf8_lossy(&body).into_owned();
        check(status == 200, || {
            format!("{what}: readblock {status} {text}")
        })?;
        Ok(text)
    };
    let want = format!("{} {}", before.len(), sha256_hex(&before)?);
    let got = read("before")?;
    check(got == want, || {
        format!("before the swap the guest read {got}, expected {want}")
    })?;
    let body = serde_json::json!({"drive_id": "data", "path_on_host": path_after});
    let (status, answer) = support::http::unix_request(
        &scratch.path("api.sock"),
        "PATCH",
        "/drives/data",
        &body.to_string(),
    )?;
    check(status == 204, || {
        format!("PATCH /drives/data: {status} {answer}")
    })?;
    // The guest reads the new capacity in a work item after the interrupt.
    let sectors = (after.len() / 512).to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = vm.invoke("blockdevs", b"")?;
        let list = String::from_utf8_lossy(&body).into_owned();
        if list
            .lines()
            .any(|l| l.split(' ').take(2).eq(["vdb", sectors.as_str()]))
        {
            break;
        }
        check(std::time::Instant::now() < deadline, || {
            format!("30 s after the swap the guest still lists\n{list}")
        })?;
        std::thread::sleep(Duration::from_millis(200));
    }
    let want = format!("{} {}", after.len(), sha256_hex(&after)?);
    let got = read("after")?;
    check(got == want, || {
        format!("after the swap the guest read {got}, expected {want}")
    })
}

/// A drive's bandwidth bucket holds the guest's reads to the configured rate (within 20%):
/// 16 MiB at 2 MiB/s (256 KiB refilled every 125 ms), the first 256 KiB at once.
fn a_drive_rate_limiter_holds_guest_reads_to_its_bandwidth() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("rate");
    let (len, size, refill_ms) = (16u64 << 20, 256u64 << 10, 125u64);
    let data = scratch.write("data.img", drive_bytes(len as usize, 3));
    let mut spec = VmSpec::read_only(&guest);
    spec.extra_drives = vec![Drive {
        id: "data".into(),
        path: data,
        read_only: true,
        rate_limiter: Some(
            serde_json::json!({"bandwidth": {"size": size, "refill_time": refill_ms}}),
        ),
    }];
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let (status, body) = vm.invoke("readblock", b"/dev/vdb")?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let mut words = text.split(' ');
    let bytes: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let seconds: f64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
    check(status == 200 && bytes == len, || {
        format!("readblock: {status} {text} (expected {len} bytes)")
    })?;
    let rate = size as f64 * 1000.0 / refill_ms as f64;
    let expected = (len - size) as f64 / rate;
    check((seconds - expected).abs() <= expected / 5.0, || {
        format!("the guest read {len} bytes in {seconds:.2} s; at {rate} B/s that is {expected:.2} s (within 20%)")
    })
}

/// reapvm must refuse the configuration with one clear line, before booting anything.
fn refused_in_netns(
    mutate: impl FnOnce(&GuestArtifacts, &Scratch, &mut VmSpec) -> Option<String>,
    want: &str,
) -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("refused");
    let mut spec = VmSpec::read_only(&guest);
    let tap_override = mutate(&guest, &scratch, &mut spec);
    let mut json = config_json(&guest.vmlinux, &spec);
    if let Some(tap) = tap_override {
        json = json.replace("\"tap0\"", &format!("\"{tap}\""));
    }
    let config = scratch.write("vm.json", json);
    let ns = NetNs::with_tap("refused")?;
    let out = run_command(
        ns.command(reapvm_bin())
            .args(["--no-api", "--config-file"])
            .arg(&config),
        Duration::from_secs(60),
    );
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("reapvm: error:"))
        .collect();
    check(
        out.code == Some(1) && errors.len() == 1 && errors[0].contains(want),
        || format!("expected one error containing {want:?}; {}", out.describe()),
    )
}

/// A tap that does not exist when reapvm starts is made by reapvm (Firecracker's TUNSETIFF);
/// set up by the test once it appears, it carries the invocation.
fn a_missing_tap_is_made_and_carries_invocations() -> Result<(), Failed> {
    let guest = GuestArtifacts::locate()?;
    let scratch = Scratch::new("tap-made");
    let mut spec = VmSpec::read_only(&guest);
    spec.tap_made_by_reapvm = true;
    let vm = FunctionVm::boot(&guest, &spec, &scratch)?;
    let (status, body) = vm.invoke("helloworld", b"tap")?;
    check(status == 200 && body == b"Hello, tap!", || {
        format!(
            "helloworld over the tap reapvm made answered {status} {:?}; {}",
            String::from_utf8_lossy(&body),
            vm.describe()
        )
    })
}

fn error_trials() -> Vec<Trial> {
    vec![
        Trial::test("error_missing_drive_file", || {
            refused_in_netns(
                |_, _, spec| {
                    spec.extra_drives.push(Drive {
                        id: "data".into(),
                        path: "/nonexistent/disk.img".into(),
                        read_only: false,
                        rate_limiter: None,
                    });
                    None
                },
                "cannot open drive data at /nonexistent/disk.img: No such file or directory",
            )
        }),
        Trial::test("error_unreadable_drive_file", || {
            refused_in_netns(
                |_, scratch, spec| {
                    let dir = scratch.path("a-directory");
                    std::fs::create_dir_all(&dir).unwrap();
                    spec.extra_drives.push(Drive {
                        id: "data".into(),
                        path: dir,
                        read_only: false,
                        rate_limiter: None,
                    });
                    None
                },
                "cannot open drive data at",
            )
        }),
        Trial::test("error_root_drive_not_ext4", || {
            refused_in_netns(
                |_, scratch, spec| {
                    spec.rootfs = scratch.write("zeros.img", vec![0u8; 4 << 20]);
                    None
                },
                "is not an ext2/3/4 filesystem",
            )
        }),
    ]
}

fn main() -> ExitCode {
    run_kvm_suite("functions", || {
        let mut trials = vec![
            Trial::test("invoke_helloworld_100_times", invoke_helloworld_100_times),
            Trial::test(
                "function_writes_file_and_host_reads_image",
                function_writes_file_and_host_reads_image,
            ),
            Trial::test(
                "read_only_root_refuses_writes",
                read_only_root_refuses_writes,
            ),
            Trial::test("network_64_mib_each_way", network_64_mib_each_way),
            Trial::test(
                "a_missing_tap_is_made_and_carries_invocations",
                a_missing_tap_is_made_and_carries_invocations,
            ),
            Trial::test(
                "several_drives_with_their_modes",
                several_drives_with_their_modes,
            ),
            Trial::test(
                "network_rate_limiters_hold_each_direction_to_its_bandwidth",
                network_rate_limiters_hold_each_direction_to_its_bandwidth,
            ),
            Trial::test(
                "cpu_templates_change_the_cpu_the_guest_sees",
                cpu_templates_change_the_cpu_the_guest_sees,
            ),
            Trial::test(
                "a_block_device_as_the_root_drive",
                a_block_device_as_the_root_drive,
            ),
            Trial::test(
                "the_entropy_device_is_the_guest_s_hwrng",
                the_entropy_device_is_the_guest_s_hwrng,
            ),
            Trial::test(
                "a_drive_swapped_after_boot_shows_its_new_contents",
                a_drive_swapped_after_boot_shows_its_new_contents,
            ),
            Trial::test(
                "a_drive_rate_limiter_holds_guest_reads_to_its_bandwidth",
                a_drive_rate_limiter_holds_guest_reads_to_its_bandwidth,
            ),
        ];
        trials.extend(error_trials());
        trials
    })
}
