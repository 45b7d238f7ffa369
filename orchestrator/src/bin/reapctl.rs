//! reapctl: reapd's command-line client (docs/orchestrator.md).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

use orchestrator::api::{BREAKDOWN_HEADER, LATENCY_HEADER, MODE_HEADER, START_HEADER};
use orchestrator::bench::{self, BenchSpec};
use orchestrator::http::{unix_request, Answer};
use orchestrator::spec::{self, ColdStart, DeploySpec};

#[derive(Parser, Debug)]
#[command(
    name = "reapctl",
    version,
    about = "Deploy and invoke functions on reapd"
)]
struct Args {
    /// reapd's API socket [default: $REAPD_SOCKET, else /run/reapd.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot the function, warm it up, snapshot it; returns when it can be invoked.
    Deploy {
        name: String,
        #[arg(long)]
        function: String,
        /// reap, file, lazy (OnDemand) or boot.
        #[arg(long, default_value = "reap", value_parser = parse_cold_start)]
        cold_start: ColdStart,
        #[arg(long, default_value_t = spec::DEFAULT_VCPUS)]
        vcpus: u32,
        #[arg(long, default_value_t = spec::DEFAULT_MEM_MIB)]
        mem_mib: u64,
        /// Seconds an idle instance is kept.
        #[arg(long, default_value_t = spec::DEFAULT_KEEP_ALIVE_S)]
        keep_alive: u64,
        #[arg(long, default_value_t = spec::DEFAULT_MAX_INSTANCES)]
        max_instances: u32,
    },
    /// Invoke a function: its answer on stdout, how it was served on stderr (exit code 1
    /// when the function answered with an error status).
    Invoke { name: String, data: Option<String> },
    /// The deployed functions.
    Ls,
    /// A function's settings, snapshot, WS and instances.
    Show { name: String },
    /// Stop every idle instance of a function.
    ScaleToZero { name: String },
    /// Remove a function, its instances and its snapshot.
    Rm { name: String },
    /// Open-loop load (Poisson arrivals): latency percentiles, cold and warm counts, and
    /// invocations.csv, breakdown.csv and latency.svg in --out.
    Bench {
        name: String,
        /// Invocations per second (mean of the Poisson process).
        #[arg(long)]
        rate: f64,
        /// Seconds of arrivals.
        #[arg(long)]
        duration: u64,
        /// Requests in flight at most; arrivals beyond it are skipped (counted).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Where the CSVs and the chart go.
        #[arg(long, default_value = "reapctl-bench")]
        out: PathBuf,
        /// The body of every invocation.
        #[arg(long, default_value = "")]
        data: String,
        /// The arrival generator's seed (the same seed, the same schedule).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn parse_cold_start(s: &str) -> Result<ColdStart, String> {
    ColdStart::parse(s).ok_or_else(|| format!("{s:?}: one of reap, file, lazy, boot"))
}

const LONG: Duration = Duration::from_secs(3600);

struct Client {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    fn call(&self, method: &str, uri: &str, body: Vec<u8>) -> Result<Answer, String> {
        let answer = self
            .runtime
            .block_on(unix_request(&self.socket, method, uri, body, LONG))
            .map_err(|e| {
                format!("{e} (is reapd running? --socket or $REAPD_SOCKET names its socket)")
            })?;
        // An answer with x-reapd-start is the function's, whatever its status: the caller
        // shows it as such.
        if (200..300).contains(&answer.status) || answer.headers.contains_key(START_HEADER) {
            return Ok(answer);
        }
        let reason = serde_json::from_slice::<Value>(&answer.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| answer.text());
        Err(format!("{} ({})", reason, answer.status))
    }

    fn json(&self, method: &str, uri: &str, body: Vec<u8>) -> Result<Value, String> {
        let answer = self.call(method, uri, body)?;
        serde_json::from_slice(&answer.body).map_err(|e| format!("reapd's answer is not JSON: {e}"))
    }
}

fn size(v: &Value) -> String {
    match v.as_u64() {
        Some(b) if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        Some(b) => format!("{:.1} KiB", b as f64 / 1024.0),
        None => "-".into(),
    }
}

fn print_function(f: &Value) {
    println!("name:          {}", f["name"].as_str().unwrap_or(""));
    println!("function:      {}", f["function"].as_str().unwrap_or(""));
    println!("cold start:    {}", f["cold_start"].as_str().unwrap_or(""));
    println!("vcpus, memory: {}, {} MiB", f["vcpus"], f["mem_mib"]);
    println!(
        "keep-alive:    {} s, at most {} instances",
        f["keep_alive_s"], f["max_instances"]
    );
    println!(
        "snapshot:      {} (vmstate {}, memory {})",
        f["snapshot_dir"].as_str().unwrap_or(""),
        size(&f["vmstate_bytes"]),
        size(&f["memory_bytes"])
    );
    println!("working set:   {}", size(&f["ws_bytes"]));
    println!(
        "starts:        {} cold, {} warm",
        f["cold_starts"], f["warm_starts"]
    );
    let instances = f["instances"].as_array().cloned().unwrap_or_default();
    println!(
        "instances:     {} ({} requests waiting)",
        instances.len(),
        f["waiting"]
    );
    for i in instances {
        println!(
            "  {:>6}  {:<5} pid {:<8} started as {:<9} {} invocations  netns {}",
            i["id"],
            i["state"].as_str().unwrap_or(""),
            i["pid"],
            i["started_as"].as_str().unwrap_or(""),
            i["invocations"],
            i["netns"].as_str().unwrap_or("")
        );
    }
}

fn run(client: &Client, command: Command) -> Result<(), String> {
    match command {
        Command::Deploy {
            name,
            function,
            cold_start,
            vcpus,
            mem_mib,
            keep_alive,
            max_instances,
        } => {
            let spec = DeploySpec {
                name,
                function,
                cold_start,
                vcpus,
                mem_mib,
                keep_alive_s: keep_alive,
                max_instances,
            };
            let started = std::time::Instant::now();
            let body = serde_json::to_vec(&spec).expect("a spec serialises");
            let f = client.json("POST", "/functions", body)?;
            println!(
                "deployed {} (function {}, cold start {}) in {:.1} s",
                spec.name,
                spec.function,
                spec.cold_start.as_str(),
                started.elapsed().as_secs_f64()
            );
            print_function(&f);
        }
        Command::Invoke { name, data } => {
            let answer = client.call(
                "POST",
                &format!("/functions/{name}/invoke"),
                data.unwrap_or_default().into_bytes(),
            )?;
            let header = |h: &str| {
                answer
                    .headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let mut out = std::io::stdout();
            let _ = out.write_all(&answer.body);
            let _ = out.flush();
            let start = header(START_HEADER);
            let latency = header(LATENCY_HEADER);
            if start == "cold" {
                eprintln!(
                    "cold ({}) latency={latency}us {}",
                    header(MODE_HEADER),
                    header(BREAKDOWN_HEADER)
                );
            } else {
                eprintln!("{start} latency={latency}us");
            }
            if !(200..300).contains(&answer.status) {
                return Err(format!("the function answered {}", answer.status));
            }
        }
        Command::Ls => {
            let list = client.json("GET", "/functions", Vec::new())?;
            println!(
                "{:<20} {:<18} {:<6} {:>9} {:>6} {:>6} {:>10}",
                "NAME", "FUNCTION", "START", "INSTANCES", "COLD", "WARM", "WS"
            );
            for f in list.as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<20} {:<18} {:<6} {:>9} {:>6} {:>6} {:>10}",
                    f["name"].as_str().unwrap_or(""),
                    f["function"].as_str().unwrap_or(""),
                    f["cold_start"].as_str().unwrap_or(""),
                    f["instances"].as_array().map(Vec::len).unwrap_or(0),
                    f["cold_starts"],
                    f["warm_starts"],
                    size(&f["ws_bytes"])
                );
            }
        }
        Command::Show { name } => {
            print_function(&client.json("GET", &format!("/functions/{name}"), Vec::new())?)
        }
        Command::ScaleToZero { name } => {
            let v = client.json(
                "POST",
                &format!("/functions/{name}/scale-to-zero"),
                Vec::new(),
            )?;
            println!(
                "{name}: stopped {} idle instances, {} busy left",
                v["instances_stopped"], v["instances_busy"]
            );
        }
        Command::Bench {
            name,
            rate,
            duration,
            concurrency,
            out,
            data,
            seed,
        } => {
            let spec = BenchSpec {
                socket: client.socket.clone(),
                name,
                rate_per_s: rate,
                duration: Duration::from_secs(duration),
                concurrency,
                data: data.into_bytes(),
                seed,
            };
            spec.check().map_err(|e| e.to_string())?;
            // The function must exist before the clock starts.
            client.json("GET", &format!("/functions/{}", spec.name), Vec::new())?;
            let report = client.runtime.block_on(bench::run(spec.clone()));
            print!("{}", report.table(&spec));
            for path in report.write(&out, &spec.name).map_err(|e| e.to_string())? {
                println!("wrote {}", path.display());
            }
        }
        Command::Rm { name } => {
            let v = client.json("DELETE", &format!("/functions/{name}"), Vec::new())?;
            println!(
                "removed {name} ({} instances stopped)",
                v["instances_stopped"]
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let socket = args
        .socket
        .or_else(|| std::env::var_os("REAPD_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/run/reapd.sock"));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("reapctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = Client { socket, runtime };
    match run(&client, args.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reapctl: {e}");
            ExitCode::FAILURE
        }
    }
}
