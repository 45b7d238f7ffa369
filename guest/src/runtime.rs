//! The function runtime: one long-lived Python worker per function, which imports the
//! handler once (so a snapshot holds an initialised runtime) and answers framed requests.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

const WORKER_SOURCE: &str = include_str!("worker.py");
const PYTHON: &str = "/usr/bin/python3";

#[derive(Debug, PartialEq, Eq)]
pub enum InvokeError {
    /// The handler raised: its message goes back to the client (HTTP 500).
    Handler(String),
    /// The worker could not be started or died.
    Worker(String),
}

struct Worker {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

pub struct Function {
    name: String,
    dir: PathBuf,
    worker_script: PathBuf,
    worker: Mutex<Option<Worker>>,
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

impl Function {
    fn spawn(&self) -> Result<Worker, String> {
        let mut child = Command::new(PYTHON)
            .arg(&self.worker_script)
            .arg(&self.dir)
            .current_dir(&self.dir)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {PYTHON} for function {}: {e}", self.name))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut ready = [0u8; 1];
        match stdout.read_exact(&mut ready) {
            Ok(()) if ready == *b"R" => Ok(Worker {
                _child: child,
                stdin,
                stdout,
            }),
            _ => Err(format!(
                "the worker of function {} exited while importing its handler (see the console)",
                self.name
            )),
        }
    }

    /// Starts the worker now, so the handler is imported before the first request.
    pub fn start(&self) -> Result<(), String> {
        let mut slot = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(self.spawn()?);
        }
        Ok(())
    }

    pub fn invoke(&self, body: &[u8]) -> Result<Vec<u8>, InvokeError> {
        let len = u32::try_from(body.len())
            .map_err(|_| InvokeError::Handler("request body too large".into()))?;
        let mut slot = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(self.spawn().map_err(InvokeError::Worker)?);
        }
        let worker = slot.as_mut().expect("worker present");
        let result = (|| -> std::io::Result<(u8, Vec<u8>)> {
            worker.stdin.write_all(&len.to_le_bytes())?;
            worker.stdin.write_all(body)?;
            worker.stdin.flush()?;
            let mut status = [0u8; 1];
            worker.stdout.read_exact(&mut status)?;
            let n = read_u32(&mut worker.stdout)? as usize;
            let mut out = vec![0u8; n];
            worker.stdout.read_exact(&mut out)?;
            Ok((status[0], out))
        })();
        match result {
            Ok((0, out)) => Ok(out),
            Ok((_, msg)) => Err(InvokeError::Handler(
                String::from_utf8_lossy(&msg).into_owned(),
            )),
            Err(e) => {
                // The worker died mid-request: the next request starts a fresh one.
                *slot = None;
                Err(InvokeError::Worker(format!(
                    "the worker of function {} failed: {e}",
                    self.name
                )))
            }
        }
    }
}

pub struct Runtime {
    functions: BTreeMap<String, Arc<Function>>,
    default: Option<String>,
}

impl Runtime {
    /// Finds every `FUNCTIONS_DIR/NAME/handler.py`; writes the worker script to `run_dir`.
    /// `default` names the function `POST /invoke` serves (else the only one there is).
    pub fn discover(
        functions_dir: &Path,
        run_dir: &Path,
        default: Option<&str>,
    ) -> Result<Self, String> {
        let mut functions = BTreeMap::new();
        let entries = match std::fs::read_dir(functions_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    functions,
                    default: None,
                })
            }
            Err(e) => return Err(format!("cannot list {}: {e}", functions_dir.display())),
        };
        std::fs::create_dir_all(run_dir)
            .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        let worker_script = run_dir.join("worker.py");
        std::fs::write(&worker_script, WORKER_SOURCE)
            .map_err(|e| format!("cannot write {}: {e}", worker_script.display()))?;
        for entry in entries.flatten() {
            let dir = entry.path();
            if !dir.join("handler.py").is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            functions.insert(
                name.clone(),
                Arc::new(Function {
                    name,
                    dir,
                    worker_script: worker_script.clone(),
                    worker: Mutex::new(None),
                }),
            );
        }
        let default = match default {
            Some(name) if functions.contains_key(name) => Some(name.to_string()),
            Some(name) => {
                return Err(format!(
                    "function {name:?} (reapvm.function=) is not in {}",
                    functions_dir.display()
                ))
            }
            None if functions.len() == 1 => functions.keys().next().cloned(),
            None => None,
        };
        Ok(Self { functions, default })
    }

    pub fn names(&self) -> Vec<&str> {
        self.functions.keys().map(String::as_str).collect()
    }

    /// `None` names the default function.
    pub fn get(&self, name: Option<&str>) -> Option<&Arc<Function>> {
        self.functions.get(name.or(self.default.as_deref())?)
    }

    /// Starts the workers that are to be warm before the guest reports ready: the default
    /// function, or all of them when there is no default.
    pub fn start(&self) -> Vec<String> {
        let to_start: Vec<&Arc<Function>> = match self.get(None) {
            Some(f) => vec![f],
            None => self.functions.values().collect(),
        };
        to_start.iter().filter_map(|f| f.start().err()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("reapvm-runtime-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn add_function(dir: &Path, name: &str, code: &str) {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("handler.py"), code).unwrap();
    }

    #[test]
    fn discovers_functions_and_the_default() {
        let dir = temp("discover");
        add_function(&dir, "hello", "def handler(b):\n    return b'hi'\n");
        std::fs::create_dir_all(dir.join("not-a-function")).unwrap();
        let rt = Runtime::discover(&dir, &dir.join("run"), None).unwrap();
        assert_eq!(rt.names(), vec!["hello"]);
        assert_eq!(rt.get(None).unwrap().name, "hello");
        add_function(&dir, "other", "def handler(b):\n    return b''\n");
        let rt = Runtime::discover(&dir, &dir.join("run"), None).unwrap();
        assert!(rt.get(None).is_none(), "two functions, no default");
        assert!(Runtime::discover(&dir, &dir.join("run"), Some("missing")).is_err());
        let none = Runtime::discover(&dir.join("nope"), &dir.join("run"), None).unwrap();
        assert!(none.names().is_empty());
    }

    /// Runs the real worker under the host's python3, when there is one.
    #[test]
    fn worker_round_trips_results_and_errors() {
        if !Path::new(PYTHON).exists() {
            eprintln!("no {PYTHON} on this host; the guest tests cover the worker");
            return;
        }
        let dir = temp("worker");
        add_function(
            &dir,
            "echo",
            "import sys\nCOUNT = [0]\ndef handler(b):\n    print('log line', file=sys.stderr)\n    print('stdout line')\n    if b == b'boom':\n        raise ValueError('bad input')\n    COUNT[0] += 1\n    return b + str(COUNT[0]).encode()\n",
        );
        let rt = Runtime::discover(&dir, &dir.join("run"), None).unwrap();
        assert!(rt.start().is_empty());
        let f = rt.get(None).unwrap();
        assert_eq!(f.invoke(b"a").unwrap(), b"a1");
        assert_eq!(
            f.invoke(b"boom"),
            Err(InvokeError::Handler("ValueError: bad input".into()))
        );
        assert_eq!(
            f.invoke(b"b").unwrap(),
            b"b2",
            "state survives between invocations"
        );
        let big = vec![7u8; 3 << 20];
        assert_eq!(f.invoke(&big).unwrap().len(), big.len() + 1);
    }
}
