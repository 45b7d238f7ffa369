//! What the guest sees of its machine, printed once at boot so tests can compare it with
//! the VM's configuration.

pub struct SystemView {
    pub online_cpus: Option<usize>,
    pub mem_total_kib: Option<u64>,
    pub system_ram_bytes: Option<u64>,
}

impl SystemView {
    pub fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        Self {
            online_cpus: read("/sys/devices/system/cpu/online").and_then(|s| count_cpu_list(&s)),
            mem_total_kib: read("/proc/meminfo").and_then(|s| mem_total_kib(&s)),
            system_ram_bytes: read("/proc/iomem").and_then(|s| system_ram_bytes(&s)),
        }
    }

    pub fn summary(&self) -> String {
        fn show<T: ToString>(v: &Option<T>) -> String {
            v.as_ref().map_or("unknown".into(), T::to_string)
        }
        format!(
            "cpus={} mem_total_kib={} system_ram_bytes={}",
            show(&self.online_cpus),
            show(&self.mem_total_kib),
            show(&self.system_ram_bytes)
        )
    }
}

/// Counts a kernel CPU list such as "0-3,5".
pub fn count_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        count += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()? + 1 - a.parse::<usize>().ok()?,
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    Some(count)
}

pub fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Sums the top-level "System RAM" ranges of /proc/iomem.
pub fn system_ram_bytes(iomem: &str) -> Option<u64> {
    let mut total = 0;
    for line in iomem.lines().filter(|l| !l.starts_with(' ')) {
        let Some((range, name)) = line.split_once(" : ") else {
            continue;
        };
        if name.trim() != "System RAM" {
            continue;
        }
        let (start, end) = range.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        total += end - start + 1;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,5,7-8"), Some(7));
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn meminfo() {
        assert_eq!(
            mem_total_kib("MemTotal:         116412 kB\nMemFree: 1 kB\n"),
            Some(116412)
        );
        assert_eq!(mem_total_kib("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn iomem() {
        let iomem = "00000000-00000fff : Reserved\n\
                     00001000-0009fbff : System RAM\n\
                     00100000-07ffffff : System RAM\n  01000000-01ffffff : Kernel code\n";
        assert_eq!(system_ram_bytes(iomem), Some(0x9ec00 + 0x7f0_0000));
    }
}
