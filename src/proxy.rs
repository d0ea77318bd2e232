//! The client's address behind reverse proxies: `trusted_proxies` (IPs and CIDR ranges) and
//! `X-Forwarded-For`. Hand-rolled on `std::net` (a prefix compare is a few lines; no crate).
//!
//! Only when the TCP peer is a trusted proxy is `X-Forwarded-For` read, and then from the
//! right: each proxy appends the address it received the request from, so the right-most
//! entry that is not itself a trusted proxy is the client. Entries to its left were written by
//! the client and are ignored (anyone can send `X-Forwarded-For: 1.2.3.4`).

use std::{fmt, net::IpAddr, str::FromStr};

use serde::Deserialize;

/// An address range: `10.0.0.0/8`, `fd00::/8`, or a single address (`127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = (usize::from(bits / 8), bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[whole] & mask == b[whole] & mask
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{s:?} is not an IP address or CIDR range: {why}");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = IpAddr::from_str(addr.trim())
            .map_err(|e| bad(&e.to_string()))?
            .to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad(&format!("the prefix must be 0 to {max}")))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl TryFrom<String> for IpNet {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .map(|ip| ip.to_canonical())
}

/// The client's address for a request from `peer` carrying these `X-Forwarded-For` header
/// values (in order; each may hold a comma-separated list).
pub fn client_ip<'a>(
    trusted: &[IpNet],
    peer: IpAddr,
    forwarded_for: impl IntoIterator<Item = &'a str>,
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let entries: Vec<&str> = forwarded_for
        .into_iter()
        .flat_map(|v| v.split(','))
        .collect();
    // The nearest hop we know: the peer, then each trusted proxy in the chain.
    let mut client = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = parse_entry(entry) else {
            // A trusted proxy wrote something we cannot read: stop at the last hop we know.
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::{client_ip, IpNet};

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn cidr_matching() {
        let n: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.255.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(
            n.contains("::ffff:10.1.0.9".parse().unwrap()),
            "v4-mapped v6"
        );
        let n: IpNet = "fd00::/8".parse().unwrap();
        assert!(n.contains("fdab::1".parse().unwrap()));
        assert!(!n.contains("fe80::1".parse().unwrap()));
        let n: IpNet = "192.168.1.128/25".parse().unwrap();
        assert!(n.contains("192.168.1.200".parse().unwrap()));
        assert!(!n.contains("192.168.1.100".parse().unwrap()));
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!("0.0.0.0/0"
            .parse::<IpNet>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "example.org", "10.0.0.0/x", ""] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_only_from_trusted_peers_right_to_left() {
        let t = nets(&["127.0.0.1", "10.0.0.0/8"]);
        let ip = |s: &str| s.parse().unwrap();
        // Untrusted peer: the header is ignored.
        assert_eq!(
            client_ip(&t, ip("198.51.100.7"), ["1.2.3.4"]),
            ip("198.51.100.7")
        );
        // Trusted peer: the right-most untrusted entry, skipping trusted hops; what the
        // client itself wrote (left) is ignored.
        assert_eq!(
            client_ip(&t, ip("127.0.0.1"), ["6.6.6.6, 203.0.113.9", "10.0.0.2"]),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(&t, ip("127.0.0.1"), ["203.0.113.9:4711"]),
            ip("203.0.113.9")
        );
        // No header, or nothing readable: the peer.
        assert_eq!(client_ip(&t, ip("127.0.0.1"), []), ip("127.0.0.1"));
        assert_eq!(client_ip(&t, ip("127.0.0.1"), ["garbage"]), ip("127.0.0.1"));
        assert_eq!(
            client_ip(&t, ip("127.0.0.1"), ["203.0.113.9, junk, 10.0.0.3"]),
            ip("10.0.0.3")
        );
        // All hops trusted: the left-most one.
        assert_eq!(
            client_ip(&t, ip("127.0.0.1"), ["10.0.0.5, 10.0.0.3"]),
            ip("10.0.0.5")
        );
        // Nothing trusted: never read.
        assert_eq!(
            client_ip(&[], ip("127.0.0.1"), ["1.2.3.4"]),
            ip("127.0.0.1")
        );
    }
}
