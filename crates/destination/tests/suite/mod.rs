//! Behaviour every destination must have; run against real SQLite and Postgres.
#![allow(dead_code)]

use spool_destination::{Destination, DestinationError, Query};
use spool_wal::{Entry, LoggedEntry};
use std::collections::BTreeSet;
use std::sync::Arc;

mod memory;
pub use memory::*;

pub type Dest = Arc<dyn Destination>;

pub fn logged(
    lsn: u64,
    source: &str,
    subject: Option<&str>,
    payload: &str,
    at_us: i64,
) -> LoggedEntry {
    let mut e = Entry::new(source, "main", payload.as_bytes().to_vec());
    e.subject = subject.map(str::to_owned);
    e.accepted_at_us = at_us;
    LoggedEntry { lsn, entry: e }
}

fn q(source: &str) -> Query {
    Query {
        source: source.into(),
        limit: 1000,
        ..Query::default()
    }
}

pub async fn all(d: &Dest, source: &str) -> Vec<spool_destination::StoredEntry> {
    d.query(&q(source)).await.unwrap().entries
}

pub async fn redelivery_is_idempotent_and_first_write_wins(d: Dest) {
    let batch: Vec<LoggedEntry> = (0..20)
        .map(|i| {
            logged(
                i,
                "s",
                Some("a"),
                &format!(r#"{{"i":{i}}}"#),
                1_000 + i as i64,
            )
        })
        .collect();
    assert_eq!(d.write_batch(&batch).await.unwrap(), 0);
    assert_eq!(d.write_batch(&batch).await.unwrap(), 20, "all already held");
    let mut changed = batch.clone();
    for le in &mut changed {
        le.entry.payload = br#"{"changed":true}"#.to_vec();
    }
    d.write_batch(&changed[5..10]).await.unwrap();
    let rows = all(&d, "s").await;
    assert_eq!(rows.len(), 20);
    for r in &rows {
        let orig = batch.iter().find(|b| b.entry.id == r.entry.id).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.entry.payload).unwrap();
        let want: serde_json::Value = serde_json::from_slice(&orig.entry.payload).unwrap();
        assert_eq!(v, want, "a redelivery changed the first write");
        assert_eq!(r.lsn, orig.lsn);
    }
    // Duplicates inside one batch are fine too.
    let dup = vec![batch[0].clone(), batch[0].clone()];
    d.write_batch(&dup).await.unwrap();
    assert_eq!(all(&d, "s").await.len(), 20);
}

pub async fn a_poison_entry_is_named_and_the_rest_can_be_written(d: Dest, poison: &str) {
    let mut batch: Vec<LoggedEntry> = (0..6)
        .map(|i| logged(i, "p", None, &format!(r#"{{"i":{i}}}"#), 10 + i as i64))
        .collect();
    batch[3].entry.payload = poison.as_bytes().to_vec();
    match d.write_batch(&batch).await.unwrap_err() {
        DestinationError::Rejected { index: Some(3), .. } => {}
        other => panic!("expected rejection of entry 3, got {other}"),
    }
    assert!(all(&d, "p").await.is_empty(), "a rejected batch wrote rows");
    batch.remove(3);
    d.write_batch(&batch).await.unwrap();
    assert_eq!(all(&d, "p").await.len(), 5);
}

pub async fn queries_filter_order_and_search(d: Dest) {
    let batch = vec![
        logged(
            1,
            "q",
            Some("alice"),
            r#"{"text":"the quick brown fox"}"#,
            100,
        ),
        logged(
            2,
            "q",
            Some("bob"),
            r#"{"text":"lazy dog sleeps","tags":["brown"]}"#,
            200,
        ),
        logged(
            3,
            "q",
            Some("alice"),
            r#"{"note":"Grüße aus Köln","n":5}"#,
            300,
        ),
        logged(
            4,
            "other",
            Some("alice"),
            r#"{"text":"brown fox from another source"}"#,
            400,
        ),
    ];
    d.write_batch(&batch).await.unwrap();
    let ids = |p: &spool_destination::Page| p.entries.iter().map(|e| e.lsn).collect::<Vec<_>>();

    assert_eq!(
        ids(&d.query(&q("q")).await.unwrap()),
        vec![3, 2, 1],
        "newest first"
    );
    let sub = Query {
        subject: Some("alice".into()),
        ..q("q")
    };
    assert_eq!(ids(&d.query(&sub).await.unwrap()), vec![3, 1]);
    let fts = Query {
        q: Some("brown".into()),
        ..q("q")
    };
    assert_eq!(
        ids(&d.query(&fts).await.unwrap()),
        vec![2, 1],
        "full-text over string values"
    );
    let both = Query {
        q: Some("quick FOX".into()),
        ..q("q")
    };
    assert_eq!(
        ids(&d.query(&both).await.unwrap()),
        vec![1],
        "every word must match"
    );
    let uni = Query {
        q: Some("grüße".into()),
        ..q("q")
    };
    assert_eq!(ids(&d.query(&uni).await.unwrap()), vec![3]);
    let range = Query {
        since_us: Some(150),
        until_us: Some(300),
        ..q("q")
    };
    assert_eq!(
        ids(&d.query(&range).await.unwrap()),
        vec![2],
        "since inclusive, until exclusive"
    );
    let none = Query {
        q: Some("zebra".into()),
        ..q("q")
    };
    assert!(d.query(&none).await.unwrap().entries.is_empty());
    // By id, scoped to the source.
    let e = &batch[0].entry;
    let got = d.get("q", e.id).await.unwrap().unwrap();
    // Postgres hands back its normalized jsonb text: compare as JSON.
    let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
    assert_eq!(json(&got.entry.payload), json(&e.payload));
    assert_eq!(
        (
            got.lsn,
            got.entry.subject.as_deref(),
            got.entry.accepted_at_us
        ),
        (1, Some("alice"), 100)
    );
    assert!(
        d.get("other", e.id).await.unwrap().is_none(),
        "read across sources"
    );
    let bad = Query {
        limit: 1001,
        ..q("q")
    };
    assert!(matches!(
        d.query(&bad).await,
        Err(DestinationError::InvalidQuery(_))
    ));
}

pub async fn cursors_neither_skip_nor_repeat_under_concurrent_inserts(d: Dest) {
    let base: Vec<LoggedEntry> = (0..95)
        .map(|i| {
            logged(
                i,
                "c",
                None,
                &format!(r#"{{"i":{i}}}"#),
                1_000_000 + (i as i64 / 3),
            )
        })
        .collect();
    d.write_batch(&base).await.unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut extra = 1000u64;
    loop {
        let page = d
            .query(&Query {
                limit: 10,
                cursor: cursor.clone(),
                ..q("c")
            })
            .await
            .unwrap();
        seen.extend(page.entries.iter().map(|e| e.lsn));
        // New entries arrive between pages (accepted now, so newer than all).
        let fresh: Vec<_> = (0..3)
            .map(|k| {
                logged(
                    extra + k,
                    "c",
                    None,
                    r#"{"late":true}"#,
                    2_000_000 + extra as i64,
                )
            })
            .collect();
        extra += 3;
        d.write_batch(&fresh).await.unwrap();
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "a page repeated an entry");
    let base_seen: BTreeSet<u64> = unique.iter().copied().filter(|l| *l < 1000).collect();
    assert_eq!(base_seen, (0..95).collect(), "pagination skipped entries");
}

pub async fn unicode_and_large_payloads_round_trip(d: Dest) {
    let big = format!(r#"{{"blob":"{}"}}"#, "ä".repeat(512 * 1024)); // ≈1 MiB
    let batch = vec![
        logged(
            1,
            "u",
            Some("日本語 subject ✓"),
            r#"{"emoji":"🦀🚀","rtl":"שלום"}"#,
            1,
        ),
        logged(2, "u", None, &big, 2),
    ];
    d.write_batch(&batch).await.unwrap();
    let a = d.get("u", batch[0].entry.id).await.unwrap().unwrap();
    assert_eq!(a.entry.subject.as_deref(), Some("日本語 subject ✓"));
    let v: serde_json::Value = serde_json::from_slice(&a.entry.payload).unwrap();
    assert_eq!(v["emoji"], "🦀🚀");
    let b = d.get("u", batch[1].entry.id).await.unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&b.entry.payload).unwrap();
    assert_eq!(v["blob"].as_str().unwrap().chars().count(), 512 * 1024);
}

pub async fn injection_strings_are_data(d: Dest) {
    let evil = "'; DROP TABLE spool_entries; --";
    let batch = vec![logged(
        1,
        evil,
        Some(evil),
        &format!(r#"{{"text":"{}"}}"#, "x\\\" OR 1=1 --"),
        5,
    )];
    d.write_batch(&batch).await.unwrap();
    let page = d
        .query(&Query {
            subject: Some(evil.into()),
            q: Some(evil.into()),
            ..q(evil)
        })
        .await
        .unwrap();
    assert!(
        page.entries.is_empty(),
        "words of the injection are not in the payload"
    );
    let page = d
        .query(&Query {
            subject: Some(evil.into()),
            ..q(evil)
        })
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].entry.source, evil);
    let bad_cursor = Query {
        cursor: Some(evil.into()),
        ..q(evil)
    };
    assert!(matches!(
        d.query(&bad_cursor).await,
        Err(DestinationError::InvalidQuery(_))
    ));
    let fts = Query {
        q: Some("OR 1=1".into()),
        ..q(evil)
    };
    assert_eq!(
        d.query(&fts).await.unwrap().entries.len(),
        1,
        "q words are plain words"
    );
    // The table is still there.
    assert_eq!(all(&d, evil).await.len(), 1);
    d.health().await.unwrap();
}

pub async fn keyed_entries_are_unique_per_source_and_copies_are_counted(d: Dest) {
    let keyed = |lsn, source: &str, key: &str| {
        let mut le = logged(lsn, source, None, &format!(r#"{{"n":{lsn}}}"#), lsn as i64);
        le.entry.idempotency_key = Some(key.into());
        le
    };
    let first = keyed(1, "s", "k");
    let copy = keyed(2, "s", "k"); // another id: a retry another node accepted
    let other_source = keyed(3, "t", "k");
    let other_key = keyed(4, "s", "k2");
    assert_eq!(
        d.write_batch(std::slice::from_ref(&first)).await.unwrap(),
        0
    );
    assert_eq!(
        d.write_batch(&[copy.clone(), other_source.clone(), other_key.clone()])
            .await
            .unwrap(),
        1,
        "the copy is dropped and counted"
    );
    assert!(d.get("s", first.entry.id).await.unwrap().is_some());
    assert!(d.get("s", copy.entry.id).await.unwrap().is_none());
    assert!(d.get("t", other_source.entry.id).await.unwrap().is_some());
    assert!(d.get("s", other_key.entry.id).await.unwrap().is_some());
    // Copies inside one batch: the first of the batch wins.
    let (a, b) = (keyed(5, "s", "k3"), keyed(6, "s", "k3"));
    assert_eq!(d.write_batch(&[a.clone(), b.clone()]).await.unwrap(), 1);
    assert!(d.get("s", a.entry.id).await.unwrap().is_some());
    assert!(d.get("s", b.entry.id).await.unwrap().is_none());
}

/// Words of every script are found by exactly those words, as `words` splits
/// them; random Unicode text (a property test) is found by each of its words,
/// and no query text, however strange, is an error.
pub async fn every_word_of_any_script_is_found(d: Dest) {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;
    let fixed = [
        "नमस्ते दुनिया, क्षत्रिय",
        "مرحبا بالعالم",
        "東京タワー 서울 中文",
        "party 🎉 👩‍👩‍👧 time",
        "Grüße CAFÉ naïve Ærøskøbing",
        "צה\"ל can't 3.14 e-mail",
    ];
    let mut runner = TestRunner::deterministic();
    // Any Unicode text; Postgres cannot hold NUL, which the door refuses for it.
    let text = proptest::collection::vec(proptest::char::any(), 0..40)
        .prop_map(|cs| cs.into_iter().filter(|c| *c != '\0').collect::<String>());
    let mut texts: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
    for _ in 0..64 {
        texts.push(text.new_tree(&mut runner).unwrap().current());
    }
    let batch: Vec<LoggedEntry> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let payload = serde_json::json!({ "text": t }).to_string();
            logged(i as u64 + 1, "w", None, &payload, i as i64 + 1)
        })
        .collect();
    d.write_batch(&batch).await.unwrap();
    for (t, le) in texts.iter().zip(&batch) {
        for word in spool_destination::words(t) {
            let found = d
                .query(&Query {
                    q: Some(word.clone()),
                    ..q("w")
                })
                .await
                .unwrap_or_else(|e| panic!("{word:?} of {t:?}: {e}"));
            assert!(
                found.entries.iter().any(|e| e.entry.id == le.entry.id),
                "{t:?} not found by its word {word:?}"
            );
        }
        // The whole text as the query: every word must match.
        let found = d
            .query(&Query {
                q: Some(t.clone()),
                ..q("w")
            })
            .await
            .unwrap_or_else(|e| panic!("query {t:?}: {e}"));
        let words: Vec<String> = spool_destination::words(t).collect();
        if !words.is_empty() && words.len() <= spool_destination::MAX_QUERY_WORDS {
            assert!(
                found.entries.iter().any(|e| e.entry.id == le.entry.id),
                "{t:?}"
            );
        }
    }
    for fixed_word in [
        "नमस्ते",
        "क्षत्रिय",
        "بالعالم",
        "東",
        "タワー",
        "🎉",
        "👩‍👩‍👧",
        "grüße",
        "café",
        "can't",
        "3.14",
    ] {
        let found = d
            .query(&Query {
                q: Some(fixed_word.into()),
                ..q("w")
            })
            .await
            .unwrap();
        assert!(!found.entries.is_empty(), "{fixed_word}");
    }
}

/// Queries a client may craft are refused as invalid (a 400 at the door), never
/// an outage or an internal error.
pub async fn crafted_queries_are_invalid_not_outages(d: Dest) {
    let bad = [
        Query {
            since_us: Some(i64::MIN),
            ..q("c")
        },
        Query {
            until_us: Some(i64::MAX),
            ..q("c")
        },
        Query {
            subject: Some("a\0b".into()),
            ..q("c")
        },
        Query {
            cursor: Some("7fffffffffffffff.0190a1b2c3d4e5f60718293a4b5c6d7e".into()),
            ..q("c")
        },
        Query {
            cursor: Some("'; DROP TABLE spool_entries; --".into()),
            ..q("c")
        },
    ];
    for query in bad {
        match d.query(&query).await {
            Err(DestinationError::InvalidQuery(_)) => {}
            other => panic!("{query:?}: {other:?}"),
        }
    }
    // The extremes of the range are fine.
    let edge = Query {
        since_us: Some(spool_destination::MIN_TIME_US),
        until_us: Some(spool_destination::MAX_TIME_US),
        ..q("c")
    };
    d.query(&edge).await.unwrap();
}

/// A page holds at most `max_bytes` of payloads (always one entry), and the
/// cursor continues where bytes cut it: nothing skipped, nothing repeated.
pub async fn pages_are_bounded_by_bytes(d: Dest) {
    let blob = |i: u64| format!(r#"{{"i":{i},"b":"{}"}}"#, "x".repeat(100_000));
    let batch: Vec<LoggedEntry> = (1..=5)
        .map(|i| logged(i, "b", None, &blob(i), i as i64))
        .collect();
    d.write_batch(&batch).await.unwrap();
    let mut seen = Vec::new();
    let mut query = Query {
        max_bytes: 250_000,
        ..q("b")
    };
    loop {
        let page = d.query(&query).await.unwrap();
        assert!(page.entries.len() <= 2, "{} entries", page.entries.len());
        seen.extend(page.entries.iter().map(|e| e.lsn));
        match page.next_cursor {
            Some(c) => query.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, vec![5, 4, 3, 2, 1]);
    let tiny = Query {
        max_bytes: 10,
        ..q("b")
    };
    let page = d.query(&tiny).await.unwrap();
    assert_eq!(page.entries.len(), 1, "the first entry always fits");
    assert!(page.next_cursor.is_some());
}

/// A redelivered batch mixing rows already stored, a copy of a key and new
/// rows indexes each new row by its own words (none by another row's).
pub async fn a_batch_of_old_and_new_rows_indexes_each_new_row_by_its_own_words(d: Dest) {
    let row = |lsn: u64, key: Option<&str>| {
        let mut le = logged(
            lsn,
            "mix",
            None,
            &format!(r#"{{"t":"word{lsn}"}}"#),
            lsn as i64,
        );
        le.entry.idempotency_key = key.map(str::to_owned);
        le
    };
    let first = vec![row(1, None), row(2, Some("k"))];
    d.write_batch(&first).await.unwrap();
    let second = vec![
        row(3, None),
        first[0].clone(),
        row(4, Some("k")),
        row(5, None),
        first[1].clone(),
        row(6, None),
    ];
    assert_eq!(d.write_batch(&second).await.unwrap(), 3);
    let expect = [
        (1, true),
        (2, true),
        (3, true),
        (4, false),
        (5, true),
        (6, true),
    ];
    for (lsn, stored) in expect {
        let found = d
            .query(&Query {
                q: Some(format!("word{lsn}")),
                ..q("mix")
            })
            .await
            .unwrap();
        let lsns: Vec<u64> = found.entries.iter().map(|e| e.lsn).collect();
        assert_eq!(lsns, if stored { vec![lsn] } else { vec![] }, "word{lsn}");
    }
}
