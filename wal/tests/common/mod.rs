//! Helpers shared by the WAL test suites.
#![allow(dead_code)]

use spool_wal::format::{self, FrameParse, SEGMENT_HEADER_LEN};
use spool_wal::{Entry, SyncMode, Wal, WalConfig};
use std::path::{Path, PathBuf};

/// An entry whose payload names `n`, so tests can check it survived intact.
pub fn entry(n: u64) -> Entry {
    let mut e = Entry::new(
        "agents",
        "main",
        format!(r#"{{"n":{n},"text":"memory {n}"}}"#).into_bytes(),
    );
    if n.is_multiple_of(3) {
        e.subject = Some(format!("subject-{}", n % 7));
    }
    e
}

/// The `n` an [`entry`] payload carries.
pub fn payload_n(payload: &[u8]) -> u64 {
    let s = std::str::from_utf8(payload).expect("payload is UTF-8");
    let rest = s.strip_prefix(r#"{"n":"#).expect("payload shape");
    rest[..rest.find(',').unwrap()].parse().unwrap()
}

/// A config with small segments so rotation happens in tests.
pub fn small(segment_bytes: u64) -> WalConfig {
    WalConfig {
        segment_bytes,
        ..WalConfig::default()
    }
}

pub fn fast() -> WalConfig {
    WalConfig {
        sync: SyncMode::Never,
        ..WalConfig::default()
    }
}

/// Segment files of `dir`, oldest first.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// (offset, lsn, kind) of every frame of a segment image.
pub fn frames(buf: &[u8]) -> Vec<(usize, u64, format::Kind)> {
    let mut out = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN;
    while let FrameParse::Ok(f) = format::parse_frame(&buf[pos..]) {
        out.push((pos, f.lsn, f.kind));
        pos += f.len();
    }
    assert_eq!(pos, buf.len(), "segment image has trailing bytes");
    out
}

/// Payload numbers of the pending entries, in LSN order.
pub fn pending_ns(wal: &Wal) -> Vec<u64> {
    wal.pending_after(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| payload_n(&e.entry.payload))
        .collect()
}
