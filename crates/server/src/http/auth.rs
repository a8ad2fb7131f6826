//! Bearer tokens: per source, and the admin token. Compared in constant time.

use super::*;

impl App {
    pub(crate) fn source(&self, name: &str) -> ApiResult<&Source> {
        self.sources.get(name).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_source",
                format!("no source named {name:?}"),
            )
        })
    }

    /// The caller may use `src`: its token, or any caller when it has none.
    pub(crate) fn authorize(&self, src: &Source, headers: &HeaderMap) -> ApiResult<()> {
        let Some(expected) = &src.token else {
            return Ok(());
        };
        let Some(given) = bearer(headers) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this source needs `Authorization: Bearer <token>`",
            ));
        };
        if ct_eq(given, expected) {
            return Ok(());
        }
        let other = self
            .sources
            .values()
            .filter_map(|s| s.token.as_deref())
            .any(|t| ct_eq(given, t));
        if other {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this token belongs to another source",
            ))
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid token",
            ))
        }
    }

    pub(crate) fn authorize_admin(&self, headers: &HeaderMap) -> ApiResult<()> {
        match &self.cfg.server.admin_token {
            None if self.cfg.server.listen.ip().is_loopback() => Ok(()),
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the admin API needs server.admin_token when listening beyond loopback",
            )),
            Some(t) => match bearer(headers) {
                Some(g) if ct_eq(g, t) => Ok(()),
                Some(_) => Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "not the admin token",
                )),
                None => Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the admin API needs `Authorization: Bearer <admin token>`",
                )),
            },
        }
    }
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub(crate) fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}
