//! Errors on the event and prediction paths are returned or counted, never swallowed.

use kvroute::events::{BlockStored, EngineHash, KvEvent, KvEventBatch, Value};
use kvroute::router::{Request, Router};
use kvroute::Error;

fn stored(hashes: &[u64], tokens: Vec<u32>) -> BlockStored {
    BlockStored {
        block_hashes: hashes.iter().map(|&h| EngineHash::Int(h)).collect(),
        token_ids: tokens,
        block_size: 16,
        ..Default::default()
    }
}

#[test]
fn a_worker_that_cannot_be_auto_added_gives_the_real_error() {
    let r = Router::from_json(r#"{"auto_add_workers": true}"#).unwrap();
    let batch = KvEventBatch::new(1.0, vec![KvEvent::BlockStored(stored(&[1], (0..16).collect()))]);
    // Before: the add failed silently and the batch was refused as "unknown worker".
    let err = r.apply_events("", &batch).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert!(err.to_string().contains("name"), "{err}");
    assert_eq!(r.metrics().event_errors, 1);
    assert!(r.workers().is_empty());
    // A good name is added as before.
    r.apply_events("pod-a", &batch).unwrap();
    assert_eq!(r.workers().len(), 1);
}

#[test]
fn extra_keys_that_cannot_be_hashed_are_refused_in_native_mode() {
    let r = Router::from_json(r#"{"workers": [{"name": "a"}]}"#).unwrap();
    let tokens: Vec<u32> = (0..16).collect();
    let mut s = stored(&[7], tokens.clone());
    s.extra_keys = Some(vec![Some(Value::Array(vec![Value::Str("lora".into()), Value::F64(0.5)]))]);
    // Before: the float made the whole block's extra keys vanish, and the block was keyed
    // as if it had none, i.e. as the plain tokens.
    let err =
        r.apply_events("a", &KvEventBatch::new(1.0, vec![KvEvent::BlockStored(s)])).unwrap_err();
    assert!(err.to_string().contains("extra keys"), "{err}");
    let d = r.route(&Request::new(&tokens)).unwrap();
    assert_eq!(d.matched_blocks, 0);
    assert_eq!(r.metrics().event_errors, 1);
}

#[test]
fn a_decision_with_more_keys_than_full_blocks_is_refused_by_on_routed() {
    let r = Router::from_json(r#"{"mode": "approximate", "workers": [{"name": "a"}]}"#).unwrap();
    let tokens: Vec<u32> = (0..64).collect();
    let mut d = r.route(&Request::new(&tokens)).unwrap();
    d.prompt_tokens = 20; // one full block, four keys
                          // Before: accepted; the cache model refused the keys silently and predicted nothing.
    let err = r.on_routed(&d).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert_eq!(r.inflight_requests(), 0, "nothing recorded");
    d.prompt_tokens = 64;
    r.on_routed(&d).unwrap();
    assert_eq!(r.metrics().index.holder_blocks, 4);
    assert_eq!(r.metrics().prediction_errors, 0);
}

#[test]
fn predictions_skipped_for_lack_of_room_are_visible() {
    // A cache model of 3 blocks (one is vLLM's null block): a 64-token prompt never fits.
    let r = Router::from_json(
        r#"{"mode": "approximate", "capacity": {"num_gpu_blocks": 3}, "workers": [{"name": "a"}]}"#,
    )
    .unwrap();
    let tokens: Vec<u32> = (0..64).collect();
    let d = r.route(&Request::new(&tokens)).unwrap();
    r.on_routed(&d).unwrap();
    let m = r.metrics();
    assert_eq!(m.workers[0].predictions_skipped, 1);
    assert!(r
        .prometheus()
        .contains("kvroute_worker_predictions_skipped_total{worker=\"a\",dp_rank=\"0\"} 1"));
}
