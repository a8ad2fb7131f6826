//! Another writer on a SQLite file, for lock tests.

use sqlx::{Connection, SqliteConnection};
use std::path::Path;

/// A connection of its own to the SQLite file at `path`, holding its write lock
/// (`BEGIN IMMEDIATE`) until the caller ends the transaction (`COMMIT` or
/// `ROLLBACK`) or drops it.
pub async fn hold_sqlite_write_lock(path: &Path) -> SqliteConnection {
    let mut other = SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("open the SQLite file");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .expect("take the write lock");
    other
}
