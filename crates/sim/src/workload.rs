//! Workloads: the requests a simulation replays.
//!
//! A request's prompt is a list of [`Segment`]s, each a run of synthetic token ids drawn
//! deterministically from a seed, so equal segments give equal tokens (shared system
//! prompts, repeated prompts, conversation history, Mooncake hash ids) without holding
//! the tokens in memory. The output is one more segment: what the engine "generates" is
//! fixed in advance, so a chat turn's next prompt can contain the previous answer, and
//! blocks cached during decode are the same blocks a later prompt looks up.
//!
//! Built-in generators: [`seed_experiment`], [`shared_prefix`], [`chat`] and
//! [`from_mooncake`]. All take explicit parameter structs with documented defaults.

use crate::trace::{MooncakeRequest, MOONCAKE_BLOCK_TOKENS};
use kvroute::rng::{splitmix64, SplitMix64};
use serde::Serialize;
use std::sync::Arc;

/// Token ids are drawn from `0..VOCAB` (a Llama-3-sized vocabulary).
pub const VOCAB: u64 = 128_000;

/// A run of `len` synthetic tokens: token `j` is a function of `(seed, j)` only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// Content seed: equal seeds give equal tokens.
    pub seed: u64,
    /// Number of tokens.
    pub len: u32,
}

impl Segment {
    /// Appends this segment's tokens to `out`.
    pub fn write(&self, out: &mut Vec<u32>) {
        self.write_range(0, self.len as usize, out);
    }

    /// Appends tokens `from..to` of this segment to `out`.
    pub fn write_range(&self, from: usize, to: usize, out: &mut Vec<u32>) {
        let base = splitmix64(self.seed ^ 0x5345_474d_454e_5400);
        out.extend((from as u64..to as u64).map(|j| (splitmix64(base ^ j) % VOCAB) as u32));
    }
}

/// One request of a workload.
#[derive(Clone, Debug)]
pub struct SimRequest {
    /// Dense index in the workload (0-based, arrival order).
    pub id: u64,
    /// Arrival time in seconds since the start.
    pub arrival_s: f64,
    /// The prompt, as segments.
    pub prompt: Arc<[Segment]>,
    /// The generated tokens (fixed in advance; `output.len` is the output length).
    pub output: Segment,
    /// The session key (the client's source IP for Kubernetes ClientIP affinity).
    pub session: Option<Arc<str>>,
}

impl SimRequest {
    /// Prompt length in tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt.iter().map(|s| s.len as usize).sum()
    }

    /// Output length in tokens (at least 1: the first token comes with the prefill).
    pub fn output_len(&self) -> usize {
        (self.output.len as usize).max(1)
    }

    /// Writes the prompt's token ids into `out` (cleared first).
    pub fn prompt_tokens(&self, out: &mut Vec<u32>) {
        out.clear();
        for s in self.prompt.iter() {
            s.write(out);
        }
    }

    /// Writes the prompt's and the output's token ids into `out` (cleared first).
    pub fn all_tokens(&self, out: &mut Vec<u32>) {
        self.prompt_tokens(out);
        self.output.write(out);
    }

    /// Writes tokens `from..to` of the whole sequence (prompt, then output) into `out`
    /// (cleared first), generating only those; `to` is capped at the sequence's end.
    pub fn tokens_range(&self, from: usize, to: usize, out: &mut Vec<u32>) {
        out.clear();
        let mut start = 0usize;
        for s in self.prompt.iter().chain([&self.output]) {
            let end = start + s.len as usize;
            let (a, b) = (from.max(start), to.min(end));
            if a < b {
                s.write_range(a - start, b - start, out);
            }
            if end >= to {
                break;
            }
            start = end;
        }
    }
}

/// A named list of requests in arrival order.
#[derive(Clone, Debug)]
pub struct Workload {
    /// A short name (`seed`, `shared-prefix`, `chat`, `trace:PATH`).
    pub name: String,
    /// The generator's parameters, for the JSON report.
    pub params: serde_json::Value,
    /// Requests sorted by arrival time; `id` is the index.
    pub requests: Vec<SimRequest>,
}

impl Workload {
    /// Keeps only the first `n` requests.
    pub fn truncate(&mut self, n: usize) {
        self.requests.truncate(n);
    }

    /// Multiplies the request rate by `factor` (arrival times divided by it).
    pub fn scale_rate(&mut self, factor: f64) {
        for r in &mut self.requests {
            r.arrival_s /= factor;
        }
    }
}

/// Sorts by arrival (stable, so equal times keep generation order) and numbers the requests.
fn finish(name: &str, params: serde_json::Value, mut reqs: Vec<SimRequest>) -> Workload {
    reqs.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    for (i, r) in reqs.iter_mut().enumerate() {
        r.id = i as u64;
    }
    Workload { name: name.into(), params, requests: reqs }
}

/// An exponential variate with the given mean.
fn exp(rng: &mut SplitMix64, mean: f64) -> f64 {
    -mean * (1.0 - rng.next_f64()).ln()
}

/// A content seed unique to `(domain, a, b)` under the workload seed.
fn content(seed: u64, domain: u64, a: u64, b: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed ^ domain) ^ a) ^ b)
}

/// Parameters of the seed experiment (see docs/simulation.md, "The seed experiment").
///
/// One client repeats a fixed set of distinct prompts at temperature 0. A share
/// `main_share` of its requests reach the Service from its own address (the session key
/// kube-proxy's ClientIP affinity sees); each of the others arrives from a fresh source
/// address (a different path into the cluster, e.g. through another node or a proxy that
/// SNATs), so affinity routes it like a new client.
#[derive(Clone, Debug, Serialize)]
pub struct SeedParams {
    /// Distinct prompts in the fixed set.
    pub prompts: usize,
    /// Times each prompt is sent.
    pub repeats: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Output tokens per request.
    pub output_tokens: u32,
    /// Mean seconds between requests (Poisson arrivals).
    pub mean_gap_s: f64,
    /// Share of requests sent from the main client address.
    pub main_share: f64,
    /// Random seed.
    pub seed: u64,
}

impl Default for SeedParams {
    fn default() -> Self {
        SeedParams {
            prompts: 20,
            repeats: 15,
            prompt_tokens: 1_000,
            output_tokens: 128,
            mean_gap_s: 1.0,
            main_share: 0.8,
            seed: 0,
        }
    }
}

/// The seed experiment: `prompts x repeats` requests, the prompt set cycled in a shuffled
/// order each round, one client.
pub fn seed_experiment(p: &SeedParams) -> Workload {
    let mut rng = SplitMix64::new(p.seed ^ 0x5eed);
    let main: Arc<str> = Arc::from("10.1.0.7");
    let mut strays = 0u32;
    let mut t = 0.0;
    let mut reqs = Vec::with_capacity(p.prompts * p.repeats);
    let mut order: Vec<usize> = (0..p.prompts).collect();
    for _ in 0..p.repeats {
        // Fisher-Yates with our own generator, so the order is portable.
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for &k in &order {
            t += exp(&mut rng, p.mean_gap_s);
            let session = if rng.next_f64() < p.main_share {
                main.clone()
            } else {
                strays += 1;
                Arc::from(format!("10.9.{}.{}", strays / 250, strays % 250 + 1))
            };
            let prompt = Segment { seed: content(p.seed, 1, k as u64, 0), len: p.prompt_tokens };
            // Temperature 0: the same prompt always yields the same answer.
            let output = Segment { seed: content(p.seed, 2, k as u64, 0), len: p.output_tokens };
            reqs.push(SimRequest {
                id: 0,
                arrival_s: t,
                prompt: Arc::from(vec![prompt]),
                output,
                session: Some(session),
            });
        }
    }
    finish("seed", serde_json::to_value(p).unwrap_or_default(), reqs)
}

/// Parameters of the shared-prefix workload (llm-d's "KV-cache wins you can see" shape).
#[derive(Clone, Debug, Serialize)]
pub struct SharedPrefixParams {
    /// Groups, each with its own system prompt.
    pub groups: usize,
    /// Users per group (each its own client address).
    pub users_per_group: usize,
    /// Questions each user sends.
    pub questions_per_user: usize,
    /// System prompt tokens (shared by a group).
    pub system_tokens: u32,
    /// Question tokens (unique per request).
    pub question_tokens: u32,
    /// Output tokens per request.
    pub output_tokens: u32,
    /// Poisson arrival rate, requests per second.
    pub rate: f64,
    /// Random seed.
    pub seed: u64,
}

impl Default for SharedPrefixParams {
    fn default() -> Self {
        SharedPrefixParams {
            groups: 150,
            users_per_group: 5,
            questions_per_user: 2,
            system_tokens: 6_000,
            question_tokens: 1_200,
            output_tokens: 1_000,
            rate: 10.0,
            seed: 0,
        }
    }
}

/// Shared-prefix groups: every request is `system(group) + question(unique)`; requests
/// arrive as a Poisson process, each from a uniformly drawn (group, user) that still has
/// questions left.
pub fn shared_prefix(p: &SharedPrefixParams) -> Workload {
    let mut rng = SplitMix64::new(p.seed ^ 0x5a4e);
    let mut pending: Vec<(usize, usize, usize)> = Vec::new();
    for g in 0..p.groups {
        for u in 0..p.users_per_group {
            for q in 0..p.questions_per_user {
                pending.push((g, u, q));
            }
        }
    }
    for i in (1..pending.len()).rev() {
        pending.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let sessions: Vec<Arc<str>> = (0..p.groups * p.users_per_group)
        .map(|i| Arc::from(format!("10.2.{}.{}", i / 250, i % 250 + 1)))
        .collect();
    let mut t = 0.0;
    let reqs = pending
        .into_iter()
        .map(|(g, u, q)| {
            t += exp(&mut rng, 1.0 / p.rate);
            let user = (g * p.users_per_group + u) as u64;
            SimRequest {
                id: 0,
                arrival_s: t,
                prompt: Arc::from(vec![
                    Segment { seed: content(p.seed, 3, g as u64, 0), len: p.system_tokens },
                    Segment { seed: content(p.seed, 4, user, q as u64), len: p.question_tokens },
                ]),
                output: Segment { seed: content(p.seed, 5, user, q as u64), len: p.output_tokens },
                session: Some(sessions[user as usize].clone()),
            }
        })
        .collect();
    finish("shared-prefix", serde_json::to_value(p).unwrap_or_default(), reqs)
}

/// Parameters of the multi-turn chat workload.
#[derive(Clone, Debug, Serialize)]
pub struct ChatParams {
    /// Conversations (one client each).
    pub conversations: usize,
    /// Turns per conversation.
    pub turns: usize,
    /// Shared system prompt tokens (one for the whole service).
    pub system_tokens: u32,
    /// Tokens of each user message.
    pub user_tokens: u32,
    /// Tokens of each answer.
    pub output_tokens: u32,
    /// Poisson rate of new conversations, per second.
    pub conversation_rate: f64,
    /// Mean seconds between a turn's arrival and the next turn's (reading + typing).
    pub mean_think_s: f64,
    /// Share of clients behind one shared NAT address (one session key for all of them).
    pub nat_share: f64,
    /// Random seed.
    pub seed: u64,
}

impl Default for ChatParams {
    fn default() -> Self {
        ChatParams {
            conversations: 400,
            turns: 6,
            system_tokens: 500,
            user_tokens: 150,
            output_tokens: 250,
            conversation_rate: 2.0,
            mean_think_s: 30.0,
            nat_share: 0.3,
            seed: 0,
        }
    }
}

/// Multi-turn chat: turn `k`'s prompt is the system prompt, then every earlier user
/// message and answer, then the new user message; its output is the next answer.
pub fn chat(p: &ChatParams) -> Workload {
    let mut rng = SplitMix64::new(p.seed ^ 0xc4a7);
    let nat: Arc<str> = Arc::from("192.0.2.1");
    let system = Segment { seed: content(p.seed, 6, 0, 0), len: p.system_tokens };
    let mut reqs = Vec::with_capacity(p.conversations * p.turns);
    let mut start = 0.0;
    for c in 0..p.conversations {
        start += exp(&mut rng, 1.0 / p.conversation_rate);
        let session = if rng.next_f64() < p.nat_share {
            nat.clone()
        } else {
            Arc::from(format!("10.3.{}.{}", c / 250, c % 250 + 1))
        };
        let mut history = vec![system];
        let mut t = start;
        for k in 0..p.turns {
            history
                .push(Segment { seed: content(p.seed, 7, c as u64, k as u64), len: p.user_tokens });
            let output =
                Segment { seed: content(p.seed, 8, c as u64, k as u64), len: p.output_tokens };
            reqs.push(SimRequest {
                id: 0,
                arrival_s: t,
                prompt: Arc::from(history.clone()),
                output,
                session: Some(session.clone()),
            });
            history.push(output);
            t += exp(&mut rng, p.mean_think_s);
        }
    }
    finish("chat", serde_json::to_value(p).unwrap_or_default(), reqs)
}

/// Options for replaying a Mooncake trace.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TraceOptions {
    /// Round each prompt up to whole 512-token blocks (the partial last block becomes a
    /// full one), so that with `block_size` 512 the simulator's blocks are exactly the
    /// trace's `hash_ids`. Off by default (prompts keep their recorded length).
    pub pad_partial_blocks: bool,
    /// Random seed (for the synthetic output tokens).
    pub seed: u64,
}

/// A Mooncake trace as a workload: hash id `h` stands for 512 synthetic tokens drawn from
/// `h` (so equal ids give equal tokens and, chained, equal block keys at any block size
/// dividing 512); the partial last block is the first tokens of its id's 512. Arrival at
/// the recorded timestamp. Requests carry no session key.
pub fn from_mooncake(name: &str, trace: &[MooncakeRequest], opt: &TraceOptions) -> Workload {
    let reqs = trace
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let n = r.hash_ids.len();
            let prompt: Vec<Segment> = r
                .hash_ids
                .iter()
                .enumerate()
                .map(|(j, &h)| {
                    let full = MOONCAKE_BLOCK_TOKENS as u32;
                    let len = if j + 1 < n || opt.pad_partial_blocks {
                        full
                    } else {
                        r.input_length - (n as u32 - 1) * full
                    };
                    Segment { seed: content(0, 9, h, 0), len }
                })
                .collect();
            SimRequest {
                id: 0,
                arrival_s: r.timestamp_ms as f64 / 1000.0,
                prompt: Arc::from(prompt),
                output: Segment { seed: content(opt.seed, 10, i as u64, 0), len: r.output_length },
                session: None,
            }
        })
        .collect();
    finish(name, serde_json::to_value(opt).unwrap_or_default(), reqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_segments_give_equal_tokens_and_different_ones_differ() {
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        Segment { seed: 7, len: 40 }.write(&mut a);
        Segment { seed: 7, len: 20 }.write(&mut b);
        Segment { seed: 8, len: 40 }.write(&mut c);
        assert_eq!(&a[..20], &b[..]);
        assert_ne!(a, c);
        assert!(a.iter().all(|&t| (t as u64) < VOCAB));
    }

    #[test]
    fn token_ranges_cut_the_whole_sequence() {
        let w = chat(&ChatParams { conversations: 1, turns: 2, ..ChatParams::default() });
        let r = &w.requests[1];
        let mut all = Vec::new();
        r.all_tokens(&mut all);
        let mut part = Vec::new();
        for (a, b) in [(0, 16), (490, 530), (640, all.len()), (all.len() - 3, all.len() + 9)] {
            r.tokens_range(a, b, &mut part);
            assert_eq!(part, all[a..b.min(all.len())], "{a}..{b}");
        }
        r.tokens_range(5, 5, &mut part);
        assert!(part.is_empty());
    }

    #[test]
    fn chat_turns_extend_the_previous_context() {
        let w = chat(&ChatParams { conversations: 3, turns: 3, ..ChatParams::default() });
        assert_eq!(w.requests.len(), 9);
        // Find two consecutive turns of one conversation: the later prompt starts with
        // the earlier prompt followed by its output.
        let mut found = 0;
        for a in &w.requests {
            for b in &w.requests {
                if b.prompt.len() == a.prompt.len() + 2
                    && b.prompt[..a.prompt.len()] == a.prompt[..]
                {
                    assert_eq!(b.prompt[a.prompt.len()], a.output);
                    assert!(b.arrival_s > a.arrival_s);
                    found += 1;
                }
            }
        }
        assert_eq!(found, 6);
    }

    #[test]
    fn shared_prefix_groups_share_exactly_the_system_prompt() {
        let w = shared_prefix(&SharedPrefixParams {
            groups: 3,
            users_per_group: 2,
            questions_per_user: 2,
            ..SharedPrefixParams::default()
        });
        assert_eq!(w.requests.len(), 12);
        let systems: std::collections::HashSet<u64> =
            w.requests.iter().map(|r| r.prompt[0].seed).collect();
        let questions: std::collections::HashSet<u64> =
            w.requests.iter().map(|r| r.prompt[1].seed).collect();
        assert_eq!((systems.len(), questions.len()), (3, 12));
        assert!(w.requests.windows(2).all(|p| p[0].arrival_s <= p[1].arrival_s));
    }
}
