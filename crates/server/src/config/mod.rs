//! `spool.toml`: every key of SPEC "Configuration" with its default. Unknown keys
//! are errors naming the key; `env:NAME` string values read the environment;
//! durations are `"250ms"`/`"30s"`, sizes `"64MiB"` (or a number of bytes).

use serde::{Deserialize, Deserializer};
use spool_destination::{DestinationConfig, Kind};
use spool_wal::{OnCorruption, SyncMode};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod text;

/// A configuration error: exit code 2, with a message naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The whole `spool.toml` (every key has a default; docs/operations.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[wal]`.
    pub wal: WalSection,
    /// `[queue]`.
    pub queue: QueueSection,
    /// `[limits]`.
    pub limits: Limits,
    /// `[idempotency]`.
    pub idempotency: Idempotency,
    /// `[[destination]]` tables.
    #[serde(rename = "destination")]
    pub destinations: Vec<DestinationConfig>,
    /// `[[source]]` tables.
    #[serde(rename = "source")]
    pub sources: Vec<SourceConfig>,
}

/// `[server]`: the listener and request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to serve HTTP on.
    pub listen: SocketAddr,
    /// Bearer token of `/v1/admin/*` (none: open on loopback only).
    pub admin_token: Option<String>,
    /// Largest request body, before and after gzip.
    #[serde(deserialize_with = "size")]
    pub max_body_bytes: u64,
    /// How long in-flight requests and the drain may take at SIGTERM.
    #[serde(deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// More `Host` names (or `host:port`) accepted while a tokenless source or
    /// an open admin API exists (besides the listen address and, on loopback,
    /// `localhost`).
    pub allowed_hosts: Vec<String>,
    /// Open connections at most; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Requests being handled at most; more are answered 503 `overloaded`.
    pub max_in_flight: usize,
    /// Longest a client may take to send its request headers.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Longest a client may take to send a request body.
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
}

/// `[wal]`: where and how the write-ahead log is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalSection {
    /// WAL directory.
    pub dir: PathBuf,
    /// Segment size before rotation.
    #[serde(deserialize_with = "size")]
    pub segment_bytes: u64,
    /// `always` | `interval:D` | `never`.
    pub sync: String,
    /// Delivered history kept for replay.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    /// Quota: history gives way past it (never pending entries).
    #[serde(deserialize_with = "opt_size")]
    pub max_bytes: Option<u64>,
    /// Writes are refused (503) below this much free disk.
    #[serde(deserialize_with = "size")]
    pub min_free_bytes: u64,
    /// `stop` | `skip`.
    pub on_corruption: String,
}

/// `[queue]`: per-destination queues and delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSection {
    /// Entries each destination's queue holds.
    pub capacity: usize,
    /// Worker tasks per destination.
    pub workers: usize,
    /// Most entries per destination write.
    pub batch_max: usize,
    /// Longest wait to fill a batch.
    #[serde(deserialize_with = "duration")]
    pub batch_linger: Duration,
    /// Attempts before a dead letter (errors an entry causes only).
    pub max_attempts: u32,
    /// First retry delay ceiling.
    #[serde(deserialize_with = "duration")]
    pub backoff_initial: Duration,
    /// Largest retry delay ceiling.
    #[serde(deserialize_with = "duration")]
    pub backoff_max: Duration,
}

/// `[limits]`: per-entry and per-request bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest entry (its JSON text).
    #[serde(deserialize_with = "size")]
    pub max_entry_bytes: u64,
    /// Most entries in one request.
    pub max_entries_per_request: usize,
    /// Payload bytes one page of a read may hold (the first entry always;
    /// then `next_cursor`): bounds a read's memory whatever its `limit`.
    #[serde(deserialize_with = "size")]
    pub max_read_bytes: u64,
}

/// `[idempotency]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Idempotency {
    /// How long a node remembers an idempotency key.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
}

/// A `[[source]]`: a named producer stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Name (in URLs).
    pub name: String,
    /// Bearer token (none: tokenless, loopback only).
    #[serde(default)]
    pub token: Option<String>,
    /// Defaults to the first destination.
    #[serde(default)]
    pub destination: Option<String>,
    /// Entries per second (sustained; bursts up to one second's worth).
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// Length of this source's embeddings: an entry's top-level `embedding`
    /// must have exactly this many numbers (stored for vector recall). Unset:
    /// `embedding` is an ordinary payload field.
    #[serde(default)]
    pub embedding_dims: Option<usize>,
}

/// Largest `embedding_dims` a source may have.
pub const MAX_EMBEDDING_DIMS: usize = 16_384;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7070".parse().expect("valid address"),
            admin_token: None,
            max_body_bytes: 10 << 20,
            shutdown_timeout: Duration::from_secs(30),
            allowed_hosts: Vec::new(),
            max_connections: 4096,
            max_in_flight: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for WalSection {
    fn default() -> Self {
        WalSection {
            dir: PathBuf::from("./spool-data/wal"),
            segment_bytes: 64 << 20,
            sync: "always".into(),
            retention: Duration::from_secs(24 * 3600),
            max_bytes: None,
            min_free_bytes: 256 << 20,
            on_corruption: "stop".into(),
        }
    }
}

impl Default for QueueSection {
    fn default() -> Self {
        let d = spool_queue::EngineConfig::default();
        QueueSection {
            capacity: d.capacity,
            workers: d.workers,
            batch_max: d.batch_max,
            batch_linger: d.batch_linger,
            max_attempts: d.max_attempts,
            backoff_initial: d.backoff_initial,
            backoff_max: d.backoff_max,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entry_bytes: 1 << 20,
            max_entries_per_request: 10_000,
            max_read_bytes: spool_destination::DEFAULT_PAGE_BYTES as u64,
        }
    }
}

impl Default for Idempotency {
    fn default() -> Self {
        Idempotency {
            window: Duration::from_secs(24 * 3600),
        }
    }
}

/// Parse a size: a number of bytes, or a string like `"64MiB"`, `"10 MB"`, `"512KiB"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (like \"64MiB\")"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Int(u64),
    Str(String),
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match SizeValue::deserialize(d)? {
        SizeValue::Int(n) => Ok(n),
        SizeValue::Str(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    size(d).map(Some)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration (like \"250ms\", \"30s\"): {e}"
        ))
    })
}

impl Config {
    /// The embedded default (`spool serve` without a config).
    pub fn embedded() -> Config {
        Config::default().completed()
    }

    /// Read and check a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Parse and check config text. Errors name the line of `text` as written
    /// and never show a value read from the environment.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let src = text::Resolved::new(text)?;
        let mut cfg: Config = toml::from_str(&src.text).map_err(|e| src.describe(&e))?;
        // Unless set, a request may carry at most what a queue holds.
        if !src.has("limits", "max_entries_per_request") {
            cfg.limits.max_entries_per_request =
                cfg.limits.max_entries_per_request.min(cfg.queue.capacity);
        }
        let cfg = cfg.completed();
        cfg.check().map_err(|e| src.locate(e))?;
        Ok(cfg)
    }

    /// Fill what defaults to other values: the embedded SQLite destination and the
    /// tokenless `default` source.
    fn completed(mut self) -> Config {
        if self.destinations.is_empty() {
            let data = self
                .wal
                .dir
                .parent()
                .map(Path::to_owned)
                .unwrap_or_default();
            self.destinations.push(DestinationConfig {
                name: "default".into(),
                kind: Kind::Sqlite,
                path: Some(data.join("spool.db").to_string_lossy().into_owned()),
                url: None,
                pool_size: None,
                timeout: None,
            });
        }
        if self.sources.is_empty() {
            self.sources.push(SourceConfig {
                name: "default".into(),
                token: None,
                destination: None,
                rate_limit: None,
                embedding_dims: None,
            });
        }
        let first = self.destinations[0].name.clone();
        for s in &mut self.sources {
            s.destination.get_or_insert_with(|| first.clone());
        }
        self
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        self.sync_mode()?;
        self.on_corruption()?;
        if self.queue.capacity == 0 {
            return bad("queue.capacity must be at least 1".into());
        }
        if self.queue.workers == 0 {
            return bad("queue.workers must be at least 1".into());
        }
        if self.queue.batch_max == 0 {
            return bad("queue.batch_max must be at least 1".into());
        }
        if self.queue.max_attempts == 0 {
            return bad("queue.max_attempts must be at least 1".into());
        }
        if self.queue.backoff_initial > self.queue.backoff_max {
            return bad("queue.backoff_initial must not exceed queue.backoff_max".into());
        }
        if self.wal.segment_bytes < 4096 {
            return bad("wal.segment_bytes must be at least 4KiB".into());
        }
        if self.limits.max_entry_bytes == 0 || self.limits.max_entries_per_request == 0 {
            return bad(
                "limits.max_entry_bytes and limits.max_entries_per_request must be above zero"
                    .into(),
            );
        }
        if self.server.max_body_bytes == 0 {
            return bad("server.max_body_bytes must be above zero".into());
        }
        if self.server.admin_token.as_deref() == Some("") {
            return bad(
                "server.admin_token is empty: set a token, or remove the key (admin then open on loopback only)"
                    .into(),
            );
        }
        if self.sources.iter().any(|s| s.token.as_deref() == Some("")) {
            return bad("source token is empty: set a token, or remove the key".into());
        }
        if self.server.max_connections == 0 || self.server.max_in_flight == 0 {
            return bad(
                "server.max_connections and server.max_in_flight must be at least 1".into(),
            );
        }
        if self.server.header_timeout.is_zero() || self.server.body_timeout.is_zero() {
            return bad("server.header_timeout and server.body_timeout must be above zero".into());
        }
        if self.limits.max_read_bytes == 0 {
            return bad(
                "limits.max_read_bytes must be at least 1 (a page always holds its first entry)"
                    .into(),
            );
        }
        if self.limits.max_entries_per_request > self.queue.capacity {
            return bad(format!(
                "limits.max_entries_per_request ({}) is above queue.capacity ({}): such a request could never be accepted",
                self.limits.max_entries_per_request, self.queue.capacity
            ));
        }
        let mut names = std::collections::HashSet::new();
        for d in &self.destinations {
            if !names.insert(&d.name) {
                return bad(format!("destination {:?} is defined twice", d.name));
            }
            let (key, v) = match d.kind {
                Kind::Sqlite => ("path", &d.path),
                Kind::Postgres => ("url", &d.url),
            };
            if v.as_deref().is_none_or(str::is_empty) {
                return bad(format!(
                    "destination {:?} (kind {:?}) needs `{key}`",
                    d.name, d.kind
                ));
            }
        }
        let mut snames = std::collections::HashSet::new();
        for s in &self.sources {
            if !valid_name(&s.name) {
                return bad(format!(
                    "source.name {:?}: use 1-64 characters of a-z, A-Z, 0-9, '-', '_', '.'",
                    s.name
                ));
            }
            if s.name == "admin" {
                return bad(
                    "source.name \"admin\" is reserved for the admin API (/v1/admin/...)".into(),
                );
            }
            if !snames.insert(&s.name) {
                return bad(format!("source {:?} is defined twice", s.name));
            }
            let d = s.destination.as_deref().unwrap_or_default();
            if !self.destinations.iter().any(|x| x.name == d) {
                return bad(format!(
                    "source {:?}: destination {d:?} is not defined",
                    s.name
                ));
            }
            if let Some(r) = s.rate_limit {
                if !(r.is_finite() && r > 0.0) {
                    return bad(format!(
                        "source {:?}: rate_limit must be a positive number",
                        s.name
                    ));
                }
            }
            if s.token.as_deref() == Some("") {
                return bad(format!("source {:?}: token must not be empty", s.name));
            }
            if s.embedding_dims
                .is_some_and(|d| !(1..=MAX_EMBEDDING_DIMS).contains(&d))
            {
                return bad(format!(
                    "source {:?}: embedding_dims must be 1-{MAX_EMBEDDING_DIMS}",
                    s.name
                ));
            }
            if s.token.is_none() && !self.server.listen.ip().is_loopback() {
                return bad(format!(
                    "source {:?} has no token but server.listen {} is not a loopback address; \
                     give it a token or listen on 127.0.0.1",
                    s.name, self.server.listen
                ));
            }
        }
        Ok(())
    }

    /// `wal.sync` parsed.
    pub fn sync_mode(&self) -> Result<SyncMode, ConfigError> {
        self.wal
            .sync
            .parse()
            .map_err(|e| ConfigError(format!("wal.sync: {e}")))
    }

    /// `wal.on_corruption` parsed.
    pub fn on_corruption(&self) -> Result<OnCorruption, ConfigError> {
        self.wal
            .on_corruption
            .parse()
            .map_err(|e| ConfigError(format!("wal.on_corruption: {e}")))
    }

    /// The WAL's configuration.
    pub fn wal_config(&self) -> Result<spool_wal::WalConfig, ConfigError> {
        Ok(spool_wal::WalConfig {
            segment_bytes: self.wal.segment_bytes,
            sync: self.sync_mode()?,
            retention: self.wal.retention,
            max_bytes: self.wal.max_bytes,
            on_corruption: self.on_corruption()?,
            max_record_bytes: (self.limits.max_entry_bytes as usize).saturating_add(64 << 10),
        })
    }

    /// The engine's configuration.
    pub fn engine_config(&self) -> spool_queue::EngineConfig {
        let q = &self.queue;
        spool_queue::EngineConfig {
            capacity: q.capacity,
            workers: q.workers,
            batch_max: q.batch_max,
            batch_linger: q.batch_linger,
            max_attempts: q.max_attempts,
            backoff_initial: q.backoff_initial,
            backoff_max: q.backoff_max,
            idempotency_window: self.idempotency.window,
            key_index: Some(self.wal.dir.join("keys")),
            min_free_bytes: self.wal.min_free_bytes,
            ..spool_queue::EngineConfig::default()
        }
    }
}

/// Source names appear in URLs: a conservative alphabet.
pub fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s != "."
        && s != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_embedded_setup() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(c.server.max_body_bytes, 10 << 20);
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.wal.dir, PathBuf::from("./spool-data/wal"));
        assert_eq!(c.wal.segment_bytes, 64 << 20);
        assert_eq!(c.sync_mode().unwrap(), SyncMode::Always);
        assert_eq!(c.wal.min_free_bytes, 256 << 20);
        assert_eq!(c.queue.capacity, 10_000);
        assert_eq!(c.queue.workers, 4);
        assert_eq!(c.queue.batch_max, 500);
        assert_eq!(c.queue.batch_linger, Duration::from_millis(5));
        assert_eq!(c.queue.max_attempts, 10);
        assert_eq!(c.limits.max_entry_bytes, 1 << 20);
        assert_eq!(c.limits.max_entries_per_request, 10_000);
        assert_eq!(c.idempotency.window, Duration::from_secs(86_400));
        assert_eq!(
            c.destinations[0].path.as_deref(),
            Some("./spool-data/spool.db")
        );
        assert_eq!(
            (c.sources[0].name.as_str(), c.sources[0].token.as_deref()),
            ("default", None)
        );
    }

    #[test]
    fn values_env_sizes_and_durations() {
        std::env::set_var("SPOOL_CFG_TEST_TOKEN", "s3cret");
        let c = Config::parse(
            r#"
            [server]
            listen = "0.0.0.0:9000"
            max_body_bytes = "2MiB"
            shutdown_timeout = "250ms"
            [wal]
            sync = "interval:10ms"
            max_bytes = 1000000
            [[destination]]
            name = "pg"
            kind = "postgres"
            url = "postgres://x@localhost/db"
            [[source]]
            name = "agents"
            token = "env:SPOOL_CFG_TEST_TOKEN"
            rate_limit = 50
            "#,
        )
        .unwrap();
        assert_eq!(c.server.max_body_bytes, 2 << 20);
        assert_eq!(c.server.shutdown_timeout, Duration::from_millis(250));
        assert_eq!(c.wal.max_bytes, Some(1_000_000));
        assert_eq!(c.sources[0].token.as_deref(), Some("s3cret"));
        assert_eq!(c.sources[0].destination.as_deref(), Some("pg"));
    }

    #[test]
    fn errors_name_the_key() {
        for (text, needle) in [
            ("[server]\nlisten_on = \"x\"", "listen_on"),
            ("bogus = 1", "bogus"),
            ("[queue]\ncapacity = \"many\"", "capacity"),
            ("[wal]\nsync = \"sometimes\"", "wal.sync"),
            ("[server]\nshutdown_timeout = \"soon\"", "shutdown_timeout"),
            ("[wal]\nsegment_bytes = \"12 parsecs\"", "segment_bytes"),
            (
                "[[source]]\nname = \"a\"\ntoken = \"env:SPOOL_SURELY_UNSET_VAR\"",
                "source[0].token",
            ),
            ("[server]\nlisten = \"0.0.0.0:7070\"", "no token"),
            ("[[source]]\nname = \"a\"\ndestination = \"nope\"", "nope"),
            ("[[source]]\nname = \"admin\"", "reserved"),
            (
                "[[destination]]\nname = \"x\"\nkind = \"oracle\"\npath = \"p\"",
                "oracle",
            ),
        ] {
            let e = Config::parse(text).unwrap_err().0;
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    /// Errors name the line as written (env: values are substituted in place,
    /// the text is not re-serialized) and never print a value read from the
    /// environment.
    #[test]
    fn errors_name_the_line_as_written_and_never_print_env_values() {
        std::env::set_var("SPOOL_CFG_TEST_SECRET_SIZE", "hunter2-very-secret");
        std::env::set_var("SPOOL_CFG_TEST_SECRET_TOKEN", "tok\"en-secret");
        let text = "# spool\n\n[server]\nadmin_token = \"env:SPOOL_CFG_TEST_SECRET_TOKEN\"\nmax_body_bytes = \"env:SPOOL_CFG_TEST_SECRET_SIZE\"\n";
        let e = Config::parse(text).unwrap_err().0;
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.starts_with("line 5:"), "{e}");
        assert!(e.contains("env:SPOOL_CFG_TEST_SECRET_SIZE"), "{e}");
        let text = "[server]\nadmin_token = \"env:SPOOL_CFG_TEST_SECRET_TOKEN\"\n\n\n[queue]\ncapacity = 10\n[limits]\nmax_entries_per_request = 20\nbogus = 1\n";
        let e = Config::parse(text).unwrap_err().0;
        assert!(e.starts_with("line 9:") && e.contains("bogus"), "{e}");
        let text = text.replace("bogus = 1\n", "");
        let e = Config::parse(&text).unwrap_err().0;
        assert!(
            e.starts_with("line 8:") && e.contains("queue.capacity"),
            "{e}"
        );
        assert!(!e.contains("en-secret"), "{e}");
        let c = Config::parse(&text.replace("20", "5")).unwrap();
        assert_eq!(c.server.admin_token.as_deref(), Some("tok\"en-secret"));
    }

    #[test]
    fn an_env_value_is_substituted_once_and_taken_literally() {
        std::env::set_var(
            "SPOOL_CFG_TEST_OUTER",
            "pre\"env:SPOOL_CFG_TEST_INNER\"post",
        );
        std::env::set_var("SPOOL_CFG_TEST_INNER", "inner-secret");
        let text = "# admin_token = \"env:SPOOL_CFG_TEST_INNER\" was the old way\n[server]\nadmin_token = \"env:SPOOL_CFG_TEST_OUTER\"\n\n[[source]]\nname = \"a\"\ntoken = \"env:SPOOL_CFG_TEST_INNER\"\n";
        let c = Config::parse(text).unwrap();
        assert_eq!(
            c.server.admin_token.as_deref(),
            Some("pre\"env:SPOOL_CFG_TEST_INNER\"post")
        );
        assert_eq!(c.sources[0].token.as_deref(), Some("inner-secret"));
        std::env::remove_var("SPOOL_CFG_TEST_MISSING");
        let e = Config::parse(&text.replace("_INNER\"\n", "_MISSING\"\n"))
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("line 7:") && e.contains("SPOOL_CFG_TEST_MISSING"),
            "{e}"
        );
    }

    #[test]
    fn an_invalid_env_value_is_never_quoted_even_in_part() {
        std::env::set_var("SPOOL_CFG_TEST_HEX", "9f86d081884c7d65\n");
        let text = "[server]\nmax_body_bytes = \"env:SPOOL_CFG_TEST_HEX\"\n";
        let e = Config::parse(text).unwrap_err().0;
        assert!(!e.contains("86d0") && !e.contains("884c"), "{e}");
        assert!(
            e.starts_with("line 2:") && e.contains("env:SPOOL_CFG_TEST_HEX"),
            "{e}"
        );
    }

    #[test]
    fn a_zero_read_page_is_refused() {
        let e = Config::parse("[limits]\nmax_read_bytes = 0\n")
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("line 2:") && e.contains("max_read_bytes"),
            "{e}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("10 MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }
}
