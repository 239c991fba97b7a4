//! The reference run: the same item stream sent to Redis as `SADD tenant id...`, one pipeline per
//! batch, so that the figures of the server under test can be quoted as a ratio to Redis's
//! measured in the same session on the same machine.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Pipeline, RedisError};

use crate::drive::Op;
use crate::stats::Failure;
use crate::workload::Generator;

/// Keys are the tenant names under this prefix, so that the reference run cannot touch the sets
/// of a CountApp that stores its tenants in the same Redis.
const KEY_PREFIX: &str = "countapp-load:";

/// After a failed connect, wait this long before the next try (as for HTTP).
const CONNECT_BACKOFF: Duration = Duration::from_millis(50);

/// The Redis of the reference run, with the key of every tenant.
pub struct RedisTarget {
    client: Client,
    config: AsyncConnectionConfig,
    keys: Vec<Vec<u8>>,
}

impl RedisTarget {
    /// Connects to the Redis at `url` once, so that a wrong URL fails before any load is sent;
    /// commands fail after `timeout`.
    pub async fn connect(url: &str, tenants: &[String], timeout: Duration) -> anyhow::Result<Arc<RedisTarget>> {
        let client = Client::open(url).with_context(|| format!("--redis {url}"))?;
        let config =
            AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .with_context(|| format!("connecting to Redis at {url}"))?;
        let keys = tenants.iter().map(|tenant| format!("{KEY_PREFIX}{tenant}").into_bytes()).collect();
        Ok(Arc::new(RedisTarget { client, config, keys }))
    }

    /// Removes the run's sets, so that repeated runs leave nothing behind. `UNLINK` frees the
    /// memory in the background: a big set does not stall Redis.
    pub async fn remove_keys(&self) -> anyhow::Result<()> {
        let mut connection = self.client.get_multiplexed_async_connection_with_config(&self.config).await?;
        redis::cmd("UNLINK")
            .arg(&self.keys)
            .query_async::<()>(&mut connection)
            .await
            .context("removing the reference run's keys")
    }
}

/// One Redis connection sending generated batches as pipelines.
pub struct RedisOp {
    target: Arc<RedisTarget>,
    connection: Option<MultiplexedConnection>,
    generator: Generator,
    pipeline: Pipeline,
    items: u64,
}

impl RedisOp {
    /// Sends `generator`'s batches to `target` over a connection of its own.
    pub fn new(target: Arc<RedisTarget>, generator: Generator) -> Self {
        RedisOp { target, connection: None, generator, pipeline: redis::pipe(), items: 0 }
    }
}

impl Op for RedisOp {
    async fn prepare(&mut self, start: u64, units: u64) -> anyhow::Result<()> {
        let batch = self.generator.next_batch(start, units as usize)?;
        // One SADD per tenant of the batch, with all of that tenant's ids: what a client of
        // Redis would send for such a batch.
        let mut items: Vec<(usize, &[u8])> = batch.items().collect();
        items.sort_by_key(|&(tenant, _)| tenant);
        self.pipeline.clear();
        for group in items.chunk_by(|a, b| a.0 == b.0) {
            self.pipeline.cmd("SADD").arg(&self.target.keys[group[0].0][..]);
            for &(_, id) in group {
                self.pipeline.arg(id);
            }
            self.pipeline.ignore();
        }
        self.items = batch.len() as u64;
        Ok(())
    }

    async fn send(&mut self) -> Result<u64, Failure> {
        let connection = match &mut self.connection {
            Some(connection) => connection,
            None => {
                let target = &self.target;
                match target.client.get_multiplexed_async_connection_with_config(&target.config).await {
                    Ok(connection) => self.connection.insert(connection),
                    Err(_) => {
                        tokio::time::sleep(CONNECT_BACKOFF).await;
                        return Err(Failure::Connect);
                    }
                }
            }
        };
        match self.pipeline.query_async::<()>(connection).await {
            Ok(()) => {
                self.generator.acknowledged();
                Ok(self.items)
            }
            Err(error) => {
                let failure = failure(&error);
                if failure != Failure::BadReply {
                    self.connection = None;
                }
                Err(failure)
            }
        }
    }
}

fn failure(error: &RedisError) -> Failure {
    if error.is_timeout() {
        Failure::Timeout
    } else if error.is_io_error() || error.is_connection_dropped() {
        Failure::Connection
    } else {
        Failure::BadReply
    }
}
