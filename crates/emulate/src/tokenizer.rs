//! Text tokenization for text prompts, chat requests and `/tokenize`, with the same
//! tokenizer code as `kvroute serve` (`kvroute-tokenize`: HF tokenizers and chat templates
//! exactly as vLLM 0.33's OpenAI server applies them), so router and replica agree on the
//! token ids of every request.

use std::sync::Arc;

/// What the HTTP side needs from a tokenizer. Bodies are passed as received: the chat
/// template sees JSON objects in the client's key order.
pub trait TextTokenizer: Send + Sync {
    /// Token ids of a `/v1/completions` body with a text prompt.
    fn encode_completion(&self, body: &str) -> Result<Vec<u32>, String>;
    /// Token ids of a `/v1/chat/completions` body.
    fn encode_chat(&self, body: &str) -> Result<Vec<u32>, String>;
    /// The text of `ids`.
    fn decode(&self, ids: &[u32]) -> String;
    /// Token ids are drawn from `0..vocab_size()`.
    fn vocab_size(&self) -> u32;
}

struct Hf {
    tok: kvroute_tokenize::Tokenizer,
    /// The same tokenizer.json for decoding (kvroute-tokenize only encodes).
    dec: tokenizers::Tokenizer,
}

fn parse(body: &str) -> Result<kvroute_tokenize::Json, String> {
    kvroute_tokenize::Json::parse(body).map_err(|e| format!("invalid JSON body: {e}"))
}

impl TextTokenizer for Hf {
    fn encode_completion(&self, body: &str) -> Result<Vec<u32>, String> {
        self.tok.encode_completion_body(&parse(body)?).map_err(|e| e.to_string())
    }

    fn encode_chat(&self, body: &str) -> Result<Vec<u32>, String> {
        self.tok.encode_chat_body(&parse(body)?).map_err(|e| e.to_string())
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.dec.decode(ids, true).unwrap_or_default()
    }

    fn vocab_size(&self) -> u32 {
        u32::try_from(self.tok.vocab_size()).unwrap_or(u32::MAX)
    }
}

/// Loads the tokenizer at `path`: a model directory (tokenizer.json, tokenizer_config.json,
/// chat template files) or a tokenizer.json.
pub fn load(path: &str) -> Result<Arc<dyn TextTokenizer>, String> {
    let tok = kvroute_tokenize::Tokenizer::from_path(path)
        .map_err(|e| format!("--tokenizer {path}: {e}"))?;
    let p = std::path::Path::new(path);
    let file = if p.is_dir() { p.join("tokenizer.json") } else { p.to_path_buf() };
    let dec = tokenizers::Tokenizer::from_file(&file)
        .map_err(|e| format!("--tokenizer {}: {e}", file.display()))?;
    Ok(Arc::new(Hf { tok, dec }))
}
