//! Agent memory: forgetting and recall (text, vector, hybrid).

use super::{all, logged, Dest};
use spool_destination::{DestinationError, Search, Tombstone};
use spool_wal::LoggedEntry;

pub fn with_embedding(mut le: LoggedEntry, v: &[f32]) -> LoggedEntry {
    le.entry.embedding = Some(v.to_vec());
    le
}

fn tombstone(source: &str, ids: Vec<uuid::Uuid>, subject: Option<&str>, at_us: i64) -> Tombstone {
    Tombstone {
        at_us,
        source: source.into(),
        destination: "main".into(),
        ids,
        subject: subject.map(str::to_owned),
    }
}

fn texts(d: &[spool_destination::StoredEntry]) -> Vec<String> {
    let mut v: Vec<String> = d
        .iter()
        // Postgres answers jsonb's normal form.
        .map(|e| {
            serde_json::from_slice::<serde_json::Value>(&e.entry.payload)
                .unwrap()
                .to_string()
        })
        .collect();
    v.sort();
    v
}

pub async fn forgetting_deletes_by_id_and_by_subject_up_to_its_time(d: Dest) {
    let a = logged(1, "agents", Some("alice"), r#"{"t":"apricot one"}"#, 100);
    let b = logged(2, "agents", Some("alice"), r#"{"t":"apricot two"}"#, 200);
    let c = logged(3, "agents", Some("bob"), r#"{"t":"cherry"}"#, 100);
    let other = logged(4, "others", Some("alice"), r#"{"t":"apricot other"}"#, 100);
    let later = logged(5, "agents", Some("alice"), r#"{"t":"apricot later"}"#, 300);
    d.write_batch(&[a, b, c.clone(), other, later])
        .await
        .unwrap();

    assert_eq!(
        d.forget(&tombstone("agents", vec![c.entry.id], None, 150))
            .await
            .unwrap(),
        1
    );
    // Another source's tombstone never touches this one's rows.
    assert_eq!(
        d.forget(&tombstone("others", vec![], Some("bob"), 999))
            .await
            .unwrap(),
        0
    );
    let t = tombstone("agents", vec![], Some("alice"), 200);
    assert_eq!(d.forget(&t).await.unwrap(), 2);
    assert_eq!(
        d.forget(&t).await.unwrap(),
        0,
        "forgetting again deletes nothing"
    );
    assert_eq!(
        texts(&all(&d, "agents").await),
        vec![r#"{"t":"apricot later"}"#]
    );
    assert_eq!(all(&d, "others").await.len(), 1);

    // The words of what was forgotten are gone from the full-text index too:
    // a new row (SQLite reuses the highest rowid once it is deleted) must not
    // be found by a forgotten row's word.
    let fig = logged(6, "agents", None, r#"{"t":"fig"}"#, 400);
    d.write_batch(std::slice::from_ref(&fig)).await.unwrap();
    d.forget(&tombstone("agents", vec![fig.entry.id], None, 0))
        .await
        .unwrap();
    d.write_batch(&[logged(7, "agents", None, r#"{"t":"grape"}"#, 500)])
        .await
        .unwrap();
    let found = d
        .query(&spool_destination::Query {
            source: "agents".into(),
            q: Some("fig".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(found.entries.is_empty(), "{:?}", found.entries);
    let hits = d
        .search(&Search {
            source: "agents".into(),
            q: Some("apricot".into()),
            k: 10,
            ..Search::default()
        })
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
}

pub async fn search_ranks_by_vector_text_and_both(d: Dest) {
    let x = with_embedding(
        logged(1, "agents", Some("s"), r#"{"t":"apple pie"}"#, 100),
        &[1.0, 0.0, 0.0],
    );
    let y = with_embedding(
        logged(2, "agents", None, r#"{"t":"banana"}"#, 200),
        &[0.9, 0.1, 0.0],
    );
    let z = with_embedding(
        logged(3, "agents", None, r#"{"t":"apple tart"}"#, 300),
        &[0.0, 1.0, 0.0],
    );
    let w = logged(4, "agents", None, r#"{"t":"apple"}"#, 400);
    let wrong_dims = with_embedding(
        logged(5, "agents", None, r#"{"t":"kiwi"}"#, 500),
        &[1.0, 0.0],
    );
    let elsewhere = with_embedding(
        logged(6, "others", None, r#"{"t":"apple"}"#, 100),
        &[1.0, 0.0, 0.0],
    );
    d.write_batch(&[
        x.clone(),
        y.clone(),
        z.clone(),
        w.clone(),
        wrong_dims,
        elsewhere,
    ])
    .await
    .unwrap();
    let search = |q: Option<&str>, v: Option<&[f32]>, k: u32| Search {
        source: "agents".into(),
        q: q.map(str::to_owned),
        embedding: v.map(<[f32]>::to_vec),
        k,
        ..Search::default()
    };
    let ids = |h: &[spool_destination::Hit]| h.iter().map(|h| h.entry.entry.id).collect::<Vec<_>>();

    let vector = d
        .search(&search(None, Some(&[1.0, 0.0, 0.0]), 2))
        .await
        .unwrap();
    assert_eq!(ids(&vector), vec![x.entry.id, y.entry.id]);
    assert!((vector[0].similarity.unwrap() - 1.0).abs() < 1e-6);
    assert_eq!(
        (vector[1].vector_rank, vector[1].text_rank),
        (Some(2), None)
    );

    let text = d.search(&search(Some("apple"), None, 10)).await.unwrap();
    let mut got = ids(&text);
    got.sort();
    assert_eq!(got, vec![x.entry.id, z.entry.id, w.entry.id]);
    assert!(text
        .iter()
        .all(|h| h.text_rank.is_some() && h.similarity.is_none()));

    // Both: x is the only one both signals rank high.
    let both = d
        .search(&search(Some("apple"), Some(&[1.0, 0.0, 0.0]), 3))
        .await
        .unwrap();
    assert_eq!(both[0].entry.entry.id, x.entry.id);
    assert!(both[0].text_rank.is_some() && both[0].vector_rank == Some(1));
    assert!(both.windows(2).all(|p| p[0].score >= p[1].score));

    let mut only_s = search(Some("apple"), Some(&[1.0, 0.0, 0.0]), 10);
    only_s.subject = Some("s".into());
    assert_eq!(ids(&d.search(&only_s).await.unwrap()), vec![x.entry.id]);
    let mut recent = search(None, Some(&[1.0, 0.0, 0.0]), 10);
    recent.since_us = Some(250);
    assert_eq!(ids(&d.search(&recent).await.unwrap()), vec![z.entry.id]);

    // Written and forgotten after the first vector search: found, then not.
    let fresh = with_embedding(
        logged(7, "agents", None, r#"{"t":"fresh"}"#, 600),
        &[0.0, 0.0, 1.0],
    );
    d.write_batch(std::slice::from_ref(&fresh)).await.unwrap();
    let near = d
        .search(&search(None, Some(&[0.0, 0.0, 1.0]), 1))
        .await
        .unwrap();
    assert_eq!(ids(&near), vec![fresh.entry.id]);
    d.forget(&tombstone("agents", vec![fresh.entry.id], None, 0))
        .await
        .unwrap();
    let near = d
        .search(&search(None, Some(&[0.0, 0.0, 1.0]), 1))
        .await
        .unwrap();
    assert_ne!(
        ids(&near),
        vec![fresh.entry.id],
        "a forgotten vector is still found"
    );
    // A redelivery of a stored row adds nothing (still one hit for x).
    d.write_batch(std::slice::from_ref(&x)).await.unwrap();
    let xs = d
        .search(&search(None, Some(&[1.0, 0.0, 0.0]), 10))
        .await
        .unwrap();
    assert_eq!(ids(&xs).iter().filter(|id| **id == x.entry.id).count(), 1);

    for bad in [
        search(None, None, 10),
        search(Some("  "), None, 10),
        search(Some("apple"), None, 0),
        search(None, Some(&[f32::NAN, 1.0, 0.0]), 10),
        search(None, Some(&[0.0, 0.0, 0.0]), 10),
    ] {
        assert!(
            matches!(d.search(&bad).await, Err(DestinationError::InvalidQuery(_))),
            "{bad:?}"
        );
    }
}
