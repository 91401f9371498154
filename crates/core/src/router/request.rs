//! The request, the decision and the load report: the types a host passes to and gets
//! from [`Router`](super::Router).

use crate::hash::RequestExtras;
use crate::types::{BlockKey, WorkerId, WorkerKey};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A request to route.
#[derive(Clone, Copy, Debug, Default)]
pub struct Request<'a> {
    /// The prompt's token ids.
    pub tokens: &'a [u32],
    /// A session key: the client IP or a session id.
    pub session: Option<&'a str>,
    /// The LoRA adapter's name, if any (used for LoRA affinity and, in vLLM schemes,
    /// folded into the hash together with `extras`).
    pub lora: Option<&'a str>,
    /// Extra hash inputs (LoRA path, cache salt, multimodal items, prompt embeddings).
    pub extras: Option<&'a RequestExtras>,
    /// The arrival time in milliseconds; `None` uses the wall clock.
    pub now_ms: Option<u64>,
}

impl<'a> Request<'a> {
    /// A request for `tokens` with nothing else set.
    pub fn new(tokens: &'a [u32]) -> Self {
        Request { tokens, ..Request::default() }
    }
}

/// One candidate's part of a decision. Its worker's name and its per-scorer scores are on
/// the [`Decision`] ([`Decision::candidate_worker`], [`Decision::candidate_scores`]), so
/// that routing does not allocate per candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CandidateScore {
    /// The worker's dense id.
    pub worker_id: WorkerId,
    /// Blocks of the prompt the worker holds (longest prefix).
    pub matched_blocks: u32,
    /// Of those, by best tier: GPU, CPU, disk.
    pub matched_by_tier: [u32; 3],
    /// The combined total.
    pub total: f64,
}

/// One candidate, spelled out with names (see [`Decision::explain`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CandidateExplanation {
    /// The worker.
    pub worker: WorkerKey,
    /// Blocks of the prompt the worker holds (longest prefix).
    pub matched_blocks: u32,
    /// Of those, by best tier: GPU, CPU, disk.
    pub matched_by_tier: [u32; 3],
    /// Each scorer's score (or the cost policy's rows), by name.
    pub scores: Vec<(String, f64)>,
    /// The combined total.
    pub total: f64,
}

/// The router's choice for one request, with every candidate's scores.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// An id for lifecycle calls ([`Router::on_routed`](super::Router::on_routed) and after).
    pub request_id: u64,
    /// The chosen worker.
    pub worker: WorkerKey,
    /// The chosen worker's dense id.
    pub worker_id: WorkerId,
    /// Blocks of the prompt the chosen worker holds.
    pub matched_blocks: u32,
    /// Full blocks in the prompt.
    pub total_blocks: u32,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// When it was routed, ms (the request's `now_ms`, or the wall clock).
    pub routed_ms: u64,
    /// Every candidate that passed the filters.
    pub candidates: Vec<CandidateScore>,
    /// The prompt's block keys (kept in approximate and hybrid modes, where
    /// [`Router::on_routed`](super::Router::on_routed) feeds them to the cache model, and
    /// in precise mode with predictions on, where it predicts them on the chosen worker).
    pub keys: Vec<BlockKey>,
    /// Worker names by dense id, as the registry had them at decision time (shared).
    pub(crate) names: Arc<[Option<WorkerKey>]>,
    /// Names of the score rows (shared by every decision of a router).
    pub(crate) score_names: Arc<[String]>,
    /// `candidates.len() x score_names.len()` scores, candidate-major.
    pub(crate) scores: Vec<f64>,
}

/// A dropped decision leaves its heap buffers (keys, candidates, scores, worker name) to
/// the thread's next [`Router::route`](super::Router::route) or
/// [`Router::preview`](super::Router::preview), which fills them instead of allocating:
/// a caller that routes and drops in a loop allocates nothing per route. One decision's
/// buffers are kept per thread.
impl Drop for Decision {
    fn drop(&mut self) {
        super::route::keep_buffers(
            std::mem::take(&mut self.keys),
            std::mem::take(&mut self.candidates),
            std::mem::take(&mut self.scores),
            std::mem::take(&mut self.worker.name),
        );
    }
}

impl Decision {
    /// The names of the per-candidate scores (the profile's scorers, or the cost policy's
    /// rows), in the order of [`candidate_scores`](Self::candidate_scores).
    pub fn score_names(&self) -> &[String] {
        &self.score_names
    }

    /// Candidate `i`'s scores, aligned with [`score_names`](Self::score_names); empty if
    /// `i` is out of range.
    pub fn candidate_scores(&self, i: usize) -> &[f64] {
        let n = self.score_names.len();
        self.scores.get(i * n..(i + 1) * n).unwrap_or(&[])
    }

    /// Candidate `i`'s worker.
    pub fn candidate_worker(&self, i: usize) -> Option<&WorkerKey> {
        let c = self.candidates.get(i)?;
        self.names.get(c.worker_id.index())?.as_ref()
    }

    /// Every candidate with its worker name and named scores, for logs.
    pub fn explain(&self) -> Vec<CandidateExplanation> {
        (0..self.candidates.len())
            .map(|i| {
                let c = &self.candidates[i];
                CandidateExplanation {
                    worker: self
                        .candidate_worker(i)
                        .cloned()
                        .unwrap_or_else(|| WorkerKey::new(format!("#{}", c.worker_id.0), 0)),
                    matched_blocks: c.matched_blocks,
                    matched_by_tier: c.matched_by_tier,
                    scores: self
                        .score_names
                        .iter()
                        .cloned()
                        .zip(self.candidate_scores(i).iter().copied())
                        .collect(),
                    total: c.total,
                }
            })
            .collect()
    }
}

impl Serialize for Decision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Decision", 7)?;
        st.serialize_field("request_id", &self.request_id)?;
        st.serialize_field("worker", &self.worker)?;
        st.serialize_field("matched_blocks", &self.matched_blocks)?;
        st.serialize_field("total_blocks", &self.total_blocks)?;
        st.serialize_field("prompt_tokens", &self.prompt_tokens)?;
        st.serialize_field("candidates", &self.explain())?;
        st.end()
    }
}

/// A load report pushed by the host, for example scraped from vLLM's `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadReport {
    /// `vllm:num_requests_waiting`.
    pub waiting: Option<u32>,
    /// `vllm:num_requests_running`.
    pub running: Option<u32>,
    /// `vllm:kv_cache_usage_perc`, 0..1.
    pub kv_usage: Option<f64>,
    /// LoRA adapters loaded on the worker.
    pub loras: Option<Vec<String>>,
}
