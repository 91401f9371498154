//! `kvroute events`: work with vLLM KV event payloads.

use crate::CliError;
use std::path::PathBuf;

/// Arguments of `kvroute events`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: EventsCommand,
}

#[derive(clap::Subcommand, Debug)]
enum EventsCommand {
    /// Decode one vLLM KVEventBatch msgpack payload and print it as one line of JSON.
    Decode(DecodeArgs),
}

/// Arguments of `kvroute events decode`.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct DecodeArgs {
    /// The payload as hex (whitespace ignored).
    #[arg(long, value_name = "HEX")]
    hex: Option<String>,
    /// A file holding the raw payload bytes.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
}

/// Runs `kvroute events`.
pub fn run(args: Args) -> Result<(), CliError> {
    match args.command {
        EventsCommand::Decode(a) => decode(a),
    }
}

fn decode(args: DecodeArgs) -> Result<(), CliError> {
    let payload = match (args.hex, args.file) {
        (Some(h), _) => parse_hex(&h)?,
        (None, Some(f)) => {
            std::fs::read(&f).map_err(|e| CliError(format!("cannot read {}: {e}", f.display())))?
        }
        (None, None) => return Err(CliError("give --hex or --file".into())),
    };
    let batch = kvroute::events::vllm::decode(&payload)?;
    crate::emit(kvroute::events::vllm::batch_to_json(&batch))?;
    Ok(())
}

fn parse_hex(text: &str) -> Result<Vec<u8>, CliError> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err(CliError(format!("--hex has an odd number of digits ({})", digits.len())));
    }
    let nibble = |i: usize| -> Result<u8, CliError> {
        let c = digits[i];
        char::from(c)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| CliError(format!("--hex: invalid digit {:?} at {i}", char::from(c))))
    };
    (0..digits.len()).step_by(2).map(|i| Ok((nibble(i)? << 4) | nibble(i + 1)?)).collect()
}
