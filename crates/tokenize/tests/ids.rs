//! The token-id byte scanner against serde_json: whenever the scanner answers, serde_json
//! (the reference, `ids::parse_serde`) gives the same answer, and `ids::parse` always
//! equals the reference. Bodies: well-formed token-id requests written in every way JSON
//! allows (whitespace, key order, batches, escapes, extra fields), the same with
//! adversarial numbers (signs, leading zeros, fractions, exponents, values past u32),
//! random byte mutations of them, and arbitrary bytes.

use kvroute_tokenize::ids::{
    parse, parse_serde, scan, scan_avx2, scan_has_avx2, scan_portable, scan_uses_avx512,
};
use proptest::prelude::*;

fn check(body: &[u8]) -> Result<(), TestCaseError> {
    let reference = parse_serde(body);
    // Every reader of the id lists: AVX-512 where this CPU has it (`scan`), AVX2 where
    // it has that (`scan_avx2`, what `scan` runs without AVX-512 VBMI2), and the SWAR
    // loop every CPU runs (`scan_portable`); they answer alike.
    let fast = scan(body);
    if let Some(fast) = &fast {
        prop_assert_eq!(Some(fast), reference.as_ref(), "{}", String::from_utf8_lossy(body));
    }
    prop_assert_eq!(scan_portable(body), fast.clone());
    prop_assert_eq!(scan_avx2(body), fast);
    prop_assert_eq!(parse(body), reference);
    Ok(())
}

/// One id as written: mostly valid u32s, sometimes something serde rejects.
fn id_text(adversarial: bool) -> BoxedStrategy<String> {
    let valid = prop_oneof![
        4 => any::<u32>().prop_map(|v| v.to_string()),
        4 => (0u32..1000).prop_map(|v| v.to_string()),
        1 => Just("4294967295".to_string()),
        1 => Just("0".to_string()),
    ];
    if !adversarial {
        return valid.boxed();
    }
    prop_oneof![
        300 => valid,
        1 => Just("4294967296".to_string()),
        1 => Just("99999999999".to_string()),
        1 => Just("18446744073709551616".to_string()),
        1 => Just("-1".to_string()),
        1 => Just("-0".to_string()),
        1 => Just("01".to_string()),
        1 => Just("00".to_string()),
        1 => Just("1.0".to_string()),
        1 => Just("1e3".to_string()),
        1 => Just("1E0".to_string()),
        1 => Just("1.".to_string()),
        1 => Just("+1".to_string()),
        1 => Just("null".to_string()),
        1 => Just("\"1\"".to_string()),
        1 => Just("[1]".to_string()),
        1 => Just("".to_string()),
        1 => (0u64..100_000_000_000).prop_map(|v| format!("0{v}")),
        1 => any::<u64>().prop_map(|v| v.to_string()),
    ]
    .boxed()
}

fn ws() -> impl Strategy<Value = &'static str> {
    prop_oneof![8 => Just(""), 4 => Just(" "), 1 => Just("\n  "), 1 => Just("\t"), 1 => Just("\r\n"), 1 => Just("\u{b}"), 1 => Just("\u{a0}")]
}

fn list(adversarial: bool) -> impl Strategy<Value = String> {
    (prop::collection::vec((id_text(adversarial), ws(), ws()), 0..40), ws(), ws()).prop_map(
        |(ids, a, z)| {
            let mut s = format!("[{a}");
            for (k, (id, w1, w2)) in ids.iter().enumerate() {
                if k > 0 {
                    s.push_str(w1);
                    s.push(',');
                    s.push_str(w2);
                }
                s.push_str(id);
            }
            s.push_str(z);
            s.push(']');
            s
        },
    )
}

fn prompt(adversarial: bool) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => list(adversarial),
        2 => (prop::collection::vec(list(adversarial), 0..4), ws()).prop_map(|(ls, w)| format!("[{w}{}]", ls.join(&format!("{w},{w}")))),
        1 => Just("\"some text\"".to_string()),
        1 => Just("null".to_string()),
        1 => Just("[\"a\", 1]".to_string()),
        1 => Just("[[1], 2]".to_string()),
        1 => Just("[[[1]]]".to_string()),
        // A later prompt of a batch that does not open with `[` (found by the fuzzer).
        1 => (list(adversarial), prop_oneof![Just("x"), Just("_"), Just("1"), Just("{")]).prop_map(|(l, c)| format!("[[1],{c}{}]", &l[1..])),
    ]
}

fn other_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("1".to_string()),
        Just("-2.5e3".to_string()),
        Just("\"m\"".to_string()),
        Just("\"caf\\u00e9 \\\"q\\\"\"".to_string()),
        Just("[]".to_string()),
        Just("{\"a\": [1, {\"b\": null}]}".to_string()),
        Just("[{\"role\": \"user\", \"content\": \"hi\"}]".to_string()),
        Just("tru".to_string()),
        Just("\"unterminated".to_string()),
        (1usize..140).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
        (1usize..140).prop_map(|d| format!("{}1{}", "{\"a\":".repeat(d), "}".repeat(d))),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just("\"prompt\"".to_string()),
        2 => Just("\"model\"".to_string()),
        2 => Just("\"stream\"".to_string()),
        1 => Just("\"messages\"".to_string()),
        1 => Just("\"prompt_embeds\"".to_string()),
        2 => Just("\"max_tokens\"".to_string()),
        1 => Just("\"pr\\u006fmpt\"".to_string()),
        1 => Just("\"promp\"".to_string()),
        1 => Just("\"\"".to_string()),
        1 => Just("\"k\u{e9}y\"".to_string()),
    ]
}

/// A body: fields in any order, possibly repeated, with any whitespace.
fn body(adversarial: bool) -> impl Strategy<Value = String> {
    let field = (key(), prompt(adversarial), other_value(), any::<u8>(), ws(), ws(), ws())
        .prop_map(|(k, p, o, pick, w1, w2, w3)| {
            let v = match (k.as_str(), pick % 4) {
                ("\"prompt\"" | "\"pr\\u006fmpt\"", _) => p,
                ("\"stream\"", 0) => "true".into(),
                ("\"stream\"", 1) => "false".into(),
                ("\"messages\"" | "\"prompt_embeds\"", 0 | 1) => "null".into(),
                ("\"model\"", 0) => "\"sql\"".into(),
                _ => o,
            };
            format!("{w1}{k}{w2}:{w3}{v}")
        });
    (prop::collection::vec((field, ws()), 0..6), ws(), ws(), prop::bool::weighted(0.05)).prop_map(
        |(fields, a, z, as_array)| {
            let inner: Vec<String> = fields.into_iter().map(|(f, w)| format!("{f}{w}")).collect();
            if as_array {
                // Arrays are not objects, whatever serde's derive would make of them.
                format!("{a}[{}]{z}", inner.join(","))
            } else {
                format!("{a}{{{}}}{z}", inner.join(","))
            }
        },
    )
}

fn mutate(body: String, edits: Vec<(usize, u8, u8)>) -> Vec<u8> {
    let mut b = body.into_bytes();
    const ALPHABET: &[u8] = b"0123456789,[]{}\" -.eE:\\ntrufalsx\t\n\xff\xc3";
    for (at, op, c) in edits {
        let at = if b.is_empty() { 0 } else { at % (b.len() + 1) };
        let c = ALPHABET[c as usize % ALPHABET.len()];
        match op % 3 {
            0 => b.insert(at, c),
            1 if at < b.len() => {
                b.remove(at);
            }
            _ if at < b.len() => b[at] = c,
            _ => {}
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Well-formed token-id bodies in any JSON spelling, and bodies around them.
    #[test]
    fn the_scanner_agrees_with_serde_on_request_bodies(b in body(false)) {
        check(b.as_bytes())?;
    }

    /// The same with numbers serde rejects, and trailing bytes.
    #[test]
    fn the_scanner_agrees_with_serde_on_adversarial_bodies(b in body(true), tail in prop_oneof![Just(""), Just(" "), Just("x"), Just("}"), Just("\u{0}")]) {
        check(b.as_bytes())?;
        check(format!("{b}{tail}").as_bytes())?;
    }

    /// One odd number among valid ids, in an otherwise plain body.
    #[test]
    fn the_scanner_agrees_with_serde_on_one_odd_id(ids in prop::collection::vec(id_text(false), 0..50), odd in id_text(true), at in any::<usize>(), batch in any::<bool>(), sep in prop_oneof![Just(","), Just(", ")]) {
        let mut ids = ids;
        ids.insert(at % (ids.len() + 1), odd);
        let list = format!("[{}]", ids.join(sep));
        let prompt = if batch { format!("[[3],{list}]") } else { list.clone() };
        check(format!("{{\"model\": \"m\", \"prompt\": {prompt}}}").as_bytes())?;
        let prompt = if batch { format!("[{list},[3]]") } else { list };
        check(format!("{{\"prompt\":{prompt},\"stream\":true}}").as_bytes())?;
    }

    /// A batch one of whose lists opens with another byte (found by the fuzzer), in an
    /// otherwise plain body.
    #[test]
    fn the_scanner_agrees_with_serde_on_broken_batches(lists in prop::collection::vec(list(false), 2..5), at in any::<usize>(), c in any::<u8>()) {
        let mut lists = lists;
        let k = 1 + at % (lists.len() - 1);
        lists[k] = format!("{}{}", c as char, &lists[k][1..]);
        check(format!("{{\"prompt\": [{}], \"model\": \"m\"}}", lists.join(",")).as_bytes())?;
        lists[0] = format!("{}{}", c as char, &lists[0][1..]);
        check(format!("{{\"prompt\": [{}]}}", lists.join(", ")).as_bytes())?;
    }

    /// Random byte edits of such bodies (truncations, stray digits, broken UTF-8, ...).
    #[test]
    fn the_scanner_agrees_with_serde_on_mutated_bodies(b in body(true), edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4)) {
        check(&mutate(b, edits))?;
    }

    /// Arbitrary bytes.
    #[test]
    fn the_scanner_agrees_with_serde_on_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..64)) {
        check(&b)?;
    }

    /// serde_json's own writing of a request, and Python's `json.dumps` spacing, take the
    /// fast path, with the ids exactly as written.
    #[test]
    fn the_scanner_reads_what_clients_write(ids in prop::collection::vec(any::<u32>(), 1..300), batch in any::<bool>(), stream in any::<bool>()) {
        let prompt = if batch { serde_json::json!([ids.clone(), [1, 2]]) } else { serde_json::json!(ids.clone()) };
        let v = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 16, "stream": stream});
        let compact = v.to_string();
        let python = compact.replace(',', ", ").replace(':', ": ");
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        for b in [compact, python, pretty] {
            prop_assert!(scan_portable(b.as_bytes()).is_some(), "{}", b);
            prop_assert!(scan_avx2(b.as_bytes()).is_some(), "{}", b);
            let p = scan(b.as_bytes());
            prop_assert!(p.is_some(), "{}", b);
            let p = p.unwrap();
            prop_assert_eq!(&p.tokens, &ids);
            prop_assert_eq!(p.stream, stream);
            prop_assert_eq!(p.model.as_deref(), Some("m"));
            check(b.as_bytes())?;
        }
    }
}

/// Says which paths ran (the AVX-512 one only on CPUs that have AVX-512 VBMI2, the AVX2
/// one only on CPUs with AVX2).
#[test]
fn report_the_paths_tested() {
    eprintln!("ids::scan uses AVX-512 on this CPU: {}", scan_uses_avx512());
    eprintln!("ids::scan_avx2 runs the AVX2 reader on this CPU: {}", scan_has_avx2());
}
