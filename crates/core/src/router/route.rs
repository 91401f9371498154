//! The request path: hashing a prompt and choosing a worker for it.

use super::{wall_ms, CandidateScore, Decision, Mode, Request, Router};
use crate::error::{Error, Result};
use crate::hash::RequestExtras;
use crate::index::{MatchOptions, Matches, PrefixIndex};
use crate::rng::{splitmix64, SplitMix64};
use crate::score::{Candidate, LoraSet, RequestInfo, ScoreContext, ScoreScratch};
use crate::types::{BlockKey, WorkerKey};
use std::cell::RefCell;
use std::sync::atomic::Ordering;

#[derive(Default)]
struct Scratch {
    keys: Vec<BlockKey>,
    matches: Matches,
    cands: Vec<Candidate>,
    score: ScoreScratch,
    spare: Spare,
}

/// The heap buffers of the last decision dropped on this thread (see `impl Drop for
/// Decision`), for the thread's next route to fill instead of allocating its own.
#[derive(Default)]
struct Spare {
    keys: Vec<BlockKey>,
    candidates: Vec<CandidateScore>,
    scores: Vec<f64>,
    name: String,
}

/// Keeps a dropped decision's buffers for the thread's next route (one decision's worth
/// per thread: what was kept before is freed). Never panics: in a thread's teardown, or
/// when a decision is dropped during a route on the same thread, the buffers are freed.
pub(super) fn keep_buffers(
    keys: Vec<BlockKey>,
    candidates: Vec<CandidateScore>,
    scores: Vec<f64>,
    name: String,
) {
    let _ = SCRATCH.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            let spare = &mut s.spare;
            if keys.capacity() > 0 {
                spare.keys = keys;
            }
            if candidates.capacity() > 0 {
                spare.candidates = candidates;
            }
            if scores.capacity() > 0 {
                spare.scores = scores;
            }
            if name.capacity() > 0 {
                spare.name = name;
            }
        }
    });
}

/// Attempts at the index read lock before a route blocks (see `Router::read_index`).
const READ_SPINS: u32 = 4096;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Appends the first `n` cells of `R` scorer-major rows to `out`, candidate-major.
fn transpose<const R: usize>(by_row: &[&[f64]; 8], n: usize, out: &mut Vec<f64>) {
    let rows: [&[f64]; R] = std::array::from_fn(|j| &by_row[j][..n]);
    let start = out.len();
    // Written straight into the spare capacity: a `resize` first zero-filled the whole
    // matrix (3 kB for 64 candidates and six rows), every route, only to overwrite it.
    out.reserve(n * R);
    let cells = &mut out.spare_capacity_mut()[..n * R];
    for (k, cell) in cells.chunks_exact_mut(R).enumerate() {
        for (c, r) in cell.iter_mut().zip(&rows) {
            c.write(r[k]);
        }
    }
    // SAFETY: the `n * R` cells after `start` are within the capacity reserved above and
    // were all written by the loop (`chunks_exact_mut(R)` over `n * R` cells: `n` chunks
    // of `R`, each cell of each chunk written once).
    unsafe { out.set_len(start + n * R) };
}

impl Router {
    /// The block keys the router uses for `tokens` (full blocks only).
    pub fn block_keys(&self, tokens: &[u32], extras: Option<&RequestExtras>) -> Result<Vec<u64>> {
        self.check_tokens(tokens)?;
        let mut out = Vec::new();
        self.hash_into(tokens, None, extras, &mut out);
        Ok(out)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some(v) = self.cfg.vocab_size {
            if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t >= v) {
                return Err(Error::invalid(format!(
                    "token id {t} at position {i} is outside the vocabulary (size {v})"
                )));
            }
        }
        Ok(())
    }

    fn hash_into(
        &self,
        tokens: &[u32],
        lora: Option<&str>,
        extras: Option<&RequestExtras>,
        out: &mut Vec<u64>,
    ) {
        static NONE: std::sync::OnceLock<RequestExtras> = std::sync::OnceLock::new();
        match (extras, lora) {
            (Some(e), _) => self.hasher.block_keys(tokens, e, out),
            (None, Some(name)) => {
                self.hasher.block_keys(tokens, &RequestExtras::with_lora(name, None), out)
            }
            (None, None) => {
                self.hasher.block_keys(tokens, NONE.get_or_init(RequestExtras::default), out)
            }
        }
    }

    /// Chooses a worker for `req`. See the [module documentation](crate::router).
    pub fn route(&self, req: &Request) -> Result<Decision> {
        self.route_impl(req, true)
    }

    /// The decision [`route`](Self::route) would make for `req` now, without changing
    /// any state: no request id is taken, no session is recorded, no counter moves. A
    /// dry run for explanations; its decision must not be passed to the lifecycle calls.
    pub fn preview(&self, req: &Request) -> Result<Decision> {
        self.route_impl(req, false)
    }

    fn route_impl(&self, req: &Request, commit: bool) -> Result<Decision> {
        self.check_tokens(req.tokens)?;
        let now = req.now_ms.unwrap_or_else(wall_ms);
        // (A read first: routes in the same millisecond do not write the line.)
        if commit && now > self.latest_route_ms.load(Ordering::Relaxed) {
            self.latest_route_ms.fetch_max(now, Ordering::Relaxed);
        }
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let s = &mut *s;
            let need_prefix = self.profile.needs_prefix();
            let predictions = self.predictions_on();
            let keep_keys = self.cfg.mode != Mode::Precise || predictions;
            if need_prefix || keep_keys {
                if s.keys.capacity() == 0 {
                    // The last decision took the scratch's keys: hash into a dropped
                    // decision's vector if there is one (`hash_into` clears it first).
                    std::mem::swap(&mut s.keys, &mut s.spare.keys);
                }
                self.hash_into(req.tokens, req.lora, req.extras, &mut s.keys);
            } else {
                s.keys.clear();
            }
            let total_blocks = (req.tokens.len() / self.cfg.block_size) as u32;
            if need_prefix && !s.keys.is_empty() {
                self.read_index().find_matches(&s.keys, MatchOptions::default(), &mut s.matches);
            } else {
                s.matches = Matches::new();
            }
            let reg = self.registry.read();
            // Predicted residency: extend each worker's match over its predicted blocks.
            let overlay = if predictions && !s.keys.is_empty() {
                Some(self.overlay.read()).filter(|o| !o.is_empty())
            } else {
                None
            };
            let mean = f64::from_bits(self.mean_uncached.load(Ordering::Relaxed));
            let pool_rate = f64::from_bits(self.pool_rate_bits.load(Ordering::Relaxed));
            s.cands.clear();
            // Live workers come in id order and overlaps are sorted by id: merge them.
            let overlaps = s.matches.overlaps();
            let mut j = 0;
            for w in reg.live() {
                while j < overlaps.len() && overlaps[j].worker < w.id {
                    j += 1;
                }
                let m = overlaps.get(j).filter(|o| o.worker == w.id);
                let last = w.last_routed_ms.load(Ordering::Relaxed);
                let usage = if self.cfg.mode == Mode::Precise {
                    None
                } else {
                    w.model.try_lock().and_then(|m| m.as_ref().map(|m| m.pool.usage()))
                };
                s.cands.push(Candidate {
                    worker: w.id,
                    matched_blocks: m.map_or(0, |o| o.blocks),
                    matched_by_tier: m.map_or([0; 3], |o| o.by_tier),
                    load: w.load(usage, mean, pool_rate, now),
                    loaded_loras: if req.lora.is_some() { *w.loras.read() } else { LoraSet::new() },
                    last_routed_ms: (last != u64::MAX).then_some(last),
                    healthy: w.healthy.load(Ordering::Relaxed)
                        && !w.draining.load(Ordering::Relaxed),
                });
            }
            // Predicted residency: extend each worker's match over its predicted blocks.
            // A pass of its own: the lookups (one likely cache miss each) are independent
            // across workers, and a tight loop lets the CPU overlap them.
            if let Some(o) = &overlay {
                // Most workers' matches end at the same few lengths and the block after
                // is rarely predicted anywhere: one probe per distinct length decides
                // whether a worker's probe can find anything at all.
                let mut memo = (usize::MAX, false);
                for (c, w) in s.cands.iter_mut().zip(reg.live()) {
                    let m = c.matched_blocks as usize;
                    let Some(&next) = s.keys.get(m) else { continue };
                    if memo.0 != m {
                        memo = (m, o.predicted_anywhere(next));
                    }
                    if !memo.1 {
                        continue;
                    }
                    let ttl = w.pred_ttl_ms.load(Ordering::Relaxed);
                    c.matched_blocks =
                        o.extend(w.id.0, &s.keys, c.matched_blocks as usize, now, ttl) as u32;
                }
            }
            drop(overlay);
            if s.cands.is_empty() {
                return Err(Error::NoWorkers("no workers are registered".into()));
            }
            let (shared_blocks, shared_share) = if predictions && !s.keys.is_empty() {
                self.popular.shared_prefix(&s.keys, s.cands.len())
            } else {
                (0, 0.0)
            };
            let info = RequestInfo {
                prompt_tokens: req.tokens.len() as u32,
                total_blocks,
                session: req.session,
                lora: req.lora,
                now_ms: now,
                shared_blocks,
                shared_share,
                tail_ttft_s: self.tail.value_s(),
            };
            let request_id = if commit {
                self.next_request.fetch_add(1, Ordering::Relaxed)
            } else {
                self.next_request.load(Ordering::Relaxed)
            };
            let mut rng = SplitMix64::new(splitmix64(self.cfg.seed ^ splitmix64(request_id)));
            let decision = {
                let ctx = ScoreContext::new(&self.sessions);
                self.profile.decide(&info, &s.cands, &ctx, &mut rng, &mut s.score)?
            };
            let chosen = reg.slots[decision.worker.index()]
                .as_ref()
                .ok_or_else(|| Error::Internal("chosen worker vanished".into()))?;
            // The explanation: one Copy entry per kept candidate and one flat score matrix,
            // so a decision costs two allocations however many workers there are (none
            // when the thread's last decision was dropped: it left its buffers behind).
            let (kept, totals, rows) = (s.score.kept(), s.score.totals(), s.score.n_rows());
            // (Into a dropped decision's vector if there is one: no allocation.)
            let mut candidates = std::mem::take(&mut s.spare.candidates);
            candidates.clear();
            candidates.extend(kept.iter().zip(totals).map(|(&ci, &total)| {
                let c = &s.cands[ci];
                CandidateScore {
                    worker_id: c.worker,
                    matched_blocks: c.matched_blocks,
                    matched_by_tier: c.matched_by_tier,
                    total,
                }
            }));
            // The rows are scorer-major, the decision's matrix candidate-major.
            // (Written in order, row slices taken once: a strided write per scorer cost
            // more than the whole copy.)
            let mut scores = std::mem::take(&mut s.spare.scores);
            scores.clear();
            scores.reserve(kept.len() * rows);
            let by_row: [&[f64]; 8] = std::array::from_fn(|j| s.score.row(j));
            // A fixed row count per call (the policies have 1 to 8 rows): the inner loop
            // unrolls and the bounds checks go, where a loop over `rows` cost about 10
            // instructions a cell.
            let n = kept.len();
            match rows {
                1 => transpose::<1>(&by_row, n, &mut scores),
                2 => transpose::<2>(&by_row, n, &mut scores),
                3 => transpose::<3>(&by_row, n, &mut scores),
                4 => transpose::<4>(&by_row, n, &mut scores),
                5 => transpose::<5>(&by_row, n, &mut scores),
                6 => transpose::<6>(&by_row, n, &mut scores),
                7 => transpose::<7>(&by_row, n, &mut scores),
                8 => transpose::<8>(&by_row, n, &mut scores),
                _ => {}
            }
            if rows > by_row.len() {
                scores.resize(kept.len() * rows, 0.0);
                for j in 0..rows {
                    for (cell, &v) in scores[j..].iter_mut().step_by(rows).zip(s.score.row(j)) {
                        *cell = v;
                    }
                }
            }
            let matched = s.cands[decision.index].matched_blocks;
            // The chosen worker's key, its name written into a dropped decision's buffer
            // if there is one. (Exhaustive: a new field of `WorkerKey` must be set here.)
            let worker = {
                let WorkerKey { name, dp_rank } = &chosen.key;
                let mut buf = std::mem::take(&mut s.spare.name);
                buf.clone_from(name);
                WorkerKey { name: buf, dp_rank: *dp_rank }
            };
            if commit {
                chosen.decisions.fetch_add(1, Ordering::Relaxed);
                chosen.last_routed_ms.store(now, Ordering::Relaxed);
                let hit_tokens = u64::from(matched) * self.cfg.block_size as u64;
                chosen.hit_tokens.fetch_add(hit_tokens, Ordering::Relaxed);
                self.metrics.record_route(info.prompt_tokens, hit_tokens);
                if let Some(key) = req.session {
                    self.sessions.record(key, chosen.id, now);
                }
            }
            Ok(Decision {
                request_id,
                worker,
                worker_id: chosen.id,
                matched_blocks: matched,
                total_blocks,
                prompt_tokens: info.prompt_tokens,
                routed_ms: now,
                candidates,
                // Moved, not copied: the next route hashes into the vector of a decision
                // dropped since, or a fresh one (one allocation, no copy of the keys).
                keys: if keep_keys { std::mem::take(&mut s.keys) } else { Vec::new() },
                names: reg.names.clone(),
                score_names: self.score_names.clone(),
                scores,
            })
        })
    }

    /// The index read lock for the request path. Event batches hold the write lock for at
    /// most [`APPLY_CHUNK`](super::APPLY_CHUNK) blocks (about 10 microseconds), so spinning that long
    /// is cheaper than parking the thread, whose wake-up alone costs tens of microseconds
    /// on a virtual machine. Past the spin budget it blocks like any reader.
    fn read_index(&self) -> parking_lot::RwLockReadGuard<'_, PrefixIndex> {
        for i in 0..READ_SPINS {
            if let Some(g) = self.index.try_read() {
                return g;
            }
            if i % 64 == 63 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        self.index.read()
    }
}
