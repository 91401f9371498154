//! Router configuration: out-of-range values are refused with the field named, from JSON,
//! from the builder and in `Router::new`; nothing wraps around.

use kvroute::router::{Mode, Router, RouterConfig, MAX_SESSION_TTL_S};
use kvroute::Error;

fn json_err(json: &str) -> String {
    let e = Router::from_json(json).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{json}: {e:?}");
    e.to_string()
}

#[test]
fn a_session_ttl_that_overflows_milliseconds_is_refused_naming_the_field() {
    // 2^63 s: the milliseconds wrapped to 0 and the error said "ttl must be positive".
    for ttl in [1u64 << 63, u64::MAX, MAX_SESSION_TTL_S + 1] {
        let e = json_err(&format!(r#"{{"session_ttl_s": {ttl}}}"#));
        assert!(e.contains("session_ttl_s") && e.contains(&ttl.to_string()), "{e}");
        let e = RouterConfig::builder().session_ttl_s(ttl).build().unwrap_err();
        assert!(e.to_string().contains("session_ttl_s"), "{e}");
    }
    assert!(json_err(r#"{"session_ttl_s": 0}"#).contains("session_ttl_s"));
    // The largest accepted TTL works, and sessions do not expire early with it.
    let r = Router::new(
        RouterConfig::builder()
            .session_ttl_s(MAX_SESSION_TTL_S)
            .preset("session-affinity")
            .worker("a")
            .worker("b")
            .build()
            .unwrap(),
    )
    .unwrap();
    let t: Vec<u32> = (0..32).collect();
    let req = |now| kvroute::router::Request {
        session: Some("s"),
        now_ms: Some(now),
        ..kvroute::router::Request::new(&t)
    };
    let first = r.route(&req(1_000)).unwrap().worker.clone();
    for now in [2_000, u64::MAX / 2, u64::MAX - 1] {
        assert_eq!(r.route(&req(now)).unwrap().worker, first, "at {now}");
    }
}

#[test]
fn out_of_range_values_are_refused_naming_the_field() {
    for (json, field) in [
        (r#"{"block_size": 0}"#, "block_size"),
        (r#"{"block_size": 1000000}"#, "block_size"),
        (r#"{"session_capacity": 0}"#, "session_capacity"),
        (r#"{"session_capacity": 4294967295}"#, "session_capacity"),
        (r#"{"vocab_size": 0}"#, "vocab_size"),
        (r#"{"index": {"max_holder_blocks": 0}}"#, "index.max_holder_blocks"),
        (r#"{"workers": [{"name": "a"}, {"name": ""}]}"#, "workers[1].name"),
        (r#"{"profile": "fastest"}"#, "profile"),
        (r#"{"mode": "approximate", "capacity": {"num_gpu_blocks": 0}}"#, "capacity"),
        (
            r#"{"mode": "hybrid", "workers": [{"name": "a", "capacity": {"model": "nope", "gpu": "h100-80gb"}}]}"#,
            "workers[0].capacity",
        ),
    ] {
        let e = json_err(json);
        assert!(e.contains(field), "{json}: {e}");
        // The same from the parsed-but-unchecked form through Router::new.
        let cfg: RouterConfig = serde_json::from_str(json).unwrap();
        let e = Router::new(cfg.clone()).unwrap_err().to_string();
        assert!(e.contains(field), "{json}: {e}");
        assert!(cfg.validate().unwrap_err().to_string().contains(field));
    }
}

#[test]
fn the_builder_sets_every_field_and_validates() {
    let cfg = RouterConfig::builder()
        .block_size(32)
        .mode(Mode::Hybrid)
        .preset("prefix")
        .worker("a")
        .seed(9)
        .native_seed(3)
        .session_capacity(100)
        .vocab_size(Some(1000))
        .auto_add_workers(true)
        .build()
        .unwrap();
    let expected = RouterConfig::from_json(
        r#"{"block_size": 32, "mode": "hybrid", "profile": "prefix", "workers": [{"name": "a"}],
            "seed": 9, "native_seed": 3, "session_capacity": 100, "vocab_size": 1000,
            "auto_add_workers": true}"#,
    )
    .unwrap();
    assert_eq!(cfg, expected);
    assert_eq!(RouterConfig::builder().build().unwrap(), RouterConfig::default());
    assert!(RouterConfig::builder()
        .block_size(0)
        .build()
        .unwrap_err()
        .to_string()
        .contains("block_size"));
}
