//! The tenants' id sets in Redis: one set per tenant, so that workers on any machine share them.
//! A merge is one pipeline of `SADD`s per tenant (each reply says how many of its ids were new),
//! a count `SCARD`.
//!
//! The write-ahead log stays local: an acknowledgement never waits for Redis. Workers on other
//! machines cannot read this one's log, so each worker merges its own closed log files, and
//! those of dead workers on its machine (taking their log's lock, so that one worker does it),
//! and deletes a file once Redis has taken its ids.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use hashbrown::HashMap;
use parking_lot::Mutex;

use super::log::Damage;
use super::log::record::{Entry, Records};
use super::log::{LogDir, WorkerLog};
use super::{FlushReport, StoreError};

/// Ids per `SADD`: large enough to amortize the round trip, small enough not to stall Redis.
const SADD_CHUNK: usize = 10_000;
/// How long connecting, and every command, may take before Redis counts as unreachable.
const TIMEOUT: Duration = Duration::from_secs(2);

/// How to reach Redis.
enum Target {
    Server(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A connection to the server, or to the cluster (which routes each command to its node).
enum Connection {
    Server(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

/// The tenants' sets in one Redis server or one Redis Cluster.
pub(crate) struct RedisTenants {
    target: Target,
    /// Idle connections. A caller takes one (or opens one), and gives it back only if it still
    /// works: a broken connection is dropped, and the next call reconnects.
    idle: Mutex<Vec<Connection>>,
}

impl RedisTenants {
    /// The sets at `url`, a server or (with `cluster`) any node of a cluster. Nothing is
    /// connected yet: Redis may be down when a worker starts, and its log takes the ingest.
    pub(crate) fn new(url: &str, cluster: bool) -> Result<RedisTenants, StoreError> {
        let bad = |e: redis::RedisError| StoreError::Backend(format!("redis_url {url}: {e}"));
        let target = if cluster {
            let client = redis::cluster::ClusterClient::builder([url])
                .connection_timeout(TIMEOUT)
                .response_timeout(TIMEOUT)
                .build()
                .map_err(bad)?;
            Target::Cluster(client)
        } else {
            Target::Server(redis::Client::open(url).map_err(bad)?)
        };
        Ok(RedisTenants { target, idle: Mutex::new(Vec::new()) })
    }

    fn connect(&self) -> redis::RedisResult<Connection> {
        Ok(match &self.target {
            Target::Server(client) => {
                let connection = client.get_connection_with_timeout(TIMEOUT)?;
                connection.set_read_timeout(Some(TIMEOUT))?;
                connection.set_write_timeout(Some(TIMEOUT))?;
                Connection::Server(connection)
            }
            Target::Cluster(client) => Connection::Cluster(Box::new(client.get_connection()?)),
        })
    }

    /// Runs `op` on a working connection.
    fn with<T>(&self, op: impl FnOnce(&mut Connection) -> redis::RedisResult<T>) -> Result<T, StoreError> {
        let taken = self.idle.lock().pop();
        let mut connection = match taken {
            Some(connection) => connection,
            None => self.connect().map_err(unavailable)?,
        };
        let result = op(&mut connection).map_err(unavailable)?;
        self.idle.lock().push(connection);
        Ok(result)
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Backend(format!("redis: {e}"))
}

/// The key of a tenant's set. The name is kept readable, but `{` and `}` (which would make
/// part of it a Redis Cluster hash tag, piling tenants onto one slot) and `%` are
/// percent-encoded, so distinct tenants keep distinct keys.
pub(crate) fn tenant_key(tenant: &str) -> String {
    let mut key = String::with_capacity(tenant.len() + 16);
    key.push_str("countapp:tenant:");
    for c in tenant.chars() {
        match c {
            '%' => key.push_str("%25"),
            '{' => key.push_str("%7B"),
            '}' => key.push_str("%7D"),
            c => key.push(c),
        }
    }
    key
}

impl RedisTenants {
    /// Merges this worker's closed log files, and those of dead workers under `wal_root`, into
    /// Redis, deleting each file once Redis has taken its ids.
    pub(crate) fn round(
        &self,
        wal_root: &Path,
        worker: &str,
        logs: &[WorkerLog],
        report: &mut FlushReport,
    ) -> Result<(), StoreError> {
        for log in logs.iter().filter(|log| !log.inputs.is_empty()) {
            let dir = wal_root.join(&log.worker);
            // A dead worker's log is taken by one live worker at a time.
            let _held = if log.worker == worker {
                None
            } else if log.live {
                continue;
            } else {
                match LogDir::lock(&dir, Duration::ZERO).map_err(|e| StoreError::io("locking a log", e))? {
                    Some(held) => Some(held),
                    None => continue,
                }
            };
            for file in &log.inputs {
                let data = match fs::read(&file.path) {
                    Ok(data) => data,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) => return Err(StoreError::io(format!("reading {}", file.path.display()), e)),
                };
                let mut by_tenant: HashMap<&str, Vec<&[u8]>> = HashMap::new();
                let mut damage = Damage::default();
                let mut records = Records::new(&data).peekable();
                while let Some(entry) = records.next() {
                    match entry {
                        Entry::Record(payload) => {
                            for run in payload.runs() {
                                let run = run.map_err(|e| StoreError::corrupt(&file.path, e))?;
                                report.items += run.count_ids().map_err(|e| StoreError::corrupt(&file.path, e))?;
                                by_tenant.entry(run.tenant).or_default().extend(run.ids());
                            }
                        }
                        Entry::Damaged { offset, len } => {
                            damage.note(&file.path, offset, len, records.peek().is_none());
                        }
                    }
                }
                damage.keep_aside(wal_root.parent().unwrap_or(wal_root), &file.path);
                report.add_damage(damage);
                for (tenant, ids) in &by_tenant {
                    report.new_ids += self.merge(tenant, ids)?;
                }
                report.tenants += by_tenant.len() as u64;
                report.log_files += 1;
                fs::remove_file(&file.path)
                    .map_err(|e| StoreError::io(format!("removing {}", file.path.display()), e))?;
                report.deleted_files += 1;
            }
        }
        Ok(())
    }

    /// Adds `ids` to `tenant`'s set; returns how many of them were new to it.
    fn merge(&self, tenant: &str, ids: &[&[u8]]) -> Result<u64, StoreError> {
        let key = tenant_key(tenant);
        // One round trip for the tenant's whole flush; each reply counts the ids that were new.
        self.with(|connection| {
            let replies: Vec<u64> = match connection {
                Connection::Server(connection) => {
                    let mut pipeline = redis::pipe();
                    for chunk in ids.chunks(SADD_CHUNK) {
                        pipeline.cmd("SADD").arg(&key).arg(chunk);
                    }
                    pipeline.query(connection)?
                }
                Connection::Cluster(connection) => {
                    let mut pipeline = redis::cluster::cluster_pipe();
                    for chunk in ids.chunks(SADD_CHUNK) {
                        pipeline.cmd("SADD").arg(&key).arg(chunk);
                    }
                    pipeline.query(connection)?
                }
            };
            Ok(replies.iter().sum())
        })
    }

    /// The tenant's distinct count: `SCARD`, a network round trip.
    pub(crate) fn count(&self, tenant: &str) -> Result<u64, StoreError> {
        let key = tenant_key(tenant);
        let scard = redis::cmd("SCARD").arg(&key).to_owned();
        self.with(|connection| match connection {
            Connection::Server(connection) => scard.query(connection),
            Connection::Cluster(connection) => scard.query(connection),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_and_free_of_hash_tags() {
        let tenants = ["a", "A", "a b", "{a}", "%7Ba%7D", "%", "%25", "../x"];
        let keys: std::collections::HashSet<String> = tenants.iter().map(|t| tenant_key(t)).collect();
        assert_eq!(keys.len(), tenants.len());
        assert!(keys.iter().all(|k| !k.contains('{') && !k.contains('}')));
    }
}
