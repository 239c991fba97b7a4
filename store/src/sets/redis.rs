//! The tenants' id sets in Redis: one set per tenant, so that workers on any machine share them.
//! A merge sends the ids of a group of log files, each id once, as pipelines of `SADD`s (each
//! reply says how many of its ids were new); a count is `SCARD`, or a count read less than a
//! moment ago (see `recent`).
//!
//! The write-ahead log stays local: an acknowledgement never waits for Redis. Workers on other
//! machines cannot read this one's log, so each worker merges its own closed log files, and
//! those of dead workers on its machine (taking their log's lock, so that one worker does it).
//!
//! A log file is handed over to Redis, never just dropped once `SADD` returns: Redis may still
//! lose what it acknowledged (AOF `everysec` and a power cut, a replica promoted in a failover).
//! After the `SADD`s of a log's files, on each connection that sent them (a merge may spread its
//! pipelines over several, `redis_merge_connections`, and Redis confirms a connection's own
//! writes only):
//!
//! - where Redis has `WAITAOF` (7.2+) and its AOF is on, `WAITAOF 1 <redis_wait_replicas>` must
//!   report the writes fsynced locally (and on that many replicas): the files are then deleted;
//! - otherwise, with `redis_wait_replicas: N`, `WAIT N` must report N replicas; and since Redis
//!   cannot vouch for its own disk, the files are renamed `.done` (consumed: no longer pending)
//!   and deleted once `redis_grace` has passed, Redis's `everysec` window and more.
//!
//! Whatever is not confirmed stays a closed log file and is merged again at the next round;
//! a consumed file left by a crash or a stop is merged again by the next run (see `log`). What
//! Redis holds is told by its replication history ([`Lineage`], per primary: the replication id
//! and offset), read once a file's ids are in, and again before a consumed file is deleted (at
//! least once a second while any waits): if the history no longer runs through where it was
//! (Redis restarted without it, a failover to a replica that lacked it, a primary that lost
//! writes and came back under the same process), the file may hold ids that Redis lost, and it
//! is merged again rather than deleted. The process id (`run_id`) would not tell the last case.
//! `SADD` is idempotent, so replaying costs nothing but the round trip.
//!
//! Merges run on the merger's thread (and, spread over several connections, on a thread per
//! connection) over synchronous connections of their own; counts run on the request path over
//! one multiplexed async connection, with a deadline.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use countapp_shared::config::RedisHandoff;
use countapp_shared::wire::REDIS_COUNT_TIMEOUT;
use hashbrown::{HashMap, HashSet};
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ErrorKind, ServerErrorKind, Value};

use super::recent::Recent;
use super::{Answer, Count, Scope, TenantPage, TenantSets};
use crate::log::{self, Contents, LogDir, LogFile, WorkerLog};
use crate::{MergeReport, QuarantinedTenant, RedisTls, Settings, StoreError, StoreOptions, disk};

/// Ids per `SADD`: large enough to amortize the round trip, small enough not to stall Redis.
const SADD_CHUNK: usize = 10_000;
/// Bytes of ids per pipeline of `SADD`s, about: one round trip for many small tenants, and a
/// bounded buffer for a large log file.
const PIPELINE_BYTES: usize = 4 << 20;
/// Bytes of log files merged together at most (one file at least), their ids deduplicated
/// across them: the memory a merge holds, about twice this.
const GROUP_BYTES: u64 = 64 << 20;
/// How long connecting, and every command of a merge, may take before Redis counts as
/// unreachable.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long `WAIT` and `WAITAOF` wait for Redis to confirm: past one `everysec` fsync, and
/// within [`TIMEOUT`].
const CONFIRM_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often a round reads what Redis holds while consumed log files wait out their grace:
/// a Redis that lost them is noticed within about this long.
const RECHECK: Duration = Duration::from_secs(1);
/// The weight of the latest merge in the recent merge rate: a few rounds make the average, so
/// that one slow round (Redis saving, say) does not push ingest back by itself.
const RATE_WEIGHT: f64 = 0.3;
/// How long a count may take, connecting included, before it answers that Redis is
/// unreachable: well within the coordinator's hop to a worker (the shared constant is derived from
/// it), so that the worker answers a 503 with the reason before the coordinator takes it for hung
/// (and stops routing ingest to it, which goes on into the logs while Redis is away). A Redis
/// round trip takes well under a millisecond on a LAN.
const COUNT_TIMEOUT: Duration = REDIS_COUNT_TIMEOUT;

/// How to reach Redis: made once per store, so the client's size does not matter.
enum Target {
    Server(Box<redis::Client>),
    Cluster(Box<Seeds>),
}

/// Where a new connection to a Redis Cluster starts: the nodes the cluster last listed, then the
/// configured node. `redis_url` names one node, and a client connects through the first of its
/// seeds that answers; with that node alone, a worker could not reconnect while it was down,
/// though its replica had been promoted and the cluster served every slot again (a cluster
/// connection does not drop a dead node from its slot map by itself, so a merge connection
/// that failed is replaced by a new one).
struct Seeds {
    /// The configured node: its address, and the credentials and TLS of every node.
    configured: redis::ConnectionInfo,
    certificates: Option<redis::TlsCertificates>,
    /// The nodes last learned, sorted, and the client that starts from them.
    client: Mutex<(Vec<(String, u16)>, redis::cluster::ClusterClient)>,
}

impl Seeds {
    fn new(url: &str, certificates: Option<redis::TlsCertificates>) -> redis::RedisResult<Seeds> {
        let configured = redis::IntoConnectionInfo::into_connection_info(url)?;
        let client = Seeds::client_over(&configured, &certificates, &[])?;
        Ok(Seeds { configured, certificates, client: Mutex::new((Vec::new(), client)) })
    }

    /// A client whose seeds are `nodes`, then `configured`, each with `configured`'s
    /// credentials and TLS.
    fn client_over(
        configured: &redis::ConnectionInfo,
        certificates: &Option<redis::TlsCertificates>,
        nodes: &[(String, u16)],
    ) -> redis::RedisResult<redis::cluster::ClusterClient> {
        let mut seeds: Vec<redis::ConnectionInfo> = nodes
            .iter()
            .filter_map(|(host, port)| {
                let mut addr = configured.addr().clone();
                match &mut addr {
                    redis::ConnectionAddr::Tcp(h, p) | redis::ConnectionAddr::TcpTls { host: h, port: p, .. } => {
                        (*h, *p) = (host.clone(), *port);
                    }
                    _ => return None,
                }
                Some(configured.clone().set_addr(addr))
            })
            .collect();
        seeds.push(configured.clone());
        let mut builder =
            redis::cluster::ClusterClient::builder(seeds).connection_timeout(TIMEOUT).response_timeout(TIMEOUT);
        if let Some(certificates) = certificates {
            builder = builder.certs(certificates.clone());
        }
        builder.build()
    }

    /// The client to connect with.
    fn client(&self) -> redis::cluster::ClusterClient {
        self.client.lock().1.clone()
    }

    /// Learns the cluster's nodes over `connection` (`CLUSTER NODES`), for the connections to
    /// come. A failure only leaves the seeds as they were.
    fn learn(&self, connection: &mut redis::cluster::ClusterConnection) {
        let nodes = match redis::cmd("CLUSTER").arg("NODES").query::<String>(connection) {
            Ok(listing) => cluster_nodes(&listing),
            Err(e) => {
                tracing::debug!("redis: CLUSTER NODES: {e}; the cluster's seeds stay as they were");
                return;
            }
        };
        let mut client = self.client.lock();
        if nodes.is_empty() || client.0 == nodes {
            return;
        }
        match Seeds::client_over(&self.configured, &self.certificates, &nodes) {
            Ok(new) => *client = (nodes, new),
            Err(e) => tracing::warn!("redis: a client over the cluster's nodes {nodes:?}: {e}"),
        }
    }
}

/// The addresses of the nodes a `CLUSTER NODES` listing names, sorted, but for those known to
/// have failed or whose address is not known yet.
fn cluster_nodes(listing: &str) -> Vec<(String, u16)> {
    let mut nodes: Vec<(String, u16)> = listing
        .lines()
        .filter_map(|line| {
            // <id> <ip:port@cport[,hostname]> <flags> ...
            let mut fields = line.split_whitespace().skip(1);
            let (address, flags) = (fields.next()?, fields.next()?);
            if flags.split(',').any(|flag| matches!(flag, "fail" | "noaddr" | "handshake")) {
                return None;
            }
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            (!host.is_empty() && port != 0).then(|| (host.to_owned(), port))
        })
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

/// A connection to the server, or to the cluster (which routes each command to its node).
enum Connection {
    Server(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

/// A merge connection, with what it learned of its server.
struct Pooled {
    connection: Connection,
    /// Whether the server confirms local fsyncs with `WAITAOF`, once asked.
    waitaof: Option<bool>,
}

impl Pooled {
    fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match &mut self.connection {
            Connection::Server(connection) => cmd.query(connection),
            Connection::Cluster(connection) => cmd.query(connection.as_mut()),
        }
    }

    /// The keys of every tenant set: `SCAN` over the server, or over each node of a cluster.
    fn tenant_keys(&mut self) -> redis::RedisResult<Vec<String>> {
        let scan = |cursor: u64| {
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(TENANT_KEYS).arg("COUNT").arg(1000).to_owned()
        };
        let mut keys = Vec::new();
        match &mut self.connection {
            Connection::Server(connection) => {
                let mut cursor = 0;
                loop {
                    let (next, batch): (u64, Vec<String>) = scan(cursor).query(connection)?;
                    keys.extend(batch);
                    if next == 0 {
                        return Ok(keys);
                    }
                    cursor = next;
                }
            }
            Connection::Cluster(connection) => {
                let listing: String = redis::cmd("CLUSTER").arg("NODES").query(connection.as_mut())?;
                for (host, port) in cluster_nodes(&listing) {
                    let node = SingleNodeRoutingInfo::ByAddress { host, port };
                    let mut cursor = 0;
                    loop {
                        let reply = connection.route_command(&scan(cursor), RoutingInfo::SingleNode(node.clone()))?;
                        let (next, batch): (u64, Vec<String>) = redis::from_redis_value(reply)?;
                        keys.extend(batch);
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
                keys.sort_unstable();
                keys.dedup();
                Ok(keys)
            }
        }
    }
}

/// The async connection of counts: multiplexed, so that every request shares it.
#[derive(Clone)]
enum Counter {
    Server(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// What Redis confirmed of a log's files once their ids were in.
enum Durable {
    /// On disk (and on the replicas asked for): the files may go.
    Now,
    /// Redis cannot confirm its own disk: the files wait out the grace period.
    AfterGrace,
}

/// A deletion a barrier asks of this worker, and the log files it must outlast.
struct DeleteAsked {
    /// The tenants to delete.
    tenants: Vec<String>,
    /// Per log directory this worker merges, the highest number of a file that was there when
    /// the deletion was first asked: it may hold ids acknowledged before the deletion, which
    /// must not be merged again once the sets are gone. Noted by the round that follows.
    cut: Option<HashMap<PathBuf, u64>>,
}

/// The merge rate, in bytes of log a second, taken for a worker's until its first merge measured
/// one: less than a worker of four merges on this project's 2-core machine (about 2.8 MB/s each,
/// together), so that its first file is closed early rather than late.
const FIRST_MERGE_RATE: f64 = 2.0 * 1024.0 * 1024.0;

/// A consumed log file, waiting out the grace period.
struct Consumed {
    /// Its directory, and its sequence number there.
    dir: PathBuf,
    seq: u64,
    /// When Redis took its ids.
    at: Instant,
    /// What Redis held once it took them.
    redis: Identity,
}

/// Where one primary's data stands, from `INFO replication`: the history it is in (its
/// replication id) and how far along (its offset), and the history it took over when it was
/// promoted, up to where it took it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lineage {
    replid: String,
    offset: u64,
    replid2: String,
    offset2: i64,
}

/// What the Redis a connection reaches holds: the lineage of the server, or of each primary of
/// a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Identity(Vec<Lineage>);

impl Identity {
    /// Whether everything `then` held is still held: each primary then has a primary now whose
    /// history runs through it (the same history at least as far along, or a history that took
    /// it over past that point).
    fn holds(&self, then: &Identity) -> bool {
        then.0.iter().all(|old| {
            self.0.iter().any(|now| {
                (now.replid == old.replid && now.offset >= old.offset)
                    || (now.replid2 == old.replid && now.offset2 >= i64::try_from(old.offset).unwrap_or(i64::MAX))
            })
        })
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lineages: Vec<String> = self.0.iter().map(|l| format!("{}@{}", l.replid, l.offset)).collect();
        f.write_str(&lineages.join(","))
    }
}

/// The tenants' sets in one Redis server or one Redis Cluster.
pub(crate) struct RedisTenants {
    /// The database's root, where damaged log files are kept aside.
    root: PathBuf,
    /// This worker's id: the log it merges, besides those of dead workers.
    worker: String,
    target: Target,
    /// Idle merge connections. A caller takes one (or opens one), and gives it back only if it
    /// still works: a broken connection is dropped, and the next call reconnects.
    idle: Mutex<Vec<Pooled>>,
    /// The counts' connection, made on the first count (it needs the async runtime); a cluster
    /// connection that could not be made is tried again on the next count.
    counter: tokio::sync::OnceCell<Counter>,
    /// Counts read lately, which answer the same tenants' counts for a moment.
    recent: Recent,
    /// The config's hand-off settings, as of the last edit.
    handoff: Mutex<RedisHandoff>,
    /// Consumed log files, each with when Redis took its ids and what it held then: deleted
    /// once the grace is over, merged again if Redis no longer holds that before.
    consumed: Mutex<Vec<Consumed>>,
    /// When a round last read what Redis holds.
    checked: Mutex<Option<Instant>>,
    /// Whether the log already says why consumed files wait out the grace period.
    told_grace: AtomicBool,
    /// What this worker is to merge and has not merged yet: when the oldest such log file was
    /// last written, and the bytes of them all.
    waiting: Mutex<(Option<SystemTime>, u64)>,
    /// Whether the last round failed (Redis unreachable, or unable to confirm its writes): the
    /// backlog then grows for want of Redis, not because ingest outruns it, and the log takes
    /// the ingest meanwhile, up to `max_pending_items`.
    failing: AtomicBool,
    /// Whether the sets of an earlier release are named for listing (see `name_earlier_sets`).
    named_earlier: AtomicBool,
    /// The tenants a barrier last asked to delete, and since when.
    delete_asked: Mutex<Option<DeleteAsked>>,
    /// How fast this worker's merges go, in log bytes per second of merging: an average over
    /// the recent rounds, to tell how long what waits will take.
    merge_rate: Mutex<Option<f64>>,
    /// How many connections a merge sends its pipelines over, as of the last config edit.
    merge_connections: AtomicUsize,
}

impl RedisTenants {
    /// The sets at `url`, a server or (with `cluster`) any node of a cluster. Nothing is
    /// connected yet: Redis may be down when a worker starts, and its log takes the ingest.
    pub(crate) fn new(
        root: &Path,
        worker: &str,
        url: &str,
        options: &StoreOptions,
        settings: &Settings,
    ) -> Result<RedisTenants, StoreError> {
        let bad = |e: redis::RedisError| StoreError::Backend(format!("redis_url {url}: {e}"));
        let certificates = tls_certificates(url, &options.redis_tls)?;
        let target = if options.redis_cluster {
            Target::Cluster(Box::new(Seeds::new(url, certificates).map_err(bad)?))
        } else if let Some(certificates) = certificates {
            Target::Server(Box::new(redis::Client::build_with_tls(url, certificates).map_err(bad)?))
        } else {
            Target::Server(Box::new(redis::Client::open(url).map_err(bad)?))
        };
        Ok(RedisTenants {
            root: root.to_path_buf(),
            worker: worker.to_owned(),
            target,
            idle: Mutex::new(Vec::new()),
            counter: tokio::sync::OnceCell::new(),
            recent: Recent::default(),
            handoff: Mutex::new(settings.redis_handoff),
            consumed: Mutex::new(Vec::new()),
            checked: Mutex::new(None),
            told_grace: AtomicBool::new(false),
            waiting: Mutex::new((None, 0)),
            failing: AtomicBool::new(false),
            named_earlier: AtomicBool::new(false),
            delete_asked: Mutex::new(None),
            merge_rate: Mutex::new(None),
            merge_connections: AtomicUsize::new(settings.redis_merge_connections),
        })
    }

    fn connect(&self) -> redis::RedisResult<Pooled> {
        let connection = match &self.target {
            Target::Server(client) => {
                let connection = client.get_connection_with_timeout(TIMEOUT)?;
                connection.set_read_timeout(Some(TIMEOUT))?;
                connection.set_write_timeout(Some(TIMEOUT))?;
                Connection::Server(connection)
            }
            Target::Cluster(seeds) => {
                let mut connection = seeds.client().get_connection()?;
                seeds.learn(&mut connection);
                Connection::Cluster(Box::new(connection))
            }
        };
        Ok(Pooled { connection, waitaof: None })
    }

    /// Runs `op` on a working merge connection.
    fn with<T>(&self, op: impl FnOnce(&mut Pooled) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.with_many(1, |connections| op(&mut connections[0]))
    }

    /// Runs `op` on `n` working merge connections (one at least); they go back to the idle
    /// ones only if `op` succeeds, and only as many as a merge now uses stay open.
    fn with_many<T>(&self, n: usize, op: impl FnOnce(&mut [Pooled]) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut connections: Vec<Pooled> = {
            let mut idle = self.idle.lock();
            let keep = idle.len().saturating_sub(n.max(1));
            idle.drain(keep..).collect()
        };
        while connections.len() < n.max(1) {
            connections.push(self.connect().map_err(unavailable)?);
        }
        let result = op(&mut connections)?;
        let mut idle = self.idle.lock();
        idle.extend(connections);
        idle.truncate(self.merge_connections.load(Ordering::Relaxed).max(1));
        Ok(result)
    }

    /// The counts' connection, made on first use.
    async fn counter(&self) -> redis::RedisResult<Counter> {
        let counter = self
            .counter
            .get_or_try_init(|| async {
                Ok::<_, redis::RedisError>(match &self.target {
                    Target::Server(client) => {
                        // One attempt per count: the manager reconnects on the next one, and
                        // a count must not wait out a retry schedule. Connecting may take
                        // longer than a count may (a TLS handshake on a busy machine): it runs
                        // on a task of its own, which a count that gives up does not cancel,
                        // or every count on such a machine would start it over, and fail.
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(TIMEOUT))
                            .set_response_timeout(Some(COUNT_TIMEOUT))
                            .set_number_of_retries(0);
                        let manager = ConnectionManager::new_lazy_with_config((**client).clone(), config)?;
                        let mut connecting = manager.clone();
                        tokio::spawn(async move {
                            let _: redis::RedisResult<()> = redis::cmd("PING").query_async(&mut connecting).await;
                        });
                        Counter::Server(manager)
                    }
                    Target::Cluster(seeds) => Counter::Cluster(seeds.client().get_async_connection().await?),
                })
            })
            .await?;
        Ok(counter.clone())
    }
}

impl RedisTenants {
    /// Runs `op` on the counts' connection, answered or failed within [`COUNT_TIMEOUT`],
    /// connecting included.
    async fn read<T, F>(&self, op: impl FnOnce(Counter) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let read = tokio::time::timeout(COUNT_TIMEOUT, async { op(self.counter().await?).await }).await;
        match read {
            Ok(read) => read.map_err(unavailable),
            Err(_) => Err(StoreError::Backend(format!("redis: no answer within {COUNT_TIMEOUT:?}"))),
        }
    }
}

impl Counter {
    /// The counts of `tenants`, in their order: one `SCARD` each, sent together on the
    /// multiplexed connection (which pipelines them, and routes each to its node in a cluster).
    async fn scards(&self, tenants: &[String]) -> redis::RedisResult<Vec<u64>> {
        let scards = tenants.iter().map(|tenant| {
            let (mut counter, scard) = (self.clone(), redis::cmd("SCARD").arg(tenant_key(tenant)).to_owned());
            async move { counter.query::<u64>(&scard).await }
        });
        futures_util::future::try_join_all(scards).await
    }

    /// Sends `cmd` on the multiplexed connection.
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Counter::Server(connection) => cmd.query_async(connection).await,
            Counter::Cluster(connection) => cmd.query_async(connection).await,
        }
    }
}

/// A bound of a `ZRANGEBYLEX`: `bound` (`(` exclusive, `[` inclusive), `name`, then `more`.
fn lex(bound: u8, name: &str, more: &[u8]) -> Vec<u8> {
    let mut arg = Vec::with_capacity(1 + name.len() + more.len());
    arg.push(bound);
    arg.extend_from_slice(name.as_bytes());
    arg.extend_from_slice(more);
    arg
}

/// The certificates of a TLS connection to `url`, read from the files `tls` names, if `url` is a
/// `rediss://` one; the system's roots where no CA file is given.
fn tls_certificates(url: &str, tls: &RedisTls) -> Result<Option<redis::TlsCertificates>, StoreError> {
    if !url.starts_with("rediss://") {
        return Ok(None);
    }
    let read = |path: &PathBuf| disk::read(path).map_err(StoreError::from);
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig { client_cert: read(cert)?, client_key: read(key)? }),
        (None, None) => None,
        _ => return Err(StoreError::Backend("a client certificate needs its key, and a key its certificate".into())),
    };
    let root_cert = tls.ca_file.as_ref().map(read).transpose()?;
    Ok(Some(redis::TlsCertificates { client_tls, root_cert }))
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Backend(format!("redis: {e}"))
}

/// The key of the sorted set that names every tenant with a set, each with score 0, so that
/// `ZRANGEBYLEX` lists them in byte order.
const NAMES_KEY: &str = "countapp:tenants";

/// The key whose presence says that every tenant set is named in [`NAMES_KEY`]: set once the
/// sets of an earlier release, which kept no list, are named.
const NAMES_COMPLETE_KEY: &str = "countapp:tenants:complete";

/// The pattern of every tenant set's key.
const TENANT_KEYS: &str = "countapp:tenant:*";

/// The tenant whose set has the key `key`, as [`tenant_key`] made it.
fn tenant_of_key(key: &str) -> Option<String> {
    let name = key.strip_prefix("countapp:tenant:")?;
    Some(name.replace("%7B", "{").replace("%7D", "}").replace("%25", "%"))
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
    /// Adds the ids of the log files `files`, in their order, to their tenants' sets over
    /// `connection`, each id once however often the files repeat it (`SADD` of a repeat still
    /// costs Redis a command's parsing and a lookup); returns the files merged, which stop at
    /// the first that is gone (its restarted worker renamed it, or another merged it).
    fn merge_files<'f>(
        &self,
        connections: &mut [Pooled],
        files: &[&'f LogFile],
        report: &mut MergeReport,
    ) -> Result<Vec<&'f LogFile>, StoreError> {
        let mut read = Vec::new();
        for &file in files {
            match Contents::read(&file.path)? {
                Some(data) => read.push((file, data)),
                None => break,
            }
        }
        let mut by_tenant: HashMap<&str, HashSet<&[u8]>> = HashMap::new();
        for (file, data) in &read {
            let damage = data.scan(&self.root, &file.path, |run| {
                report.items += run.count_ids();
                by_tenant.entry(run.tenant).or_default().extend(run.ids());
            });
            report.add_damage(damage);
        }
        report.new_ids += sadd(connections, &by_tenant).map_err(unavailable)?;
        report.tenants += by_tenant.len() as u64;
        report.log_files += read.len() as u64;
        // Its ids borrow from the files read.
        drop(by_tenant);
        Ok(read.into_iter().map(|(file, _)| file).collect())
    }

    /// Notes, for a deletion just asked, the highest file number of each log this worker
    /// merges (its own and dead workers'), among the final files in `logs` and those it
    /// consumed (see [`DeleteAsked::cut`]).
    fn note_delete_cut(&self, logs: &[WorkerLog]) {
        let mut asked = self.delete_asked.lock();
        let Some(asked) = asked.as_mut().filter(|asked| asked.cut.is_none()) else { return };
        let mut cut: HashMap<PathBuf, u64> = HashMap::new();
        for log in logs.iter().filter(|log| log.worker == self.worker || !log.live) {
            for file in &log.inputs {
                let highest = cut.entry(log.dir.clone()).or_default();
                *highest = (*highest).max(file.seq);
            }
        }
        for consumed in self.consumed.lock().iter() {
            let highest = cut.entry(consumed.dir.clone()).or_default();
            *highest = (*highest).max(consumed.seq);
        }
        asked.cut = Some(cut);
    }

    /// Names in [`NAMES_KEY`] the tenant sets of an earlier release, which kept no list, once:
    /// the first round of a run asks whether [`NAMES_COMPLETE_KEY`] says that was done, and if
    /// not, scans the keys. A failure is told, and the next round tries again.
    fn name_earlier_sets(&self) {
        if self.named_earlier.load(Ordering::Relaxed) {
            return;
        }
        let named = self.with(|connection| {
            if connection.query::<bool>(redis::cmd("EXISTS").arg(NAMES_COMPLETE_KEY)).map_err(unavailable)? {
                return Ok(None);
            }
            let tenants: Vec<String> =
                connection.tenant_keys().map_err(unavailable)?.iter().filter_map(|key| tenant_of_key(key)).collect();
            for chunk in tenants.chunks(SADD_CHUNK) {
                let mut zadd = redis::cmd("ZADD");
                zadd.arg(NAMES_KEY);
                for tenant in chunk {
                    zadd.arg(0).arg(tenant);
                }
                connection.query::<u64>(&zadd).map_err(unavailable)?;
            }
            connection.query::<()>(redis::cmd("SET").arg(NAMES_COMPLETE_KEY).arg(1)).map_err(unavailable)?;
            Ok(Some(tenants.len()))
        });
        match named {
            Ok(named) => {
                if let Some(tenants) = named {
                    tracing::info!(tenants, "the tenant sets of an earlier release are named for listing");
                }
                self.named_earlier.store(true, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "cannot name the tenant sets of an earlier release yet"),
        }
    }

    /// The round [`TenantSets::merge`] runs; see there.
    fn merge_logs(&self, logs: &[WorkerLog], report: &mut MergeReport) -> Result<(), StoreError> {
        self.name_earlier_sets();
        self.note_delete_cut(logs);
        let worker = self.worker.as_str();
        // What this worker is to merge: its own final files, and those of dead workers; the
        // files it consumed only wait out their grace. Until merged, they are its lag.
        let consumed_here = |log: &WorkerLog, file: &LogFile| {
            file.consumed && self.consumed.lock().iter().any(|c| c.dir == log.dir && c.seq == file.seq)
        };
        let mut waiting: Vec<(&WorkerLog, &LogFile)> = logs
            .iter()
            .filter(|log| log.worker == worker || !log.live)
            .flat_map(|log| log.inputs.iter().map(move |file| (log, file)))
            .filter(|(log, file)| !consumed_here(log, file))
            .collect();
        self.note_waiting(&waiting);
        if self.consumed.lock().is_empty() && waiting.is_empty() {
            return Ok(());
        }
        let handoff = *self.handoff.lock();
        if !self.consumed.lock().is_empty() {
            let redis = self.with(|connection| identity(connection).map_err(unavailable))?;
            *self.checked.lock() = Some(Instant::now());
            self.settle_consumed(&redis, handoff.grace, report)?;
        }
        for log in logs.iter().filter(|log| !log.inputs.is_empty() && (log.worker == worker || !log.live)) {
            let dir = log.dir.clone();
            // A dead worker's log is taken by one live worker at a time.
            let _held = if log.worker == worker {
                None
            } else {
                match LogDir::lock(&dir, Duration::ZERO)? {
                    Some(held) => Some(held),
                    None => continue,
                }
            };
            let started = Instant::now();
            let spread = self.merge_connections.load(Ordering::Relaxed);
            let (merged, durable, redis) = self.with_many(spread, |connections| {
                // A dead worker's consumed files are its inputs; once this worker consumed
                // them too, they only wait out its grace.
                let inputs: Vec<&LogFile> = log.inputs.iter().filter(|file| !consumed_here(log, file)).collect();
                let mut merged = Vec::new();
                for files in in_groups(&inputs) {
                    let taken = self.merge_files(connections, files, report)?;
                    let gone = taken.len() < files.len();
                    merged.extend(taken);
                    if gone {
                        break;
                    }
                }
                if merged.is_empty() {
                    return Ok((merged, Durable::Now, Identity::default()));
                }
                // Redis confirms a connection's own writes: each one that sent ids asks.
                let mut durable = Durable::Now;
                for connection in connections.iter_mut() {
                    if let Durable::AfterGrace = self.confirm(connection, handoff)? {
                        durable = Durable::AfterGrace;
                    }
                }
                // Read once the writes are in: a history that later runs at least this far
                // holds them.
                let redis = identity(&mut connections[0]).map_err(unavailable)?;
                Ok((merged, durable, redis))
            })?;
            self.note_rate(merged.iter().map(|file| file.len).sum(), started.elapsed());
            for file in merged {
                self.hand_off(&dir, file, &durable, &redis, report)?;
                waiting.retain(|(_, waits)| !std::ptr::eq(*waits, file));
            }
            self.note_waiting(&waiting);
        }
        Ok(())
    }

    /// Notes what waits to be merged by this worker (see [`TenantSets::merge_lag`]).
    fn note_waiting(&self, waiting: &[(&WorkerLog, &LogFile)]) {
        let oldest = waiting.iter().map(|(_, file)| file.modified).min();
        *self.waiting.lock() = (oldest, waiting.iter().map(|(_, file)| file.len).sum());
    }

    /// Folds a merge of `bytes` of log that took `took` into the recent merge rate.
    fn note_rate(&self, bytes: u64, took: Duration) {
        if bytes == 0 || took.is_zero() {
            return;
        }
        let rate = bytes as f64 / took.as_secs_f64();
        let mut recent = self.merge_rate.lock();
        *recent = Some(recent.map_or(rate, |recent| RATE_WEIGHT * rate + (1.0 - RATE_WEIGHT) * recent));
    }

    /// Asks Redis to confirm the writes made so far on `connection`: `WAITAOF` where the
    /// server has it, else `WAIT` for the replicas asked for and the grace period.
    fn confirm(&self, connection: &mut Pooled, handoff: RedisHandoff) -> Result<Durable, StoreError> {
        let replicas = handoff.wait_replicas;
        let millis = CONFIRM_TIMEOUT.as_millis() as u64;
        if connection.waitaof.is_none() {
            // An unknown command's entry is nil (Redis before 7.2).
            let info: Vec<Value> =
                connection.query(redis::cmd("COMMAND").arg("INFO").arg("WAITAOF")).map_err(unavailable)?;
            let has = info.first().is_some_and(|entry| *entry != Value::Nil);
            connection.waitaof = Some(has);
            if !has {
                self.tell_grace("Redis has no WAITAOF (it came with 7.2)", handoff.grace);
            }
        }
        if connection.waitaof == Some(true) {
            match connection.query::<Value>(redis::cmd("WAITAOF").arg(1).arg(replicas).arg(millis)) {
                Ok(reply) => {
                    let (local, remote) = lowest_pair(&reply).ok_or_else(|| {
                        StoreError::Backend(format!("redis: WAITAOF answered {reply:?}, not two counts"))
                    })?;
                    if local >= 1 && remote >= i64::from(replicas) {
                        return Ok(Durable::Now);
                    }
                    return Err(StoreError::Backend(format!(
                        "redis: WAITAOF 1 {replicas} {millis}: fsynced on {local} primary and {remote} replicas; \
                         the log files are merged again at the next round"
                    )));
                }
                // It refuses when its AOF is off: nothing local can be confirmed then.
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError) => {
                    connection.waitaof = Some(false);
                    self.tell_grace(&format!("WAITAOF is refused ({e})"), handoff.grace);
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        if replicas > 0 {
            let acked: i64 = connection.query(redis::cmd("WAIT").arg(replicas).arg(millis)).map_err(unavailable)?;
            if acked < i64::from(replicas) {
                return Err(StoreError::Backend(format!(
                    "redis: WAIT {replicas} {millis}: {acked} replicas have the ids (redis_wait_replicas \
                     is {replicas}); the log files are merged again at the next round"
                )));
            }
        }
        Ok(Durable::AfterGrace)
    }

    /// Says once why consumed log files wait out the grace period rather than go at once.
    fn tell_grace(&self, why: &str, grace: Duration) {
        if !self.told_grace.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                grace_s = grace.as_secs_f64(),
                "{why}: Redis cannot confirm that it wrote the ids to disk, so each log file whose ids it \
                 took is kept for redis_grace, and replayed if the worker restarts within it"
            );
        }
    }

    /// Deletes the log file `file` of the log directory `dir` if Redis confirmed its ids, or
    /// marks it consumed for the grace period.
    fn hand_off(
        &self,
        dir: &Path,
        file: &LogFile,
        durable: &Durable,
        redis: &Identity,
        report: &mut MergeReport,
    ) -> Result<(), StoreError> {
        match durable {
            Durable::Now => {
                if log::delete_taken(file)? {
                    report.deleted_files += 1;
                }
            }
            Durable::AfterGrace => {
                if !log::consume(dir, file)? {
                    return Ok(());
                }
                let (dir, seq, at, redis) = (dir.to_path_buf(), file.seq, Instant::now(), redis.clone());
                self.consumed.lock().push(Consumed { dir, seq, at, redis });
            }
        }
        Ok(())
    }

    /// Settles the consumed log files with `redis`, what Redis holds now: those whose ids it
    /// may have lost become closed files again, to be merged again; those that waited `grace`
    /// since Redis took their ids are deleted.
    fn settle_consumed(&self, redis: &Identity, grace: Duration, report: &mut MergeReport) -> Result<(), StoreError> {
        let settled: Vec<Consumed> = {
            let mut consumed = self.consumed.lock();
            let (settled, waiting) =
                consumed.drain(..).partition(|c| !redis.holds(&c.redis) || c.at.elapsed() >= grace);
            *consumed = waiting;
            settled
        };
        for file in settled {
            let held = redis.holds(&file.redis);
            if !held {
                tracing::warn!(
                    dir = %file.dir.display(),
                    seq = file.seq,
                    was = %file.redis,
                    now = %redis,
                    "Redis may have lost this log file's ids (restarted, failed over, or lost writes): merging it again"
                );
            }
            if log::settle_consumed(&file.dir, file.seq, held)? {
                report.deleted_files += 1;
            }
        }
        Ok(())
    }
}

impl TenantSets for RedisTenants {
    fn highest_merged(&self, _worker: &str) -> u64 {
        // Redis keeps no record of log files: a log file is deleted only once its ids are in.
        0
    }

    /// Whether a round should settle the consumed log files though nothing else changed: one
    /// has waited out its grace, or what Redis holds was last read over a second ago.
    fn round_due(&self) -> bool {
        let grace = self.handoff.lock().grace;
        let consumed = self.consumed.lock();
        !consumed.is_empty()
            && (consumed.iter().any(|c| c.at.elapsed() >= grace)
                || self.checked.lock().is_none_or(|at| at.elapsed() >= RECHECK))
    }

    /// Merges this worker's closed log files, and those of dead workers, into
    /// Redis (whole files, whatever the scope: Redis takes a file's ids in one go), and hands each log's files over (see the module documentation). First settles
    /// the consumed files: merged again if another Redis answers now, deleted once their grace
    /// is over. Asks Redis nothing when there is nothing to do.
    fn merge(&self, logs: &[WorkerLog], _scope: Scope<'_>, report: &mut MergeReport) -> Result<(), StoreError> {
        let files = report.log_files;
        let merged = self.merge_logs(logs, report);
        self.failing.store(merged.is_err(), Ordering::Relaxed);
        // This worker's counts show its own merges at once.
        if report.log_files > files {
            self.recent.forget();
        }
        merged
    }

    /// The tenant's distinct count: `SCARD` on the counts' multiplexed connection, answered or
    /// failed within [`COUNT_TIMEOUT`]; or a count read less than a moment ago (see `recent`).
    fn count(&self, tenant: &str) -> Count<'_> {
        if let Some(count) = self.recent.count(tenant) {
            return Answer::Now(Ok(count));
        }
        let (sent, tenant) = (self.recent.sent(), tenant.to_owned());
        let scard = redis::cmd("SCARD").arg(tenant_key(&tenant)).to_owned();
        Answer::Later(Box::pin(async move {
            let count = self.read(move |mut counter| async move { counter.query(&scard).await }).await?;
            self.recent.keep(sent, [(tenant.as_str(), count)]);
            Ok(count)
        }))
    }

    /// The tenants' counts (see [`Counter::scards`]): those read less than a moment ago as
    /// [`TenantSets::count`] keeps them, the others from Redis.
    fn counts<'a>(&'a self, tenants: &'a [String]) -> Answer<'a, Vec<u64>> {
        let kept: Vec<Option<u64>> = tenants.iter().map(|tenant| self.recent.count(tenant)).collect();
        if kept.iter().all(Option::is_some) {
            return Answer::Now(Ok(kept.into_iter().flatten().collect()));
        }
        let missing: Vec<String> =
            tenants.iter().zip(&kept).filter(|(_, k)| k.is_none()).map(|(t, _)| t.clone()).collect();
        let sent = self.recent.sent();
        Answer::Later(Box::pin(async move {
            let asked = &missing;
            let read = self.read(move |counter| async move { counter.scards(asked).await }).await?;
            self.recent.keep(sent, missing.iter().map(String::as_str).zip(read.iter().copied()));
            let mut read = read.into_iter();
            Ok(kept.into_iter().map(|kept| kept.or_else(|| read.next()).unwrap_or_default()).collect())
        }))
    }

    /// Membership: `SMISMEMBER`, in chunks of [`SADD_CHUNK`] ids sent together.
    fn contains<'a>(&'a self, tenant: &'a str, ids: &'a [String]) -> Answer<'a, Vec<bool>> {
        Answer::Later(Box::pin(self.read(move |counter| async move {
            let key = tenant_key(tenant);
            let chunks = ids.chunks(SADD_CHUNK).map(|chunk| {
                let (mut counter, smismember) =
                    (counter.clone(), redis::cmd("SMISMEMBER").arg(&key).arg(chunk).to_owned());
                async move { counter.query::<Vec<bool>>(&smismember).await }
            });
            let answers = futures_util::future::try_join_all(chunks).await?;
            Ok(answers.concat())
        })))
    }

    /// The tenant's distinct count, for callers outside an async runtime: `SCARD` on a merge
    /// connection.
    fn count_blocking(&self, tenant: &str) -> Result<u64, StoreError> {
        let scard = redis::cmd("SCARD").arg(tenant_key(tenant)).to_owned();
        self.with(|connection| connection.query(&scard).map_err(unavailable))
    }

    /// How long the oldest file waiting has waited, and at least how long merging all that waits
    /// will take at the recent rate: Redis takes ids at its own pace, slower than a worker's
    /// log can take them, and what waits now is counted only once merged. A worker that pushes
    /// ingest back past this keeps its backlog to what it merges within the bound, so that counts
    /// converge within about `worker_persist` and the bound, however long the load.
    fn merge_lag(&self) -> Duration {
        let (oldest, bytes) = *self.waiting.lock();
        let waited = oldest.map_or(Duration::ZERO, |since| since.elapsed().unwrap_or_default());
        let to_merge = match *self.merge_rate.lock() {
            Some(rate) if bytes > 0 => Duration::from_secs_f64(bytes as f64 / rate),
            _ => Duration::ZERO,
        };
        waited.max(to_merge)
    }

    /// `bytes` at the recent merge rate, or, before a merge measured one, at
    /// [`FIRST_MERGE_RATE`]: a worker's first log file under load would otherwise hold all that
    /// came in until the next `worker_persist`, seconds of merging.
    fn merge_time(&self, bytes: u64) -> Option<Duration> {
        let rate = self.merge_rate.lock().unwrap_or(FIRST_MERGE_RATE);
        Some(Duration::from_secs_f64(bytes as f64 / rate))
    }

    fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// The list of tenants' names (`ZRANGEBYLEX`), a batch at a time, each name with its
    /// `SCARD`: a name whose set is gone (deleted since) is left out.
    fn list<'a>(&'a self, prefix: &'a str, after: &'a str, limit: usize) -> Answer<'a, TenantPage> {
        Answer::Later(Box::pin(self.read(move |mut counter| async move {
            let mut page = TenantPage::default();
            let mut min = if after >= prefix { lex(b'(', after, b"") } else { lex(b'[', prefix, b"") };
            // No UTF-8 string holds the byte 0xff: every name that starts with `prefix` is below.
            let max = if prefix.is_empty() { b"+".to_vec() } else { lex(b'(', prefix, &[0xff]) };
            loop {
                let want = limit - page.tenants.len() + 1;
                let mut range = redis::cmd("ZRANGEBYLEX");
                range.arg(NAMES_KEY).arg(&min).arg(&max).arg("LIMIT").arg(0).arg(want);
                let names: Vec<String> = counter.query(&range).await?;
                let counts = counter.scards(&names).await?;
                for (name, count) in names.iter().zip(counts).filter(|(_, count)| *count > 0) {
                    if page.tenants.len() == limit {
                        page.next = page.tenants.last().map(|(tenant, _)| tenant.clone());
                        return Ok(page);
                    }
                    page.tenants.push((name.clone(), Ok(count)));
                }
                match names.last() {
                    Some(last) if names.len() == want => min = lex(b'(', last, b""),
                    _ => return Ok(page),
                }
            }
        })))
    }

    /// Notes that the deletion of `tenants` is asked; the round that follows notes which log
    /// files it must outlast (see [`DeleteAsked::cut`]).
    fn delete_in_round(&self, tenants: &[String]) {
        let mut asked = self.delete_asked.lock();
        if asked.as_ref().is_none_or(|asked| asked.tenants != tenants) {
            *asked = (!tenants.is_empty()).then(|| DeleteAsked { tenants: tenants.to_vec(), cut: None });
        }
    }

    /// Deletes the sets of `tenants` (`UNLINK`, confirmed like a merge), once no log file from
    /// before the deletion was asked is left to merge, or waits out its grace as a consumed
    /// file: such a file is merged again should Redis lose it or this worker die, which would
    /// bring deleted ids back. Every worker does so, after its own round: the last one removes
    /// whatever the others' rounds added meanwhile, all of it acknowledged concurrently with
    /// the deletion.
    fn deleted(&self, tenants: &[String]) -> Result<Vec<String>, StoreError> {
        let cut = match self.delete_asked.lock().as_ref() {
            Some(DeleteAsked { tenants: asked, cut: Some(cut) }) if asked.as_slice() == tenants => cut.clone(),
            _ => return Ok(Vec::new()),
        };
        let before = |dir: &Path, seq: u64| cut.get(dir).is_some_and(|&highest| seq <= highest);
        let waiting = self.waiting.lock().0.is_some();
        if waiting || self.consumed.lock().iter().any(|consumed| before(&consumed.dir, consumed.seq)) {
            return Ok(Vec::new());
        }
        let handoff = *self.handoff.lock();
        self.with(|connection| {
            for tenant in tenants {
                connection.query::<u64>(redis::cmd("UNLINK").arg(tenant_key(tenant))).map_err(unavailable)?;
                connection.query::<u64>(redis::cmd("ZREM").arg(NAMES_KEY).arg(tenant)).map_err(unavailable)?;
            }
            self.confirm(connection, handoff)
        })?;
        *self.delete_asked.lock() = None;
        Ok(tenants.to_vec())
    }

    /// Every shard, once the last round left nothing of this worker's log to merge, nor of a
    /// dead worker's on this machine: this worker's part is then in Redis; none otherwise.
    fn settled(&self, _logs: &[WorkerLog], shards: &[u16]) -> Vec<u16> {
        if self.waiting.lock().0.is_none() { shards.to_vec() } else { Vec::new() }
    }

    /// Each worker merges its own log: a shard is settled once every worker vouches for it.
    fn vouches_for_every_writer(&self) -> bool {
        false
    }

    fn keeps_reads(&self) -> bool {
        true
    }

    fn forget_reads(&self) {
        self.recent.forget();
    }

    fn ids_in_memory(&self) -> (u64, u64) {
        // The sets live in Redis; a worker holds none of them.
        (0, 0)
    }

    fn quarantined(&self) -> Vec<QuarantinedTenant> {
        // A Redis set has no file of its own that could be damaged.
        Vec::new()
    }

    fn apply(&self, settings: &Settings) {
        *self.handoff.lock() = settings.redis_handoff;
        self.merge_connections.store(settings.redis_merge_connections, Ordering::Relaxed);
    }
}

/// Consecutive runs of `files` of about [`GROUP_BYTES`] each (one file at least), merged together
/// so that an id repeated across them is sent once, in memory bounded whatever the backlog.
fn in_groups<'a, 'f>(files: &'a [&'f LogFile]) -> impl Iterator<Item = &'a [&'f LogFile]> {
    let mut rest = files;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let end = rest
            .iter()
            .position(|file| {
                bytes += file.len;
                bytes > GROUP_BYTES
            })
            .map_or(rest.len(), |at| at.max(1));
        let (group, left) = rest.split_at(end);
        rest = left;
        Some(group)
    })
}

/// Adds each tenant's ids in `by_tenant` to its set, and names the tenants in [`NAMES_KEY`] (once
/// their ids are in: a crash between leaves a set unlisted only until its log file is merged
/// again, as it will be); returns how many ids were new. One round trip per pipeline of about
/// [`PIPELINE_BYTES`] of ids, however many tenants: a round trip per tenant would cost a file
/// of many small tenants a round trip per id or two. The pipelines are shared out among
/// `connections`, each sending the next one not yet taken from a thread of its own: `SADD` is
/// idempotent and its order does not matter.
fn sadd(connections: &mut [Pooled], by_tenant: &HashMap<&str, HashSet<&[u8]>>) -> redis::RedisResult<u64> {
    let pipelines = Mutex::new(Pipelines { tenants: by_tenant.iter(), tenant: None });
    let failed = AtomicBool::new(false);
    let send = |connection: &mut Pooled| -> redis::RedisResult<u64> {
        let mut new = 0;
        while !failed.load(Ordering::Relaxed) {
            // Built under the lock, sent outside it.
            let Some(sadds) = pipelines.lock().next() else { break };
            new += send_sadds(connection, sadds, &[]).inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
        }
        Ok(new)
    };
    let new: u64 = match &mut *connections {
        [connection] => send(connection)?,
        connections => std::thread::scope(|scope| {
            let senders: Vec<_> = connections.iter_mut().map(|connection| scope.spawn(|| send(connection))).collect();
            let sent: Vec<redis::RedisResult<u64>> =
                senders.into_iter().map(|sender| sender.join().expect("a sender does not panic")).collect();
            sent.into_iter().sum::<redis::RedisResult<u64>>()
        })?,
    };
    let tenants: Vec<&str> = by_tenant.keys().copied().collect();
    let names: Vec<redis::Cmd> = tenants
        .chunks(SADD_CHUNK)
        .map(|chunk| {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(NAMES_KEY);
            for tenant in chunk {
                zadd.arg(0).arg(*tenant);
            }
            zadd
        })
        .collect();
    send_sadds(&mut connections[0], Vec::new(), &names)?;
    Ok(new)
}

/// The `SADD`s of a merge, as pipelines of about [`PIPELINE_BYTES`] of ids each: built one at a
/// time, so that the ids are copied into commands a pipeline at a time.
struct Pipelines<'m, 'a> {
    tenants: hashbrown::hash_map::Iter<'m, &'a str, HashSet<&'a [u8]>>,
    /// The tenant whose ids are being taken: its key, and the ids left.
    tenant: Option<(String, hashbrown::hash_set::Iter<'m, &'a [u8]>)>,
}

impl Iterator for Pipelines<'_, '_> {
    type Item = Vec<redis::Cmd>;

    fn next(&mut self) -> Option<Vec<redis::Cmd>> {
        let mut commands = Vec::new();
        let mut bytes = 0;
        while bytes < PIPELINE_BYTES {
            if self.tenant.is_none() {
                let Some((tenant, ids)) = self.tenants.next() else { break };
                self.tenant = Some((tenant_key(tenant), ids.iter()));
            }
            let (key, ids) = self.tenant.as_mut().expect("taken above");
            let chunk: Vec<&[u8]> = ids.by_ref().take(SADD_CHUNK).copied().collect();
            if chunk.is_empty() {
                self.tenant = None;
                continue;
            }
            bytes += chunk.iter().map(|id| id.len()).sum::<usize>();
            let mut sadd = redis::cmd("SADD");
            sadd.arg(&*key).arg(chunk);
            commands.push(sadd);
        }
        (!commands.is_empty()).then_some(commands)
    }
}

/// Sends `sadds`, then `then` (whose replies are ignored), in one pipeline; returns the sum of
/// the `SADD` replies.
fn send_sadds(connection: &mut Pooled, sadds: Vec<redis::Cmd>, then: &[redis::Cmd]) -> redis::RedisResult<u64> {
    if sadds.is_empty() && then.is_empty() {
        return Ok(0);
    }
    let replies: Vec<u64> = match &mut connection.connection {
        Connection::Server(connection) => {
            let mut pipeline = redis::pipe();
            for sadd in sadds {
                pipeline.add_command(sadd);
            }
            for cmd in then {
                pipeline.add_command(cmd.clone()).ignore();
            }
            pipeline.query(connection)?
        }
        Connection::Cluster(connection) => {
            let mut pipeline = redis::cluster::cluster_pipe();
            for sadd in sadds {
                pipeline.add_command(sadd);
            }
            for cmd in then {
                pipeline.add_command(cmd.clone()).ignore();
            }
            pipeline.query(connection.as_mut())?
        }
    };
    Ok(replies.iter().sum())
}

/// What the Redis `connection` reaches holds: the lineage of the server, or of each primary of
/// a cluster, from `INFO replication`.
fn identity(connection: &mut Pooled) -> redis::RedisResult<Identity> {
    let info: Value = connection.query(redis::cmd("INFO").arg("replication"))?;
    let mut lineages = Vec::new();
    collect_lineages(&info, &mut lineages);
    lineages.sort_unstable_by(|a, b| a.replid.cmp(&b.replid));
    Ok(Identity(lineages))
}

/// The lineages in an `INFO replication` reply: a text from a server, or one per node (as an
/// array or a map) from a cluster. A node that is not a primary holds no lineage of its own.
fn collect_lineages(info: &Value, lineages: &mut Vec<Lineage>) {
    let parse = |text: &str| {
        let field = |name: &str| {
            text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')).map(str::trim).unwrap_or_default()
        };
        (field("role") == "master").then(|| Lineage {
            replid: field("master_replid").to_owned(),
            offset: field("master_repl_offset").parse().unwrap_or(0),
            replid2: field("master_replid2").to_owned(),
            offset2: field("second_repl_offset").parse().unwrap_or(-1),
        })
    };
    match info {
        Value::BulkString(bytes) => lineages.extend(parse(&String::from_utf8_lossy(bytes))),
        Value::SimpleString(text) | Value::VerbatimString { text, .. } => lineages.extend(parse(text)),
        Value::Array(items) => items.iter().for_each(|item| collect_lineages(item, lineages)),
        Value::Map(pairs) => pairs.iter().for_each(|(_, value)| collect_lineages(value, lineages)),
        _ => {}
    }
}

/// The lowest `[local, replicas]` pair in a `WAITAOF` reply: one pair from a server, one per
/// primary (as an array or a map) from a cluster.
fn lowest_pair(reply: &Value) -> Option<(i64, i64)> {
    match reply {
        Value::Array(items) => match items.as_slice() {
            [Value::Int(local), Value::Int(replicas)] => Some((*local, *replicas)),
            items => lowest(items.iter().map(lowest_pair)),
        },
        Value::Map(pairs) => lowest(pairs.iter().map(|(_, value)| lowest_pair(value))),
        _ => None,
    }
}

/// The pairwise minimum of `pairs`; `None` if there is none, or if any is not a pair.
fn lowest(pairs: impl Iterator<Item = Option<(i64, i64)>>) -> Option<(i64, i64)> {
    pairs.reduce(|a, b| Some((a?.0.min(b?.0), a?.1.min(b?.1))))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_files_are_merged_in_groups_of_bounded_bytes_in_their_order() {
        let file = |seq: u64, len: u64| LogFile {
            seq,
            path: PathBuf::from(format!("{seq}.log")),
            closed: true,
            consumed: false,
            modified: SystemTime::UNIX_EPOCH,
            len,
        };
        let files = [file(1, 10), file(2, GROUP_BYTES - 10), file(3, 1), file(4, 3 * GROUP_BYTES), file(5, 5)];
        let refs: Vec<&LogFile> = files.iter().collect();
        let groups: Vec<Vec<u64>> = in_groups(&refs).map(|g| g.iter().map(|f| f.seq).collect()).collect();
        // A file larger than a group is a group of its own.
        assert_eq!(groups, [vec![1, 2], vec![3], vec![4], vec![5]]);
        assert_eq!(in_groups(&[]).count(), 0);
    }

    #[test]
    fn keys_are_distinct_and_free_of_hash_tags() {
        let tenants = ["a", "A", "a b", "{a}", "%7Ba%7D", "%", "%25", "../x"];
        let keys: std::collections::HashSet<String> = tenants.iter().map(|t| tenant_key(t)).collect();
        assert_eq!(keys.len(), tenants.len());
        assert!(keys.iter().all(|k| !k.contains('{') && !k.contains('}')));
        for tenant in tenants {
            assert_eq!(tenant_of_key(&tenant_key(tenant)).as_deref(), Some(tenant));
        }
    }

    fn info(role: &str, replid: &str, offset: u64, replid2: &str, offset2: i64) -> Value {
        Value::BulkString(
            format!(
                "# Replication\r\nrole:{role}\r\nconnected_slaves:0\r\nmaster_replid:{replid}\r\n\
                 master_replid2:{replid2}\r\nmaster_repl_offset:{offset}\r\nsecond_repl_offset:{offset2}\r\n"
            )
            .into(),
        )
    }

    fn lineage(replid: &str, offset: u64, replid2: &str, offset2: i64) -> Lineage {
        Lineage { replid: replid.into(), offset, replid2: replid2.into(), offset2 }
    }

    #[test]
    fn lineages_of_a_server_and_of_a_cluster_read_from_info() {
        let mut found = Vec::new();
        collect_lineages(&info("master", "aaa", 120, "000", -1), &mut found);
        assert_eq!(found, [lineage("aaa", 120, "000", -1)]);
        // A cluster's reply maps each node's address to its INFO; replicas hold no lineage.
        let cluster = Value::Map(vec![
            (Value::BulkString(b"127.0.0.1:7001".to_vec()), info("master", "bbb", 5, "000", -1)),
            (Value::BulkString(b"127.0.0.1:7002".to_vec()), info("slave", "bbb", 5, "000", -1)),
        ]);
        let mut found = Vec::new();
        collect_lineages(&cluster, &mut found);
        assert_eq!(found, [lineage("bbb", 5, "000", -1)]);
    }

    #[test]
    fn the_seeds_of_a_cluster_are_its_nodes_but_those_failed_or_without_an_address() {
        let listing = "\
            a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460\n\
            b2 127.0.0.1:7002@17002,node-b master,fail - 1 1 2 disconnected\n\
            c3 127.0.0.1:7003@17003 slave b2 0 2 3 connected\n\
            d4 :0@0 master,noaddr - 0 0 0 disconnected\n\
            e5 10.0.0.5:7005@17005 master,fail? - 0 0 4 connected 5461-10922\n\
            f6 ::1:7006@17006 handshake - 0 0 0 connected\n";
        let nodes = cluster_nodes(listing);
        let expected = [("10.0.0.5", 7005), ("127.0.0.1", 7001), ("127.0.0.1", 7003)];
        assert_eq!(nodes, expected.map(|(host, port)| (host.to_owned(), port)));
    }

    #[test]
    fn redis_holds_what_it_took_while_its_history_runs_through_it() {
        let then = Identity(vec![lineage("aaa", 100, "000", -1)]);
        let holds = |now: Lineage| Identity(vec![now]).holds(&then);
        assert!(holds(lineage("aaa", 100, "000", -1)), "nothing happened");
        assert!(holds(lineage("aaa", 250, "000", -1)), "more writes since");
        assert!(holds(lineage("ccc", 300, "aaa", 180)), "a replica promoted that had it");
        assert!(!holds(lineage("aaa", 90, "000", -1)), "reloaded from an older snapshot");
        assert!(!holds(lineage("ddd", 0, "000", -1)), "restarted without its history");
        assert!(!holds(lineage("ccc", 300, "aaa", 60)), "a replica promoted that lagged");
        assert!(Identity(vec![lineage("x", 1, "", -1)]).holds(&Identity::default()), "nothing taken");
    }

    #[test]
    fn waitaof_replies_of_a_server_and_of_a_cluster_read_as_their_weakest_pair() {
        let pair = |l, r| Value::Array(vec![Value::Int(l), Value::Int(r)]);
        assert_eq!(lowest_pair(&pair(1, 0)), Some((1, 0)));
        assert_eq!(lowest_pair(&Value::Array(vec![pair(1, 2), pair(0, 3), pair(1, 1)])), Some((0, 1)));
        let map = Value::Map(vec![(Value::SimpleString("a".into()), pair(1, 1)), (Value::Nil, pair(1, 0))]);
        assert_eq!(lowest_pair(&map), Some((1, 0)));
        assert_eq!(lowest_pair(&Value::Array(vec![pair(1, 1), Value::Nil])), None);
        assert_eq!(lowest_pair(&Value::Int(1)), None);
        assert_eq!(lowest_pair(&Value::Array(vec![])), None);
    }
}
