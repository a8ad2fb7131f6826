//! The write path's body parser: gzip (sometimes), the linear prescan, the
//! split into entries, and each entry's check by a destination's rules.
//! Properties: never a panic, a hang or a 5xx; an accepted body's entries are
//! at most the limit, each a JSON object the destination can store, whose
//! fields are what the parser said; its indexed words are each non-empty, at
//! most `MAX_WORD_BYTES`, free of whitespace and control characters, distinct,
//! and at most `MAX_INDEXED_BYTES` in all.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spool_server::http::{gunzip, parse_entries, BodyRules};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let rules = BodyRules {
        ndjson: flags & 1 != 0,
        max_entries: 1 + (flags as usize >> 4),
        max_entry_bytes: 4096,
        no_nul: flags & 2 != 0,
        header_key: (flags & 8 != 0).then(|| "k".to_owned()),
        embedding_dims: (flags & 2 != 0).then_some(3),
    };
    let decoded;
    let body = if flags & 4 != 0 {
        match gunzip(body, 1 << 20) {
            Ok(d) => {
                decoded = d;
                &decoded[..]
            }
            Err(e) => {
                assert!(e.status().is_client_error(), "{e:?}");
                return;
            }
        }
    } else {
        body
    };
    match parse_entries(body, &rules) {
        Ok(entries) => {
            assert!(!entries.is_empty() && entries.len() <= rules.max_entries);
            for e in entries {
                assert!(e.payload.len() <= 4096);
                let fields = spool_destination::check_payload(&e.payload, rules.no_nul)
                    .expect("an accepted entry passes the destination's check");
                // A second opinion on the fields: serde_json's own parse.
                let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
                assert!(v.is_object());
                assert_eq!(v.get("subject").and_then(|s| s.as_str()), e.subject.as_deref());
                let key = v.get("idempotency_key").and_then(|s| s.as_str());
                assert_eq!(key.or(rules.header_key.as_deref()), e.idempotency_key.as_deref());
                match (fields.subject, &e.subject) {
                    (spool_destination::Field::Text(s), Some(t)) => assert_eq!(&s, t),
                    (spool_destination::Field::Absent, None) => {}
                    other => panic!("subject {other:?}"),
                }
                let words = spool_destination::payload_words(&e.payload);
                assert!(words.len() <= spool_destination::MAX_INDEXED_BYTES);
                let mut seen = std::collections::HashSet::new();
                for w in words.split(' ').filter(|_| !words.is_empty()) {
                    assert!(!w.is_empty() && w.len() <= spool_destination::MAX_WORD_BYTES, "{w:?}");
                    assert!(!w.chars().any(|c| c.is_whitespace() || c.is_control()), "{w:?}");
                    assert!(seen.insert(w), "{w:?} twice");
                }
                if rules.no_nul {
                    assert!(!e.subject.unwrap_or_default().contains('\0'));
                    assert!(!e.idempotency_key.unwrap_or_default().contains('\0'));
                }
            }
        }
        Err(e) => assert!(e.status().is_client_error(), "{e:?}"),
    }
});
