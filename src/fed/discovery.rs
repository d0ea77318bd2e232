//! Server discovery: from a server name to where its federation API listens.
//!
//! Follows the spec's order, minus SRV records (no resolver dependency yet):
//! 1. an IP literal: that address, with the name's port or 8448;
//! 2. a hostname with an explicit port: that host and port;
//! 3. otherwise `https://<hostname>/.well-known/matrix/server`; a `m.server` delegation is
//!    resolved by steps 1–2 again (hostname without port: 8448);
//! 4. otherwise the hostname on port 8448.
//!
//! The TLS name checked is the delegated host when there was delegation, else the server name's
//! host; the `Host` header is the same.

use std::net::IpAddr;

use ruma::ServerName;

/// Where to connect for one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host to connect to and to name in TLS SNI and the `Host` header (no brackets for IPv6).
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// `https://host:port` (IPv6 in brackets).
    pub fn base_url(&self) -> String {
        if self.host.contains(':') {
            format!("https://[{}]:{}", self.host, self.port)
        } else {
            format!("https://{}:{}", self.host, self.port)
        }
    }
}

/// Splits a server name (or an `m.server` value) into host and optional port.
pub fn split(name: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = name.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((ip.to_owned(), port));
    }
    match name.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), Some(p.parse().ok()?))),
        None => Some((name.to_owned(), None)),
    }
}

/// Steps 1 and 2: resolution that needs no network. `None` means "ask `.well-known`".
pub fn resolve_static(name: &ServerName) -> Option<Endpoint> {
    let (host, port) = split(name.as_str())?;
    if host.parse::<IpAddr>().is_ok() {
        return Some(Endpoint {
            host,
            port: port.unwrap_or(8448),
        });
    }
    port.map(|port| Endpoint { host, port })
}

/// Step 3's answer (`m.server`) turned into an endpoint; `None` for a malformed value.
pub fn resolve_delegated(m_server: &str) -> Option<Endpoint> {
    let (host, port) = split(m_server)?;
    if host.is_empty() {
        return None;
    }
    Some(Endpoint {
        host,
        port: port.unwrap_or(8448),
    })
}

/// Step 4.
pub fn default_endpoint(name: &ServerName) -> Option<Endpoint> {
    let (host, _) = split(name.as_str())?;
    Some(Endpoint { host, port: 8448 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(h: &str, p: u16) -> Option<Endpoint> {
        Some(Endpoint {
            host: h.into(),
            port: p,
        })
    }

    #[test]
    fn static_resolution_follows_the_spec() {
        let n = |s: &str| <&ServerName>::try_from(s).unwrap().to_owned();
        assert_eq!(resolve_static(&n("127.0.0.1:8481")), ep("127.0.0.1", 8481));
        assert_eq!(resolve_static(&n("127.0.0.1")), ep("127.0.0.1", 8448));
        assert_eq!(resolve_static(&n("[::1]:9000")), ep("::1", 9000));
        assert_eq!(resolve_static(&n("[::1]")), ep("::1", 8448));
        assert_eq!(
            resolve_static(&n("example.org:1234")),
            ep("example.org", 1234)
        );
        assert_eq!(resolve_static(&n("example.org")), None, "asks .well-known");
        assert_eq!(default_endpoint(&n("example.org")), ep("example.org", 8448));
        assert_eq!(
            resolve_delegated("matrix.example.org"),
            ep("matrix.example.org", 8448)
        );
        assert_eq!(
            resolve_delegated("matrix.example.org:443"),
            ep("matrix.example.org", 443)
        );
        assert_eq!(resolve_delegated(":443"), None);
        assert_eq!(ep("::1", 1).unwrap().base_url(), "https://[::1]:1");
    }
}
