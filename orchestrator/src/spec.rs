//! What a deploy asks for: the function, how its instances cold-start, their size and
//! their limits. Parsed once at the API edge; every value is checked there.

use serde::{Deserialize, Serialize};

/// How a new instance of a function starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColdStart {
    /// Restore the snapshot with reapvm's REAP backend: the first cold start records the
    /// working set, every later one prefetches it.
    Reap,
    /// Restore with the File backend (the memory file mapped privately, paged in by the
    /// kernel).
    File,
    /// Restore with the OnDemand backend (userfaultfd, one page per fault).
    Lazy,
    /// No snapshot: boot the guest.
    Boot,
}

impl ColdStart {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reap => "reap",
            Self::File => "file",
            Self::Lazy => "lazy",
            Self::Boot => "boot",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "reap" => Some(Self::Reap),
            "file" => Some(Self::File),
            "lazy" => Some(Self::Lazy),
            "boot" => Some(Self::Boot),
            _ => None,
        }
    }

    /// reapvm's `backend_type` for this mode's snapshot load (none for a boot).
    pub fn backend_type(self) -> Option<&'static str> {
        match self {
            Self::Reap => Some("Reap"),
            Self::File => Some("File"),
            Self::Lazy => Some("OnDemand"),
            Self::Boot => None,
        }
    }
}

pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEM_MIB: u64 = 256;
pub const DEFAULT_KEEP_ALIVE_S: u64 = 600;
pub const DEFAULT_MAX_INSTANCES: u32 = 4;

/// `POST /functions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySpec {
    /// The deployment's name (what `invoke` takes).
    pub name: String,
    /// The function in the guest's rootfs (`/functions/F`).
    pub function: String,
    #[serde(default = "default_cold_start")]
    pub cold_start: ColdStart,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// Seconds an instance may stay idle before it is stopped.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
}

fn default_cold_start() -> ColdStart {
    ColdStart::Reap
}
fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}
fn default_mem_mib() -> u64 {
    DEFAULT_MEM_MIB
}
fn default_keep_alive() -> u64 {
    DEFAULT_KEEP_ALIVE_S
}
fn default_max_instances() -> u32 {
    DEFAULT_MAX_INSTANCES
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("field `{field}`: {reason} (got {value})")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

fn invalid(field: &'static str, value: impl ToString, reason: &'static str) -> SpecError {
    SpecError::Invalid {
        field,
        value: value.to_string(),
        reason,
    }
}

/// A name that is safe as a folder name and a network namespace name's part.
pub fn check_name(field: &'static str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?}"),
            "1 to 40 of a-z, 0-9, '_' and '-', not starting with '-'",
        ))
    }
}

impl DeploySpec {
    pub fn check(&self) -> Result<(), SpecError> {
        check_name("name", &self.name)?;
        check_name("function", &self.function)?;
        if !(1..=32).contains(&self.vcpus) {
            return Err(invalid("vcpus", self.vcpus, "1 to 32"));
        }
        if !(128..=65536).contains(&self.mem_mib) {
            return Err(invalid("mem_mib", self.mem_mib, "128 to 65536 MiB"));
        }
        if self.keep_alive_s == 0 || self.keep_alive_s > 7 * 24 * 3600 {
            return Err(invalid("keep_alive_s", self.keep_alive_s, "1 s to 7 days"));
        }
        if !(1..=64).contains(&self.max_instances) {
            return Err(invalid("max_instances", self.max_instances, "1 to 64"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<DeploySpec, String> {
        let s: DeploySpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        s.check().map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let s = spec(r#"{"name":"hello","function":"helloworld"}"#).unwrap();
        assert_eq!(s.cold_start, ColdStart::Reap);
        assert_eq!((s.vcpus, s.mem_mib), (DEFAULT_VCPUS, DEFAULT_MEM_MIB));
        assert_eq!(s.max_instances, DEFAULT_MAX_INSTANCES);
    }

    #[test]
    fn bad_values_name_their_field() {
        let e = spec(r#"{"name":"Hello","function":"helloworld"}"#).unwrap_err();
        assert!(e.contains("`name`"), "{e}");
        let e = spec(r#"{"name":"h","function":"../etc"}"#).unwrap_err();
        assert!(e.contains("`function`"), "{e}");
        let e = spec(r#"{"name":"h","function":"f","vcpus":0}"#).unwrap_err();
        assert!(e.contains("`vcpus`"), "{e}");
        let e = spec(r#"{"name":"h","function":"f","mem_mib":64}"#).unwrap_err();
        assert!(e.contains("`mem_mib`"), "{e}");
        let e = spec(r#"{"name":"h","function":"f","max_instances":0}"#).unwrap_err();
        assert!(e.contains("`max_instances`"), "{e}");
        let e = spec(r#"{"name":"h","function":"f","cold_start":"warm"}"#).unwrap_err();
        assert!(e.contains("unknown variant `warm`"), "{e}");
        let e = spec(r#"{"name":"h","function":"f","colour":1}"#).unwrap_err();
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn cold_start_names_round_trip() {
        for mode in [
            ColdStart::Reap,
            ColdStart::File,
            ColdStart::Lazy,
            ColdStart::Boot,
        ] {
            assert_eq!(ColdStart::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(ColdStart::Lazy.backend_type(), Some("OnDemand"));
        assert_eq!(ColdStart::Boot.backend_type(), None);
    }
}
