//! The Mooncake conversation trace, read whole, against the facts its README states.

use kvroute_sim::trace::{read_mooncake, MOONCAKE_BLOCK_TOKENS};
use std::collections::HashSet;
use std::path::PathBuf;

#[test]
fn unbounded_cache_in_arrival_order_hits_the_readme_ceiling() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/mooncake/conversation_trace.jsonl");
    let reqs = read_mooncake(&path).unwrap();

    // README: 12,031 requests, every one starting with id 0, 288,500 blocks, 182,790 distinct.
    assert_eq!(reqs.len(), 12_031);
    assert!(reqs.iter().all(|r| r.hash_ids.first() == Some(&0)));
    assert!(reqs.windows(2).all(|w| w[0].timestamp_ms <= w[1].timestamp_ms));
    let total: usize = reqs.iter().map(|r| r.hash_ids.len()).sum();
    assert_eq!(total, 288_500);
    assert!(reqs
        .iter()
        .all(|r| r.hash_ids.len() == (r.input_length as usize).div_ceil(MOONCAKE_BLOCK_TOKENS)));

    // One infinite prefix cache, requests in arrival order: a request hits its leading
    // blocks up to the first one never seen before, then all its blocks are cached.
    let mut cache: HashSet<u64> = HashSet::new();
    let mut hits = 0usize;
    for r in &reqs {
        hits += r.hash_ids.iter().take_while(|id| cache.contains(id)).count();
        cache.extend(r.hash_ids.iter().copied());
    }
    assert_eq!(cache.len(), 182_790);
    // The ceiling: every block but the first sighting of each distinct id.
    assert_eq!(hits, 288_500 - 182_790);
    let share = hits as f64 / total as f64;
    assert_eq!(format!("{:.1}%", share * 100.0), "36.6%");
}
