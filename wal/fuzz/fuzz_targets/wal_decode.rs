//! Arbitrary bytes into the segment/record decoder and into recovery of a
//! directory built from them. Must never panic, hang or allocate unboundedly.
//!
//! Byte 0 picks the mode:
//! - even: the rest is a raw segment image (also split into two segments at byte 1);
//! - odd: the rest is a script of (kind, len, body) records that are framed with
//!   valid CRCs into a segment, then damaged (truncated / a bit flipped) — so the
//!   fuzzer reaches the body decoders and recovery logic behind the checksums.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spool_wal::format;
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
        let d = PathBuf::from(base).join(format!("spool-wal-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn write_dir(segments: &[(u64, Vec<u8>)]) {
    let dir = scratch();
    for e in std::fs::read_dir(dir).unwrap() {
        let _ = std::fs::remove_file(e.unwrap().path());
    }
    for (first, bytes) in segments {
        std::fs::write(dir.join(format::segment_file_name(*first)), bytes).unwrap();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    spool_wal::fuzzing::decode_bytes(rest);
    if mode & 1 == 0 {
        let split = rest.first().map_or(0, |b| *b as usize).min(rest.len());
        write_dir(&[(1, rest[..split].to_vec()), (1000, rest[split..].to_vec())]);
    } else {
        let mut seg = format::encode_segment_header(1).to_vec();
        let mut lsn = 1u64;
        let mut it = rest;
        while it.len() >= 3 {
            // 0 is not a kind: exercises the unknown-kind path; the high bit is
            // FRAME_FLAG_SYNCED (format version 2), which decides torn vs corrupt.
            let kind = (it[0] % 6) | (it[0] & format::FRAME_FLAG_SYNCED);
            let len = (u16::from_le_bytes([it[1], it[2]]) as usize).min(it.len() - 3);
            let body = &it[3..3 + len];
            it = &it[3 + len..];
            // Frame with a valid CRC whatever the kind byte.
            let mut frame = Vec::new();
            format::encode_frame(&mut frame, format::Kind::Entry, lsn, body);
            frame[8] = kind;
            let crc = {
                let mut h = crc32fast::Hasher::new();
                h.update(&frame[8..]);
                h.finalize()
            };
            frame[4..8].copy_from_slice(&crc.to_le_bytes());
            seg.extend_from_slice(&frame);
            lsn += 1 + (kind as u64 & 1);
        }
        // Damage: the last byte of the script says where.
        if let Some(&d) = rest.last() {
            let at = (d as usize * 7919) % seg.len();
            if d & 1 == 0 {
                seg.truncate(at.max(1));
            } else {
                seg[at] ^= 1 << (d % 8);
            }
        }
        write_dir(&[(1, seg)]);
    }
    spool_wal::fuzzing::recover_dir(scratch());
});
