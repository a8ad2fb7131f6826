//! Fault model test: random appends, markers, requeues, purges, forgets (by id),
//! rotations and retentions
//! through the fault seam, with injected write, sync and truncate failures, and
//! restarts after a clean close, a kill, or a power loss (unsynced bytes dropped at
//! random, holes included). After every restart the WAL must open (a crash is never
//! corruption), every acknowledged entry must be there exactly once, no refused
//! entry may be (unless a power loss struck while a failed sync left its bytes
//! undecided), and the pending and dead sets must be what the model allows.
//!
//! `make test` runs a CI-sized number of cases; `make chaos` (SPOOL_CHAOS=full) runs
//! many more.

mod common;

use common::*;
use proptest::prelude::*;
use spool_wal::fault::{Fault, FaultIo, FaultOp};
use spool_wal::{Wal, WalConfig, WalError, WalHooks};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    Deliver(usize),
    Fail(usize),
    Requeue(usize),
    Purge(usize),
    /// Forget a pending entry by id (a TOMBSTONE, durable before it answers).
    Forget(usize),
    Rotate,
    Retention,
    /// Arm a failure of the next call of this kind.
    Inject(FaultOp, Fault),
    Restart(Crash),
}

#[derive(Debug, Clone, Copy)]
enum Crash {
    /// `close()`: everything written is synced.
    Clean,
    /// kill -9: what was written stays (the page cache survives).
    Kill,
    /// Power loss: each unsynced piece kept or dropped by these bits.
    Power(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let fault = prop_oneof![Just(Fault::Eio), Just(Fault::NoSpace)];
    let kind = prop_oneof![
        3 => Just(FaultOp::Write),
        2 => Just(FaultOp::Sync),
        1 => Just(FaultOp::SetLen),
        1 => Just(FaultOp::Create),
    ];
    prop_oneof![
        6 => (1u8..4).prop_map(Op::Append),
        3 => any::<usize>().prop_map(Op::Deliver),
        1 => any::<usize>().prop_map(Op::Fail),
        1 => any::<usize>().prop_map(Op::Requeue),
        1 => any::<usize>().prop_map(Op::Purge),
        1 => any::<usize>().prop_map(Op::Forget),
        1 => Just(Op::Rotate),
        1 => Just(Op::Retention),
        2 => (kind, fault).prop_map(|(k, f)| Op::Inject(k, f)),
        2 => prop_oneof![
            Just(Crash::Clean),
            Just(Crash::Kill),
            any::<u64>().prop_map(Crash::Power),
        ]
        .prop_map(Op::Restart),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum St {
    Pending,
    Delivered,
    Dead,
    /// A dead letter an operator purged: gone, and never to be replayed.
    Purged,
    /// Forgotten by id while pending: gone, and never to be delivered.
    Forgotten,
}

/// What the model knows of one entry: its status as acknowledged, and the older
/// statuses a crash may bring back (markers are not synced before they answer).
#[derive(Debug)]
struct Known {
    n: u64,
    id: uuid::Uuid,
    st: St,
    undo: BTreeSet<St>,
}

#[derive(Default)]
struct Model {
    entries: BTreeMap<u64, Known>,
    /// Payload numbers refused by the append that poisoned the handle: after a
    /// power loss their bytes may or may not have reached the disk.
    undecided: BTreeSet<u64>,
    /// A truncate fault was armed: the cut-back after a failed sync may fail too,
    /// leaving the refused bytes in the page cache (documented limit).
    cut_may_fail: bool,
    poisoned: bool,
    max_acked_lsn: u64,
}

impl Model {
    /// A call failed: whether it poisoned the handle just now.
    fn refused(&mut self, e: &WalError) -> bool {
        let poison = matches!(e, WalError::Poisoned(_));
        let now = poison && !self.poisoned;
        self.poisoned |= poison;
        now
    }

    /// A sync covered everything written: no older status can come back.
    fn barrier(&mut self) {
        for k in self.entries.values_mut() {
            k.undo.clear();
        }
    }

    fn set(&mut self, lsn: u64, st: St) {
        let k = self.entries.get_mut(&lsn).expect("known entry");
        let old = std::mem::replace(&mut k.st, st);
        k.undo.insert(old);
    }

    fn with(&self, st: St) -> Vec<u64> {
        let v = self.entries.iter().filter(|(_, k)| k.st == st);
        v.map(|(l, _)| *l).collect()
    }

    /// The live handle agrees with the model exactly.
    fn check_live(&self, wal: &Wal) {
        let pending: Vec<u64> = wal
            .pending_after(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| e.lsn)
            .collect();
        assert_eq!(pending, self.with(St::Pending), "pending set");
        let dead: Vec<u64> = wal
            .dead_letters(None, usize::MAX)
            .iter()
            .map(|d| d.lsn)
            .collect();
        assert_eq!(dead, self.with(St::Dead), "dead letters");
        self.check_purged(wal);
        self.check_forgotten(wal);
    }

    /// Every entry forgotten is known forgotten (its tombstone is retained: never
    /// applied here, so it pins its segment), and reads back as no longer pending.
    fn check_forgotten(&self, wal: &Wal) {
        for (lsn, k) in self.entries.iter().filter(|(_, k)| k.st == St::Forgotten) {
            assert!(
                wal.forgot_id("agents", k.id).is_some(),
                "lsn {lsn}: forget lost"
            );
            let read = wal.read_queued(&[*lsn]);
            assert!(
                matches!(read[0].1, spool_wal::ReadBack::Gone),
                "lsn {lsn}: a forgotten entry reads back as {:?}",
                read[0].1
            );
        }
    }

    /// Every purged entry whose record is still in the WAL is known purged (so
    /// replay skips it), and nothing else is.
    fn check_purged(&self, wal: &Wal) {
        for item in wal.reader(1) {
            let (lsn, rec) = item.unwrap();
            if !matches!(rec, spool_wal::Record::Entry(_)) {
                continue;
            }
            let purged = self.entries.get(&lsn).is_some_and(|k| k.st == St::Purged);
            assert_eq!(wal.is_purged(lsn), purged, "lsn {lsn}: purged flag");
        }
    }

    /// After a restart: every entry is in a status the model allows; adopt it.
    fn reconcile(&mut self, wal: &Wal, crash: Crash) {
        let pending = wal.pending_after(0, usize::MAX).unwrap();
        let mut seen_n = BTreeSet::new();
        let mut observed: BTreeMap<u64, St> = BTreeMap::new();
        for e in &pending {
            let n = payload_n(&e.entry.payload);
            assert!(seen_n.insert(n), "entry {n} is stored twice");
            observed.insert(e.lsn, St::Pending);
        }
        for d in wal.dead_letters(None, usize::MAX) {
            observed.insert(d.lsn, St::Dead);
        }
        for (lsn, k) in &mut self.entries {
            let gone = if wal.forgot_id("agents", k.id).is_some() {
                St::Forgotten
            } else if k.st == St::Purged || k.undo.contains(&St::Purged) {
                if wal.is_purged(*lsn) || k.st == St::Purged {
                    St::Purged
                } else {
                    St::Delivered
                }
            } else {
                St::Delivered
            };
            let got = observed.remove(lsn).unwrap_or(gone);
            assert!(
                got == k.st || k.undo.contains(&got),
                "entry {} (lsn {lsn}) is {got:?} after {crash:?}; acknowledged {:?}, may revert to {:?}",
                k.n, k.st, k.undo
            );
            k.st = got;
            k.undo.clear();
        }
        // Whatever is left was never acknowledged.
        for (lsn, st) in observed {
            let e = wal.read_entries(&[lsn]).unwrap().remove(0).entry;
            let n = payload_n(&e.payload);
            let may = matches!(crash, Crash::Power(_)) || self.cut_may_fail;
            assert!(
                may && self.undecided.contains(&n) && st == St::Pending,
                "refused entry {n} (lsn {lsn}) is on disk after {crash:?}"
            );
            self.entries.insert(
                lsn,
                Known {
                    n,
                    id: e.id,
                    st,
                    undo: BTreeSet::new(),
                },
            );
        }
        self.entries.retain(|_, k| k.st != St::Delivered);
        self.undecided.clear();
        self.cut_may_fail = false;
        self.poisoned = false;
        self.check_purged(wal);
        self.check_forgotten(wal);
    }
}

fn config() -> WalConfig {
    WalConfig {
        segment_bytes: 4096,
        // Delivered history goes at once: retention and the checkpoints' segment
        // lists are exercised on every rotation.
        retention: Duration::ZERO,
        ..WalConfig::default()
    }
}

fn open(dir: &std::path::Path) -> (Wal, FaultIo) {
    let io = FaultIo::new();
    let hooks = WalHooks {
        io: Arc::new(io.clone()),
        ..WalHooks::default()
    };
    let wal = Wal::open_with(dir, config(), hooks).expect("a crash stopped startup");
    (wal, io)
}

fn pick(v: Vec<u64>, i: &usize) -> Option<u64> {
    (!v.is_empty()).then(|| v[i % v.len()])
}

fn run(ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, mut io) = open(dir.path());
    let mut m = Model::default();
    let mut n = 0u64;
    for op in ops {
        let was_poisoned = m.poisoned;
        rt.block_on(async {
            match op {
                Op::Append(k) => {
                    let es: Vec<_> = (0..k).map(|i| entry(n + i as u64)).collect();
                    let ns: Vec<u64> = (n..n + k as u64).collect();
                    n += k as u64;
                    match wal.append(&es).await {
                        Ok(lsns) => {
                            for ((l, n), e) in lsns.iter().zip(ns).zip(&es) {
                                assert!(*l > m.max_acked_lsn, "LSN handed out again");
                                m.max_acked_lsn = *l;
                                m.entries.insert(
                                    *l,
                                    Known {
                                        n,
                                        id: e.id,
                                        st: St::Pending,
                                        undo: BTreeSet::new(),
                                    },
                                );
                            }
                            m.barrier();
                        }
                        Err(e) => {
                            if m.refused(&e) {
                                m.undecided.extend(ns);
                            }
                        }
                    }
                }
                Op::Deliver(i) => {
                    let Some(l) = pick(m.with(St::Pending), &i) else {
                        return;
                    };
                    match wal.mark_delivered(&[l]).await {
                        Ok(()) => m.set(l, St::Delivered),
                        Err(e) => drop(m.refused(&e)),
                    }
                }
                Op::Fail(i) => {
                    let Some(l) = pick(m.with(St::Pending), &i) else {
                        return;
                    };
                    match wal.mark_failed(l, 3, "rejected").await {
                        Ok(()) => m.set(l, St::Dead),
                        Err(e) => drop(m.refused(&e)),
                    }
                }
                Op::Requeue(i) => {
                    let Some(l) = pick(m.with(St::Dead), &i) else {
                        return;
                    };
                    match wal.requeue(&[l]).await {
                        Ok(v) => {
                            assert_eq!(v, vec![l]);
                            m.set(l, St::Pending);
                            m.barrier();
                        }
                        Err(e) => {
                            if m.refused(&e) {
                                // Its record may have reached the disk.
                                m.entries.get_mut(&l).unwrap().undo.insert(St::Pending);
                            }
                        }
                    }
                }
                Op::Purge(i) => {
                    let Some(l) = pick(m.with(St::Dead), &i) else {
                        return;
                    };
                    match wal.purge(&[l]).await {
                        Ok(v) => {
                            assert_eq!(v, vec![l]);
                            m.set(l, St::Purged);
                            m.barrier();
                        }
                        Err(e) => {
                            if m.refused(&e) {
                                // Its record may have reached the disk.
                                m.entries.get_mut(&l).unwrap().undo.insert(St::Purged);
                            }
                        }
                    }
                }
                Op::Forget(i) => {
                    let Some(l) = pick(m.with(St::Pending), &i) else {
                        return;
                    };
                    let mut t = spool_wal::Tombstone {
                        at_us: spool_wal::now_us(),
                        source: "agents".into(),
                        destination: "main".into(),
                        ids: vec![m.entries[&l].id],
                        subject: None,
                    };
                    match wal.forget(&mut t).await {
                        Ok(_) => {
                            m.set(l, St::Forgotten);
                            m.barrier();
                        }
                        Err(e) => {
                            if m.refused(&e) {
                                // Its record may have reached the disk.
                                m.entries.get_mut(&l).unwrap().undo.insert(St::Forgotten);
                            }
                        }
                    }
                }
                Op::Rotate => match wal.rotate().await {
                    Ok(()) => m.barrier(),
                    Err(e) => drop(m.refused(&e)),
                },
                Op::Retention => match wal.run_retention().await {
                    Ok(_) => m.barrier(),
                    Err(e) => drop(m.refused(&e)),
                },
                Op::Inject(kind, fault) => {
                    m.cut_may_fail |= kind == FaultOp::SetLen;
                    io.fail(kind, 0, fault)
                }
                Op::Restart(crash) => {
                    match crash {
                        Crash::Clean => match wal.sync().await {
                            Ok(()) => m.barrier(),
                            Err(e) => drop(m.refused(&e)),
                        },
                        Crash::Kill => io.crash(),
                        Crash::Power(bits) => {
                            let mut bits = bits;
                            io.power_loss(|_| {
                                bits = bits.rotate_left(1);
                                bits & 1 == 1
                            })
                            .unwrap();
                        }
                    }
                    wal.close();
                    (wal, io) = open(dir.path());
                    m.reconcile(&wal, crash);
                }
            }
        });
        if !m.poisoned && !was_poisoned {
            m.check_live(&wal);
        }
    }
    io.crash();
    wal.close();
    drop(wal);
    // Whatever happened, the directory verifies and opens.
    let v = spool_wal::inspect::verify(dir.path()).unwrap();
    assert!(v.is_ok(), "{:?}", v.damage);
    let wal = Wal::open(dir.path(), config()).unwrap();
    m.reconcile(&wal, Crash::Kill);
}

fn cases() -> u32 {
    if std::env::var("SPOOL_CHAOS").as_deref() == Ok("full") {
        3000
    } else {
        96
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_wal_under_faults_keeps_every_acknowledged_entry_once(
        ops in prop::collection::vec(op(), 1..60)
    ) {
        run(ops);
    }
}
