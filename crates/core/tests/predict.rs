//! The `kvroute` preset through the router's public API: predicted residency (visible to
//! the next route, confirmed by a covering event, expired after its TTL, bounded), the
//! prefill-rate learner, never-stale load and the metrics that export them.

use kvroute::events::{BlockStored, EngineHash, KvEvent, KvEventBatch};
use kvroute::rng::SplitMix64;
use kvroute::router::{LoadReport, Request, Router, RouterConfig};

fn router(workers: &[&str], tweak: impl FnOnce(&mut RouterConfig)) -> Router {
    let mut cfg = RouterConfig::default();
    tweak(&mut cfg);
    let r = Router::new(cfg).unwrap();
    for w in workers {
        r.add_worker(w, 0).unwrap();
    }
    r
}

fn prompt(seed: u64, len: usize) -> Vec<u32> {
    let mut g = SplitMix64::new(seed);
    (0..len).map(|_| g.below(50_000) as u32).collect()
}

fn at(tokens: &[u32], now_ms: u64) -> Request<'_> {
    Request { now_ms: Some(now_ms), ..Request::new(tokens) }
}

/// The event a vLLM worker sends once it has cached `tokens`' full blocks.
fn stored(tokens: &[u32], ts: f64) -> KvEventBatch {
    let blocks = tokens.len() / 16;
    let ev = KvEvent::BlockStored(BlockStored {
        block_hashes: (0..blocks as u64).map(|i| EngineHash::Int(1_000 + i)).collect(),
        token_ids: tokens[..blocks * 16].to_vec(),
        block_size: 16,
        ..BlockStored::default()
    });
    KvEventBatch::new(ts, vec![ev])
}

#[test]
fn the_default_profile_is_kvroute() {
    let r = router(&["a"], |_| {});
    let d = r.route(&Request::new(&prompt(1, 64))).unwrap();
    assert_eq!(d.score_names(), ["ttft_s", "saved_s", "queue_s", "cost_s", "active", "guard"]);
    assert_eq!(RouterConfig::from_json("{}").unwrap(), RouterConfig::default());
}

#[test]
fn the_ttft_tail_is_the_configured_percentile_of_observed_first_tokens() {
    // 128 requests whose first tokens come 1..=128 ms after routing (in a scrambled
    // order): the tail is the nearest-rank percentile of those times, computed naively.
    let run = |tweak: &dyn Fn(&mut RouterConfig)| {
        let r = router(&["a", "b"], tweak);
        assert_eq!(r.metrics().tail_ttft_s, 0.0, "nothing observed yet");
        let mut now = 10_000u64;
        for i in 0..128u64 {
            let d = r.route(&at(&prompt(500 + i, 64), now)).unwrap();
            r.on_routed(&d).unwrap();
            let elapsed = 1 + (i * 37) % 128;
            r.on_first_token_at(d.request_id, now + elapsed).unwrap();
            r.on_finished(d.request_id).unwrap();
            now += 1_000;
        }
        r
    };
    let nearest_rank = |q: f64| (128.0 * q).ceil() / 1e3;
    let r = run(&|_| {});
    let tail = r.metrics().tail_ttft_s;
    assert!((tail - nearest_rank(0.99)).abs() < 1e-6, "default p99: {tail}");
    assert!(r.prometheus().contains(&format!("kvroute_ttft_tail_seconds {tail}")));
    let r = run(&|c| {
        c.profile = serde_json::from_str(
            r#"{"picker": {"name": "ttft", "params": {"tail_quantile": 0.5}}}"#,
        )
        .unwrap();
    });
    let tail = r.metrics().tail_ttft_s;
    assert!((tail - nearest_rank(0.5)).abs() < 1e-6, "configured p50: {tail}");
    // Out of range: a configuration error that names the field, and no router.
    for bad in ["0", "1.5", "-0.1"] {
        let json = format!(
            r#"{{"profile": {{"picker": {{"name": "ttft", "params": {{"tail_quantile": {bad}}}}}}}}}"#
        );
        let err = RouterConfig::from_json(&json).unwrap_err().to_string();
        assert!(err.contains("tail_quantile"), "{bad}: {err}");
    }
}

#[test]
fn a_prediction_is_visible_confirmed_and_expires() {
    let r = router(&["a", "b", "c"], |_| {});
    let p = prompt(7, 160); // 10 blocks
    let d1 = r.route(&at(&p, 1_000)).unwrap();
    assert_eq!(d1.matched_blocks, 0);
    r.on_routed(&d1).unwrap();
    let m = r.metrics();
    assert_eq!((m.predictions.made, m.predictions_held), (10, 10));
    // Before any event, the next request with that prefix sees it on the same worker.
    let d2 = r.route(&at(&p, 1_100)).unwrap();
    assert_eq!((d2.worker.clone(), d2.matched_blocks), (d1.worker.clone(), 10));
    // The worker's events cover the blocks 300 ms after routing: confirmed, and the index
    // now answers for them.
    r.apply_events(&d1.worker.name, &stored(&p, 1.3)).unwrap();
    let m = r.metrics();
    assert_eq!((m.predictions.confirmed, m.predictions_held), (10, 0));
    let d3 = r.route(&at(&p, 1_400)).unwrap();
    assert_eq!((d3.worker.clone(), d3.matched_blocks), (d1.worker.clone(), 10));
    // The TTL adapted to the ten observed 300 ms delays: mean + 4 mean deviations, the
    // deviation starting at half the first delay and decaying by 15/16 per observation.
    let w = m.workers.iter().find(|w| w.worker == d1.worker).unwrap();
    let want = (300.0 + 4.0 * 150.0 * (15.0f64 / 16.0).powi(9)).floor() / 1e3;
    assert!((w.prediction_ttl_s - want).abs() < 1e-9, "{} vs {want}", w.prediction_ttl_s);
    let other = m.workers.iter().find(|w| w.worker != d1.worker).unwrap();
    assert_eq!(other.prediction_ttl_s, 2.0, "the configured TTL until observations");

    // A prediction nobody confirms is gone after its TTL (0.9 s on that worker).
    let q = prompt(8, 160);
    let e1 = r.route(&at(&q, 10_000)).unwrap();
    r.on_routed(&e1).unwrap();
    let ttl_ms = (r.metrics().workers.iter().find(|w| w.worker == e1.worker).unwrap())
        .prediction_ttl_s
        * 1e3;
    let before = r.route(&at(&q, 10_000 + ttl_ms as u64)).unwrap();
    assert_eq!(before.matched_blocks, 10, "still within its TTL");
    let after = r.route(&at(&q, 10_001 + ttl_ms as u64)).unwrap();
    assert_eq!(after.matched_blocks, 0, "past its TTL");
    // Expiry is counted when the overlay next takes a prediction.
    let e2 = r.route(&at(&prompt(9, 32), 20_000)).unwrap();
    r.on_routed(&e2).unwrap();
    assert_eq!(r.metrics().predictions.expired, 10);
    // Removing a worker drops its predictions.
    r.remove_worker(&e2.worker.name, 0).unwrap();
    assert_eq!(r.metrics().predictions_held, 0);
}

#[test]
fn clearing_a_worker_drops_its_predictions_as_a_clear_event_does() {
    let r = router(&["a", "b"], |_| {});
    let p = prompt(11, 160); // 10 blocks
    let d1 = r.route(&at(&p, 1_000)).unwrap();
    r.on_routed(&d1).unwrap();
    assert_eq!(r.metrics().predictions_held, 10);
    assert_eq!(r.route(&at(&p, 1_050)).unwrap().matched_blocks, 10);
    // Nothing confirmed is in the index, so the clear frees no index entry, but the
    // predicted blocks of that worker must go: its cache is empty now.
    assert_eq!(r.clear_worker(&d1.worker.name).unwrap(), 0);
    assert_eq!(r.metrics().predictions_held, 0);
    assert_eq!(r.route(&at(&p, 1_100)).unwrap().matched_blocks, 0);
}

#[test]
fn predictions_stay_under_their_cap_under_a_flood_of_unique_prompts() {
    let r = router(&["a", "b"], |c| c.predictions.capacity = 500);
    for i in 0..2_000u64 {
        let p = prompt(100 + i, 160);
        let d = r.route(&at(&p, 1_000 + i)).unwrap();
        r.on_routed(&d).unwrap();
        assert!(r.metrics().predictions_held <= 500);
    }
    let m = r.metrics();
    assert_eq!(m.predictions.made, 20_000);
    assert!(m.predictions.dropped >= 20_000 - 500, "{:?}", m.predictions);
    // Predictions off: nothing is predicted.
    let r = router(&["a", "b"], |c| c.predictions.enabled = false);
    let p = prompt(5, 160);
    let d = r.route(&at(&p, 1)).unwrap();
    r.on_routed(&d).unwrap();
    assert_eq!(r.route(&at(&p, 2)).unwrap().matched_blocks, 0);
    assert_eq!(r.metrics().predictions.made, 0);
    // Bad prediction settings are configuration errors.
    for bad in [
        r#"{"predictions": {"capacity": 0}}"#,
        r#"{"predictions": {"ttl_s": -1}}"#,
        r#"{"predictions": {"min_ttl_s": 5, "max_ttl_s": 1}}"#,
    ] {
        assert!(Router::from_json(bad).is_err(), "{bad}");
    }
}

#[test]
fn prefill_rates_are_learned_from_lifecycle_calls() {
    // Two workers with known prefill rates and the picker's fixed 10 ms step overhead;
    // requests one at a time (no queue), first token after overhead + tokens / rate. Each
    // worker serves alone for a while (the other drained).
    let truth = [("slow", 5_000.0), ("fast", 20_000.0)];
    let r = router(&["slow", "fast"], |_| {});
    let mut now = 1_000u64;
    for (phase, (only, rate)) in truth.iter().enumerate() {
        for (name, _) in truth {
            r.drain_worker(name, 0, name != *only).unwrap();
        }
        for i in 0..200u64 {
            let p = prompt(1_000 * (phase as u64 + 1) + i, 8_000);
            let d = r.route(&at(&p, now)).unwrap();
            assert_eq!(d.worker.name, *only);
            r.on_routed(&d).unwrap();
            now += (10.0 + 8_000.0 / rate * 1e3) as u64;
            r.on_first_token_at(d.request_id, now).unwrap();
            r.on_finished(d.request_id).unwrap();
            now += 5;
        }
    }
    for (name, _) in truth {
        r.drain_worker(name, 0, false).unwrap();
    }
    let m = r.metrics();
    for (name, rate) in truth {
        let w = m.workers.iter().find(|w| w.worker.name == name).unwrap();
        assert!(w.prefill_rate_samples > 20, "{name}: {} samples", w.prefill_rate_samples);
        let err = (w.prefill_tokens_per_s - rate).abs() / rate;
        assert!(err < 0.03, "{name}: learned {} vs {rate}", w.prefill_tokens_per_s);
    }
    // With both available, a cold request goes to the faster one (lower predicted TTFT).
    let d = r.route(&at(&prompt(77, 8_000), now)).unwrap();
    assert_eq!(d.worker.name, "fast");
    // A worker not observed yet is priced at the pool's rate (every worker's observations,
    // the latest weighing most: here the last 200 were all of `fast`, so it lies between
    // the two and near 20,000), not at the configured 10,000 tokens/s, which would make
    // it look slower than the observed workers and keep it from ever being chosen and
    // observed.
    r.add_worker("new", 0).unwrap();
    let m = r.metrics();
    let w = m.workers.iter().find(|w| w.worker.name == "new").unwrap();
    assert_eq!(w.prefill_rate_samples, 0);
    let rate = w.prefill_tokens_per_s;
    assert!((15_000.0..=20_000.0).contains(&rate), "new worker priced at {rate}");
    r.remove_worker("new", 0).unwrap();
    // Exported for Prometheus.
    let prom = r.prometheus();
    assert!(prom.contains("kvroute_worker_prefill_tokens_per_second{worker=\"fast\""));
    assert!(prom.contains("kvroute_predictions_made_total "));
    // A first token on another clock (wall clock after simulated routing) teaches nothing.
    let before = r.metrics().workers[0].prefill_tokens_per_s;
    let d = r.route(&at(&prompt(3, 8_000), 5)).unwrap();
    r.on_routed(&d).unwrap();
    r.on_first_token_at(d.request_id, 5 + 7_200_000).unwrap();
    let m = r.metrics();
    let w = m.workers.iter().find(|w| w.worker == d.worker).unwrap();
    if d.worker.name == m.workers[0].worker.name {
        assert_eq!(w.prefill_tokens_per_s, before);
    }
}

#[test]
fn load_is_never_stale_between_scrapes() {
    let r = router(&["a", "b"], |_| {});
    let zero = LoadReport { waiting: Some(0), running: Some(0), ..LoadReport::default() };
    r.report_load("a", 0, &zero).unwrap();
    r.report_load("b", 0, &zero).unwrap();
    // A burst of distinct prompts inside one scrape interval alternates between the
    // workers: each route sees the ones before it.
    let mut count = [0u32; 2];
    for i in 0..10u64 {
        let d = r.route(&at(&prompt(50 + i, 1_600), 1_000)).unwrap();
        r.on_routed(&d).unwrap();
        count[(d.worker.name == "b") as usize] += 1;
    }
    assert_eq!(count, [5, 5]);
    let m = r.metrics();
    assert!(m.workers.iter().all(|w| w.active_requests == 5 && w.pending_prefill_tokens > 0));
    // A scrape resets what was counted since: the report now covers those requests.
    let seven = LoadReport { waiting: Some(7), running: Some(0), ..LoadReport::default() };
    r.report_load("a", 0, &seven).unwrap();
    let m = r.metrics();
    let a = m.workers.iter().find(|w| w.worker.name == "a").unwrap();
    assert_eq!(a.active_requests, 7);
}

#[test]
fn learned_rates_within_a_factor_two_of_the_pool_do_not_decide_placement() {
    // Two workers of the same hardware whose observed rates differ (6,000 and 8,000
    // tokens/s: work the router does not see, such as another router replica's requests,
    // slows `a`'s observations). `a` holds the first 1,600 tokens of the next prompt.
    let r = router(&["a", "b"], |_| {});
    let mut now = 1_000u64;
    let train = |only: &str, rate: f64, seed: u64, now: &mut u64| {
        for name in ["a", "b"] {
            r.drain_worker(name, 0, name != only).unwrap();
        }
        for i in 0..200u64 {
            let p = prompt(seed + i, 8_000);
            let d = r.route(&at(&p, *now)).unwrap();
            r.on_routed(&d).unwrap();
            *now += (10.0 + 8_000.0 / rate * 1e3) as u64;
            r.on_first_token_at(d.request_id, *now).unwrap();
            r.on_finished(d.request_id).unwrap();
            *now += 5;
        }
    };
    train("b", 8_000.0, 10_000, &mut now);
    train("a", 6_000.0, 20_000, &mut now);
    // The shared prefix, routed to `a` (predicted there) and served.
    let held = prompt(99, 8_000);
    let d = r.route(&at(&held, now)).unwrap();
    assert_eq!(d.worker.name, "a");
    r.on_routed(&d).unwrap();
    now += (10.0 + 8_000.0 / 6_000.0 * 1e3) as u64;
    r.on_first_token_at(d.request_id, now).unwrap();
    r.on_finished(d.request_id).unwrap();
    r.drain_worker("b", 0, false).unwrap();
    // Learned and exported per worker ...
    let m = r.metrics();
    let rate =
        |n: &str| m.workers.iter().find(|w| w.worker.name == n).unwrap().prefill_tokens_per_s;
    assert!((rate("a") - 6_000.0).abs() < 300.0 && (rate("b") - 8_000.0).abs() < 400.0);
    // ... but not used for placement: priced at their own rates, `b` would win
    // (8,000 uncached / 8,000 x 2 = 2.0 s against 6,400 / 6,000 x 2 = 2.13 s on `a`); at
    // one pool rate the 1,600 tokens `a` holds decide.
    let mut next = held[..1_600].to_vec();
    next.extend(prompt(7, 6_400));
    let d = r.route(&at(&next, now + 1)).unwrap();
    assert_eq!(d.worker.name, "a", "{:?}", d.candidates);
    assert_eq!(d.matched_blocks, 100);
}

#[test]
fn pending_prefill_adds_other_routers_waiting_requests_to_its_own_in_flight_work() {
    // Ten 800-token requests set the router's mean uncached size near 800 tokens.
    let r = router(&["a", "b"], |_| {});
    r.drain_worker("a", 0, true).unwrap();
    for i in 0..10u64 {
        let d = r.route(&at(&prompt(500 + i, 800), 1_000 + i)).unwrap();
        r.on_routed(&d).unwrap();
        r.on_first_token_at(d.request_id, 1_100 + i).unwrap();
        r.on_finished(d.request_id).unwrap();
    }
    r.drain_worker("a", 0, false).unwrap();
    r.drain_worker("b", 0, true).unwrap();
    // One 8,000-token request of its own goes to `a` and is being prefilled there.
    let d = r.route(&at(&prompt(1, 8_000), 2_000)).unwrap();
    assert_eq!(d.worker.name, "a");
    r.on_routed(&d).unwrap();
    let mean = {
        let m = r.metrics();
        let a = m.workers.iter().find(|w| w.worker.name == "a").unwrap();
        assert_eq!(a.pending_prefill_tokens, 8_000);
        800.0 + (8_000.0 - 800.0) / 64.0
    };
    // The scrape: 1 running (its own request, in prefill) and 2 waiting, which are not
    // its own (another router replica sent them). Priced at the mean, the waiting queue
    // alone is ~1,800 tokens; its own 8,000 in-flight tokens are not in it. Pending
    // prefill is at least its own work plus the others' waiting requests it cannot
    // account for otherwise: 8,000 + (2 - 1) x mean (its in-flight request bounds its own
    // waiting ones from above, so one of the two waiting is counted as its own).
    r.report_load("a", 0, &LoadReport { waiting: Some(2), running: Some(1), ..Default::default() })
        .unwrap();
    let m = r.metrics();
    let a = m.workers.iter().find(|w| w.worker.name == "a").unwrap();
    let want = 8_000 + mean as u64;
    assert!(
        a.pending_prefill_tokens.abs_diff(want) <= 1,
        "pending {} want {want}",
        a.pending_prefill_tokens
    );
}

#[test]
fn in_flight_prefill_counts_the_progress_made_since_it_started() {
    // Learn a pool rate of 8,000 tokens/s on both workers (one 8,000-token prompt a second).
    let r = router(&["a", "b"], |_| {});
    let mut now = 1_000u64;
    for i in 0..200u64 {
        let d = r.route(&at(&prompt(10_000 + i, 8_000), now)).unwrap();
        r.on_routed(&d).unwrap();
        now += 1_010;
        r.on_first_token_at(d.request_id, now).unwrap();
        r.on_finished(d.request_id).unwrap();
        now += 5;
    }
    // Two 8,000-token requests of its own go to `a` at `now`: the first is prefilled, the
    // second waits behind it.
    r.drain_worker("b", 0, true).unwrap();
    let d1 = r.route(&at(&prompt(1, 8_000), now)).unwrap();
    r.on_routed(&d1).unwrap();
    let d2 = r.route(&at(&prompt(2, 8_000), now)).unwrap();
    r.on_routed(&d2).unwrap();
    assert_eq!((d1.worker.name.as_str(), d2.worker.name.as_str()), ("a", "a"));
    r.drain_worker("b", 0, false).unwrap();
    let a = d1.worker_id;
    let queue_s = |t: u64| {
        let d = r.preview(&at(&prompt(3, 160), t)).unwrap();
        let k = d.candidates.iter().position(|c| c.worker_id == a).unwrap();
        d.candidate_scores(k)[2]
    };
    // Just routed: both prompts are ahead (2 s at 8,000 tokens/s) ...
    let q = queue_s(now);
    assert!((q - 2.0).abs() < 0.1, "{q}");
    // ... half a second later about a quarter of it is done.
    let q = queue_s(now + 500);
    assert!((q - 1.5).abs() < 0.1, "{q}");
    // The first one's first token at 1.2 s (slower than priced): the second one starts
    // then, and its whole prompt counts from there (not what the clock alone would say).
    r.on_first_token_at(d1.request_id, now + 1_200).unwrap();
    let q = queue_s(now + 1_200);
    assert!((q - 1.0).abs() < 0.1, "{q}");
    let q = queue_s(now + 1_700);
    assert!((q - 0.5).abs() < 0.1, "{q}");
    // Past its expected end nothing is left (its first token is due any moment).
    assert_eq!(queue_s(now + 2_500), 0.0);
}

#[test]
fn another_routers_request_in_prefill_counts_until_the_worker_has_had_time_for_it() {
    // Learn a pool rate of 8,000 tokens/s and a mean of 8,000 uncached tokens per request.
    let r = router(&["a", "b"], |_| {});
    let mut now = 1_000u64;
    for i in 0..200u64 {
        let d = r.route(&at(&prompt(20_000 + i, 8_000), now)).unwrap();
        r.on_routed(&d).unwrap();
        now += 1_010;
        r.on_first_token_at(d.request_id, now).unwrap();
        r.on_finished(d.request_id).unwrap();
        now += 5;
    }
    // `a` and `b` were added in that order: ids 0 and 1.
    let queue_s = |t: u64, w: &str| {
        let d = r.preview(&at(&prompt(3, 160), t)).unwrap();
        let id = usize::from(w != "a");
        let k = d.candidates.iter().position(|c| c.worker_id.index() == id).unwrap();
        d.candidate_scores(k)[2]
    };
    let scrape = |w: &str, waiting: u32, running: u32, t: u64| {
        let rep =
            LoadReport { waiting: Some(waiting), running: Some(running), ..Default::default() };
        r.report_load_at(w, 0, &rep, t).unwrap();
    };
    // Both idle, 3 decoding requests of another router on `a`.
    scrape("a", 0, 3, now);
    scrape("b", 0, 0, now);
    assert_eq!(queue_s(now, "a"), 0.0);
    // 50 ms later `a` runs one more request, none waiting: another router's new request,
    // in prefill (it is not waiting). One request at the mean: 1 s of work at the rate.
    now += 50;
    scrape("a", 0, 4, now);
    scrape("b", 0, 0, now);
    let q = queue_s(now, "a");
    assert!((q - 1.0).abs() < 0.05, "{q}");
    assert_eq!(queue_s(now, "b"), 0.0);
    // Half a second later half of it is done; after a second nothing is left.
    let q = queue_s(now + 500, "a");
    assert!((q - 0.5).abs() < 0.05, "{q}");
    assert_eq!(queue_s(now + 1_000, "a"), 0.0);
    // Three more arrive at once: beyond the one in prefill they wait, and only one
    // request's prefill is kept (what the waiting count does not show).
    now += 600;
    scrape("a", 0, 7, now);
    let q = queue_s(now, "a");
    assert!((q - 1.0).abs() < 0.05, "{q}");
    // When they show up as waiting, the waiting bound prices them (3 at the mean).
    scrape("a", 3, 5, now + 50);
    let q = queue_s(now + 50, "a");
    assert!((q - 3.0).abs() < 0.05, "{q}");
    // Requests finishing (fewer active) add nothing.
    scrape("a", 0, 2, now + 5_000);
    assert_eq!(queue_s(now + 5_000, "a"), 0.0);
    // Without the scrape's time, the clock starts at the next route that reads the load.
    scrape("a", 0, 2, now + 5_000);
    r.report_load("a", 0, &LoadReport { waiting: Some(0), running: Some(3), ..Default::default() })
        .unwrap();
    let q = queue_s(now + 6_000, "a");
    assert!((q - 1.0).abs() < 0.05, "{q}");
    let q = queue_s(now + 6_250, "a");
    assert!((q - 0.75).abs() < 0.05, "{q}");
}
