//! The `kvroute` command line.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cmd_events;
mod cmd_hash;
mod cmd_listen;
mod cmd_serve;
mod cmd_simulate;

/// KV-cache-aware request routing for LLM serving.
#[derive(Parser, Debug)]
#[command(name = "kvroute", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Hash a JSON array of token ids into chained block hashes (vLLM-exact or native).
    Hash(cmd_hash::Args),
    /// Decode vLLM KV event payloads.
    Events(cmd_events::Args),
    /// Compare routing policies on simulated vLLM workers (seed, shared-prefix, chat, traces).
    Simulate(cmd_simulate::Args),
    /// Subscribe to vLLM KV-event publishers and apply their events to a router's index.
    Listen(cmd_listen::Args),
    /// Run the KV-cache-aware OpenAI-compatible router in front of vLLM replicas.
    Serve(cmd_serve::Args),
    /// Emulate one vLLM replica (OpenAI API, KV events, metrics) for tests without a GPU.
    Emulate(kvroute_emulate::Args),
}

/// Writes a line to standard output. A closed pipe (`kvroute simulate | head`) is not an
/// error: the reader has what it wanted, so the rest is dropped quietly.
pub fn emit(line: impl std::fmt::Display) -> Result<(), CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError(e.to_string())),
        _ => Ok(()),
    }
}

/// An error that the command line reports as one line and exit code 2.
#[derive(Debug)]
pub struct CliError(pub String);

impl<E: std::fmt::Display> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Hash(args) => cmd_hash::run(args),
        Command::Events(args) => cmd_events::run(args),
        Command::Simulate(args) => cmd_simulate::run(args),
        Command::Listen(args) => cmd_listen::run(args),
        Command::Serve(args) => cmd_serve::run(args),
        Command::Emulate(args) => kvroute_emulate::run(args).map_err(CliError),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError(msg)) => {
            eprintln!("kvroute: error: {}", msg.lines().next().unwrap_or(""));
            ExitCode::from(2)
        }
    }
}
