//! Who the other workers of the cluster are, and how to reach them: those the config lists,
//! wherever they run, and those running on this database now, which the config may not list
//! (a worker being removed still drains, one started by hand still takes ingest).

use std::net::{IpAddr, SocketAddr};

use countapp_shared::config::Config;

/// The id a worker's log is kept under: its address, so that two workers on one port but on
/// different local hosts keep apart.
pub(crate) fn worker_id(addr: SocketAddr) -> String {
    format!("{}-{}", addr.ip(), addr.port()).replace(':', "_")
}

/// The address of the worker whose log is kept under `id`, as [`worker_id`] made it; `None`
/// for a log directory made otherwise (by hand, or by an embedding of the store).
fn addr_of(id: &str) -> Option<SocketAddr> {
    let (ip, port) = id.rsplit_once('-')?;
    let ip: IpAddr = ip.replace('_', ":").parse().ok()?;
    Some(SocketAddr::new(ip, port.parse().ok()?))
}

/// A worker to reach, not this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peer {
    /// `http://HOST:PORT`, to append a path to.
    pub(crate) url: String,
    /// Its log's id, if it runs on this database: a refused connection then means it is
    /// starting or stopping, not gone, while it holds its log's lock.
    pub(crate) local_id: Option<String>,
}

/// The other workers: those `config` lists, and those of `live` (ids of the workers holding
/// their log's lock on this database), except the one listening on `me`.
pub(crate) fn peers(config: &Config, live: &[String], me: SocketAddr) -> Vec<Peer> {
    let mut peers: Vec<Peer> = Vec::new();
    for id in live {
        match addr_of(id) {
            Some(addr) if addr != me => {
                peers.push(Peer { url: format!("http://{addr}"), local_id: Some(id.clone()) });
            }
            Some(_) => {}
            None => tracing::warn!(worker = id, "a running worker whose log id names no address: a barrier skips it"),
        }
    }
    for url in &config.workers {
        // `localhost` and 127.0.0.1 are one worker, and so is a listed one also running here.
        let by_addr = url.bind_addr().map(|addr| format!("http://{addr}"));
        if url.bind_addr() == Some(me)
            || peers.iter().any(|p| p.url == url.as_str() || Some(&p.url) == by_addr.as_ref())
        {
            continue;
        }
        peers.push(Peer { url: url.as_str().to_owned(), local_id: None });
    }
    peers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_id_leads_back_to_its_worker() {
        for addr in ["127.0.0.1:5001", "[::1]:5002", "10.1.2.3:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(addr_of(&worker_id(addr)), Some(addr));
        }
        assert_eq!(addr_of("by-hand"), None);
        assert_eq!(addr_of("nodash"), None);
    }

    #[test]
    fn peers_are_the_listed_and_the_running_workers_but_this_one() {
        let config = Config::from_yaml_str(
            "workers: [http://127.0.0.1:5001, http://127.0.0.1:5002, http://10.0.0.2:5001, http://localhost:5009]",
            std::path::Path::new("/"),
        )
        .unwrap();
        let me: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        let live = ["127.0.0.1-5001".to_owned(), "127.0.0.1-5009".to_owned()];
        let urls: Vec<(String, bool)> =
            peers(&config, &live, me).into_iter().map(|p| (p.url, p.local_id.is_some())).collect();
        assert_eq!(
            urls,
            [
                ("http://127.0.0.1:5009".to_owned(), true),
                ("http://127.0.0.1:5002".to_owned(), false),
                ("http://10.0.0.2:5001".to_owned(), false),
            ]
        );
    }
}
