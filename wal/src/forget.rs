//! Forgetting: TOMBSTONE records and the questions the rest of spool asks of them.
//!
//! A tombstone is durable before [`Wal::forget`] resolves. From then on the
//! tracked entries it names by id are no longer pending (never delivered, never
//! requeued), [`Wal::read_queued`] answers [`crate::ReadBack::Forgotten`] for any
//! queued entry it covers, and [`Wal::forgets`] tells replay to skip what it
//! covers. It is pending itself until the destination has applied its delete
//! ([`Wal::mark_delivered`] with its LSN), and it is retained — carried by every
//! checkpoint, its segment kept — for as long as an older segment may still hold
//! an entry it forgot.

use crate::entry::{LoggedEntry, MAX_NAME_LEN};
use crate::error::{Result, WalError};
use crate::format::{self, Kind, Tombstone};
use crate::inbox::Op;
use crate::wal::Wal;
use std::sync::Arc;
use uuid::Uuid;

impl Wal {
    /// Append a TOMBSTONE; resolves with its LSN once durable (per the sync
    /// mode), `t.at_us` set to the stamp it was stored with (rising with the LSN,
    /// like [`Wal::append`]'s). Not refused by the quota: forgetting is how space
    /// comes back.
    pub async fn forget(&self, t: &mut Tombstone) -> Result<u64> {
        if t.source.len() > MAX_NAME_LEN || t.destination.len() > MAX_NAME_LEN {
            return Err(WalError::InvalidRecord(
                "source and destination names are limited to 65535 bytes",
            ));
        }
        let mut body = Vec::new();
        format::encode_tombstone(t, &mut body);
        let limit = self.config().max_record_bytes;
        if body.len() > limit {
            return Err(WalError::RecordTooLarge {
                len: body.len(),
                limit,
            });
        }
        let (lsns, stamps) = self
            .call_stamped(|reply| Op::Append {
                records: vec![(Kind::Tombstone, body)],
                durable: true,
                gated: false,
                reply,
            })
            .await?;
        t.at_us = stamps[0];
        Ok(lsns[0])
    }

    /// Whether a retained tombstone forgets this entry (replay skips it).
    pub fn forgets(&self, le: &LoggedEntry) -> bool {
        let e = &le.entry;
        self.shared.state().forgets(
            le.lsn,
            &e.source,
            e.id,
            e.subject.as_deref(),
            e.accepted_at_us,
        )
    }

    /// Of these entries, the ids a retained tombstone forgets.
    pub fn forgotten_among<'a>(
        &self,
        entries: impl IntoIterator<Item = &'a LoggedEntry>,
    ) -> Vec<Uuid> {
        let st = self.shared.state();
        entries
            .into_iter()
            .filter(|le| {
                let e = &le.entry;
                st.forgets(
                    le.lsn,
                    &e.source,
                    e.id,
                    e.subject.as_deref(),
                    e.accepted_at_us,
                )
            })
            .map(|le| le.entry.id)
            .collect()
    }

    /// Every retained tombstone, oldest first, and whether its delete is applied.
    pub fn tombstones(&self) -> Vec<(u64, Arc<Tombstone>, bool)> {
        self.shared
            .state()
            .tombstones
            .iter()
            .map(|(l, m)| (*l, m.tombstone.clone(), m.delivered))
            .collect()
    }

    /// Tombstones whose delete the destination has not applied yet, oldest first.
    pub fn pending_tombstones(&self) -> Vec<(u64, Arc<Tombstone>)> {
        self.tombstones()
            .into_iter()
            .filter(|(_, _, applied)| !applied)
            .map(|(l, t, _)| (l, t))
            .collect()
    }

    /// The LSN of a retained tombstone that forgot `id` (by id) in `source`.
    pub fn forgot_id(&self, source: &str, id: Uuid) -> Option<u64> {
        self.shared.state().forgot_id(source, id)
    }
}
