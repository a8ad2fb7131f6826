//! Reading a write's body: bounded, gzip, the linear prescan, splitting into
//! entries, per-entry checks ([`parse_entries`], also the fuzz target's entry).

use super::*;

/// What a write body must satisfy.
#[derive(Debug, Clone)]
pub struct BodyRules {
    /// NDJSON (else one JSON object or an array of them).
    pub ndjson: bool,
    /// `limits.max_entries_per_request`.
    pub max_entries: usize,
    /// `limits.max_entry_bytes`.
    pub max_entry_bytes: u64,
    /// The destination refuses NUL in text (Postgres).
    pub no_nul: bool,
    /// The `Idempotency-Key` header (one-entry requests only).
    pub header_key: Option<String>,
    /// The source's `embedding_dims`: a top-level `embedding` must have this
    /// many finite numbers. `None`: `embedding` is an ordinary field.
    pub embedding_dims: Option<usize>,
}

/// One entry of a write, checked: its destination can store it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedEntry {
    /// Top-level `subject`.
    pub subject: Option<String>,
    /// Top-level `idempotency_key`, or the header's.
    pub idempotency_key: Option<String>,
    /// The entry's JSON text, verbatim.
    pub payload: Vec<u8>,
    /// Its top-level `embedding` (when the source has `embedding_dims`).
    pub embedding: Option<Vec<f32>>,
}

/// A decoded write body into its entries, each checked by the rules of the
/// destination in one streaming pass (nothing answered 202 can become a dead
/// letter for its content). All or nothing: the first bad entry refuses the
/// request (400 `invalid_json` / `invalid_entry` / `invalid_request`, 413).
pub fn parse_entries(body: &[u8], rules: &BodyRules) -> Result<Vec<ParsedEntry>, ApiError> {
    let raws = split_entries(body, rules.ndjson, rules.max_entries)?;
    if raws.is_empty() {
        return Err(ApiError::bad(
            "invalid_entry",
            "the request holds no entries",
        ));
    }
    let header_key = rules.header_key.as_ref();
    if header_key.is_some() && raws.len() != 1 {
        return Err(ApiError::bad(
            "invalid_request",
            "the Idempotency-Key header is for one-entry requests; put `idempotency_key` in each entry",
        ));
    }
    if header_key.is_some_and(|k| k.is_empty() || k.len() > MAX_FIELD_BYTES) {
        return Err(ApiError::bad(
            "invalid_request",
            format!("Idempotency-Key must be 1-{MAX_FIELD_BYTES} bytes"),
        ));
    }
    let mut entries = Vec::with_capacity(raws.len());
    for (raw, at) in raws {
        let text = raw.get();
        if text.len() as u64 > rules.max_entry_bytes {
            return Err(ApiError::too_large(format!(
                "{at} is {} bytes; limits.max_entry_bytes is {}",
                text.len(),
                rules.max_entry_bytes
            )));
        }
        if !text.starts_with('{') {
            return Err(ApiError::bad(
                "invalid_entry",
                format!("{at}: an entry must be a JSON object"),
            ));
        }
        let invalid = |e: spool_destination::InvalidEntry| {
            ApiError::bad("invalid_entry", format!("{at}: {e}"))
        };
        let fields =
            spool_destination::check_payload(text.as_bytes(), rules.no_nul).map_err(invalid)?;
        let subject = string_field(fields.subject, "subject", &at)?;
        let key = string_field(fields.idempotency_key, "idempotency_key", &at)?
            .or_else(|| header_key.cloned());
        if key.as_deref() == Some("") {
            return Err(ApiError::bad(
                "invalid_entry",
                format!("{at}: `idempotency_key` must not be empty"),
            ));
        }
        spool_destination::check_text("subject", subject.as_deref(), rules.no_nul)
            .and_then(|()| {
                spool_destination::check_text("idempotency_key", key.as_deref(), rules.no_nul)
            })
            .map_err(invalid)?;
        let embedding = match (fields.embedding, rules.embedding_dims) {
            (_, None) | (Embedding::Absent, _) => None,
            (Embedding::Invalid(why), Some(_)) => {
                return Err(ApiError::bad(
                    "invalid_entry",
                    format!("{at}: `embedding` {why}"),
                ))
            }
            (Embedding::Numbers(v), Some(dims)) if v.len() != dims => {
                return Err(ApiError::bad(
                    "invalid_entry",
                    format!(
                        "{at}: `embedding` has {} numbers; this source's embedding_dims is {dims}",
                        v.len()
                    ),
                ))
            }
            (Embedding::Numbers(v), Some(_)) => {
                // Cosine needs a norm: finite (as f32) and not zero.
                let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
                if norm == 0.0 || norm > f64::from(f32::MAX) {
                    return Err(ApiError::bad(
                        "invalid_entry",
                        format!(
                            "{at}: `embedding` must have a non-zero norm within a 32-bit float"
                        ),
                    ));
                }
                Some(v)
            }
        };
        entries.push(ParsedEntry {
            subject,
            idempotency_key: key,
            payload: text.as_bytes().to_vec(),
            embedding,
        });
    }
    Ok(entries)
}

/// `Some(string)` / `None` for a JSON string / null-or-absent field, else an error.
pub(crate) fn string_field(v: Field, name: &str, at: &str) -> ApiResult<Option<String>> {
    match v {
        Field::Absent => Ok(None),
        Field::Text(s) if s.len() <= MAX_FIELD_BYTES => Ok(Some(s)),
        Field::Text(_) => Err(ApiError::bad(
            "invalid_entry",
            format!("{at}: `{name}` is longer than {MAX_FIELD_BYTES} bytes"),
        )),
        Field::NotText => Err(ApiError::bad(
            "invalid_entry",
            format!("{at}: `{name}` must be a string"),
        )),
    }
}

pub(crate) fn json_error(e: &serde_json::Error, line_offset: usize) -> ApiError {
    let line = e.line() + line_offset;
    ApiError::bad(
        "invalid_json",
        format!("invalid JSON at line {line}, column {}: {e}", e.column()),
    )
}

/// Deepest JSON nesting accepted (the array around entries counts).
pub(crate) const MAX_DEPTH: usize = 64;

/// One linear pass before any parser sees the body: refuse nesting deeper than
/// [`MAX_DEPTH`] (a recursive parser would overflow its stack) and more than
/// `max_entries` entries (parsing a million tiny entries only to refuse them costs
/// memory in proportion). Entries are counted as top-level array elements (commas
/// at depth 1) or non-blank NDJSON lines.
pub(crate) fn prescan(body: &[u8], ndjson: bool, max_entries: usize) -> ApiResult<()> {
    let (mut depth, mut in_str, mut esc, mut line) = (0usize, false, false, 1usize);
    let mut entries = 0usize;
    let mut line_counted = false;
    let mut top_array = false;
    let too_many = || {
        ApiError::too_large(format!(
            "more than {max_entries} entries in one request; limits.max_entries_per_request is {max_entries}"
        ))
    };
    for &b in body {
        if ndjson && !line_counted && !b.is_ascii_whitespace() {
            line_counted = true;
            entries += 1;
            if entries > max_entries {
                return Err(too_many());
            }
        }
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                if depth == 0 {
                    top_array = b == b'[';
                }
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(ApiError::bad(
                        "invalid_json",
                        format!(
                            "invalid JSON at line {line}: nesting deeper than {MAX_DEPTH} levels"
                        ),
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if !ndjson && depth == 1 && top_array => {
                // A separator of the top-level array: one more entry.
                entries += 1;
                if entries + 1 > max_entries {
                    return Err(too_many());
                }
            }
            b'\n' => {
                line += 1;
                if ndjson {
                    depth = 0; // every NDJSON line is a document of its own
                    line_counted = false;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Decode the body into the raw JSON text of each entry.
pub(crate) fn split_entries(
    body: &[u8],
    ndjson: bool,
    max_entries: usize,
) -> ApiResult<Vec<(&RawValue, String)>> {
    prescan(body, ndjson, max_entries)?;
    if ndjson {
        let mut out = Vec::new();
        for (i, line) in body.split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let raw: &RawValue = serde_json::from_slice(line).map_err(|e| json_error(&e, i))?;
            out.push((raw, format!("line {}", i + 1)));
        }
        return Ok(out);
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| json_error(&e, 0))?;
        Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, r)| (r, format!("entry {i}")))
            .collect())
    } else {
        let raw: &RawValue = serde_json::from_slice(body).map_err(|e| json_error(&e, 0))?;
        Ok(vec![(raw, "entry 0".to_owned())])
    }
}

/// Largest declared body a refusal still reads (and drops) before answering.
const DISCARD_MAX: u64 = 4 << 20;
/// How long a refusal reads it at most.
const DISCARD_WITHIN: Duration = Duration::from_secs(1);

/// Read and drop `body`, for at most `within`.
async fn discard(mut body: Body, within: Duration) {
    use http_body_util::BodyExt;
    let drain = async { while let Some(Ok(_)) = body.frame().await {} };
    let _ = tokio::time::timeout(within, drain).await;
}

/// Read the request body, bounded by `limit` before and after gzip.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    within: Duration,
) -> ApiResult<Vec<u8>> {
    let too_large = || {
        ApiError::too_large(format!(
            "request body exceeds server.max_body_bytes ({limit} bytes)"
        ))
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        if len > limit {
            // A client may still be sending it: read and drop a body that is
            // not huge (briefly), so it reads this 413 rather than a connection
            // reset by the unread bytes (seen as EPIPE by a test's client).
            if len <= DISCARD_MAX {
                discard(body, within.min(DISCARD_WITHIN)).await;
            }
            return Err(too_large());
        }
    }
    let read = tokio::time::timeout(within, axum::body::to_bytes(body, limit as usize));
    let raw = read
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the body did not arrive within {within:?} (server.body_timeout)"),
            )
        })?
        .map_err(|e| {
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::bad("invalid_request", format!("could not read the body: {e}"))
            }
        })?;
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("identity") | Some("") => Ok(raw.to_vec()),
        Some("gzip") | Some("x-gzip") => gunzip(&raw, limit),
        Some(other) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Encoding {other:?} is not supported (use gzip or none)"),
        )),
    }
}

/// Decode a gzip body: every member (`cat a.gz b.gz` is one valid gzip
/// stream), bounded by `limit`; anything after the last member that is not a
/// member (trailing garbage) is an error — never a body silently cut short.
pub fn gunzip(raw: &[u8], limit: u64) -> ApiResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut dec = flate2::read::MultiGzDecoder::new(raw).take(limit + 1);
    dec.read_to_end(&mut out)
        .map_err(|e| ApiError::bad("invalid_request", format!("body is not valid gzip: {e}")))?;
    if out.len() as u64 > limit {
        return Err(ApiError::too_large(format!(
            "decompressed body exceeds server.max_body_bytes ({limit} bytes)"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gz(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Before: `GzDecoder` stopped after the first member, and a 202 stored
    /// only the first member's entries.
    #[test]
    fn every_member_of_a_multi_member_gzip_body_is_decoded() {
        let mut body = gz(b"{\"n\":1}\n");
        body.extend(gz(b"{\"n\":2}\n"));
        assert_eq!(gunzip(&body, 1 << 20).unwrap(), b"{\"n\":1}\n{\"n\":2}\n");
    }

    #[test]
    fn trailing_garbage_after_a_gzip_member_is_refused() {
        let mut body = gz(b"{\"n\":1}\n");
        body.extend(b"garbage after the member");
        let e = gunzip(&body, 1 << 20).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, "invalid_request")
        );
    }

    #[test]
    pub(crate) fn times_parse_with_offsets_and_as_unix_seconds() {
        let z = parse_time("since", "2026-01-02T03:04:05Z").unwrap();
        assert_eq!(parse_time("since", "2026-01-02T05:04:05+02:00").unwrap(), z);
        assert_eq!(parse_time("since", "1767323045").unwrap(), z);
        assert_eq!(
            parse_time("since", "2026-01-02T03:04:05.5Z").unwrap(),
            z + 500_000
        );
        assert!(parse_time("since", "yesterday").is_err());
    }

    #[test]
    pub(crate) fn nesting_is_bounded_whatever_the_layout() {
        let deep = |n: usize, sep: &str| {
            format!("{}{}", "[".repeat(n), "]".repeat(n)).replace('[', &format!("[{sep}"))
        };
        let check_depth = |b: &[u8], nd: bool| prescan(b, nd, usize::MAX);
        assert!(check_depth(deep(MAX_DEPTH, "").as_bytes(), false).is_ok());
        assert!(check_depth(deep(MAX_DEPTH + 1, "").as_bytes(), false).is_err());
        assert!(
            check_depth(deep(MAX_DEPTH + 1, "\n").as_bytes(), false).is_err(),
            "newlines must not reset depth"
        );
        assert!(check_depth(br#"{"s":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}"#, false).is_ok());
        let lines = format!("{}\n", deep(MAX_DEPTH, "")).repeat(3);
        assert!(check_depth(lines.as_bytes(), true).is_ok());
    }

    #[test]
    pub(crate) fn too_many_entries_are_refused_by_the_prescan_exactly_at_the_limit() {
        let array = |n: usize| format!("[{}]", vec![r#"{"a":[1,2],"s":","}"#; n].join(","));
        assert!(prescan(array(3).as_bytes(), false, 3).is_ok());
        assert_eq!(
            prescan(array(4).as_bytes(), false, 3)
                .unwrap_err()
                .status
                .as_u16(),
            413
        );
        assert!(prescan(br#"{"a":1,"b":2,"c":3,"d":4}"#, false, 1).is_ok());
        let nd = |n: usize| format!("\n{}\n  \n", vec![r#"{"a":1,"b":2}"#; n].join("\n"));
        assert!(prescan(nd(3).as_bytes(), true, 3).is_ok());
        assert_eq!(
            prescan(nd(4).as_bytes(), true, 3)
                .unwrap_err()
                .status
                .as_u16(),
            413
        );
    }
}
