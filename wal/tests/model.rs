//! Model-based test: random sequences of appends, markers, forgets (by id and
//! by subject), compactions, rotations and reopens agree with a simple
//! in-memory model of the pending set, dead letters, forgotten entries and LSNs.

mod common;

use common::*;
use proptest::prelude::*;
use spool_wal::{Entry, LoggedEntry, SyncMode, Tombstone, Wal, WalConfig};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    Deliver(Vec<prop::sample::Index>),
    Fail(prop::sample::Index),
    Requeue(prop::sample::Index),
    ForgetId(prop::sample::Index),
    ForgetSubject(u64),
    Compact,
    Rotate,
    Retention,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1u8..6).prop_map(Op::Append),
        3 => prop::collection::vec(any::<prop::sample::Index>(), 1..4).prop_map(Op::Deliver),
        1 => any::<prop::sample::Index>().prop_map(Op::Fail),
        1 => any::<prop::sample::Index>().prop_map(Op::Requeue),
        1 => any::<prop::sample::Index>().prop_map(Op::ForgetId),
        1 => (0u64..7).prop_map(Op::ForgetSubject),
        1 => Just(Op::Compact),
        1 => Just(Op::Rotate),
        1 => Just(Op::Retention),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    pending: BTreeSet<u64>,
    dead: BTreeMap<u64, (u32, String)>,
    last_lsn: u64,
    /// Payload number of each entry, by LSN.
    ns: BTreeMap<u64, u64>,
    /// Every entry appended, by LSN.
    entries: BTreeMap<u64, Entry>,
    /// LSNs of the entries a tombstone forgot.
    forgotten: BTreeSet<u64>,
}

fn tombstone(ids: Vec<uuid::Uuid>, subject: Option<String>) -> Tombstone {
    Tombstone {
        at_us: spool_wal::now_us(),
        source: "agents".into(),
        destination: "main".into(),
        ids,
        subject,
    }
}

fn config() -> WalConfig {
    WalConfig {
        segment_bytes: 4096,
        sync: SyncMode::Never,
        // Time-based retention is covered by tests/retention.rs; here it must not
        // expire dead letters behind the model's back.
        retention: std::time::Duration::from_secs(3600),
        ..WalConfig::default()
    }
}

fn check(wal: &Wal, m: &Model) {
    let st = wal.status();
    assert_eq!(st.pending, m.pending.len() as u64, "pending count");
    assert_eq!(st.dead, m.dead.len() as u64, "dead count");
    let got: BTreeMap<u64, u64> = wal
        .pending_after(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| (e.lsn, payload_n(&e.entry.payload)))
        .collect();
    let want: BTreeMap<u64, u64> = m.pending.iter().map(|l| (*l, m.ns[l])).collect();
    assert_eq!(got, want, "pending entries");
    let dead: BTreeMap<u64, (u32, String)> = wal
        .dead_letters(None, usize::MAX)
        .into_iter()
        .map(|d| (d.lsn, (d.attempts, d.reason)))
        .collect();
    assert_eq!(dead, m.dead, "dead letters");
    let dead_entries = wal
        .read_entries(&m.dead.keys().copied().collect::<Vec<_>>())
        .unwrap();
    for e in dead_entries {
        assert_eq!(payload_n(&e.entry.payload), m.ns[&e.lsn]);
    }
    for (lsn, e) in &m.entries {
        let le = LoggedEntry {
            lsn: *lsn,
            entry: e.clone(),
        };
        assert_eq!(
            wal.forgets(&le),
            m.forgotten.contains(lsn),
            "forgotten: lsn {lsn}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn wal_agrees_with_model(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), config()).unwrap();
        let mut m = Model::default();
        let mut n = 0u64;
        for op in ops {
            rt.block_on(async {
                match op {
                    Op::Append(k) => {
                        let es: Vec<_> = (0..k).map(|i| entry(n + i as u64)).collect();
                        let lsns = wal.append(&es).await.unwrap();
                        for (i, l) in lsns.iter().enumerate() {
                            assert!(*l > m.last_lsn, "LSN did not increase");
                            m.last_lsn = *l;
                            m.pending.insert(*l);
                            m.ns.insert(*l, n + i as u64);
                            m.entries.insert(*l, es[i].clone());
                        }
                        n += k as u64;
                    }
                    Op::Deliver(ix) => {
                        if m.pending.is_empty() { return; }
                        let v: Vec<u64> = m.pending.iter().copied().collect();
                        let pick: BTreeSet<u64> = ix.iter().map(|i| *i.get(&v)).collect();
                        let pick: Vec<u64> = pick.into_iter().collect();
                        wal.mark_delivered(&pick).await.unwrap();
                        for l in pick { m.pending.remove(&l); }
                    }
                    Op::Fail(i) => {
                        if m.pending.is_empty() { return; }
                        let v: Vec<u64> = m.pending.iter().copied().collect();
                        let l = *i.get(&v);
                        let reason = format!("reason {l}");
                        wal.mark_failed(l, 10, &reason).await.unwrap();
                        m.pending.remove(&l);
                        m.dead.insert(l, (10, reason));
                    }
                    Op::Requeue(i) => {
                        if m.dead.is_empty() { return; }
                        let v: Vec<u64> = m.dead.keys().copied().collect();
                        let l = *i.get(&v);
                        assert_eq!(wal.requeue(&[l]).await.unwrap(), vec![l]);
                        m.dead.remove(&l);
                        m.pending.insert(l);
                    }
                    Op::ForgetId(i) => {
                        if m.entries.is_empty() { return; }
                        let v: Vec<u64> = m.entries.keys().copied().collect();
                        let l = *i.get(&v);
                        let t = wal.forget(&mut tombstone(vec![m.entries[&l].id], None)).await.unwrap();
                        m.last_lsn = t;
                        // By id: tracked or not, it ends here.
                        m.pending.remove(&l);
                        m.dead.remove(&l);
                        m.forgotten.insert(l);
                    }
                    Op::ForgetSubject(k) => {
                        let subject = format!("subject-{k}");
                        let t = wal.forget(&mut tombstone(Vec::new(), Some(subject.clone()))).await.unwrap();
                        m.last_lsn = t;
                        // By subject: covered, but a tracked entry stays tracked
                        // until its worker ends it.
                        for (l, e) in &m.entries {
                            if e.subject.as_deref() == Some(subject.as_str()) {
                                m.forgotten.insert(*l);
                            }
                        }
                    }
                    Op::Compact => {
                        wal.compact().unwrap();
                    }
                    Op::Rotate => wal.rotate().await.unwrap(),
                    Op::Retention => {
                        let r = wal.run_retention().await.unwrap();
                        assert_eq!(r.segments_deleted, 0, "deleted a segment younger than the retention");
                    }
                    Op::Reopen => {
                        wal.close();
                        wal = Wal::open(dir.path(), config()).unwrap();
                        let reopened = entry(n);
                        let next = wal.append(std::slice::from_ref(&reopened)).await.unwrap()[0];
                        assert!(next > m.last_lsn, "LSN reused after reopen");
                        m.last_lsn = next;
                        m.pending.insert(next);
                        m.ns.insert(next, n);
                        m.entries.insert(next, reopened);
                        n += 1;
                    }
                }
            });
            check(&wal, &m);
        }
        wal.close();
        let wal = Wal::open(dir.path(), config()).unwrap();
        check(&wal, &m);
        let v = spool_wal::inspect::verify(dir.path());
        // The live handle holds the lock; verify must say so rather than read.
        prop_assert!(v.is_err());
        wal.close();
        let v = spool_wal::inspect::verify(dir.path()).unwrap();
        prop_assert!(v.is_ok() && v.torn_tail.is_none());
        let stats = spool_wal::inspect::stats(dir.path()).unwrap();
        prop_assert_eq!(stats.pending, m.pending.len() as u64);
        prop_assert_eq!(stats.failed, m.dead.len() as u64);
    }
}
