//! Worker URLs: a worker's identity in the cluster, compared by their normalized text.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A worker's URL, such as `http://localhost:5001`: the worker's identity in the cluster.
///
/// Only `http://HOST:PORT` is accepted (an optional trailing `/` aside), so that two spellings
/// of one worker compare equal and the coordinator can diff worker sets on reload. It orders by
/// its normalized text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerUrl {
    /// `http://HOST:PORT`, the host as the `url` crate normalizes it (lower case, IPv6 in
    /// brackets). Kept first so that the derived order is the order of the text.
    normalized: String,
    host: url::Host<String>,
    port: u16,
}

impl WorkerUrl {
    /// The host as written in a URL: a lower-case domain, an IPv4 address, or an IPv6 address
    /// in brackets (`[::1]`), following [`url::Url::host_str`].
    pub fn host(&self) -> &str {
        // `normalized` is "http://" + host + ":" + port.
        let authority = &self.normalized["http://".len()..];
        &authority[..authority.rfind(':').expect("a normalized worker URL has a port")]
    }

    /// The worker's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the coordinator spawns and supervises this worker: its host is `127.0.0.1`,
    /// `localhost` or `::1`. Any other host is run by its owner and only health-checked and
    /// routed to, even another loopback address such as 127.0.0.2, which is how a second
    /// machine is stood in for on one host.
    pub fn is_local(&self) -> bool {
        match &self.host {
            url::Host::Domain(domain) => domain == "localhost",
            url::Host::Ipv4(ip) => *ip == Ipv4Addr::LOCALHOST,
            url::Host::Ipv6(ip) => ip.is_loopback(),
        }
    }

    /// The address the worker should listen on: the host of its URL, never all interfaces.
    ///
    /// `localhost` maps to 127.0.0.1. `None` for any other domain name, which only a DNS
    /// lookup can turn into an address.
    pub fn bind_addr(&self) -> Option<SocketAddr> {
        let ip = match &self.host {
            url::Host::Domain(domain) if domain == "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            url::Host::Domain(_) => return None,
            url::Host::Ipv4(ip) => IpAddr::V4(*ip),
            url::Host::Ipv6(ip) => IpAddr::V6(*ip),
        };
        Some(SocketAddr::new(ip, self.port))
    }

    /// The normalized URL, `http://HOST:PORT` without a trailing slash, ready to have a path
    /// such as `/items` appended.
    pub fn as_str(&self) -> &str {
        &self.normalized
    }
}

impl fmt::Display for WorkerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.normalized)
    }
}

impl FromStr for WorkerUrl {
    type Err = WorkerUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let url = url::Url::parse(text)?;
        if url.scheme() != "http" {
            return Err(WorkerUrlError::Scheme(url.scheme().to_owned()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(WorkerUrlError::UserInfo);
        }
        if url.path() != "/" {
            return Err(WorkerUrlError::Path(url.path().to_owned()));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(WorkerUrlError::QueryOrFragment);
        }
        // The url crate refuses an http URL without a host, so these cannot fail.
        let host = url.host().expect("http URLs have a host").to_owned();
        let host_str = url.host_str().expect("http URLs have a host");
        let unspecified = match &host {
            url::Host::Ipv4(ip) => ip.is_unspecified(),
            url::Host::Ipv6(ip) => ip.is_unspecified(),
            url::Host::Domain(_) => false,
        };
        if unspecified {
            return Err(WorkerUrlError::UnspecifiedHost);
        }
        // The url crate drops a port equal to the scheme's default, so `:80` must be looked
        // for in the text itself.
        let port = match url.port() {
            Some(port) => port,
            None if has_explicit_port(text) => 80,
            None => return Err(WorkerUrlError::MissingPort),
        };
        if port == 0 {
            return Err(WorkerUrlError::PortZero);
        }
        Ok(WorkerUrl { normalized: format!("http://{host_str}:{port}"), host, port })
    }
}

/// Whether the authority of an `http://` URL text ends in `:PORT`; IPv6 hosts contain colons
/// of their own, so only a colon after the closing bracket counts.
fn has_explicit_port(text: &str) -> bool {
    let rest = text.trim().split_once("://").map_or("", |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let after_host = authority.rfind(']').map_or(authority, |end| &authority[end..]);
    after_host.contains(':')
}

/// Why a string is not a usable worker URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerUrlError {
    /// Not a URL at all.
    #[error("not a valid URL ({0}); write it like http://localhost:5001")]
    Parse(#[from] url::ParseError),
    /// Workers speak plain HTTP only.
    #[error("scheme must be http, got {0}")]
    Scheme(String),
    /// A worker is addressed by host and port; credentials have no place in its URL.
    #[error("must not contain a user name or password")]
    UserInfo,
    /// The coordinator appends its own paths (`/items`, `/health`), so the URL must not have one.
    #[error("must not have a path, got {0}")]
    Path(String),
    /// As with a path, the coordinator builds its own requests.
    #[error("must not have a query or fragment")]
    QueryOrFragment,
    /// 0.0.0.0 and :: are listening addresses, not addresses a worker can be reached at.
    #[error("host must be an address the worker can be reached at, not 0.0.0.0 or ::")]
    UnspecifiedHost,
    /// Worker ports are part of the worker's identity, so they are never left implicit.
    #[error("must give an explicit port, like http://localhost:5001")]
    MissingPort,
    /// Port 0 means "any port" to a listener, which the coordinator could not route to.
    #[error("port must not be 0")]
    PortZero,
}

impl Serialize for WorkerUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.normalized)
    }
}

impl<'de> Deserialize<'de> for WorkerUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = WorkerUrl;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a worker URL string, like http://localhost:5001")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<WorkerUrl, E> {
                text.parse().map_err(|err| E::custom(format!("{text:?}: {err}")))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> WorkerUrl {
        text.parse().unwrap_or_else(|err| panic!("{text}: {err}"))
    }

    #[test]
    fn worker_url_accessors() {
        let w = url("http://localhost:5001/");
        assert_eq!((w.host(), w.port(), w.as_str()), ("localhost", 5001, "http://localhost:5001"));
        assert_eq!(w.to_string(), "http://localhost:5001");
        assert_eq!(w.bind_addr(), Some("127.0.0.1:5001".parse().unwrap()));

        let w = url("http://[::1]:5002");
        assert_eq!((w.host(), w.port(), w.as_str()), ("[::1]", 5002, "http://[::1]:5002"));
        assert_eq!(w.bind_addr(), Some("[::1]:5002".parse().unwrap()));

        let w = url("http://Worker-B.Example:5003");
        assert_eq!((w.host(), w.as_str()), ("worker-b.example", "http://worker-b.example:5003"));
        assert_eq!(w.bind_addr(), None);

        let w = url("http://10.1.2.3:80");
        assert_eq!((w.port(), w.as_str()), (80, "http://10.1.2.3:80"));
        assert_eq!(w.bind_addr(), Some("10.1.2.3:80".parse().unwrap()));
        assert_eq!(url("http://[::1]:80").port(), 80);
        assert_eq!("http://[::1]".parse::<WorkerUrl>(), Err(WorkerUrlError::MissingPort));
    }

    #[test]
    fn locality() {
        for local in ["http://localhost:5001", "http://127.0.0.1:5001", "http://[::1]:5001"] {
            assert!(url(local).is_local(), "{local}");
        }
        let remotes = [
            "http://127.0.0.2:5001",
            "http://10.1.2.3:5001",
            "http://worker-b.example:5001",
            "http://192.168.0.7:5001",
        ];
        for remote in remotes {
            assert!(!url(remote).is_local(), "{remote}");
        }
    }

    #[test]
    fn worker_urls_order_and_compare_by_normalized_text() {
        assert_eq!(url("http://LocalHost:5001/"), url("http://localhost:5001"));
        let mut urls = [url("http://localhost:5002"), url("http://10.0.0.1:5001"), url("http://localhost:5001")];
        urls.sort();
        let sorted: Vec<&str> = urls.iter().map(WorkerUrl::as_str).collect();
        assert_eq!(sorted, ["http://10.0.0.1:5001", "http://localhost:5001", "http://localhost:5002"]);
    }
}
