//! reapd's state that must survive a restart, in SQLite (`STATE_DIR/reapd.db`): deployed
//! functions with their settings and snapshot paths, the instances running now (so that a
//! reapd started after a crash finds and stops them), and every invocation's outcome.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::breakdown::Breakdown;
use crate::spec::{ColdStart, DeploySpec};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("state database {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("state database {path}: function {name} has an unknown cold_start {value:?}")]
    Corrupt {
        path: String,
        name: String,
        value: String,
    },
}

/// A deployed function as stored.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Function {
    pub spec: DeploySpec,
    /// The folder with its snapshot (`vmstate`, `memory`) and WS (`memory.ws`).
    pub dir: PathBuf,
    pub deployed_at_ms: u64,
}

/// An instance that was started and not yet seen gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    pub id: u64,
    pub function: String,
    pub pid: u32,
    pub netns: String,
    pub dir: PathBuf,
}

/// One invocation's outcome.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Invocation {
    pub at_ms: u64,
    pub instance: u64,
    /// `cold` or `warm`.
    pub start: String,
    /// For a cold start: `record`, `prefetch`, `file`, `lazy` or `boot`.
    pub mode: Option<String>,
    pub status: u16,
    pub latency_us: u64,
    pub breakdown: Option<Breakdown>,
}

pub struct Db {
    path: String,
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    cold_start TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    mem_mib INTEGER NOT NULL,
    keep_alive_s INTEGER NOT NULL,
    max_instances INTEGER NOT NULL,
    dir TEXT NOT NULL,
    deployed_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    function TEXT NOT NULL,
    pid INTEGER NOT NULL,
    netns TEXT NOT NULL,
    dir TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS invocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    function TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    instance INTEGER NOT NULL,
    start TEXT NOT NULL,
    mode TEXT,
    status INTEGER NOT NULL,
    latency_us INTEGER NOT NULL,
    breakdown TEXT
);
CREATE INDEX IF NOT EXISTS invocations_by_function ON invocations (function, seq);
";

impl Db {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let shown = path.display().to_string();
        let err = |source| DbError::Sqlite {
            path: shown.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        // WAL: a write is durable at commit, and a reapd killed mid-write leaves the
        // database as of its last commit.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Self {
            path: shown,
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, DbError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|source| DbError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    pub fn insert_function(&self, f: &Function) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO functions VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    f.spec.name,
                    f.spec.function,
                    f.spec.cold_start.as_str(),
                    f.spec.vcpus,
                    f.spec.mem_mib,
                    f.spec.keep_alive_s,
                    f.spec.max_instances,
                    f.dir.to_string_lossy(),
                    f.deployed_at_ms,
                ],
            )
            .map(|_| ())
        })
    }

    pub fn remove_function(&self, name: &str) -> Result<bool, DbError> {
        self.with(|c| {
            c.execute("DELETE FROM invocations WHERE function = ?1", [name])?;
            Ok(c.execute("DELETE FROM functions WHERE name = ?1", [name])? > 0)
        })
    }

    pub fn functions(&self) -> Result<Vec<Function>, DbError> {
        let rows: Vec<(Function, String)> = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT name, function, cold_start, vcpus, mem_mib, keep_alive_s, max_instances, \
                 dir, deployed_at_ms FROM functions ORDER BY name",
            )?;
            let rows = stmt.query_map([], |r| {
                let cold: String = r.get(2)?;
                Ok((
                    Function {
                        spec: DeploySpec {
                            name: r.get(0)?,
                            function: r.get(1)?,
                            cold_start: ColdStart::parse(&cold).unwrap_or(ColdStart::Boot),
                            vcpus: r.get(3)?,
                            mem_mib: r.get(4)?,
                            keep_alive_s: r.get(5)?,
                            max_instances: r.get(6)?,
                        },
                        dir: PathBuf::from(r.get::<_, String>(7)?),
                        deployed_at_ms: r.get(8)?,
                    },
                    cold,
                ))
            })?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(f, cold)| match ColdStart::parse(&cold) {
                Some(_) => Ok(f),
                None => Err(DbError::Corrupt {
                    path: self.path.clone(),
                    name: f.spec.name,
                    value: cold,
                }),
            })
            .collect()
    }

    /// Records a started instance and returns its id.
    pub fn insert_instance(
        &self,
        function: &str,
        netns_prefix: &str,
        dir_base: &Path,
    ) -> Result<InstanceRow, DbError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO instances (function, pid, netns, dir) VALUES (?1, 0, '', '')",
                [function],
            )?;
            let id = c.last_insert_rowid() as u64;
            let netns = format!("{netns_prefix}{id}");
            let dir = dir_base.join(format!("{function}-{id}"));
            c.execute(
                "UPDATE instances SET netns = ?1, dir = ?2 WHERE id = ?3",
                params![netns, dir.to_string_lossy(), id],
            )?;
            Ok(InstanceRow {
                id,
                function: function.to_string(),
                pid: 0,
                netns,
                dir,
            })
        })
    }

    pub fn set_instance_pid(&self, id: u64, pid: u32) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE instances SET pid = ?1 WHERE id = ?2",
                params![pid, id],
            )
            .map(|_| ())
        })
    }

    pub fn remove_instance(&self, id: u64) -> Result<(), DbError> {
        self.with(|c| {
            c.execute("DELETE FROM instances WHERE id = ?1", [id])
                .map(|_| ())
        })
    }

    pub fn instances(&self) -> Result<Vec<InstanceRow>, DbError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT id, function, pid, netns, dir FROM instances")?;
            let rows = stmt.query_map([], |r| {
                Ok(InstanceRow {
                    id: r.get(0)?,
                    function: r.get(1)?,
                    pid: r.get(2)?,
                    netns: r.get(3)?,
                    dir: PathBuf::from(r.get::<_, String>(4)?),
                })
            })?;
            rows.collect()
        })
    }

    pub fn insert_invocation(&self, function: &str, inv: &Invocation) -> Result<(), DbError> {
        let breakdown = inv
            .breakdown
            .as_ref()
            .map(|b| serde_json::to_string(b).expect("a breakdown serialises"));
        self.with(|c| {
            c.execute(
                "INSERT INTO invocations (function, at_ms, instance, start, mode, status, latency_us, breakdown) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    function,
                    inv.at_ms,
                    inv.instance,
                    inv.start,
                    inv.mode,
                    inv.status,
                    inv.latency_us,
                    breakdown
                ],
            )
            .map(|_| ())
        })
    }

    /// The last `limit` invocations of `function`, oldest first.
    pub fn invocations(&self, function: &str, limit: u32) -> Result<Vec<Invocation>, DbError> {
        let mut rows = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT at_ms, instance, start, mode, status, latency_us, breakdown FROM invocations \
                 WHERE function = ?1 ORDER BY seq DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![function, limit], |r| {
                let breakdown: Option<String> = r.get(6)?;
                Ok(Invocation {
                    at_ms: r.get(0)?,
                    instance: r.get(1)?,
                    start: r.get(2)?,
                    mode: r.get(3)?,
                    status: r.get(4)?,
                    latency_us: r.get(5)?,
                    breakdown: breakdown.and_then(|b| serde_json::from_str(&b).ok()),
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.reverse();
        Ok(rows)
    }

    /// Counts of cold and warm starts of `function`.
    pub fn start_counts(&self, function: &str) -> Result<(u64, u64), DbError> {
        self.with(|c| {
            let count = |start: &str| -> rusqlite::Result<u64> {
                c.query_row(
                    "SELECT COUNT(*) FROM invocations WHERE function = ?1 AND start = ?2",
                    params![function, start],
                    |r| r.get(0),
                )
            };
            Ok((count("cold")?, count("warm")?))
        })
    }

    pub fn function(&self, name: &str) -> Result<Option<Function>, DbError> {
        let exists = self.with(|c| {
            c.query_row(
                "SELECT 1 FROM functions WHERE name = ?1",
                [name],
                |_| Ok(()),
            )
            .optional()
        })?;
        match exists {
            Some(()) => Ok(self.functions()?.into_iter().find(|f| f.spec.name == name)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("reapd.db")).unwrap();
        (dir, db)
    }

    fn function(name: &str) -> Function {
        Function {
            spec: DeploySpec {
                name: name.into(),
                function: "helloworld".into(),
                cold_start: ColdStart::Lazy,
                vcpus: 2,
                mem_mib: 512,
                keep_alive_s: 30,
                max_instances: 3,
            },
            dir: PathBuf::from("/state/functions").join(name),
            deployed_at_ms: 1234,
        }
    }

    #[test]
    fn functions_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reapd.db");
        {
            let db = Db::open(&path).unwrap();
            db.insert_function(&function("b")).unwrap();
            db.insert_function(&function("a")).unwrap();
            assert!(
                db.insert_function(&function("a")).is_err(),
                "names are unique"
            );
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.functions().unwrap(), vec![function("a"), function("b")]);
        assert_eq!(db.function("b").unwrap(), Some(function("b")));
        assert!(db.remove_function("a").unwrap());
        assert!(!db.remove_function("a").unwrap());
        assert_eq!(db.function("a").unwrap(), None);
    }

    #[test]
    fn instances_get_unique_ids_and_names() {
        let (_dir, db) = temp_db();
        let a = db
            .insert_instance("hello", "rd1234-", Path::new("/s/instances"))
            .unwrap();
        let b = db
            .insert_instance("hello", "rd1234-", Path::new("/s/instances"))
            .unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(a.netns, format!("rd1234-{}", a.id));
        assert_eq!(a.dir, PathBuf::from(format!("/s/instances/hello-{}", a.id)));
        db.set_instance_pid(a.id, 77).unwrap();
        db.remove_instance(b.id).unwrap();
        let left = db.instances().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].id, left[0].pid), (a.id, 77));
    }

    #[test]
    fn invocations_keep_their_breakdown_and_order() {
        let (_dir, db) = temp_db();
        db.insert_function(&function("hello")).unwrap();
        let cold = Invocation {
            at_ms: 1,
            instance: 1,
            start: "cold".into(),
            mode: Some("record".into()),
            status: 200,
            latency_us: 900,
            breakdown: Some(Breakdown {
                load_vmm_us: 100,
                rec_pages: 42,
                total_us: 900,
                ..Breakdown::default()
            }),
        };
        let warm = Invocation {
            at_ms: 2,
            start: "warm".into(),
            mode: None,
            latency_us: 50,
            breakdown: None,
            ..cold.clone()
        };
        db.insert_invocation("hello", &cold).unwrap();
        db.insert_invocation("hello", &warm).unwrap();
        db.insert_invocation("hello", &warm).unwrap();
        assert_eq!(
            db.invocations("hello", 10).unwrap(),
            vec![cold.clone(), warm.clone(), warm.clone()]
        );
        assert_eq!(db.invocations("hello", 1).unwrap(), vec![warm]);
        assert_eq!(db.start_counts("hello").unwrap(), (1, 2));
        db.remove_function("hello").unwrap();
        assert_eq!(db.start_counts("hello").unwrap(), (0, 0));
    }
}
