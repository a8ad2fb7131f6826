//! The config file's text: `env:NAME` values substituted in place, so every
//! line stays where it was written; errors name that line and show it as
//! written (with `env:NAME`, never the value), and every value read from the
//! environment is scrubbed from error messages.

use super::ConfigError;

pub(super) struct Resolved<'a> {
    original: &'a str,
    /// The text with `env:` values substituted, line for line.
    pub text: String,
    /// Values read from the environment: (NAME, value).
    secrets: Vec<(String, String)>,
    table: toml::Table,
}

impl<'a> Resolved<'a> {
    pub fn new(original: &'a str) -> Result<Resolved<'a>, ConfigError> {
        let plain = Resolved {
            original,
            text: original.to_owned(),
            secrets: Vec::new(),
            table: toml::Table::new(),
        };
        let table: toml::Table = toml::from_str(original).map_err(|e| plain.describe(&e))?;
        let mut refs = Vec::new();
        env_refs(&toml::Value::Table(table), "", &mut refs);
        let mut secrets = Vec::new();
        for (path, name) in refs {
            let value = std::env::var(&name).map_err(|_| {
                plain.at(
                    plain.line_of_ref(&name),
                    format!("{path}: environment variable {name} is not set"),
                )
            })?;
            secrets.push((name, value));
        }
        let text = substitute(original, &secrets);
        // Longest first, so a value inside another is never scrubbed half.
        secrets.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        let mut resolved = Resolved {
            original,
            text,
            secrets,
            table: toml::Table::new(),
        };
        resolved.table = toml::from_str(&resolved.text).map_err(|e| resolved.describe(&e))?;
        let mut left = Vec::new();
        env_refs(&toml::Value::Table(resolved.table.clone()), "", &mut left);
        if let Some((path, name)) = left.first() {
            return Err(resolved.at(
                resolved.line_of_ref(name),
                format!("{path}: write an env: reference as a one-line quoted string"),
            ));
        }
        Ok(resolved)
    }

    /// Whether `[table] key` is written.
    pub fn has(&self, table: &str, key: &str) -> bool {
        self.table.get(table).and_then(|t| t.get(key)).is_some()
    }

    /// A TOML error, on the line as written.
    pub fn describe(&self, e: &toml::de::Error) -> ConfigError {
        let line = e.span().map(|s| {
            self.text[..s.start.min(self.text.len())]
                .matches('\n')
                .count()
                + 1
        });
        self.at(line, self.scrub(e.message().trim()))
    }

    /// A check's error, with the line of the first `table.key` it names that
    /// the file writes.
    pub fn locate(&self, e: ConfigError) -> ConfigError {
        let msg = self.scrub(&e.0);
        let line = msg
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .filter_map(|w| w.split_once('.'))
            .find_map(|(table, key)| self.line_of_key(table, key));
        self.at(line, msg)
    }

    /// An error on `line`; when that line takes its value from the
    /// environment, the message (which may quote pieces of the value: a unit,
    /// a trimmed copy) is replaced by one that names the variable only.
    fn at(&self, line: Option<usize>, msg: String) -> ConfigError {
        match line.and_then(|n| Some((n, self.original.lines().nth(n - 1)?))) {
            Some((n, text)) => {
                let from_env = self.secrets.iter().find(|(name, _)| {
                    text.contains(&format!("\"env:{name}\""))
                        || text.contains(&format!("'env:{name}'"))
                });
                let msg = match from_env {
                    Some((name, _)) => format!(
                        "the value of env:{name} is not valid for this key (not shown: it came from the environment)"
                    ),
                    None => msg,
                };
                ConfigError(format!("line {n}: {msg}\n    {}", text.trim()))
            }
            None => ConfigError(msg),
        }
    }

    /// `msg` with every value read from the environment — as is, and as TOML
    /// or Rust would escape it — replaced by its `env:NAME`.
    fn scrub(&self, msg: &str) -> String {
        let mut m = msg.to_owned();
        for (name, v) in self.secrets.iter().filter(|(_, v)| v.len() >= 2) {
            let toml = basic_string(v);
            let debug = format!("{v:?}");
            for form in [
                &toml[1..toml.len() - 1],
                &debug[1..debug.len() - 1],
                v,
                v.trim(),
            ] {
                m = m.replace(form, &format!("env:{name}"));
            }
        }
        m
    }

    /// The first line, not a comment, that writes `"env:NAME"` (or single-quoted).
    fn line_of_ref(&self, name: &str) -> Option<usize> {
        let (double, single) = (format!("\"env:{name}\""), format!("'env:{name}'"));
        self.original
            .lines()
            .position(|l| {
                !l.trim_start().starts_with('#') && (l.contains(&double) || l.contains(&single))
            })
            .map(|i| i + 1)
    }

    /// The line of `key = …` under `[table]` or `[[table]]`.
    fn line_of_key(&self, table: &str, key: &str) -> Option<usize> {
        let mut current = "";
        for (i, line) in self.original.lines().enumerate() {
            let l = line.trim();
            if let Some(h) = l.strip_prefix('[') {
                current = h.trim_matches(|c| c == '[' || c == ']' || c == ' ');
            } else if current == table
                && l.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            {
                return Some(i + 1);
            }
        }
        None
    }
}

/// Every string value `env:NAME` under `v`: (key path, NAME).
fn env_refs(v: &toml::Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::String(s) => {
            if let Some(name) = s.strip_prefix("env:") {
                out.push((path.to_owned(), name.to_owned()));
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                env_refs(v, &p, out);
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                env_refs(v, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// `text` with each quoted `env:NAME` that names one of `values` replaced by
/// its value as a TOML basic string, in one pass (a value that itself holds
/// `"env:OTHER"` is never substituted again).
fn substitute(text: &str, values: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("env:") {
        let quote = rest[..at]
            .chars()
            .next_back()
            .filter(|q| *q == '"' || *q == '\'');
        let found = quote.and_then(|q| {
            let tail = &rest[at + 4..];
            let end = tail.find(q)?;
            let (_, value) = values.iter().find(|(n, _)| n == &tail[..end])?;
            Some((at - 1, at + 4 + end + 1, value))
        });
        match found {
            Some((start, end, value)) => {
                out.push_str(&rest[..start]);
                out.push_str(&basic_string(value));
                rest = &rest[end..];
            }
            None => {
                out.push_str(&rest[..at + 4]);
                rest = &rest[at + 4..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// `value` as a one-line TOML basic string.
fn basic_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
