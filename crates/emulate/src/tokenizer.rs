//! Text tokenization for text prompts, chat requests and `/tokenize`.

use serde_json::Value;

/// What the HTTP side needs from a tokenizer.
pub trait TextTokenizer: Send + Sync {
    /// Token ids of a completion prompt.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String>;
    /// Token ids of a chat request (`body` is the whole request, `messages` its messages),
    /// rendered with the model's chat template as vLLM's OpenAI server does it.
    fn encode_chat(&self, body: &Value, messages: &Value) -> Result<Vec<u32>, String>;
    /// The text of `ids`.
    fn decode(&self, ids: &[u32]) -> String;
    /// Token ids are drawn from `0..vocab_size()`.
    fn vocab_size(&self) -> u32;
}

/// Loads the tokenizer in `dir` (a `tokenizer.json` or a model directory).
pub fn load(dir: &str) -> Result<std::sync::Arc<dyn TextTokenizer>, String> {
    Err(format!("--tokenizer {dir}: this build has no text tokenizer yet; send token ids"))
}
