//! `rebase-snap --base-file BASE --diff-file DIFF`: applies a Diff snapshot's memory file
//! onto the memory file of the snapshot it followed, as Firecracker's tool of that name.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "rebase-snap",
    about = "Apply a Diff snapshot's memory file onto its base memory file, in place"
)]
struct Args {
    /// The memory file of the previous (Full, or already rebased) snapshot; rewritten in place.
    #[arg(long)]
    base_file: PathBuf,
    /// The Diff snapshot's memory file (sparse: only dirty pages hold data).
    #[arg(long)]
    diff_file: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match snapshot::diff::apply_diff(&args.base_file, &args.diff_file) {
        Ok(bytes) => {
            println!(
                "rebase-snap: {bytes} bytes of {} applied onto {}",
                args.diff_file.display(),
                args.base_file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rebase-snap: error: {e}");
            ExitCode::FAILURE
        }
    }
}
