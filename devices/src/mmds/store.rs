//! The MMDS data store: one JSON document the host sets through the API (`PUT`/`PATCH
//! /mmds`) and the guest reads over HTTP, as Firecracker's. It also holds what the guest's
//! requests are checked against: the MMDS version, the EC2 compatibility switch and the
//! session tokens.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::stack::MmdsCounts;
use super::token::{TokenError, Tokens};

/// Firecracker's default for `--mmds-size-limit` (its default API payload limit).
pub const DEFAULT_SIZE_LIMIT: usize = 51_200;

/// How the guest must ask: V1 answers any GET, V2 only one that carries a session token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    #[default]
    V1,
    V2,
}

/// What a guest's GET answers with: JSON, or EC2's IMDS text (keys one per line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Json,
    Imds,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("the MMDS data store would hold {size} bytes, more than its limit of {limit} bytes (--mmds-size-limit)")]
    TooLarge { size: usize, limit: usize },
    #[error("the MMDS data store is empty: PUT /mmds before PATCH /mmds")]
    NotInitialized,
    #[error("the MMDS resource does not exist")]
    NotFound,
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
    #[error(transparent)]
    Token(#[from] TokenError),
}

#[derive(Debug)]
pub struct MmdsStore {
    version: MmdsVersion,
    imds_compat: bool,
    data: Value,
    initialized: bool,
    size_limit: usize,
    tokens: Tokens,
    counts: MmdsCounts,
}

impl MmdsStore {
    pub fn new(size_limit: usize) -> Self {
        Self {
            version: MmdsVersion::default(),
            imds_compat: false,
            data: Value::Null,
            initialized: false,
            size_limit,
            tokens: Tokens::default(),
            counts: MmdsCounts::default(),
        }
    }

    /// What the guests' frames and requests were (the `mmds` metrics).
    pub fn counts(&self) -> MmdsCounts {
        self.counts
    }

    pub(crate) fn counts_mut(&mut self) -> &mut MmdsCounts {
        &mut self.counts
    }

    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    /// `PUT /mmds/config`'s version and `imds_compat`. Tokens handed out under another
    /// version stay valid until they expire, as Firecracker's.
    pub fn configure(&mut self, version: MmdsVersion, imds_compat: bool) {
        self.version = version;
        self.imds_compat = imds_compat;
    }

    fn check_size(&self, data: &Value) -> Result<(), StoreError> {
        // Serialising a Value cannot fail: its keys are strings.
        let size = serde_json::to_vec(data)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > self.size_limit {
            return Err(StoreError::TooLarge {
                size,
                limit: self.size_limit,
            });
        }
        Ok(())
    }

    /// `PUT /mmds`: replaces the whole document. A refused one changes nothing.
    pub fn put(&mut self, data: Value) -> Result<(), StoreError> {
        self.check_size(&data)?;
        self.data = data;
        self.initialized = true;
        Ok(())
    }

    /// `PATCH /mmds`: a JSON merge patch (RFC 7396) over the document. A refused one
    /// changes nothing.
    pub fn patch(&mut self, patch: &Value) -> Result<(), StoreError> {
        if !self.initialized {
            return Err(StoreError::NotInitialized);
        }
        let mut patched = self.data.clone();
        merge_patch(&mut patched, patch);
        self.check_size(&patched)?;
        self.data = patched;
        Ok(())
    }

    /// `GET /mmds`: the document (`{}` while nothing was put, as Firecracker answers).
    pub fn data(&self) -> Value {
        match &self.data {
            Value::Null => Value::Object(Map::new()),
            data => data.clone(),
        }
    }

    /// What a guest's GET of `path` (a JSON pointer; a trailing `/` is ignored) answers.
    pub fn get(&self, path: &str, format: OutputFormat) -> Result<String, StoreError> {
        let pointer = path.strip_suffix('/').unwrap_or(path);
        let value = self.data.pointer(pointer).ok_or(StoreError::NotFound)?;
        match (format, self.imds_compat) {
            (OutputFormat::Json, false) => Ok(value.to_string()),
            // EC2's IMDS answers in its own format whatever the Accept header says.
            _ => imds_text(value),
        }
    }

    pub fn new_token(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, StoreError> {
        Ok(self.tokens.issue(ttl_seconds, now)?)
    }

    pub fn token_is_valid(&self, token: &str, now: Instant) -> bool {
        self.tokens.is_valid(token, now)
    }
}

/// RFC 7396: an object patches member by member (null removes), anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(doc) = target {
        for (key, value) in members {
            if value.is_null() {
                doc.remove(key);
            } else {
                merge_patch(doc.entry(key.as_str()).or_insert(Value::Null), value);
            }
        }
    }
}

/// EC2's IMDS text: an object lists its keys one per line (objects' with a trailing `/`),
/// a string is itself; other types have no IMDS form.
fn imds_text(value: &Value) -> Result<String, StoreError> {
    match value {
        Value::Object(map) => Ok(map
            .iter()
            .map(|(key, v)| {
                if v.is_object() {
                    format!("{key}/")
                } else {
                    key.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")),
        Value::String(s) => Ok(s.clone()),
        _ => Err(StoreError::UnsupportedValueType),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> MmdsStore {
        let mut store = MmdsStore::new(DEFAULT_SIZE_LIMIT);
        store
            .put(
                json!({"latest": {"meta-data": {"ami-id": "ami-1", "count": 3,
                "network": {"mac": "06:00"}}}, "a/b": "slash", "m~n": "tilde"}),
            )
            .unwrap();
        store
    }

    #[test]
    fn gets_answer_json_or_imds_text() {
        let store = store();
        let json = |p| store.get(p, OutputFormat::Json);
        let imds = |p| store.get(p, OutputFormat::Imds);
        assert_eq!(json("/latest/meta-data/ami-id").unwrap(), "\"ami-1\"");
        assert_eq!(imds("/latest/meta-data/ami-id").unwrap(), "ami-1");
        assert_eq!(
            imds("/latest/meta-data/").unwrap(),
            "ami-id\ncount\nnetwork/"
        );
        assert_eq!(imds("/latest").unwrap(), "meta-data/");
        assert_eq!(json("/latest/meta-data/count").unwrap(), "3");
        assert_eq!(
            imds("/latest/meta-data/count"),
            Err(StoreError::UnsupportedValueType)
        );
        assert_eq!(json("/latest/nothing"), Err(StoreError::NotFound));
        // JSON pointer escapes: ~1 is '/', ~0 is '~'.
        assert_eq!(imds("/a~1b").unwrap(), "slash");
        assert_eq!(imds("/m~0n").unwrap(), "tilde");
        assert!(imds("/").unwrap().starts_with("a/b\nlatest/"));
    }

    #[test]
    fn imds_compat_ignores_the_accept_header() {
        let mut store = store();
        store.configure(MmdsVersion::V1, true);
        assert_eq!(
            store.get("/latest/meta-data/ami-id", OutputFormat::Json),
            Ok("ami-1".into())
        );
    }

    #[test]
    fn patches_merge_and_refusals_change_nothing() {
        let mut empty = MmdsStore::new(100);
        assert_eq!(empty.data(), json!({}));
        assert_eq!(
            empty.patch(&json!({"a": 1})),
            Err(StoreError::NotInitialized)
        );
        empty.put(json!({"a": {"b": 1, "c": 2}, "d": 3})).unwrap();
        empty
            .patch(&json!({"a": {"b": null, "e": [1]}, "d": "x"}))
            .unwrap();
        assert_eq!(empty.data(), json!({"a": {"c": 2, "e": [1]}, "d": "x"}));
        let big = json!({"big": "x".repeat(200)});
        assert!(matches!(
            empty.patch(&big),
            Err(StoreError::TooLarge { limit: 100, .. })
        ));
        assert!(matches!(empty.put(big), Err(StoreError::TooLarge { .. })));
        assert_eq!(empty.data(), json!({"a": {"c": 2, "e": [1]}, "d": "x"}));
        // A patch that is not an object replaces the document (RFC 7396).
        empty.patch(&json!("s")).unwrap();
        assert_eq!(empty.data(), json!("s"));
    }
}
