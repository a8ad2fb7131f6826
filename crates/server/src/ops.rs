//! Offline operator tools: `wal verify|inspect|stats`, `replay`, `dlq list|requeue|purge`.
//! Each takes the WAL directory's lock (refusing a directory a server holds).

use crate::Failure;
use anyhow::Context;
use serde_json::json;
use spool_server::config::Config;
use spool_wal::{Record, Tracked, Wal, WalError};
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

type Out = Result<ExitCode, Failure>;

/// Entry status as the replay filter names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Status {
    Pending,
    Delivered,
    Failed,
}

fn existing_dir(dir: &Path) -> Result<(), Failure> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(Failure::Usage(format!(
            "--dir {}: no such directory",
            dir.display()
        )))
    }
}

fn wal_failure(e: WalError) -> Failure {
    match e {
        WalError::Locked { dir } => Failure::Failed(anyhow::anyhow!(
            "WAL directory {} is held by a running spool server; stop it first (or use the admin API)",
            dir.display()
        )),
        e => Failure::Failed(e.into()),
    }
}

fn print_json(v: serde_json::Value) {
    println!("{v}");
}

pub fn verify(dir: &Path, as_json: bool) -> Out {
    existing_dir(dir)?;
    let r = spool_wal::inspect::verify(dir).map_err(wal_failure)?;
    if as_json {
        print_json(json!({
            "ok": r.is_ok(),
            "segments": r.segments,
            "records": r.records,
            "bytes": r.bytes,
            "torn_tail": r.torn_tail.as_ref().map(|t| json!({"segment": t.segment, "offset": t.offset, "bytes": t.bytes})),
            "damage": r.damage.as_ref().map(|d| json!({"segment": d.segment, "offset": d.offset, "reason": d.reason})),
        }));
    } else {
        if let Some(t) = &r.torn_tail {
            println!(
                "torn tail: segment {} at offset {} ({} bytes; recovery truncates it)",
                t.segment, t.offset, t.bytes
            );
        }
        match &r.damage {
            None => println!(
                "ok: {} segments, {} records, {} bytes",
                r.segments, r.records, r.bytes
            ),
            Some(d) => println!(
                "damaged: segment {} at offset {}: {}",
                d.segment, d.offset, d.reason
            ),
        }
    }
    Ok(if r.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn inspect(dir: &Path, from: u64, limit: usize, as_json: bool) -> Out {
    existing_dir(dir)?;
    let records = spool_wal::inspect::inspect(dir, from, limit).map_err(wal_failure)?;
    for r in records {
        if as_json {
            print_json(json!({
                "lsn": r.lsn, "kind": r.kind.name(), "source": r.source, "id": r.id,
                "status": r.status, "bytes": r.bytes, "targets": r.targets,
            }));
        } else {
            let dash = || "-".to_owned();
            let targets = if r.targets.is_empty() {
                String::new()
            } else {
                format!(" lsns={:?}", r.targets)
            };
            println!(
                "{} {} {} {} {} {}{}",
                r.lsn,
                r.kind.name(),
                r.source.unwrap_or_else(dash),
                r.id.map_or_else(dash, |i| i.to_string()),
                r.status.unwrap_or("-"),
                r.bytes,
                targets
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn stats(dir: &Path, as_json: bool) -> Out {
    existing_dir(dir)?;
    let s = spool_wal::inspect::stats(dir).map_err(wal_failure)?;
    if as_json {
        print_json(json!({
            "segments": s.segments, "bytes": s.bytes, "records": s.records, "entries": s.entries,
            "pending": s.pending, "delivered": s.delivered, "failed": s.failed,
            "oldest_pending_lsn": s.oldest_pending_lsn,
        }));
    } else {
        println!("segments            {}", s.segments);
        println!("bytes               {}", s.bytes);
        println!("records             {}", s.records);
        println!("entries             {}", s.entries);
        println!("pending             {}", s.pending);
        println!("delivered           {}", s.delivered);
        println!("failed              {}", s.failed);
        println!(
            "oldest pending lsn  {}",
            s.oldest_pending_lsn
                .map_or_else(|| "-".into(), |l| l.to_string())
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn compact(dir: &Path, as_json: bool) -> Out {
    existing_dir(dir)?;
    let wal = Wal::open(dir, spool_wal::WalConfig::default()).map_err(wal_failure)?;
    let r = wal.compact().map_err(wal_failure);
    wal.close();
    let r = r?;
    if as_json {
        print_json(json!({
            "segments_scanned": r.segments_scanned, "segments_rewritten": r.segments_rewritten,
            "entries_erased": r.entries_erased, "bytes_erased": r.bytes_erased,
        }));
    } else {
        println!(
            "erased {} forgotten entries ({} bytes) in {} of {} sealed segments",
            r.entries_erased, r.bytes_erased, r.segments_rewritten, r.segments_scanned
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn open_wal(cfg: &Config) -> Result<Wal, Failure> {
    if !cfg.wal.dir.is_dir() {
        return Err(Failure::Usage(format!(
            "wal.dir {}: no such directory",
            cfg.wal.dir.display()
        )));
    }
    Wal::open(&cfg.wal.dir, cfg.wal_config()?).map_err(wal_failure)
}

pub struct Replay {
    pub destination: String,
    pub source: Option<String>,
    pub from: u64,
    pub to: u64,
    pub status: Vec<Status>,
    pub dry_run: bool,
    pub json: bool,
}

/// Re-deliver retained WAL entries to a destination in batches (upserts by id:
/// running it twice changes nothing).
///
/// Without `--source`, the entries whose own destination is `--destination`;
/// with `--source S`, every entry of S, copied to `--destination` whatever its
/// own destination (to fill a new one). Only an entry written to its *own*
/// destination changes status (pending → delivered); a copy elsewhere leaves it
/// pending for its own destination, which still gets it.
pub async fn replay(cfg: &Config, r: Replay) -> Out {
    let dcfg = cfg
        .destinations
        .iter()
        .find(|d| d.name == r.destination)
        .ok_or_else(|| {
            Failure::Usage(format!(
                "--destination {:?} is not in the config",
                r.destination
            ))
        })?;
    if r.from > r.to {
        return Err(Failure::Usage("--from must not be above --to".into()));
    }
    let wal = open_wal(cfg)?;
    let dest = if r.dry_run {
        None
    } else {
        Some(
            spool_destination::open(dcfg)
                .with_context(|| format!("opening destination {:?}", dcfg.name))?,
        )
    };
    let last = wal.status().visible_lsn.min(r.to);
    let bar = if std::io::stderr().is_terminal() && !r.json {
        let b = indicatif::ProgressBar::new(last.saturating_sub(r.from) + 1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} LSNs {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let (mut counts, mut skipped, mut copied, mut purged) = ([0u64; 3], 0u64, 0u64, 0u64);
    let mut forgotten = 0u64;
    let mut batch = Vec::new();
    let mut pending_lsns = Vec::new();
    let flush = |batch: &mut Vec<spool_wal::LoggedEntry>, pending: &mut Vec<u64>| {
        let batch = std::mem::take(batch);
        let pending = std::mem::take(pending);
        let (dest, wal) = (dest.clone(), wal.clone());
        async move {
            if let Some(d) = dest {
                d.write_batch(&batch)
                    .await
                    .context("writing a batch to the destination")?;
                if !pending.is_empty() {
                    wal.mark_delivered(&pending)
                        .await
                        .context("marking replayed entries delivered")?;
                }
            }
            anyhow::Ok(())
        }
    };
    for item in wal.reader(r.from) {
        let (lsn, rec) = item.map_err(wal_failure)?;
        if lsn > last {
            break;
        }
        if let Some(b) = &bar {
            b.set_position(lsn.saturating_sub(r.from));
        }
        let Record::Entry(entry) = rec else { continue };
        if wal.is_purged(lsn) {
            // Discarded by an operator: never delivered, not by replay either.
            purged += 1;
            continue;
        }
        let le = spool_wal::LoggedEntry { lsn, entry };
        if wal.forgets(&le) {
            // Forgotten by its producer: never delivered again (its tombstones
            // are applied below, for copies the destination may still hold).
            forgotten += 1;
            continue;
        }
        let entry = &le.entry;
        let wanted_source = match &r.source {
            Some(s) => &entry.source == s,
            None => entry.destination == r.destination,
        };
        let status = match wal.status_of(lsn) {
            Some(Tracked::Pending) => Status::Pending,
            Some(Tracked::Dead { .. }) => Status::Failed,
            None => Status::Delivered,
        };
        if !wanted_source || !r.status.contains(&status) {
            skipped += 1;
            continue;
        }
        counts[status as usize] += 1;
        if entry.destination != r.destination {
            copied += 1;
        } else if status == Status::Pending {
            pending_lsns.push(lsn);
        }
        batch.push(le);
        if batch.len() >= 500 {
            flush(&mut batch, &mut pending_lsns).await?;
        }
    }
    flush(&mut batch, &mut pending_lsns).await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut tombstones = 0u64;
    for (lsn, t, applied) in wal.tombstones() {
        let wanted = match &r.source {
            Some(s) => &t.source == s,
            None => t.destination == r.destination,
        };
        if !wanted || lsn < r.from || lsn > last {
            continue;
        }
        tombstones += 1;
        if let Some(d) = &dest {
            d.forget(&t)
                .await
                .context("applying a tombstone to the destination")?;
            if !applied && t.destination == r.destination {
                wal.mark_delivered(&[lsn])
                    .await
                    .context("marking a tombstone applied")?;
            }
        }
    }
    if let Some(d) = &dest {
        d.close().await;
    }
    let total: u64 = counts.iter().sum();
    if r.json {
        print_json(json!({
            "destination": r.destination, "dry_run": r.dry_run, "replayed": total,
            "pending": counts[0], "delivered": counts[1], "failed": counts[2], "skipped": skipped,
            "copied_from_other_destinations": copied, "purged_skipped": purged,
            "forgotten_skipped": forgotten, "tombstones_applied": tombstones,
        }));
    } else {
        println!(
            "{} {total} entries to {:?} (pending {}, delivered {}, failed {}; {copied} of another destination, status unchanged); skipped {skipped}, purged {purged}, forgotten {forgotten}; {tombstones} tombstones applied",
            if r.dry_run {
                "would replay"
            } else {
                "replayed"
            },
            r.destination,
            counts[0],
            counts[1],
            counts[2]
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn dlq_list(cfg: &Config, source: Option<&str>, limit: usize, as_json: bool) -> Out {
    let wal = open_wal(cfg)?;
    let dead = wal.dead_letters(source, limit);
    if as_json {
        let v: Vec<_> = dead
            .iter()
            .map(|d| {
                json!({"id": d.id, "lsn": d.lsn, "source": d.source, "destination": d.destination,
                       "attempts": d.attempts, "reason": d.reason})
            })
            .collect();
        print_json(json!({ "dead_letters": v }));
    } else if dead.is_empty() {
        println!("no dead letters");
    } else {
        for d in &dead {
            println!(
                "{} lsn={} source={} destination={} attempts={} reason={}",
                d.id, d.lsn, d.source, d.destination, d.attempts, d.reason
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Which offline dead-letter operation.
#[derive(Debug, Clone, Copy)]
pub enum DlqOp {
    Requeue,
    Purge,
}

/// `spool dlq requeue|purge`: one operation on the dead letters chosen (exit 1
/// naming ids that are not dead letters).
pub async fn dlq(cfg: &Config, op: DlqOp, ids: Option<Vec<uuid::Uuid>>, as_json: bool) -> Out {
    let wal = open_wal(cfg)?;
    let which = ids
        .as_deref()
        .map_or(spool_queue::Select::All, spool_queue::Select::Ids);
    let out = match op {
        DlqOp::Requeue => spool_queue::dlq::requeue(&wal, which).await,
        DlqOp::Purge => spool_queue::dlq::purge(&wal, which).await,
    }
    .map_err(wal_failure)?;
    wal.close();
    let (verb, after) = match op {
        DlqOp::Requeue => ("requeued", " (delivered when the server next runs)"),
        DlqOp::Purge => ("purged", ""),
    };
    let ids: Vec<_> = out.done.iter().map(|d| d.id).collect();
    if as_json {
        print_json(json!({verb: ids.len(), "ids": ids, "not_dead_letters": out.not_dead_letters}));
    } else {
        println!("{verb} {} dead letters{after}", ids.len());
        for id in &out.not_dead_letters {
            println!("not a dead letter: {id}");
        }
    }
    Ok(if out.not_dead_letters.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
