//! The inbox between appenders and the writer thread: the ops waiting for the
//! next group, in the order they will reach the log.
//!
//! Invariant: ops leave the inbox in the order they entered it, and the writer
//! assigns LSNs in that order — so what is decided here, under the inbox lock,
//! follows LSN order. That is where ENTRY and TOMBSTONE stamps are set: each
//! keeps its caller's time unless that is not above the previous stamp, so
//! stamps rise with the LSN (docs/wal-format.md, "Stamps rise with the LSN").

use crate::error::{Result, WalError};
use crate::format::{self, Kind};
use crate::wal::RetentionReport;
use tokio::sync::oneshot;

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

pub(crate) enum Op {
    Append {
        records: Vec<(Kind, Vec<u8>)>,
        /// Wait for fdatasync (under `sync = "always"`).
        durable: bool,
        /// Refused when the quota is reached (entries; markers always pass, since they free space).
        gated: bool,
        reply: Reply<Vec<u64>>,
    },
    Sync(Reply<()>),
    Rotate(Reply<()>),
    Retention(Reply<RetentionReport>),
}

impl Op {
    /// Whether its answer waits for an fdatasync (under `sync = "always"`;
    /// other modes never gather).
    pub fn waits_for_sync(&self) -> bool {
        matches!(self, Op::Append { durable: true, .. } | Op::Sync(_))
    }

    pub fn fail(self, e: WalError) {
        match self {
            Op::Append { reply, .. } => drop(reply.send(Err(e))),
            Op::Sync(reply) | Op::Rotate(reply) => drop(reply.send(Err(e))),
            Op::Retention(reply) => drop(reply.send(Err(e))),
        }
    }
}

#[derive(Default)]
pub(crate) struct Inbox {
    pub ops: Vec<Op>,
    pub closing: bool,
    /// Of `ops`, those whose answer waits for an fdatasync.
    pub waiting: usize,
    /// The writer is gathering a group and wants a wake-up when this many
    /// ops wait for an fdatasync.
    pub want: usize,
    /// The last stamp given to an ENTRY or TOMBSTONE (µs): ops reach the log in
    /// inbox order, so stamps given here rise with the LSN.
    pub stamp: i64,
}

impl Inbox {
    /// Stamp the records of an append: each keeps the time its caller gave it
    /// (the clock when it was accepted) unless that is not above the previous
    /// stamp, then it gets the previous stamp + 1. Answers the stamps given.
    fn stamp(&mut self, records: &mut [(Kind, Vec<u8>)]) -> Vec<i64> {
        let mut given = Vec::new();
        for (kind, body) in records {
            let Some(at) = format::stamp_at(*kind) else {
                continue;
            };
            let Some(field) = body.get_mut(at..at + 8) else {
                continue;
            };
            let asked = i64::from_le_bytes(field.try_into().expect("8 bytes"));
            self.stamp = asked.max(self.stamp + 1);
            field.copy_from_slice(&self.stamp.to_le_bytes());
            given.push(self.stamp);
        }
        given
    }

    /// Queue `op`, stamping it if it appends; answers the stamps given.
    pub fn push(&mut self, mut op: Op) -> Vec<i64> {
        let given = match &mut op {
            Op::Append { records, .. } => self.stamp(records),
            _ => Vec::new(),
        };
        self.waiting += usize::from(op.waits_for_sync());
        self.ops.push(op);
        given
    }
}
