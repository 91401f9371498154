//! Per-decision trace of router policies: where does each policy lose prompt blocks
//! against the ceiling? A diagnostic tool (docs/simulation.md, "Why kvroute missed hits on
//! the Mooncake trace"), not part of the CLI.
//!
//! ```text
//! cargo run --release -p kvroute-sim --example decisions -- \
//!     trace:testdata/mooncake/conversation_trace.jsonl 10 187501 [REQUESTS] [POLICIES] [REPLICAS]
//! ```
//!
//! For every request it compares, in blocks of the prompt (simulator keys, from the
//! workers' events as the router receives them):
//!
//! - `ever`: the longest prefix that was ever cached anywhere (the oracle's view);
//! - `best`: the longest prefix cached on some worker at routing time;
//! - `chosen`: the prefix cached on the chosen worker at routing time;
//! - `admitted`: what the engine found cached when it admitted the request (the hit).
//!
//! `ever - best` is lost to eviction (the cluster no longer holds it), `best - chosen` to
//! the routing decision (a *move*), `chosen - admitted` between routing and admission (the
//! blocks were evicted while the request queued; negative when blocks the router predicted
//! were computed meanwhile). Moves are split by what the router believed (its own matched
//! blocks, events plus predictions) and by the guard row of its decision.

mod common;

use hashbrown::{HashMap, HashSet};
use kvroute::Result;
use kvroute_sim::{CacheEvent, ClusterView, Policy, Routed, RouterPolicy, SimRequest};
use std::sync::{Arc, Mutex};

#[derive(Default, Clone, Debug)]
struct Totals {
    requests: u64,
    blocks: u64,
    ever: u64,
    best: u64,
    chosen: u64,
    /// Moves where the router saw the chosen worker's match as the largest (its view was
    /// wrong or stale).
    moves_unseen: (u64, u64),
    /// Moves the guard made (chosen candidate differs from the cheapest, guard row set).
    moves_guard: (u64, u64),
    /// Other moves the router knew about: the cost preferred a shorter match.
    moves_cost: (u64, u64),
    /// Of the cost moves: blocks lost where the chosen worker's match was 0.
    cost_to_cold: (u64, u64),
}

struct Tracer {
    inner: RouterPolicy,
    ever: HashSet<u64>,
    cached: Vec<HashSet<u64>>,
    t: Arc<Mutex<Totals>>,
    per_worker_blocks: Vec<u64>,
    stored: Vec<u64>,
    removed: Vec<u64>,
    dump: Option<Arc<Mutex<Vec<String>>>>,
    /// Per request: (routed at, predicted ttft_s, predicted queue_s) of the chosen worker.
    predicted: HashMap<u64, (f64, f64, f64)>,
    /// Calibration bins by predicted queue_s: (count, sum predicted ttft, sum actual ttft).
    calib: Vec<(u64, f64, f64)>,
    /// Per request (DECISIONS_REQS): the line written at routing, completed at first token.
    reqs: Option<(HashMap<u64, String>, Vec<String>)>,
    /// Per worker, requests routed there without a first token yet.
    in_flight: Vec<HashSet<u64>>,
    /// First-token time of every request.
    first_token: HashMap<u64, f64>,
    /// Cost moves away from a history holder: what the holder would have delivered.
    moves: Vec<MoveRec>,
    /// The engine's prefill rate and step overhead (to price the holder's own prefill).
    engine_rate: f64,
}

/// One cost move: the holder's prediction against what its queue actually did.
#[derive(Clone, Debug)]
struct MoveRec {
    req: u64,
    at: f64,
    holder: usize,
    /// Predicted (ttft_s, queue_s) at the holder, and the router's tail.
    holder_pred: (f64, f64),
    tail: f64,
    /// Uncached tokens of the request at the holder (router's view) and at the chosen.
    holder_uncached: f64,
    chosen_uncached: f64,
    /// Predicted ttft_s at the chosen worker.
    chosen_pred: f64,
    /// Requests in flight on the holder at the move.
    ahead: Vec<u64>,
    lost: u64,
    prompt_tokens: usize,
}

const BINS: [f64; 6] = [0.0, 0.25, 1.0, 3.0, 6.0, 12.0];

fn prefix(keys: &[u64], set: &HashSet<u64>) -> u64 {
    keys.iter().take_while(|k| set.contains(*k)).count() as u64
}

impl Policy for Tracer {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn wants_events(&self) -> bool {
        true
    }
    fn route(&mut self, r: &Routed<'_>, view: &ClusterView<'_>) -> Result<usize> {
        let w = self.inner.route(r, view)?;
        self.in_flight[w].insert(r.req.id);
        let keys = r.prompt_keys;
        let ever = prefix(keys, &self.ever);
        let per: Vec<u64> = self.cached.iter().map(|c| prefix(keys, c)).collect();
        let best = per.iter().copied().max().unwrap_or(0);
        let chosen = per[w];
        if let Some((_, d)) = self.inner.last_decision() {
            let names = d.score_names();
            let ti = names.iter().position(|n| n.ends_with("ttft_s"));
            let qi = names.iter().position(|n| n.ends_with("queue_s"));
            let pos = d.candidates.iter().position(|c| c.worker_id.index() == w);
            if let Some(pos) = pos {
                let s = d.candidate_scores(pos);
                // NaN: the policy predicts no TTFT (not in the calibration).
                let (pt, pq) = (ti.map_or(f64::NAN, |i| s[i]), qi.map_or(f64::NAN, |i| s[i]));
                self.predicted.insert(r.req.id, (view.now_s, pt, pq));
                if let Some((open, _)) = &mut self.reqs {
                    let ai = names.iter().position(|n| n.ends_with("active"));
                    let truth: Vec<String> = view
                        .workers
                        .iter()
                        .map(|v| format!("{}/{}/{}", v.waiting, v.running, v.waiting_prompt_tokens))
                        .collect();
                    let cands: Vec<String> = (0..d.candidates.len())
                        .map(|i| {
                            let c = &d.candidates[i];
                            let s = d.candidate_scores(i);
                            format!(
                                "w{}:m{}:tm{}:q{:.2}:c{:.2}:a{}",
                                c.worker_id.index(),
                                c.matched_blocks,
                                per[c.worker_id.index()],
                                qi.map_or(f64::NAN, |i| s[i]),
                                names
                                    .iter()
                                    .position(|n| n.ends_with("cost_s"))
                                    .map_or(0.0, |q| s[q]),
                                ai.map_or(0.0, |q| s[q])
                            )
                        })
                        .collect();
                    let (rep, _) = self.inner.last_decision().unwrap();
                    open.insert(
                        r.req.id,
                        format!(
                            "id={} t={:.3} rep={rep} w={w} predttft={:.3} predq={:.3} true=[{}] cands=[{}]",
                            r.req.id,
                            view.now_s,
                            pt,
                            pq,
                            truth.join(" "),
                            cands.join(" ")
                        ),
                    );
                }
            }
        }
        let mut t = self.t.lock().unwrap();
        t.requests += 1;
        t.blocks += keys.len() as u64;
        t.ever += ever;
        t.best += best;
        t.chosen += chosen;
        if chosen < best {
            let lost = best - chosen;
            let (_, d) = self.inner.last_decision().expect("a decision");
            let names = d.score_names();
            let gi = names.iter().position(|n| n.ends_with("guard"));
            let ci = names.iter().position(|n| n.ends_with("cost_s"));
            let pos = d.candidates.iter().position(|c| c.worker_id.index() == w).unwrap();
            let rmax = d.candidates.iter().map(|c| c.matched_blocks).max().unwrap_or(0);
            let mut is_cost = false;
            let bucket = if d.candidates[pos].matched_blocks >= rmax {
                &mut t.moves_unseen
            } else {
                // The cheapest candidate (lowest cost_s) guarded: a guard move.
                let cheapest = ci.map(|ci| {
                    (0..d.candidates.len())
                        .min_by(|&a, &b| {
                            d.candidate_scores(a)[ci].total_cmp(&d.candidate_scores(b)[ci])
                        })
                        .unwrap()
                });
                let guarded = match (gi, cheapest) {
                    (Some(gi), Some(k)) => k != pos && d.candidate_scores(k)[gi] != 0.0,
                    _ => false,
                };
                if guarded {
                    &mut t.moves_guard
                } else {
                    is_cost = true;
                    if chosen == 0 {
                        t.cost_to_cold.0 += 1;
                        t.cost_to_cold.1 += lost;
                    }
                    &mut t.moves_cost
                }
            };
            bucket.0 += 1;
            bucket.1 += lost;
            let ti = names.iter().position(|n| n.ends_with("ttft_s"));
            let qi = names.iter().position(|n| n.ends_with("queue_s"));
            if let (true, Some(ti), Some(qi), Some(ci)) = (is_cost, ti, qi, ci) {
                // The holder: the cheapest candidate among those with the longest match.
                let hk = (0..d.candidates.len())
                    .filter(|&k| d.candidates[k].matched_blocks == rmax)
                    .min_by(|&a, &b| {
                        d.candidate_scores(a)[ci].total_cmp(&d.candidate_scores(b)[ci])
                    })
                    .unwrap();
                let hs = d.candidate_scores(hk);
                let holder = d.candidates[hk].worker_id.index();
                let bs = 16.0;
                let pt = r.prompt_len as f64;
                let unc = |m: u32| pt - (f64::from(m) * bs).min(pt - 1.0);
                self.moves.push(MoveRec {
                    req: r.req.id,
                    at: view.now_s,
                    holder,
                    holder_pred: (hs[ti], hs[qi]),
                    tail: 0.0,
                    holder_uncached: unc(rmax),
                    chosen_uncached: unc(d.candidates[pos].matched_blocks),
                    chosen_pred: d.candidate_scores(pos)[ti],
                    ahead: self.in_flight[holder].iter().copied().collect(),
                    lost,
                    prompt_tokens: r.prompt_len,
                });
            }
            if let Some(dump) = &self.dump {
                let rows: Vec<String> = (0..d.candidates.len())
                    .map(|i| {
                        let c = &d.candidates[i];
                        let s: Vec<String> =
                            d.candidate_scores(i).iter().map(|x| format!("{x:.3}")).collect();
                        format!(
                            "w{}:true{}/rt{}[{}]",
                            c.worker_id.index(),
                            per[c.worker_id.index()],
                            c.matched_blocks,
                            s.join(",")
                        )
                    })
                    .collect();
                dump.lock().unwrap().push(format!(
                    "t={:.3} req={} blocks={} ever={ever} best={best} chose=w{w}:{chosen} {}",
                    view.now_s,
                    r.req.id,
                    keys.len(),
                    rows.join(" ")
                ));
            }
        }
        self.per_worker_blocks[w] += keys.len() as u64;
        Ok(w)
    }
    fn on_events(
        &mut self,
        worker: usize,
        evs: &[CacheEvent],
        reqs: &[SimRequest],
        now_s: f64,
    ) -> Result<()> {
        for ev in evs {
            match ev {
                CacheEvent::Stored { keys, .. } => {
                    self.stored[worker] += keys.len() as u64;
                    for &k in keys {
                        self.ever.insert(k);
                        self.cached[worker].insert(k);
                    }
                }
                CacheEvent::Removed { key } => {
                    self.removed[worker] += 1;
                    self.cached[worker].remove(key);
                }
                CacheEvent::Cleared => self.cached[worker].clear(),
            }
        }
        self.inner.on_events(worker, evs, reqs, now_s)
    }
    fn on_first_token(&mut self, w: usize, req: &SimRequest, now_s: f64) -> Result<()> {
        if let Some((open, done)) = &mut self.reqs {
            if let (Some(line), Some((at, _, _))) =
                (open.remove(&req.id), self.predicted.get(&req.id))
            {
                done.push(format!("actual={:.3} {line}", now_s - at));
            }
        }
        self.in_flight[w].remove(&req.id);
        self.first_token.insert(req.id, now_s);
        if let Some((at, ttft, q)) = self.predicted.remove(&req.id).filter(|p| !p.1.is_nan()) {
            let b = BINS.iter().rposition(|&x| q >= x).unwrap_or(0);
            let c = &mut self.calib[b];
            c.0 += 1;
            c.1 += ttft;
            c.2 += now_s - at;
        }
        self.inner.on_first_token(w, req, now_s)
    }
    fn on_finished(&mut self, w: usize, req: &SimRequest, now_s: f64) -> Result<()> {
        self.in_flight[w].remove(&req.id);
        self.inner.on_finished(w, req, now_s)
    }
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (workload, spec) = common::spec_from_args(&a);
    let policies: Vec<String> =
        a.get(4).map_or("kvroute,llm-d", String::as_str).split(',').map(String::from).collect();
    let replicas: usize = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(1);
    let dump_path = std::env::var("DECISIONS_DUMP").ok();
    let (prepared, mut cfg) = spec.prepare(&workload)?;
    // DECISIONS_SEED=N: another seed for the routers' random streams (near-ties), to see
    // how much of a difference between two variants is the noise of a few decisions.
    if let Some(seed) = std::env::var("DECISIONS_SEED").ok().and_then(|s| s.parse().ok()) {
        cfg.seed = seed;
    }
    // DECISIONS_TAIL_Q=0.9: the kvroute profile's tail_quantile (default 0.99).
    let tail_q: Option<f64> = std::env::var("DECISIONS_TAIL_Q").ok().and_then(|s| s.parse().ok());
    let oracle = kvroute_sim::run_oracle(&prepared, &cfg)?;
    println!("oracle hit {:.2}%", 100.0 * oracle.hit_rate);
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = policies
            .iter()
            .map(|name| {
                let (prepared, cfg, dump_path) = (&prepared, &cfg, &dump_path);
                s.spawn(move || -> Result<_> {
                    let inner = RouterPolicy::named(name, cfg.workers, &cfg.engine, cfg.seed)?
                        .with_tail_quantile(tail_q)?
                        .with_replicas(replicas)?;
                    let t = Arc::new(Mutex::new(Totals::default()));
                    let dump = dump_path.as_ref().map(|_| Arc::new(Mutex::new(Vec::new())));
                    let mut tr = Tracer {
                        inner,
                        ever: HashSet::new(),
                        cached: vec![HashSet::new(); cfg.workers],
                        t: t.clone(),
                        per_worker_blocks: vec![0; cfg.workers],
                        stored: vec![0; cfg.workers],
                        removed: vec![0; cfg.workers],
                        dump: dump.clone(),
                        predicted: HashMap::new(),
                        calib: vec![(0, 0.0, 0.0); BINS.len()],
                        reqs: std::env::var("DECISIONS_REQS")
                            .ok()
                            .map(|_| (HashMap::new(), Vec::new())),
                        in_flight: vec![HashSet::new(); cfg.workers],
                        first_token: HashMap::new(),
                        moves: Vec::new(),
                        engine_rate: cfg.engine.prefill_tokens_per_s,
                    };
                    let res = kvroute_sim::run(prepared, cfg, &mut tr)?;
                    if let (Some(p), Some(d)) = (dump_path, dump) {
                        std::fs::write(format!("{p}.{name}"), d.lock().unwrap().join("\n"))
                            .unwrap();
                    }
                    if let (Ok(p), Some((_, done))) = (std::env::var("DECISIONS_REQS"), &tr.reqs) {
                        std::fs::write(format!("{p}.{name}"), done.join("\n")).unwrap();
                    }
                    let pw = format!(
                        "{:?}\n  stored k {:?}\n  removed k {:?}",
                        tr.per_worker_blocks.iter().map(|x| x / 1000).collect::<Vec<_>>(),
                        tr.stored.iter().map(|x| x / 1000).collect::<Vec<_>>(),
                        tr.removed.iter().map(|x| x / 1000).collect::<Vec<_>>()
                    );
                    let m: Vec<Vec<u64>> = tr
                        .inner
                        .routers()
                        .iter()
                        .map(|r| {
                            r.metrics()
                                .workers
                                .iter()
                                .map(|w| w.prefill_tokens_per_s as u64)
                                .collect()
                        })
                        .collect();
                    let t = t.lock().unwrap().clone();
                    let calib: Vec<String> = BINS
                        .iter()
                        .zip(&tr.calib)
                        .map(|(b, (n, p, a))| {
                            let n1 = (*n).max(1) as f64;
                            format!("q>={b}s: n {n} pred {:.2} actual {:.2}", p / n1, a / n1)
                        })
                        .collect();
                    let mut pw = format!("{pw}\n  ttft calibration {}", calib.join(" | "));
                    // Cost moves: the holder's predicted TTFT against what its queue did
                    // (the last first token of the requests in flight there at the move,
                    // plus the request's own uncached prefill at the engine's rate), and
                    // the chosen worker's prediction against its observed TTFT.
                    if !tr.moves.is_empty() {
                        let (mut n, mut hp, mut ha, mut cp, mut ca) = (0.0, 0.0, 0.0, 0.0, 0.0);
                        let mut lines = Vec::new();
                        for m in &tr.moves {
                            let clear = m
                                .ahead
                                .iter()
                                .filter_map(|id| tr.first_token.get(id))
                                .fold(m.at, |a, &b| a.max(b));
                            let holder_actual =
                                clear - m.at + m.holder_uncached / tr.engine_rate;
                            let chosen_actual =
                                tr.first_token.get(&m.req).map_or(f64::NAN, |&f| f - m.at);
                            n += 1.0;
                            hp += m.holder_pred.0;
                            ha += holder_actual;
                            cp += m.chosen_pred;
                            ca += chosen_actual;
                            lines.push(format!(
                                "req {} t {:.1} lost {} prompt {} holder w{} pred {:.2} (q {:.2}) actual~ {:.2} ahead {} | chosen pred {:.2} actual {:.2} | uncached h {:.0} c {:.0}",
                                m.req, m.at, m.lost, m.prompt_tokens, m.holder, m.holder_pred.0,
                                m.holder_pred.1, holder_actual, m.ahead.len(), m.chosen_pred,
                                chosen_actual, m.holder_uncached, m.chosen_uncached
                            ));
                            let _ = m.tail;
                        }
                        pw = format!(
                            "{pw}\n  cost moves {n}: holder pred {:.2} actual~ {:.2} ; chosen pred {:.2} actual {:.2}",
                            hp / n, ha / n, cp / n, ca / n
                        );
                        if let Ok(p) = std::env::var("DECISIONS_MOVES") {
                            std::fs::write(format!("{p}.{name}"), lines.join("\n")).unwrap();
                        }
                    }
                    Ok((name.clone(), res, t, pw, format!("{m:?}")))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut counts: HashMap<String, ()> = HashMap::new();
    for r in results {
        let (name, res, t, pw, metrics) = r?;
        counts.insert(name.clone(), ());
        let pct = |x: u64| 100.0 * x as f64 / t.blocks as f64;
        println!(
            "\n{name}: hit {:.2}% block-hit {:.2}% ttft p90 {:.3}s top {:.1}% evictions {}",
            100.0 * res.hit_rate,
            100.0 * res.block_hit_rate,
            res.ttft_p90_s.unwrap_or(0.0),
            100.0 * res.top_worker_share,
            res.evictions
        );
        println!(
            "  blocks {} ; ever {:.2}% ; best at routing {:.2}% ; chosen {:.2}% ; admitted (block hit) {:.2}%",
            t.blocks,
            pct(t.ever),
            pct(t.best),
            pct(t.chosen),
            100.0 * res.block_hit_rate
        );
        println!(
            "  lost: evicted {:.2}% ; moves {:.2}% (unseen {} req {:.2}% ; guard {} req {:.2}% ; cost {} req {:.2}%, of which to a cold worker {} req {:.2}%)",
            pct(t.ever - t.best),
            pct(t.best - t.chosen),
            t.moves_unseen.0,
            pct(t.moves_unseen.1),
            t.moves_guard.0,
            pct(t.moves_guard.1),
            t.moves_cost.0,
            pct(t.moves_cost.1),
            t.cost_to_cold.0,
            pct(t.cost_to_cold.1),
        );
        println!("  per worker requests {:?}", res.per_worker);
        println!("  preemptions {}", res.preemptions);
        println!("  per worker prompt blocks k {pw}");
        if std::env::var("DECISIONS_METRICS").is_ok() {
            println!("  learned prefill rates per replica {metrics}");
        }
    }
    Ok(())
}
