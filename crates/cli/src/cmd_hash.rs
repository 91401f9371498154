//! `kvroute hash` (to be written: see issue 2).

use crate::CliError;

/// Arguments of `kvroute hash`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `kvroute hash`.
pub fn run(_args: Args) -> Result<(), CliError> {
    Err(CliError("not implemented yet".into()))
}
