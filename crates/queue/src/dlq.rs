//! Dead-letter operations on a WAL — requeue and purge by id or all — shared by
//! the running engine ([`crate::Engine::requeue`], [`crate::Engine::purge`]) and
//! the offline `spool dlq` tools, so there is one definition of each.

use spool_wal::{DeadLetter, Wal, WalError};
use std::collections::HashSet;
use uuid::Uuid;

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, Copy)]
pub enum Select<'a> {
    /// Every dead letter.
    All,
    /// These entry ids (ids that are not dead letters are reported, not an error).
    Ids(&'a [Uuid]),
}

/// What a requeue or purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DlqOutcome {
    /// The dead letters the operation applied to.
    pub done: Vec<DeadLetter>,
    /// Ids asked for that are not dead letters (pending, delivered, unknown).
    pub not_dead_letters: Vec<Uuid>,
}

/// Put dead letters back to pending (durable once it returns). The caller feeds
/// them to their destination (the engine does; offline, the next start does).
pub async fn requeue(wal: &Wal, which: Select<'_>) -> Result<DlqOutcome, WalError> {
    apply(wal, which, |lsns| async move { wal.requeue(&lsns).await }).await
}

/// Discard dead letters: terminal, never delivered, their segments free to go
/// (durable once it returns).
pub async fn purge(wal: &Wal, which: Select<'_>) -> Result<DlqOutcome, WalError> {
    apply(wal, which, |lsns| async move { wal.purge(&lsns).await }).await
}

async fn apply<F, Fut>(wal: &Wal, which: Select<'_>, op: F) -> Result<DlqOutcome, WalError>
where
    F: FnOnce(Vec<u64>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u64>, WalError>>,
{
    let asked: Option<HashSet<Uuid>> = match which {
        Select::All => None,
        Select::Ids(ids) => Some(ids.iter().copied().collect()),
    };
    let chosen: Vec<DeadLetter> = wal
        .dead_letters(None, usize::MAX)
        .into_iter()
        .filter(|d| asked.as_ref().is_none_or(|a| a.contains(&d.id)))
        .collect();
    let done: HashSet<u64> = op(chosen.iter().map(|d| d.lsn).collect())
        .await?
        .into_iter()
        .collect();
    let done: Vec<DeadLetter> = chosen
        .into_iter()
        .filter(|d| done.contains(&d.lsn))
        .collect();
    let not_dead_letters = match which {
        Select::All => Vec::new(),
        Select::Ids(ids) => {
            let hit: HashSet<Uuid> = done.iter().map(|d| d.id).collect();
            let mut seen = HashSet::new();
            ids.iter()
                .filter(|id| !hit.contains(id) && seen.insert(**id))
                .copied()
                .collect()
        }
    };
    Ok(DlqOutcome {
        done,
        not_dead_letters,
    })
}
