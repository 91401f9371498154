//! `kvroute hash`: chained block hashes of a JSON array of token ids.

use crate::CliError;
use kvroute::hash::{to_hex as hex, BlockHasher, HashAlgo, HashConfig, RequestExtras};
use std::io::Read;
use std::path::PathBuf;

/// Arguments of `kvroute hash`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hash scheme: sha256, sha256_cbor, xxhash, xxhash_cbor (vLLM's) or xxh3 (native).
    #[arg(long, default_value = "sha256")]
    algo: HashAlgo,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// The engine's PYTHONHASHSEED (required for xxhash and xxhash_cbor).
    #[arg(long)]
    hash_seed: Option<String>,
    /// Seed of the native xxh3 chain.
    #[arg(long, default_value_t = 0)]
    native_seed: u64,
    /// LoRA adapter name.
    #[arg(long)]
    lora_name: Option<String>,
    /// LoRA adapter path (with --lora-name).
    #[arg(long, requires = "lora_name")]
    lora_path: Option<String>,
    /// Cache salt (on block 0).
    #[arg(long)]
    cache_salt: Option<String>,
    /// A file holding a JSON array of token ids (standard input when absent).
    #[arg(long)]
    tokens: Option<PathBuf>,
}

/// Parses a JSON array of token ids, each in 0..=u32::MAX.
fn parse_tokens(text: &str) -> Result<Vec<u32>, CliError> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| CliError(format!("tokens are not valid JSON: {e}")))?;
    let arr =
        v.as_array().ok_or_else(|| CliError("tokens must be a JSON array of token ids".into()))?;
    arr.iter()
        .enumerate()
        .map(|(i, t)| {
            t.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| {
                CliError(format!(
                    "token {i} is {t}: token ids must be integers from 0 to {}",
                    u32::MAX
                ))
            })
        })
        .collect()
}

/// The printed result (fields in this order).
#[derive(serde::Serialize)]
struct Output {
    none_hash: String,
    blocks: Vec<BlockOut>,
}

/// One block of the printed result.
#[derive(serde::Serialize)]
struct BlockOut {
    hash: String,
    event_hash: u64,
}

/// Runs `kvroute hash`.
pub fn run(args: Args) -> Result<(), CliError> {
    let text = match &args.tokens {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| CliError(format!("cannot read {}: {e}", p.display())))?,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CliError(format!("cannot read standard input: {e}")))?;
            s
        }
    };
    let tokens = parse_tokens(&text)?;
    let hasher = BlockHasher::new(HashConfig {
        algo: args.algo,
        block_size: args.block_size,
        hash_seed: args.hash_seed,
        native_seed: args.native_seed,
        ..Default::default()
    })?;
    let extras = RequestExtras::from_lora_and_salt(
        args.lora_name.as_deref(),
        args.lora_path.as_deref(),
        args.cache_salt.as_deref(),
    )?
    .unwrap_or_default();
    let out = Output {
        none_hash: hex(hasher.none_hash()),
        blocks: hasher
            .block_hashes(&tokens, &extras)
            .iter()
            .map(|b| BlockOut { hash: hex(&b.digest), event_hash: b.event_hash })
            .collect(),
    };
    let out = serde_json::to_string(&out)?;
    crate::emit(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_parsing_rejects_out_of_range_ids() {
        assert_eq!(parse_tokens("[0, 1, 4294967295]").unwrap(), [0, 1, u32::MAX]);
        assert!(parse_tokens("[-1]").is_err());
        assert!(parse_tokens("[4294967296]").is_err());
        assert!(parse_tokens("[1.5]").is_err());
        assert!(parse_tokens("{\"a\": 1}").is_err());
        assert!(parse_tokens("[1, 2").is_err());
    }
}
