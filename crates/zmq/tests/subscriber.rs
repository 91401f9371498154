//! kvroute-zmq against a real publisher peer speaking vLLM's wire protocol
//! (tests/peer/vllm_publisher.py, pyzmq + msgpack).

mod common;

use common::{expected_payload, seqs, summary, vllm_payloads, wait_stats, Peer, Recorder, Seen};
use kvroute_zmq::{GapCause, PublisherConfig, ResetReason, Subscriber, SubscriberConfig};
use std::sync::{mpsc, Arc};
use std::time::Duration;

const WORKER: &str = "w0";

/// Starts a subscriber on `peer` (with its replay endpoint unless `tweak` removes it) and
/// waits until the peer has the subscription, so no live message is lost to ZeroMQ's
/// slow-joiner window.
fn subscribe(
    peer: &mut Peer,
    sink: Arc<Recorder>,
    tweak: impl FnOnce(&mut PublisherConfig, &mut SubscriberConfig),
) -> Subscriber {
    let mut p = PublisherConfig::new(peer.pub_ep.clone())
        .with_replay(peer.replay_ep.clone())
        .with_worker(WORKER);
    let mut cfg = SubscriberConfig { replay_timeout: Duration::from_secs(3), ..Default::default() };
    tweak(&mut p, &mut cfg);
    cfg.publishers = vec![p];
    let sub = Subscriber::start(cfg, sink).expect("start subscriber");
    peer.cmd("waitsub");
    sub
}

/// Every batch in `seen` carries the payload the peer sent for its seq and epoch, where
/// the epoch is `epochs[i]` after the i-th reset.
fn assert_payloads(seen: &[Seen], epochs: &[u32]) {
    let payloads = vllm_payloads();
    let mut resets = 0;
    for e in seen {
        match e {
            Seen::Reset(..) => resets += 1,
            Seen::Batch { worker, seq, payload } => {
                assert_eq!(worker, WORKER);
                let epoch = epochs[resets];
                assert_eq!(
                    *payload,
                    expected_payload(&payloads, *seq, epoch),
                    "payload of seq {seq} (epoch {epoch})"
                );
            }
        }
    }
}

#[test]
fn live_batches_arrive_in_order_with_exact_payloads() {
    let mut peer = Peer::spawn(&[]);
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |p, _| p.replay_endpoint = None);
    assert_eq!(peer.cmd("pub 25"), 25);
    let seen = rec.wait_seq(24);
    assert_eq!(seqs(&seen), (0..25).collect::<Vec<_>>());
    // The first ten are byte-identical to vLLM's own payloads (kv_events.json).
    assert_payloads(&seen, &[0]);
    let st = sub.stats().remove(0);
    assert_eq!((st.batches, st.last_seq, st.gaps, st.resets), (25, Some(24), 0, 0));
    assert!(st.connected && st.last_batch_at.is_some());
    assert_eq!(st.worker, WORKER);
    sub.shutdown();
}

#[test]
fn gap_filled_by_replay_delivers_every_seq_once_in_order() {
    let mut peer = Peer::spawn(&[]);
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |_, _| {});
    peer.cmd("pub 5");
    peer.cmd("drop 4"); // seqs 5..8 buffered for replay but lost on the wire
    peer.cmd("pub 6"); // 9..14
    let seen = rec.wait_seq(14);
    // Wait until any late duplicates would have arrived, then check nothing was repeated.
    peer.cmd("pub 1");
    let seen_all = rec.wait_seq(15);
    assert_eq!(seqs(&seen_all), (0..16).collect::<Vec<_>>(), "{:?}", summary(&seen));
    assert_payloads(&seen_all, &[0]);
    let st = sub.stats().remove(0);
    assert_eq!((st.gaps, st.replays_ok, st.replays_failed, st.resets), (1, 1, 0, 0));
    sub.shutdown();
}

#[test]
fn gap_the_replay_cannot_fill_resets_the_worker() {
    let mut peer = Peer::spawn(&[]);
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |_, _| {});
    peer.cmd("pub 5");
    peer.cmd("lose 3"); // 5..7 never buffered
    peer.cmd("pub 4"); // 8..11
    let seen = rec.wait_seq(11);
    let expected_reset =
        ResetReason::Gap { expected: 5, got: 8, cause: GapCause::NotBuffered { first: Some(8) } };
    let want: Vec<Seen> = seen.iter().filter(|e| matches!(e, Seen::Reset(..))).cloned().collect();
    assert_eq!(want, vec![Seen::Reset(WORKER.into(), expected_reset)]);
    assert_eq!(summary(&seen)[..5], ["0", "1", "2", "3", "4"]);
    assert!(matches!(seen[5], Seen::Reset(..)), "{:?}", summary(&seen));
    assert_eq!(seqs(&seen[6..]), vec![8, 9, 10, 11]);
    assert_payloads(&seen, &[0, 0]);
    let st = sub.stats().remove(0);
    assert_eq!((st.gaps, st.replays_ok, st.replays_failed, st.resets), (1, 0, 1, 1));
    sub.shutdown();
}

#[test]
fn gap_without_replay_endpoint_or_with_a_silent_one_resets() {
    // No replay endpoint configured.
    let mut peer = Peer::spawn(&[]);
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |p, _| p.replay_endpoint = None);
    peer.cmd("pub 3");
    peer.cmd("drop 2");
    peer.cmd("pub 2");
    let seen = rec.wait_seq(6);
    let reset = ResetReason::Gap { expected: 3, got: 5, cause: GapCause::NoReplayEndpoint };
    assert_eq!(summary(&seen), ["0", "1", "2", &format!("RESET({reset})"), "5", "6"]);
    let st = sub.stats().remove(0);
    assert_eq!((st.gaps, st.replays_failed, st.resets), (1, 0, 1));
    sub.shutdown();

    // A replay endpoint that never answers: the replay times out.
    let mut peer = Peer::spawn(&[]);
    let rec = Arc::new(Recorder::default());
    let sub =
        subscribe(&mut peer, rec.clone(), |_, c| c.replay_timeout = Duration::from_millis(300));
    peer.cmd("replay off");
    peer.cmd("pub 3");
    peer.cmd("drop 2");
    peer.cmd("pub 2");
    let seen = rec.wait_seq(6);
    let reset = ResetReason::Gap { expected: 3, got: 5, cause: GapCause::Timeout };
    assert_eq!(summary(&seen), ["0", "1", "2", &format!("RESET({reset})"), "5", "6"]);
    let st = sub.stats().remove(0);
    assert_eq!((st.gaps, st.replays_failed, st.resets), (1, 1, 1));
    sub.shutdown();
}

#[test]
fn in_process_restart_is_detected_and_the_new_stream_applied() {
    let mut peer = Peer::spawn(&[]);
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |_, _| {});
    peer.cmd("pub 6");
    rec.wait_seq(5);
    peer.cmd("restart");
    peer.cmd("pub 3");
    let seen = rec.wait_for("3 batches after the restart", |s| s.len() >= 10);
    let reset = ResetReason::Restart { expected: 6, got: 0 };
    assert_eq!(
        summary(&seen),
        ["0", "1", "2", "3", "4", "5", &format!("RESET({reset})"), "0", "1", "2"]
    );
    assert_payloads(&seen, &[0, 1]);
    let st = sub.stats().remove(0);
    assert_eq!((st.restarts, st.resets, st.gaps, st.last_seq), (1, 1, 0, Some(2)));
    sub.shutdown();
}

#[test]
fn publisher_process_restart_reconnects_and_resets() {
    let mut peer = Peer::spawn(&[]);
    let (pub_port, replay_port) = (Peer::port(&peer.pub_ep), Peer::port(&peer.replay_ep));
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |_, _| {});
    peer.cmd("pub 5");
    rec.wait_seq(4);
    peer.kill();
    wait_stats(&sub, "disconnect", |st| !st.connected);
    // The engine comes back on the same ports; its seq starts again at 0.
    let mut peer =
        Peer::spawn(&["--pub-port", &pub_port, "--replay-port", &replay_port, "--epoch", "1"]);
    peer.cmd("waitsub");
    peer.cmd("pub 3");
    let seen = rec.wait_for("3 batches of the new engine", |s| s.len() >= 9);
    let reset = ResetReason::Restart { expected: 5, got: 0 };
    assert_eq!(
        summary(&seen),
        ["0", "1", "2", "3", "4", &format!("RESET({reset})"), "0", "1", "2"]
    );
    assert_payloads(&seen, &[0, 1]);
    let st = sub.stats().remove(0);
    assert_eq!((st.restarts, st.resets, st.reconnects), (1, 1, 1));
    assert!(st.connected);
    sub.shutdown();
}

#[test]
fn restarted_publisher_that_ran_past_the_old_seq_is_caught_by_replay_check() {
    // The new engine publishes seqs 0..7 while the subscriber is not connected, then 8, 9.
    // 8 > expected 5 looks like a gap; the replay re-requests seq 4 and finds a different
    // batch there, so this is a restart, not a gap, and the new stream is applied from 0.
    let mut peer = Peer::spawn(&[]);
    let (pub_port, replay_port) = (Peer::port(&peer.pub_ep), Peer::port(&peer.replay_ep));
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |_, _| {});
    peer.cmd("pub 5");
    rec.wait_seq(4);
    peer.kill();
    wait_stats(&sub, "disconnect", |st| !st.connected);
    let mut peer =
        Peer::spawn(&["--pub-port", &pub_port, "--replay-port", &replay_port, "--epoch", "1"]);
    peer.cmd("drop 8");
    peer.cmd("waitsub");
    peer.cmd("pub 2");
    let seen = rec.wait_seq(9);
    let reset = ResetReason::Restart { expected: 5, got: 4 };
    let mut want: Vec<String> = (0..5).map(|s: u64| s.to_string()).collect();
    want.push(format!("RESET({reset})"));
    want.extend((0..10).map(|s: u64| s.to_string()));
    assert_eq!(summary(&seen), want);
    assert_payloads(&seen, &[0, 1]);
    let st = sub.stats().remove(0);
    // Two replays: the one that revealed the restart, then the new stream from seq 0.
    assert_eq!((st.restarts, st.resets, st.reconnects, st.replays_ok), (1, 1, 1, 2));
    sub.shutdown();
}

#[test]
fn start_seq_replays_what_a_late_subscriber_missed() {
    // A router replica restored a snapshot that has everything before seq 4.
    let mut peer = Peer::spawn(&[]);
    peer.cmd("drop 10"); // published before this subscriber existed
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |p, _| p.start_seq = Some(4));
    peer.cmd("pub 2");
    let seen = rec.wait_seq(11);
    assert_eq!(seqs(&seen), (4..12).collect::<Vec<_>>());
    assert_payloads(&seen, &[0]);
    let st = sub.stats().remove(0);
    assert_eq!((st.gaps, st.replays_ok, st.resets), (1, 1, 0));
    sub.shutdown();
}

#[test]
fn malformed_and_foreign_messages_are_counted_and_skipped() {
    let mut peer = Peer::spawn(&[]);
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |p, _| p.topic = "kv-events".into());
    peer.cmd("pub 2");
    let topic = "6b762d6576656e7473"; // "kv-events"
    peer.cmd(&format!("raw {topic} 0000000000000002")); // 2 frames
    peer.cmd(&format!("raw {topic} 00000002 aa")); // seq of 4 bytes
    peer.cmd(&format!("raw {topic} 0000000000000002 aa bb")); // 4 frames
    peer.cmd(&format!("raw {topic} ffffffffffffffff aa")); // reserved end-marker seq
    peer.cmd(&format!("raw {topic}2d78 0000000000000002 aa")); // "kv-events-x"
    peer.cmd("pub 2");
    let seen = rec.wait_seq(3);
    assert_eq!(seqs(&seen), vec![0, 1, 2, 3]);
    assert_payloads(&seen, &[0]);
    let st = sub.stats().remove(0);
    assert_eq!((st.frame_errors, st.foreign_topic, st.gaps, st.resets), (4, 1, 0, 0));
    sub.shutdown();
}

/// Checks what a consumer that fell behind saw: between resets, seqs strictly consecutive
/// and payloads exact; the stream ends with the last published seq.
fn assert_consistent(seen: &[Seen], last: u64) {
    let mut prev: Option<u64> = None;
    for e in seen {
        match e {
            Seen::Reset(..) => prev = None,
            Seen::Batch { seq, .. } => {
                if let Some(p) = prev {
                    assert_eq!(*seq, p + 1, "non-consecutive seqs without a reset");
                }
                prev = Some(*seq);
            }
        }
    }
    assert_eq!(prev, Some(last));
    assert_payloads(seen, &vec![0; seen.len() + 1]);
}

#[test]
fn slow_consumer_with_small_hwm_recovers_every_batch_by_replay() {
    // Tiny buffers on both sides and a sink that sleeps: the publisher drops messages
    // (PUB semantics) and the subscriber must notice and replay them. The replay buffer
    // holds everything, so nothing may be lost or repeated.
    let n = 3000u64;
    let mut peer = Peer::spawn(&["--sndhwm", "2", "--sndbuf", "2048", "--buffer", "5000"]);
    let rec = Arc::new(Recorder::slow(Duration::from_micros(300)));
    let sub = subscribe(&mut peer, rec.clone(), |_, c| c.rcvhwm = 2);
    peer.cmd(&format!("pub {n}"));
    peer.cmd("pub 5 100"); // a slow tail, so drops at the end of the burst are noticed
    let seen = rec.wait_seq(n + 4);
    assert_eq!(seqs(&seen), (0..n + 5).collect::<Vec<_>>());
    assert_consistent(&seen, n + 4);
    let st = sub.stats().remove(0);
    eprintln!("slow consumer, full replay buffer: {st:?}");
    // ~1 MB burst against 2-message HWMs and a 2 KB send buffer, consumed at most ~3300
    // batches/s: the publisher must have dropped some, or the scenario was not exercised.
    assert!(st.gaps >= 1, "no gap: the burst did not overflow the queues");
    assert_eq!(st.resets, 0);
    assert_eq!(st.gaps, st.replays_ok);
    sub.shutdown();
}

#[test]
fn slow_consumer_with_short_replay_buffer_resets_but_stays_consistent() {
    let n = 3000u64;
    let mut peer = Peer::spawn(&["--sndhwm", "2", "--sndbuf", "2048", "--buffer", "4"]);
    let rec = Arc::new(Recorder::slow(Duration::from_micros(300)));
    let sub = subscribe(&mut peer, rec.clone(), |_, c| c.rcvhwm = 2);
    peer.cmd(&format!("pub {n}"));
    // Messages dropped at the very end of a burst are only noticed when the next one
    // arrives: finish with a slow tail that the consumer keeps up with.
    peer.cmd("pub 5 100");
    let seen = rec.wait_seq(n + 4);
    assert_consistent(&seen, n + 4);
    let st = sub.stats().remove(0);
    eprintln!("slow consumer, 4-batch replay buffer: {st:?}");
    let resets = seen.iter().filter(|e| matches!(e, Seen::Reset(..))).count() as u64;
    assert!(st.gaps >= 1, "no gap: the burst did not overflow the queues");
    assert_eq!(st.resets, resets);
    assert_eq!(st.gaps, st.replays_ok + st.replays_failed);
    assert_eq!(st.batches, seqs(&seen).len() as u64);
    sub.shutdown();
}

#[test]
fn shutdown_joins_promptly_even_during_a_replay() {
    let mut peer = Peer::spawn(&[]);
    let rec = Arc::new(Recorder::default());
    // A replay that would wait a minute for an answer that never comes.
    let sub = subscribe(&mut peer, rec.clone(), |_, c| c.replay_timeout = Duration::from_secs(60));
    peer.cmd("replay off");
    peer.cmd("pub 2");
    peer.cmd("drop 2");
    peer.cmd("pub 1");
    rec.wait_seq(1);
    wait_stats(&sub, "the gap", |st| st.gaps == 1);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        sub.shutdown();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("shutdown did not return within 5 s");
    // Dropping a subscriber (instead of shutdown) stops it too.
    let rec2 = Arc::new(Recorder::default());
    let sub2 = subscribe(&mut peer, rec2, |_, _| {});
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(sub2);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("drop did not return within 5 s");
    // Nothing reached the sink from the gap onwards: the replay never completed.
    assert_eq!(seqs(&rec.seen()), vec![0, 1]);
}

#[test]
fn several_publishers_are_tracked_independently() {
    let mut a = Peer::spawn(&[]);
    let mut b = Peer::spawn(&["--epoch", "3"]);
    let rec = Arc::new(Recorder::default());
    let cfg = SubscriberConfig {
        publishers: vec![
            PublisherConfig::new(a.pub_ep.clone()).with_replay(a.replay_ep.clone()),
            PublisherConfig::new(b.pub_ep.clone()).with_replay(b.replay_ep.clone()),
        ],
        ..Default::default()
    };
    let sub = Subscriber::start(cfg, rec.clone()).expect("start");
    a.cmd("waitsub");
    b.cmd("waitsub");
    a.cmd("pub 4");
    b.cmd("pub 2");
    b.cmd("drop 1");
    b.cmd("pub 2");
    let seen = rec.wait_for("7 batches", |s| s.len() >= 9);
    let payloads = vllm_payloads();
    let (wa, wb) = (Peer::port(&a.pub_ep), Peer::port(&b.pub_ep));
    for (name, epoch, want) in [(&wa, 0, vec![0, 1, 2, 3]), (&wb, 3, vec![0, 1, 2, 3, 4])] {
        let mine: Vec<&Seen> = seen
            .iter()
            .filter(|e| matches!(e, Seen::Batch { worker, .. } if worker.ends_with(name.as_str())))
            .collect();
        let got: Vec<u64> =
            mine.iter().map(|e| if let Seen::Batch { seq, .. } = e { *seq } else { 0 }).collect();
        assert_eq!(got, want);
        for e in mine {
            if let Seen::Batch { seq, payload, worker } = e {
                assert_eq!(*worker, format!("127.0.0.1:{name}"));
                assert_eq!(*payload, expected_payload(&payloads, *seq, epoch));
            }
        }
    }
    let st = sub.stats();
    assert_eq!((st[0].gaps, st[1].gaps, st[1].replays_ok), (0, 1, 1));
    sub.shutdown();
}

/// A sink that fails on seq 1 and panics on seq 2, recording everything else.
struct Faulty(Recorder);

impl kvroute_zmq::EventSink for Faulty {
    fn on_batch(
        &self,
        p: &kvroute_zmq::PublisherInfo,
        seq: u64,
        payload: &[u8],
    ) -> kvroute::Result<()> {
        match seq {
            1 => Err(kvroute::Error::decode("bad payload")),
            2 => panic!("sink bug"),
            _ => self.0.on_batch(p, seq, payload),
        }
    }
    fn on_reset(&self, p: &kvroute_zmq::PublisherInfo, reason: ResetReason) {
        self.0.on_reset(p, reason)
    }
}

#[test]
fn sink_errors_and_panics_are_counted_and_the_stream_goes_on() {
    let mut peer = Peer::spawn(&[]);
    let sink = Arc::new(Faulty(Recorder::default()));
    let cfg = SubscriberConfig {
        publishers: vec![PublisherConfig::new(peer.pub_ep.clone()).with_worker(WORKER)],
        ..Default::default()
    };
    let sub = Subscriber::start(cfg, sink.clone()).expect("start");
    peer.cmd("waitsub");
    peer.cmd("pub 5");
    let seen = sink.0.wait_seq(4);
    assert_eq!(seqs(&seen), vec![0, 3, 4]);
    let st = sub.stats().remove(0);
    assert_eq!((st.batches, st.sink_errors, st.gaps, st.resets), (5, 2, 0, 0));
    // The last failure was the panic on seq 2 (after the error on seq 1).
    assert_eq!(st.last_error.as_deref(), Some("seq 2: the sink panicked"));
    sub.shutdown();
}

#[test]
fn default_topic_receives_llm_d_topics() {
    // llm-d publishes on kv@<pod-ip>:<port>@<model>; vLLM's own default is "". The
    // subscriber's default must receive both without being told the topic.
    for topic in ["kv@10.0.0.7:8000@Qwen/Qwen3-0.6B", ""] {
        let mut peer = Peer::spawn(&["--topic", topic]);
        let rec = Arc::new(Recorder::default());
        let sub = subscribe(&mut peer, rec.clone(), |_, _| {});
        peer.cmd("pub 3");
        let seen = rec.wait_seq(2);
        assert_eq!(seqs(&seen), vec![0, 1, 2], "topic {topic:?}");
        assert_payloads(&seen, &[0]);
        let st = sub.stats().remove(0);
        assert_eq!((st.batches, st.foreign_topic, st.idle), (3, 0, false));
        sub.shutdown();
    }
}

#[test]
fn connected_publisher_that_sends_nothing_is_flagged_idle() {
    let mut peer = Peer::spawn(&["--topic", "kv@10.0.0.7:8000@m"]);
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |p, c| {
        p.topic = "kv-events".into(); // the wrong topic: nothing matches
        c.idle_warning = Duration::from_millis(300);
    });
    peer.cmd("pub 3");
    let st = wait_stats(&sub, "idle flag", |st| st.idle);
    assert!(st.connected && st.connected_at.is_some());
    assert_eq!(st.batches, 0);
    sub.shutdown();

    // With a matching topic, batches keep it from being idle; silence brings it back.
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |_, c| c.idle_warning = Duration::from_secs(2));
    peer.cmd("pub 1");
    rec.wait_seq(3);
    assert!(!sub.stats()[0].idle);
    wait_stats(&sub, "idle after silence", |st| st.idle);
    sub.shutdown();
}

#[test]
fn replay_replies_without_topic_frame_fill_the_gap() {
    // vLLM before 0.26-0.28 replied ["", seq, payload] without the topic frame.
    let mut peer = Peer::spawn(&["--legacy-replay"]);
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |p, _| p.topic = "kv-events".into());
    peer.cmd("pub 3");
    peer.cmd("drop 3");
    peer.cmd("pub 2");
    let seen = rec.wait_seq(7);
    assert_eq!(seqs(&seen), (0..8).collect::<Vec<_>>(), "{:?}", summary(&seen));
    assert_payloads(&seen, &[0]);
    let st = sub.stats().remove(0);
    assert_eq!((st.gaps, st.replays_ok, st.frame_errors, st.resets), (1, 1, 0, 0));
    sub.shutdown();
}

#[test]
fn live_batches_that_arrive_during_a_failed_replay_are_applied_after_the_reset() {
    // A 4-batch replay buffer. Seqs 5..7 are lost on the wire; 8 reveals the gap and the
    // replay request is held while 9..17 arrive live. By the time the publisher answers, it
    // buffers only 14..17: the gap cannot be filled (reset), but 8..13, received live, lead
    // without a hole into 14..17 and must be applied after the reset, not dropped.
    let mut peer = Peer::spawn(&["--buffer", "4"]);
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |_, c| c.replay_timeout = Duration::from_secs(15));
    peer.cmd("pub 5");
    rec.wait_seq(4);
    peer.cmd("replay hold");
    peer.cmd("drop 3");
    peer.cmd("pub 10");
    // Let the live batches reach the subscriber before the answer does.
    std::thread::sleep(Duration::from_millis(300));
    peer.cmd("replay release");
    let seen = rec.wait_seq(17);
    let reset =
        ResetReason::Gap { expected: 5, got: 8, cause: GapCause::NotBuffered { first: Some(14) } };
    let mut want: Vec<String> = (0..5).map(|s: u64| s.to_string()).collect();
    want.push(format!("RESET({reset})"));
    want.extend((8..18).map(|s: u64| s.to_string()));
    assert_eq!(summary(&seen), want);
    assert_payloads(&seen, &[0, 0]);
    let st = sub.stats().remove(0);
    assert_eq!((st.gaps, st.replays_failed, st.resets, st.batches), (1, 1, 1, 15));
    sub.shutdown();
}

#[test]
fn live_batches_beyond_max_pending_wait_in_the_socket_and_are_not_lost() {
    // Only 2 live batches may be buffered during a replay; the rest stay in ZeroMQ's queue
    // and are read after it. Nothing is lost or repeated.
    let mut peer = Peer::spawn(&[]);
    let rec = Arc::new(Recorder::default());
    let sub = subscribe(&mut peer, rec.clone(), |_, c| c.max_pending = 2);
    peer.cmd("pub 3");
    rec.wait_seq(2);
    peer.cmd("replay hold");
    peer.cmd("drop 2");
    peer.cmd("pub 8");
    std::thread::sleep(Duration::from_millis(300));
    peer.cmd("replay release");
    let seen = rec.wait_seq(12);
    assert_eq!(seqs(&seen), (0..13).collect::<Vec<_>>(), "{:?}", summary(&seen));
    assert_payloads(&seen, &[0]);
    let st = sub.stats().remove(0);
    assert_eq!((st.gaps, st.replays_ok, st.resets), (1, 1, 0));
    sub.shutdown();
}
