//! Parsing of the multipart messages vLLM's `ZmqEventPublisher` sends.
//!
//! Live PUB messages are `[topic, seq (8 bytes big-endian), payload]`. Replies to a replay
//! request, as a DEALER receives them, are `["", topic, seq, payload]`, terminated by the
//! end marker `["", "", 0xFFFF_FFFF_FFFF_FFFF, ""]`. See `zmq_wire.json` in the vLLM
//! vectors for captured frames. vLLM before 0.26-0.28 sent replay replies without the topic
//! frame: `["", seq, payload]`, ended by `["", 0xFFFF_FFFF_FFFF_FFFF, ""]`; both forms are
//! accepted.

/// The sequence number vLLM puts in the replay end marker.
pub const END_SEQ: u64 = u64::MAX;

/// One batch as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The topic frame.
    pub topic: Vec<u8>,
    /// The sequence number.
    pub seq: u64,
    /// The msgpack `KVEventBatch` payload.
    pub payload: Vec<u8>,
}

/// Why a message was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The message had the wrong number of frames.
    FrameCount {
        /// How many frames were expected.
        expected: usize,
        /// How many arrived.
        got: usize,
    },
    /// The sequence frame was not 8 bytes long.
    SeqLength(usize),
    /// A replay reply did not start with the empty delimiter frame.
    MissingDelimiter,
    /// A live message carried the reserved end-marker sequence number.
    ReservedSeq,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::FrameCount { expected, got } => {
                write!(f, "expected {expected} frames, got {got}")
            }
            FrameError::SeqLength(n) => write!(f, "sequence frame has {n} bytes, expected 8"),
            FrameError::MissingDelimiter => write!(f, "replay reply without empty delimiter"),
            FrameError::ReservedSeq => write!(f, "live message uses the reserved end-marker seq"),
        }
    }
}

fn seq_of(frame: &[u8]) -> Result<u64, FrameError> {
    let bytes: [u8; 8] = frame.try_into().map_err(|_| FrameError::SeqLength(frame.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Parses a live PUB message `[topic, seq, payload]`.
pub fn parse_live(mut frames: Vec<Vec<u8>>) -> Result<Batch, FrameError> {
    if frames.len() != 3 {
        return Err(FrameError::FrameCount { expected: 3, got: frames.len() });
    }
    let payload = frames.pop().unwrap_or_default();
    let seq = seq_of(&frames[1])?;
    if seq == END_SEQ {
        return Err(FrameError::ReservedSeq);
    }
    let topic = frames.swap_remove(0);
    Ok(Batch { topic, seq, payload })
}

/// One reply to a replay request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayReply {
    /// A buffered batch.
    Batch(Batch),
    /// A buffered batch in the older form without a topic frame (its topic is unknown).
    Untagged {
        /// The sequence number.
        seq: u64,
        /// The msgpack `KVEventBatch` payload.
        payload: Vec<u8>,
    },
    /// The end marker: the publisher has sent everything it buffered.
    End,
}

/// Parses a reply received on a DEALER socket: `["", topic, seq, payload]` or the end
/// marker `["", "", END_SEQ, ""]`; or, from vLLM before 0.26-0.28, `["", seq, payload]` or
/// `["", END_SEQ, ""]`.
pub fn parse_replay(mut frames: Vec<Vec<u8>>) -> Result<ReplayReply, FrameError> {
    if frames.len() != 4 && frames.len() != 3 {
        return Err(FrameError::FrameCount { expected: 4, got: frames.len() });
    }
    if !frames[0].is_empty() {
        return Err(FrameError::MissingDelimiter);
    }
    if frames.len() == 3 {
        let seq = seq_of(&frames[1])?;
        if seq == END_SEQ {
            return Ok(ReplayReply::End);
        }
        let payload = frames.pop().unwrap_or_default();
        return Ok(ReplayReply::Untagged { seq, payload });
    }
    let seq = seq_of(&frames[2])?;
    if seq == END_SEQ && frames[1].is_empty() {
        return Ok(ReplayReply::End);
    }
    let payload = frames.pop().unwrap_or_default();
    let topic = frames.swap_remove(1);
    Ok(ReplayReply::Batch(Batch { topic, seq, payload }))
}

/// The frames of a replay request sent from a DEALER: `["", start_seq (8 bytes BE)]`.
pub fn replay_request(start_seq: u64) -> [Vec<u8>; 2] {
    [Vec::new(), start_seq.to_be_bytes().to_vec()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/vllm/zmq_wire.json");
        let text = std::fs::read_to_string(path).expect("zmq_wire.json");
        serde_json::from_str(&text).expect("json")
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn frames(v: &serde_json::Value) -> Vec<Vec<u8>> {
        v.as_array().unwrap().iter().map(|f| unhex(f.as_str().unwrap())).collect()
    }

    #[test]
    fn live_messages_from_vllm_parse() {
        let v = vectors();
        let topic = v["topic"].as_str().unwrap().as_bytes();
        for m in v["live_pub_messages"].as_array().unwrap() {
            let f = frames(&m["frames_hex"]);
            let b = parse_live(f.clone()).unwrap();
            assert_eq!(b.topic, topic);
            assert_eq!(b.seq, m["seq"].as_u64().unwrap());
            assert_eq!(b.payload, f[2]);
        }
    }

    #[test]
    fn dealer_replay_exchange_from_vllm_parses() {
        let v = vectors();
        let r = &v["replay_request_dealer"];
        let sent = frames(&r["sent_frames_hex"]);
        let start = u64::from_be_bytes(sent[1].clone().try_into().unwrap());
        assert_eq!(replay_request(start).to_vec(), sent);
        let received: Vec<_> = r["received"].as_array().unwrap().iter().map(frames).collect();
        let (last, batches) = received.split_last().unwrap();
        assert_eq!(parse_replay(last.clone()).unwrap(), ReplayReply::End);
        let live = v["live_pub_messages"].as_array().unwrap();
        for (i, f) in batches.iter().enumerate() {
            let ReplayReply::Batch(b) = parse_replay(f.clone()).unwrap() else {
                panic!("batch expected")
            };
            assert_eq!(b.seq, start + i as u64);
            // A replayed batch is byte-identical to the live message with the same seq.
            let live_frames = frames(&live[b.seq as usize]["frames_hex"]);
            assert_eq!(parse_live(live_frames).unwrap(), b);
        }
    }

    #[test]
    fn malformed_messages_are_rejected() {
        assert_eq!(
            parse_live(vec![b"t".to_vec(), vec![0; 8]]),
            Err(FrameError::FrameCount { expected: 3, got: 2 })
        );
        assert_eq!(
            parse_live(vec![b"t".to_vec(), vec![0; 4], vec![1]]),
            Err(FrameError::SeqLength(4))
        );
        assert_eq!(
            parse_live(vec![b"t".to_vec(), vec![0xff; 8], vec![1]]),
            Err(FrameError::ReservedSeq)
        );
        assert_eq!(parse_live(Vec::new()), Err(FrameError::FrameCount { expected: 3, got: 0 }));
        assert_eq!(
            parse_replay(vec![b"x".to_vec(), b"t".to_vec(), vec![0; 8], vec![]]),
            Err(FrameError::MissingDelimiter)
        );
        assert_eq!(
            parse_replay(vec![vec![], b"t".to_vec(), vec![0; 9], vec![]]),
            Err(FrameError::SeqLength(9))
        );
        assert_eq!(
            parse_replay(vec![vec![], vec![0; 8]]),
            Err(FrameError::FrameCount { expected: 4, got: 2 })
        );
        assert_eq!(
            parse_replay(vec![vec![], b"t".to_vec(), vec![0; 8], vec![], vec![]]),
            Err(FrameError::FrameCount { expected: 4, got: 5 })
        );
        assert_eq!(
            parse_replay(vec![vec![], b"topic".to_vec(), vec![]]),
            Err(FrameError::SeqLength(5))
        );
    }

    #[test]
    fn replay_replies_without_topic_frame_parse() {
        // vLLM before 0.26-0.28: `["", seq, payload]`, end marker `["", END_SEQ, ""]`.
        let seq7 = 7u64.to_be_bytes().to_vec();
        assert_eq!(
            parse_replay(vec![vec![], seq7, b"p".to_vec()]),
            Ok(ReplayReply::Untagged { seq: 7, payload: b"p".to_vec() })
        );
        assert_eq!(parse_replay(vec![vec![], vec![0xff; 8], vec![]]), Ok(ReplayReply::End));
        assert_eq!(
            parse_replay(vec![b"x".to_vec(), vec![0; 8], vec![]]),
            Err(FrameError::MissingDelimiter)
        );
    }
}
