//! Request traces in the Mooncake FAST'25 format.
//!
//! One JSON object per line:
//! `{"timestamp": <ms since start>, "input_length": <tokens>, "output_length": <tokens>,
//! "hash_ids": [<int>, ...]}`. `hash_ids` are remapped prefix-block hashes of
//! [`MOONCAKE_BLOCK_TOKENS`] tokens each, `ceil(input_length / 512)` of them; an equal id
//! means the same block *and* the same whole preceding prefix, so they can be used
//! directly as [`kvroute::BlockKey`]s. Unknown fields are ignored; blank lines are skipped.

use kvroute::{BlockKey, Error, Result};
use serde::Deserialize;
use std::io::BufRead;
use std::path::Path;

/// Tokens per `hash_ids` block in Mooncake traces.
pub const MOONCAKE_BLOCK_TOKENS: usize = 512;

/// One request of a Mooncake trace.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct MooncakeRequest {
    /// Arrival time in milliseconds since the start of the trace.
    #[serde(rename = "timestamp")]
    pub timestamp_ms: u64,
    /// Prompt length in tokens.
    pub input_length: u32,
    /// Generated tokens.
    pub output_length: u32,
    /// Prefix block ids of the prompt, one per 512 tokens (the last one may be partial).
    pub hash_ids: Vec<BlockKey>,
}

impl MooncakeRequest {
    /// Number of *full* 512-token blocks in the prompt (the ones a prefix cache can hold).
    pub fn full_blocks(&self) -> usize {
        self.input_length as usize / MOONCAKE_BLOCK_TOKENS
    }
}

/// Parses a Mooncake trace from `reader`. Errors with [`Error::Decode`] naming the 1-based
/// line number on a malformed line (bad JSON, missing field, wrong type, or a `hash_ids`
/// length other than `ceil(input_length / 512)`), and with [`Error::Io`] on a read error.
pub fn parse_mooncake<R: BufRead>(reader: R) -> Result<Vec<MooncakeRequest>> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let lineno = i + 1;
        let line = line.map_err(|e| Error::Io(format!("line {lineno}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let req: MooncakeRequest = serde_json::from_str(&line)
            .map_err(|e| Error::decode(format!("mooncake trace line {lineno}: {e}")))?;
        let want = (req.input_length as usize).div_ceil(MOONCAKE_BLOCK_TOKENS);
        if req.hash_ids.len() != want {
            return Err(Error::decode(format!(
                "mooncake trace line {lineno}: {} hash_ids for input_length {} (expected {want})",
                req.hash_ids.len(),
                req.input_length
            )));
        }
        out.push(req);
    }
    Ok(out)
}

/// Reads a Mooncake trace file (see [`parse_mooncake`]).
pub fn read_mooncake(path: impl AsRef<Path>) -> Result<Vec<MooncakeRequest>> {
    let path = path.as_ref();
    let file =
        std::fs::File::open(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    parse_mooncake(std::io::BufReader::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_skips_blank_ones() {
        let text = "{\"timestamp\": 5, \"input_length\": 513, \"output_length\": 7, \"hash_ids\": [0, 1]}\n\n\
                    {\"timestamp\": 9, \"input_length\": 512, \"output_length\": 1, \"hash_ids\": [0], \"extra\": 1}\n";
        let reqs = parse_mooncake(text.as_bytes()).unwrap();
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].timestamp_ms, 5);
        assert_eq!(reqs[0].hash_ids, vec![0, 1]);
        assert_eq!(reqs[0].full_blocks(), 1);
        assert_eq!(reqs[1].full_blocks(), 1);
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        let good =
            "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [0]}";
        for (bad, lineno) in [
            ("{\"timestamp\": 0, \"input_length\": 10", 3),
            ("{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1}", 3),
            ("{\"timestamp\": -1, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [0]}", 3),
            ("{\"timestamp\": 0, \"input_length\": 1025, \"output_length\": 1, \"hash_ids\": [0, 1]}", 3),
            ("not json", 3),
        ] {
            let text = format!("{good}\n\n{bad}\n{good}\n");
            match parse_mooncake(text.as_bytes()) {
                Err(Error::Decode(msg)) => {
                    assert!(msg.contains(&format!("line {lineno}:")), "{msg}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(read_mooncake("/nonexistent/trace.jsonl"), Err(Error::Io(_))));
    }
}
