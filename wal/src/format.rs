//! The on-disk format: segment header, record frame, record bodies.
//!
//! Every multi-byte integer is little-endian. The layout is documented byte by
//! byte in `docs/wal-format.md`; `tests::constants_match_doc` keeps the two in
//! step. Changing anything here is a format change: bump [`FORMAT_VERSION`].

use crate::entry::Entry;
use uuid::Uuid;

/// First eight bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SPOOLWAL";
/// Version of the segment and record format written by this build.
pub const FORMAT_VERSION: u32 = 5;
/// Oldest format version this build reads (version 1 has no [`FRAME_FLAG_SYNCED`]
/// and no segment list in its checkpoints; both read as absent).
pub const MIN_READ_VERSION: u32 = 1;
/// High bit of a frame's kind byte: every byte before this frame in its segment
/// was durable (fdatasynced) when the frame was written. Recovery uses it to tell
/// the last unsynced write (a torn tail, whatever its shape) from synced history.
pub const FRAME_FLAG_SYNCED: u8 = 0x80;
/// Size of the segment header: magic(8) version(4) flags(4) first_lsn(8) reserved(4) crc(4).
pub const SEGMENT_HEADER_LEN: usize = 32;
/// Size of a record frame header: len(4) crc(4) kind(1) lsn(8).
pub const FRAME_HEADER_LEN: usize = 17;
/// File name suffix of a segment.
pub const SEGMENT_SUFFIX: &str = ".wal";
/// Digits of the zero-padded first LSN in a segment file name.
pub const SEGMENT_NAME_DIGITS: usize = 20;
/// Hard upper bound of a frame body the decoder accepts (1 GiB), whatever the
/// configured limit: a corrupt length field can never make the reader trust more.
pub const MAX_FRAME_BODY: usize = 1 << 30;

/// The kind byte of a record frame.
///
/// Do not renumber: the values are on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// An accepted entry.
    Entry = 1,
    /// Entries delivered (a batch of LSNs).
    Delivered = 2,
    /// An entry failed permanently (dead letter).
    Failed = 3,
    /// Dead letters put back to pending (a batch of LSNs).
    Requeued = 4,
    /// Summary of the pending and dead set, first record of every rotated segment.
    Checkpoint = 5,
    /// Dead letters an operator discarded (a batch of LSNs). Since version 3.
    Purged = 6,
    /// Entries forgotten (by id or by subject) by a producer. Since version 4.
    Tombstone = 7,
    /// What was an ENTRY record of a forgotten entry, erased by `spool wal
    /// compact` (same length, body zeroed). Since version 4.
    Erased = 8,
}

impl Kind {
    /// The kind for a byte, if it names one.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Entry,
            2 => Kind::Delivered,
            3 => Kind::Failed,
            4 => Kind::Requeued,
            5 => Kind::Checkpoint,
            6 => Kind::Purged,
            7 => Kind::Tombstone,
            8 => Kind::Erased,
            _ => return None,
        })
    }

    /// Lower-case name, as printed by the operator tools.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Entry => "entry",
            Kind::Delivered => "delivered",
            Kind::Failed => "failed",
            Kind::Requeued => "requeued",
            Kind::Checkpoint => "checkpoint",
            Kind::Purged => "purged",
            Kind::Tombstone => "tombstone",
            Kind::Erased => "erased",
        }
    }
}

/// A decoded record body.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// An accepted entry.
    Entry(Entry),
    /// These entries reached their destination.
    Delivered(Vec<u64>),
    /// This entry is a dead letter.
    Failed {
        /// LSN of the ENTRY record.
        lsn: u64,
        /// Delivery attempts made.
        attempts: u32,
        /// Why it failed.
        reason: String,
    },
    /// These dead letters are pending again.
    Requeued(Vec<u64>),
    /// The pending and dead set as of this record.
    Checkpoint(Checkpoint),
    /// These dead letters were discarded by an operator: terminal, never delivered.
    Purged(Vec<u64>),
    /// Entries a producer forgot.
    Tombstone(Tombstone),
    /// An erased ENTRY record (its body's length).
    Erased(usize),
}

impl Record {
    /// The frame kind of this record.
    pub fn kind(&self) -> Kind {
        match self {
            Record::Entry(_) => Kind::Entry,
            Record::Delivered(_) => Kind::Delivered,
            Record::Failed { .. } => Kind::Failed,
            Record::Requeued(_) => Kind::Requeued,
            Record::Checkpoint(_) => Kind::Checkpoint,
            Record::Purged(_) => Kind::Purged,
            Record::Tombstone(_) => Kind::Tombstone,
            Record::Erased(_) => Kind::Erased,
        }
    }
}

/// Body of a CHECKPOINT record: every entry that is not yet DELIVERED as of the
/// checkpoint, with where its ENTRY record lies, so recovery can start here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Pending entries: (lsn, byte offset of the frame in its segment).
    pub pending: Vec<(u64, u64)>,
    /// Dead letters.
    pub dead: Vec<DeadRef>,
    /// First LSNs of the segments that existed before this checkpoint's own, oldest
    /// first: the segment holding a listed LSN is the greatest of these not above it,
    /// even after retention deleted segments in between. `None` in a version-1
    /// checkpoint (recovery then maps by the files present).
    pub segments: Option<Vec<u64>>,
    /// Purged dead letters whose ENTRY record may still be retained (version 3;
    /// written only after a segment list): replay must never deliver them.
    pub purged: Vec<u64>,
    /// TOMBSTONE records still retained in the segments before this checkpoint's
    /// own (version 4): recovery reads them at their offsets, so what they forgot
    /// stays forgotten.
    pub tombstones: Vec<TombRef>,
    /// The highest accept or forget time (µs) stamped on a record before this
    /// checkpoint (version 5; 0 when absent): stamps keep rising after a restart
    /// even if the clock went back.
    pub stamp: i64,
}

/// A TOMBSTONE record as a checkpoint lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TombRef {
    /// LSN of the TOMBSTONE record.
    pub lsn: u64,
    /// Byte offset of its frame in its segment.
    pub offset: u64,
    /// Whether the destination has applied it (the delete is done).
    pub delivered: bool,
}

/// Body of a TOMBSTONE record: what a producer of `source` forgot. Covers the
/// entries of `source` whose id is in `ids`, and — with `subject` — every entry
/// of `source` with that subject accepted at or before `at_us`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// When the forget was accepted, µs since the epoch.
    pub at_us: i64,
    /// Source whose entries are forgotten.
    pub source: String,
    /// Destination the delete is delivered to.
    pub destination: String,
    /// Entry ids forgotten.
    pub ids: Vec<Uuid>,
    /// Forget every entry with this subject accepted at or before `at_us`.
    pub subject: Option<String>,
}

impl Tombstone {
    /// Whether this tombstone forgets the entry.
    pub fn covers(&self, e: &EntryRef<'_>) -> bool {
        self.covers_parts(e.source, e.id, e.subject, e.accepted_at_us)
    }

    /// [`Tombstone::covers`] on an entry's parts.
    pub fn covers_parts(&self, source: &str, id: Uuid, subject: Option<&str>, at_us: i64) -> bool {
        source == self.source
            && (self.ids.contains(&id)
                || (self.subject.is_some()
                    && subject == self.subject.as_deref()
                    && at_us <= self.at_us))
    }
}

/// A dead letter as a checkpoint records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRef {
    /// LSN of the ENTRY record.
    pub lsn: u64,
    /// Byte offset of the ENTRY frame in its segment.
    pub offset: u64,
    /// Delivery attempts made.
    pub attempts: u32,
    /// Why it failed.
    pub reason: String,
}

/// Encode a segment header.
pub fn encode_segment_header(first_lsn: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // 12..16 flags, 24..28 reserved: zero.
    h[16..24].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32fast::hash(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Why a segment header was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than [`SEGMENT_HEADER_LEN`] bytes.
    Short,
    /// Bad magic or checksum.
    Invalid(&'static str),
    /// A format version this build does not read.
    Version(u32),
}

/// Decode a segment header, returning its first LSN.
pub fn decode_segment_header(buf: &[u8]) -> Result<u64, HeaderError> {
    if buf.len() < SEGMENT_HEADER_LEN {
        return Err(HeaderError::Short);
    }
    let crc = u32::from_le_bytes(buf[28..32].try_into().unwrap());
    if crc32fast::hash(&buf[0..28]) != crc {
        return Err(HeaderError::Invalid("segment header checksum mismatch"));
    }
    if buf[0..8] != SEGMENT_MAGIC {
        return Err(HeaderError::Invalid("bad segment magic"));
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    if !(MIN_READ_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(HeaderError::Version(version));
    }
    Ok(u64::from_le_bytes(buf[16..24].try_into().unwrap()))
}

/// The format version of a segment header that [`decode_segment_header`] accepted.
pub fn segment_header_version(buf: &[u8]) -> u32 {
    u32::from_le_bytes(buf[8..12].try_into().unwrap())
}

/// Append a complete frame (header + body) for `kind`/`lsn` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, kind: Kind, lsn: u64, body: &[u8]) {
    encode_frame_flagged(out, kind, false, lsn, body)
}

/// [`encode_frame`], with [`FRAME_FLAG_SYNCED`] set when `synced_before`.
pub fn encode_frame_flagged(
    out: &mut Vec<u8>,
    kind: Kind,
    synced_before: bool,
    lsn: u64,
    body: &[u8],
) {
    let kind_byte = kind as u8 | if synced_before { FRAME_FLAG_SYNCED } else { 0 };
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind_byte]);
    h.update(&lsn.to_le_bytes());
    h.update(body);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.push(kind_byte);
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(body);
}

/// A frame that passed its checksum.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// Record kind.
    pub kind: Kind,
    /// Record LSN.
    pub lsn: u64,
    /// Record body (not yet decoded).
    pub body: &'a [u8],
    /// [`FRAME_FLAG_SYNCED`] was set: everything before it was durable when written.
    pub synced_before: bool,
}

impl Frame<'_> {
    /// Bytes the frame occupies on disk.
    pub fn len(&self) -> usize {
        FRAME_HEADER_LEN + self.body.len()
    }

    /// A frame is never empty (it has a header); here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What lies at an offset of a segment.
#[derive(Debug, Clone, Copy)]
pub enum FrameParse<'a> {
    /// A frame whose checksum matches.
    Ok(Frame<'a>),
    /// The buffer ends inside the frame header or body.
    Incomplete,
    /// The bytes are not a valid frame.
    Bad(&'static str),
}

/// Parse the frame at the start of `buf`. Never allocates; never trusts the length
/// field beyond the bytes actually present.
pub fn parse_frame(buf: &[u8]) -> FrameParse<'_> {
    if buf.len() < FRAME_HEADER_LEN {
        return FrameParse::Incomplete;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    if len > MAX_FRAME_BODY {
        return FrameParse::Bad("frame length exceeds the format limit");
    }
    if buf.len() - FRAME_HEADER_LEN < len {
        return FrameParse::Incomplete;
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    let end = FRAME_HEADER_LEN + len;
    if crc32fast::hash(&buf[8..end]) != crc {
        return FrameParse::Bad("record checksum mismatch");
    }
    let Some(kind) = Kind::from_u8(buf[8] & !FRAME_FLAG_SYNCED) else {
        return FrameParse::Bad("unknown record kind");
    };
    let lsn = u64::from_le_bytes(buf[9..17].try_into().unwrap());
    FrameParse::Ok(Frame {
        kind,
        lsn,
        body: &buf[FRAME_HEADER_LEN..end],
        synced_before: buf[8] & FRAME_FLAG_SYNCED != 0,
    })
}

// ---- bodies --------------------------------------------------------------

const ENTRY_HAS_SUBJECT: u8 = 1;
const ENTRY_HAS_IDEMPOTENCY_KEY: u8 = 2;
const ENTRY_HAS_EMBEDDING: u8 = 4;
const TOMBSTONE_HAS_SUBJECT: u8 = 1;

/// Where the time stamp (`accepted_at_us` of an ENTRY, `at_us` of a TOMBSTONE,
/// an i64) lies in a record body of this kind. The WAL sets it as it orders the
/// record (see [`crate::Wal::append`]).
pub(crate) fn stamp_at(kind: Kind) -> Option<usize> {
    match kind {
        Kind::Entry => Some(16),
        Kind::Tombstone => Some(0),
        _ => None,
    }
}

/// Encode an ENTRY body. Field order (do not reorder): id(16) accepted_at_us(i64)
/// flags(u8) source(str16) destination(str16) [subject(str32)] [idempotency_key(str32)]
/// payload(bytes32) [embedding: count(u32) × f32] (version 4).
pub fn encode_entry(e: &Entry, out: &mut Vec<u8>) {
    out.reserve(64 + e.source.len() + e.destination.len() + e.payload.len());
    out.extend_from_slice(e.id.as_bytes());
    out.extend_from_slice(&e.accepted_at_us.to_le_bytes());
    let mut flags = 0u8;
    if e.subject.is_some() {
        flags |= ENTRY_HAS_SUBJECT;
    }
    if e.idempotency_key.is_some() {
        flags |= ENTRY_HAS_IDEMPOTENCY_KEY;
    }
    if e.embedding.is_some() {
        flags |= ENTRY_HAS_EMBEDDING;
    }
    out.push(flags);
    put_str16(out, &e.source);
    put_str16(out, &e.destination);
    if let Some(s) = &e.subject {
        put_bytes32(out, s.as_bytes());
    }
    if let Some(k) = &e.idempotency_key {
        put_bytes32(out, k.as_bytes());
    }
    put_bytes32(out, &e.payload);
    if let Some(v) = &e.embedding {
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
}

/// Encode a TOMBSTONE body: at_us(i64) flags(u8) source(str16) destination(str16)
/// ids: count(u32) × 16 bytes, [subject(str32)].
pub fn encode_tombstone(t: &Tombstone, out: &mut Vec<u8>) {
    out.extend_from_slice(&t.at_us.to_le_bytes());
    out.push(if t.subject.is_some() {
        TOMBSTONE_HAS_SUBJECT
    } else {
        0
    });
    put_str16(out, &t.source);
    put_str16(out, &t.destination);
    out.extend_from_slice(&(t.ids.len() as u32).to_le_bytes());
    for id in &t.ids {
        out.extend_from_slice(id.as_bytes());
    }
    if let Some(s) = &t.subject {
        put_bytes32(out, s.as_bytes());
    }
}

/// Encode a DELIVERED, REQUEUED or PURGED body: count(u32) then count × lsn(u64).
pub fn encode_lsns(lsns: &[u64], out: &mut Vec<u8>) {
    out.reserve(4 + lsns.len() * 8);
    out.extend_from_slice(&(lsns.len() as u32).to_le_bytes());
    for l in lsns {
        out.extend_from_slice(&l.to_le_bytes());
    }
}

/// Encode a FAILED body: lsn(u64) attempts(u32) reason(str32).
pub fn encode_failed(lsn: u64, attempts: u32, reason: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&attempts.to_le_bytes());
    put_bytes32(out, reason.as_bytes());
}

/// Encode a CHECKPOINT body: pending_count(u32) × {lsn(u64) offset(u64)}, then
/// dead_count(u32) × {lsn(u64) offset(u64) attempts(u32) reason(str32)}, then
/// (version 2) segment_count(u32) × first_lsn(u64).
pub fn encode_checkpoint(c: &Checkpoint, out: &mut Vec<u8>) {
    out.reserve(8 + c.pending.len() * 16 + c.dead.len() * 32);
    out.extend_from_slice(&(c.pending.len() as u32).to_le_bytes());
    for (lsn, off) in &c.pending {
        out.extend_from_slice(&lsn.to_le_bytes());
        out.extend_from_slice(&off.to_le_bytes());
    }
    out.extend_from_slice(&(c.dead.len() as u32).to_le_bytes());
    for d in &c.dead {
        out.extend_from_slice(&d.lsn.to_le_bytes());
        out.extend_from_slice(&d.offset.to_le_bytes());
        out.extend_from_slice(&d.attempts.to_le_bytes());
        put_bytes32(out, d.reason.as_bytes());
    }
    if let Some(segs) = &c.segments {
        encode_lsns(segs, out);
        encode_lsns(&c.purged, out);
        out.extend_from_slice(&(c.tombstones.len() as u32).to_le_bytes());
        for t in &c.tombstones {
            out.extend_from_slice(&t.lsn.to_le_bytes());
            out.extend_from_slice(&t.offset.to_le_bytes());
            out.push(u8::from(t.delivered));
        }
        out.extend_from_slice(&c.stamp.to_le_bytes());
    }
}

/// Encode any record body.
pub fn encode_record(r: &Record, out: &mut Vec<u8>) {
    match r {
        Record::Entry(e) => encode_entry(e, out),
        Record::Delivered(l) | Record::Requeued(l) | Record::Purged(l) => encode_lsns(l, out),
        Record::Failed {
            lsn,
            attempts,
            reason,
        } => encode_failed(*lsn, *attempts, reason, out),
        Record::Checkpoint(c) => encode_checkpoint(c, out),
        Record::Tombstone(t) => encode_tombstone(t, out),
        Record::Erased(n) => out.resize(out.len() + n, 0),
    }
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Callers validate lengths (`Entry::validate`); truncation cannot happen here.
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A body that passed its checksum but does not decode: only a bug or a
/// deliberate forgery produces one; treated as corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyError(pub &'static str);

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BodyError> {
        if self.buf.len() < n {
            return Err(BodyError("record body is truncated"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, BodyError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, BodyError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, BodyError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, BodyError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn str16(&mut self) -> Result<&'a str, BodyError> {
        let n = self.u16()? as usize;
        utf8(self.take(n)?)
    }
    fn bytes32(&mut self) -> Result<&'a [u8], BodyError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str32(&mut self) -> Result<&'a str, BodyError> {
        utf8(self.bytes32()?)
    }
    /// A count of items of at least `min_item` bytes each, checked against what is left
    /// so a corrupt count cannot make the decoder allocate unboundedly.
    fn count(&mut self, min_item: usize) -> Result<usize, BodyError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(BodyError("record count exceeds the body"));
        }
        Ok(n)
    }
    /// count (u32) then count × LSN (u64).
    fn lsns(&mut self) -> Result<Vec<u64>, BodyError> {
        let n = self.count(8)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.u64()?);
        }
        Ok(v)
    }
    fn end(&self) -> Result<(), BodyError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(BodyError("trailing bytes after record body"))
        }
    }
}

fn utf8(b: &[u8]) -> Result<&str, BodyError> {
    std::str::from_utf8(b).map_err(|_| BodyError("string field is not UTF-8"))
}

/// An ENTRY body decoded without copying.
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    /// Entry id.
    pub id: Uuid,
    /// Accept time, µs since the epoch.
    pub accepted_at_us: i64,
    /// Source name.
    pub source: &'a str,
    /// Destination name.
    pub destination: &'a str,
    /// Subject, if any.
    pub subject: Option<&'a str>,
    /// Idempotency key, if any.
    pub idempotency_key: Option<&'a str>,
    /// Payload bytes.
    pub payload: &'a [u8],
    /// The embedding's little-endian f32s, if any (version 4).
    pub embedding: Option<&'a [u8]>,
}

impl EntryRef<'_> {
    /// Copy into an owned [`Entry`].
    pub fn to_entry(&self) -> Entry {
        Entry {
            id: self.id,
            source: self.source.to_owned(),
            destination: self.destination.to_owned(),
            subject: self.subject.map(str::to_owned),
            idempotency_key: self.idempotency_key.map(str::to_owned),
            accepted_at_us: self.accepted_at_us,
            payload: self.payload.to_vec(),
            embedding: self.embedding.map(|b| {
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            }),
        }
    }
}

/// Decode an ENTRY body without copying it.
pub fn decode_entry_ref(body: &[u8]) -> Result<EntryRef<'_>, BodyError> {
    let mut c = Cursor { buf: body };
    let id = Uuid::from_bytes(c.take(16)?.try_into().unwrap());
    let accepted_at_us = c.u64()? as i64;
    let flags = c.u8()?;
    if flags & !(ENTRY_HAS_SUBJECT | ENTRY_HAS_IDEMPOTENCY_KEY | ENTRY_HAS_EMBEDDING) != 0 {
        return Err(BodyError("unknown entry flags"));
    }
    let source = c.str16()?;
    let destination = c.str16()?;
    let subject = if flags & ENTRY_HAS_SUBJECT != 0 {
        Some(c.str32()?)
    } else {
        None
    };
    let idempotency_key = if flags & ENTRY_HAS_IDEMPOTENCY_KEY != 0 {
        Some(c.str32()?)
    } else {
        None
    };
    let payload = c.bytes32()?;
    let embedding = if flags & ENTRY_HAS_EMBEDDING != 0 {
        let n = c.count(4)?;
        Some(c.take(n * 4)?)
    } else {
        None
    };
    c.end()?;
    Ok(EntryRef {
        id,
        accepted_at_us,
        source,
        destination,
        subject,
        idempotency_key,
        payload,
        embedding,
    })
}

/// Decode an ENTRY body.
pub fn decode_entry(body: &[u8]) -> Result<Entry, BodyError> {
    decode_entry_ref(body).map(|e| e.to_entry())
}

/// Decode a TOMBSTONE body.
pub fn decode_tombstone(body: &[u8]) -> Result<Tombstone, BodyError> {
    let mut c = Cursor { buf: body };
    let at_us = c.u64()? as i64;
    let flags = c.u8()?;
    if flags & !TOMBSTONE_HAS_SUBJECT != 0 {
        return Err(BodyError("unknown tombstone flags"));
    }
    let source = c.str16()?.to_owned();
    let destination = c.str16()?.to_owned();
    let n = c.count(16)?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(Uuid::from_bytes(c.take(16)?.try_into().unwrap()));
    }
    let subject = if flags & TOMBSTONE_HAS_SUBJECT != 0 {
        Some(c.str32()?.to_owned())
    } else {
        None
    };
    c.end()?;
    Ok(Tombstone {
        at_us,
        source,
        destination,
        ids,
        subject,
    })
}

/// Decode any record body of `kind`.
pub fn decode_record(kind: Kind, body: &[u8]) -> Result<Record, BodyError> {
    let mut c = Cursor { buf: body };
    let r = match kind {
        Kind::Entry => return decode_entry(body).map(Record::Entry),
        Kind::Tombstone => return decode_tombstone(body).map(Record::Tombstone),
        Kind::Erased => return Ok(Record::Erased(body.len())),
        Kind::Delivered | Kind::Requeued | Kind::Purged => {
            let v = c.lsns()?;
            match kind {
                Kind::Delivered => Record::Delivered(v),
                Kind::Requeued => Record::Requeued(v),
                _ => Record::Purged(v),
            }
        }
        Kind::Failed => Record::Failed {
            lsn: c.u64()?,
            attempts: c.u32()?,
            reason: c.str32()?.to_owned(),
        },
        Kind::Checkpoint => {
            let n = c.count(16)?;
            let mut pending = Vec::with_capacity(n);
            for _ in 0..n {
                pending.push((c.u64()?, c.u64()?));
            }
            let n = c.count(24)?;
            let mut dead = Vec::with_capacity(n);
            for _ in 0..n {
                dead.push(DeadRef {
                    lsn: c.u64()?,
                    offset: c.u64()?,
                    attempts: c.u32()?,
                    reason: c.str32()?.to_owned(),
                });
            }
            // Version 1 ends here; version 2 appends the segment list, version
            // 3 the purged list after it.
            let segments = if c.buf.is_empty() {
                None
            } else {
                Some(c.lsns()?)
            };
            let purged = if c.buf.is_empty() {
                Vec::new()
            } else {
                c.lsns()?
            };
            // Version 4: the retained tombstones.
            let mut tombstones = Vec::new();
            if !c.buf.is_empty() {
                let n = c.count(17)?;
                tombstones.reserve(n);
                for _ in 0..n {
                    let (lsn, offset) = (c.u64()?, c.u64()?);
                    let delivered = match c.u8()? {
                        0 => false,
                        1 => true,
                        _ => return Err(BodyError("unknown tombstone state")),
                    };
                    tombstones.push(TombRef {
                        lsn,
                        offset,
                        delivered,
                    });
                }
            }
            // Version 5: the highest stamp.
            let stamp = if c.buf.is_empty() { 0 } else { c.u64()? as i64 };
            Record::Checkpoint(Checkpoint {
                pending,
                dead,
                segments,
                purged,
                tombstones,
                stamp,
            })
        }
    };
    c.end()?;
    Ok(r)
}

/// File name of the segment whose first record has `first_lsn`.
pub fn segment_file_name(first_lsn: u64) -> String {
    format!(
        "{first_lsn:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_NAME_DIGITS
    )
}

/// The first LSN a segment file name stands for, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_entry() -> Entry {
        Entry {
            id: Uuid::now_v7(),
            source: "agents".into(),
            destination: "main".into(),
            subject: Some("user-42".into()),
            idempotency_key: None,
            accepted_at_us: 1_700_000_000_000_000,
            payload: br#"{"text":"hello"}"#.to_vec(),
            embedding: None,
        }
    }

    #[test]
    fn header_round_trip_and_rejects_damage() {
        let h = encode_segment_header(42);
        assert_eq!(decode_segment_header(&h), Ok(42));
        for i in 0..SEGMENT_HEADER_LEN {
            let mut d = h;
            d[i] ^= 0x10;
            assert!(
                decode_segment_header(&d).is_err(),
                "flip at byte {i} accepted"
            );
        }
        assert_eq!(decode_segment_header(&h[..10]), Err(HeaderError::Short));
    }

    #[test]
    fn frames_round_trip_every_kind() {
        let records = [
            Record::Entry(sample_entry()),
            Record::Entry(Entry {
                embedding: Some(vec![0.5, -1.25, f32::MIN_POSITIVE]),
                ..sample_entry()
            }),
            Record::Tombstone(Tombstone {
                at_us: 1_700_000_000_000_001,
                source: "agents".into(),
                destination: "main".into(),
                ids: vec![Uuid::now_v7(), Uuid::now_v7()],
                subject: None,
            }),
            Record::Tombstone(Tombstone {
                at_us: 5,
                source: "agents".into(),
                destination: "main".into(),
                ids: vec![],
                subject: Some("user-42".into()),
            }),
            Record::Erased(40),
            Record::Delivered(vec![1, 2, 3]),
            Record::Failed {
                lsn: 7,
                attempts: 10,
                reason: "constraint".into(),
            },
            Record::Requeued(vec![7]),
            Record::Purged(vec![8, 9]),
            Record::Checkpoint(Checkpoint {
                pending: vec![(1, 32), (9, 400)],
                dead: vec![DeadRef {
                    lsn: 7,
                    offset: 200,
                    attempts: 3,
                    reason: "x".into(),
                }],
                segments: Some(vec![1, 5]),
                purged: vec![4],
                tombstones: vec![TombRef {
                    lsn: 6,
                    offset: 500,
                    delivered: true,
                }],
                stamp: 1_700_000_000_000_002,
            }),
            Record::Checkpoint(Checkpoint::default()),
        ];
        let mut buf = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let mut body = Vec::new();
            encode_record(r, &mut body);
            encode_frame(&mut buf, r.kind(), i as u64 + 1, &body);
        }
        let mut pos = 0;
        for (i, r) in records.iter().enumerate() {
            let FrameParse::Ok(f) = parse_frame(&buf[pos..]) else {
                panic!("frame {i} did not parse")
            };
            assert_eq!(f.lsn, i as u64 + 1);
            assert_eq!(&decode_record(f.kind, f.body).unwrap(), r);
            pos += f.len();
        }
        assert_eq!(pos, buf.len());
    }

    #[test]
    fn every_truncation_of_a_frame_is_incomplete_and_every_flip_is_bad() {
        let mut body = Vec::new();
        encode_entry(&sample_entry(), &mut body);
        let mut buf = Vec::new();
        encode_frame(&mut buf, Kind::Entry, 5, &body);
        for cut in 0..buf.len() {
            assert!(matches!(parse_frame(&buf[..cut]), FrameParse::Incomplete));
        }
        for i in 4..buf.len() {
            let mut d = buf.clone();
            d[i] ^= 0x01;
            assert!(
                matches!(parse_frame(&d), FrameParse::Bad(_)),
                "flip at {i} accepted"
            );
        }
    }

    #[test]
    fn a_version_4_checkpoint_without_a_stamp_reads_as_stamp_zero() {
        let cp = Checkpoint {
            pending: vec![(3, 32)],
            segments: Some(vec![1]),
            tombstones: vec![TombRef {
                lsn: 2,
                offset: 90,
                delivered: false,
            }],
            stamp: 77,
            ..Checkpoint::default()
        };
        let mut body = Vec::new();
        encode_checkpoint(&cp, &mut body);
        body.truncate(body.len() - 8); // as version 4 wrote it
        match decode_record(Kind::Checkpoint, &body).unwrap() {
            Record::Checkpoint(got) => assert_eq!(got, Checkpoint { stamp: 0, ..cp }),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_file_name(1), "00000000000000000001.wal");
        assert_eq!(parse_segment_file_name("00000000000000000001.wal"), Some(1));
        assert_eq!(parse_segment_file_name("1.wal"), None);
        assert_eq!(parse_segment_file_name("0000000000000000000x.wal"), None);
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
    }

    /// The constants table of docs/wal-format.md must match the code.
    #[test]
    fn constants_match_doc() {
        let doc = include_str!("../../docs/wal-format.md");
        let table = doc
            .split("| constant | value | meaning |")
            .nth(1)
            .and_then(|t| t.split("\n\n").next())
            .expect("constants table in docs/wal-format.md");
        let mut seen = 0;
        for line in table.lines() {
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            if cols.len() < 4 || !cols[1].starts_with('`') {
                continue;
            }
            let name = cols[1].trim_matches('`');
            let value = cols[2].trim_matches('`');
            let want = match name {
                "SEGMENT_MAGIC" => std::str::from_utf8(&SEGMENT_MAGIC).unwrap().to_owned(),
                "FORMAT_VERSION" => FORMAT_VERSION.to_string(),
                "MIN_READ_VERSION" => MIN_READ_VERSION.to_string(),
                "FRAME_FLAG_SYNCED" => FRAME_FLAG_SYNCED.to_string(),
                "SEGMENT_HEADER_LEN" => SEGMENT_HEADER_LEN.to_string(),
                "FRAME_HEADER_LEN" => FRAME_HEADER_LEN.to_string(),
                "SEGMENT_NAME_DIGITS" => SEGMENT_NAME_DIGITS.to_string(),
                "MAX_FRAME_BODY" => MAX_FRAME_BODY.to_string(),
                "KIND_ENTRY" => (Kind::Entry as u8).to_string(),
                "KIND_DELIVERED" => (Kind::Delivered as u8).to_string(),
                "KIND_FAILED" => (Kind::Failed as u8).to_string(),
                "KIND_REQUEUED" => (Kind::Requeued as u8).to_string(),
                "KIND_CHECKPOINT" => (Kind::Checkpoint as u8).to_string(),
                "KIND_PURGED" => (Kind::Purged as u8).to_string(),
                "KIND_TOMBSTONE" => (Kind::Tombstone as u8).to_string(),
                "KIND_ERASED" => (Kind::Erased as u8).to_string(),
                other => panic!("docs/wal-format.md names unknown constant {other}"),
            };
            assert_eq!(value, want, "docs/wal-format.md: {name}");
            seen += 1;
        }
        assert_eq!(seen, 16, "constants table incomplete");
        // The header tables' sizes add up to the constants.
        assert_eq!(encode_segment_header(1).len(), SEGMENT_HEADER_LEN);
        let mut f = Vec::new();
        encode_frame(&mut f, Kind::Delivered, 1, &[]);
        assert_eq!(f.len(), FRAME_HEADER_LEN);
        assert!(doc.contains(&format!("version {FORMAT_VERSION}")));
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        let mut body = Vec::new();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_record(Kind::Delivered, &body).is_err());
        assert!(decode_record(Kind::Checkpoint, &body).is_err());
    }
}
