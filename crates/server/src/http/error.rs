//! The one error answer: `{"error","message"}` with a status, and the
//! conversions from engine and destination errors.

use super::*;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
    /// The error code (`invalid_entry`, ...).
    pub fn code(&self) -> &'static str {
        self.code
    }
    /// The answer's body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code.to_owned(),
            message: self.message.clone(),
            retry_after_seconds: self.retry_after,
        }
    }
    pub(crate) fn retry(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs.max(1));
        self
    }
    pub(crate) fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub(crate) fn too_large(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }
    pub(crate) fn unavailable(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry(5)
    }
    pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Engine refusals. Nothing of the call was written in any of these; details
/// that name files stay in the log.
impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> ApiError {
        match e {
            IngestError::Full { retry_after, .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                "the delivery queue is full; nothing was written",
            )
            .retry(retry_after.as_secs()),
            IngestError::WalFull {
                limit, retry_after, ..
            } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!(
                    "the WAL is at wal.max_bytes ({limit} bytes), held by entries waiting \
                     for delivery or by dead letters; nothing was written"
                ),
            )
            .retry(retry_after.as_secs()),
            IngestError::Closed => ApiError::unavailable("shutting down"),
            IngestError::LowDisk { .. } => ApiError::unavailable(
                "free disk space under the WAL is below wal.min_free_bytes; nothing was written",
            ),
            IngestError::Wal(e) => {
                tracing::error!(error = %e, "WAL append failed");
                ApiError::unavailable(if e.is_out_of_space() {
                    "the WAL's disk is full; nothing was written"
                } else {
                    "the WAL cannot write; nothing was written (see the server log)"
                })
            }
            e => {
                tracing::error!(error = %e, "ingest failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the entries could not be accepted (see the server log); nothing was written",
                )
            }
        }
    }
}

/// Dead-letter operations that could not write their record.
impl From<spool_wal::WalError> for ApiError {
    fn from(e: spool_wal::WalError) -> ApiError {
        tracing::error!(error = %e, "WAL write failed");
        ApiError::unavailable("the WAL cannot write (see the server log)")
    }
}

/// Read-path errors: a bad query is the client's (400); anything else is the
/// destination's, answered without its raw text (SQL, paths stay in the log).
impl From<DestinationError> for ApiError {
    fn from(e: DestinationError) -> ApiError {
        match e {
            DestinationError::InvalidQuery(m) => ApiError::bad("invalid_request", m),
            e if e.is_transient() || matches!(e, DestinationError::SchemaTooNew { .. }) => {
                tracing::warn!(error = %e, "read failed: destination unavailable");
                ApiError::unavailable("the destination is unavailable (see the server log)")
            }
            e => {
                tracing::error!(error = %e, "read failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the read failed (see the server log)",
                )
            }
        }
    }
}
