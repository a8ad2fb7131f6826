//! Browser safety. While anything is reachable without a token — a tokenless
//! source, or the admin API open on loopback — a web page the user visits must
//! not reach it: requests whose `Host` is not this server's (DNS rebinding) are
//! refused, and so are cross-site `Origin`s on write and admin routes. (A write
//! also needs a JSON `Content-Type`, which no CORS "simple request" can send.)

use super::*;

/// The `Host` values this server answers to while guarded.
pub(crate) struct HostGuard {
    /// Lower-case `host:port` (and, for `allowed_hosts` entries without a port,
    /// bare host names, which then match on any port).
    allowed: Vec<String>,
}

impl HostGuard {
    /// `None` when every source has a token and the admin API needs one.
    pub(crate) fn new(cfg: &Config) -> Option<HostGuard> {
        let s = &cfg.server;
        let open_admin = s.admin_token.is_none() && s.listen.ip().is_loopback();
        let tokenless = cfg.sources.iter().any(|src| src.token.is_none());
        if !open_admin && !tokenless {
            return None;
        }
        let port = s.listen.port();
        let mut allowed = vec![s.listen.to_string()];
        if s.listen.ip().is_loopback() {
            for h in ["localhost", "127.0.0.1", "[::1]"] {
                allowed.push(format!("{h}:{port}"));
            }
        }
        allowed.extend(s.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()));
        Some(HostGuard { allowed })
    }

    /// Whether `host` (a `Host` header or an origin's authority) is ours.
    fn allows(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let bare = match host.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host.as_str(),
        };
        self.allowed.iter().any(|a| *a == host || *a == bare)
    }

    /// Check a request: its `Host`, and on write/admin routes its `Origin`.
    pub(crate) fn check(&self, headers: &HeaderMap, guarded_route: bool) -> ApiResult<()> {
        if let Some(h) = headers.get(header::HOST) {
            let host = h.to_str().unwrap_or("");
            if !self.allows(host) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden_host",
                    format!(
                        "Host {host:?} is not this server's; while a source has no token or the admin API is open, only the listen address (and server.allowed_hosts) are answered"
                    ),
                ));
            }
        }
        if guarded_route {
            if let Some(o) = headers.get(header::ORIGIN) {
                let origin = o.to_str().unwrap_or("");
                let authority = origin
                    .split_once("://")
                    .map(|(_, rest)| rest.trim_end_matches('/'))
                    .unwrap_or("");
                if authority.is_empty() || !self.allows(authority) {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden_origin",
                        format!("cross-site Origin {origin:?} may not write or use the admin API"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(extra: &str) -> HostGuard {
        let cfg =
            Config::parse(&format!("[server]\nlisten = \"127.0.0.1:7070\"\n{extra}")).unwrap();
        HostGuard::new(&cfg).expect("the embedded default is guarded")
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_our_own_host_and_origin_pass() {
        let g = guard("allowed_hosts = [\"spool.internal\"]");
        for ok in [
            "127.0.0.1:7070",
            "localhost:7070",
            "LOCALHOST:7070",
            "[::1]:7070",
            "spool.internal",
            "spool.internal:7070",
        ] {
            assert!(g.check(&headers(&[("host", ok)]), true).is_ok(), "{ok}");
        }
        for bad in [
            "evil.example:7070",
            "localhost:8080",
            "127.0.0.1",
            "attacker.localhost:7070",
        ] {
            let e = g.check(&headers(&[("host", bad)]), false).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::FORBIDDEN, "forbidden_host"),
                "{bad}"
            );
        }
        let h = headers(&[
            ("host", "localhost:7070"),
            ("origin", "http://localhost:7070"),
        ]);
        assert!(g.check(&h, true).is_ok());
        for bad in ["https://evil.example", "null", "http://localhost:9999"] {
            let h = headers(&[("host", "localhost:7070"), ("origin", bad)]);
            assert_eq!(
                g.check(&h, true).unwrap_err().code,
                "forbidden_origin",
                "{bad}"
            );
            assert!(g.check(&h, false).is_ok(), "reads do not check Origin");
        }
    }

    #[test]
    fn no_guard_when_everything_needs_a_token() {
        let cfg = Config::parse(
            "[server]\nlisten = \"0.0.0.0:7070\"\nadmin_token = \"a\"\n[[source]]\nname = \"s\"\ntoken = \"t\"",
        )
        .unwrap();
        assert!(HostGuard::new(&cfg).is_none());
    }
}
