//! The coordinator's client for the workers' control routes: health checks, identity, stats,
//! config pushes and shutdown requests.
//!
//! It talks to the workers directly, whatever proxy the environment names (`HTTP_PROXY`,
//! `http_proxy`, `ALL_PROXY`, ...): a proxy would be handed the token, and one that cannot reach
//! the workers would keep every worker from ever becoming ready. It follows no redirect. And it
//! reads at most [`MAX_REPLY`] of a reply: a worker's are small, and whatever answers on a
//! worker's address is not trusted with the coordinator's memory.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;

/// The largest reply body read: a worker's `/stats`, the largest, is a few kilobytes.
pub(crate) const MAX_REPLY: usize = 1 << 20;
/// How long opening a connection to a worker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a control request's reply could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplyError {
    /// The connection failed, or the timeout passed, while reading it.
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    /// The body is larger than a worker's replies ever are.
    #[error("a reply over {MAX_REPLY} bytes")]
    TooLarge,
    /// The body is not the JSON expected.
    #[error("a reply that is not the JSON expected: {0}")]
    Json(#[from] serde_json::Error),
}

/// The client, built once and shared by every supervising task and the dashboard's polls.
pub(crate) fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// The body of `reply`, refused as soon as it is known to be over [`MAX_REPLY`].
pub(crate) async fn body(mut reply: reqwest::Response) -> Result<Bytes, ReplyError> {
    if reply.content_length().is_some_and(|len| len > MAX_REPLY as u64) {
        return Err(ReplyError::TooLarge);
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = reply.chunk().await? {
        if body.len() + chunk.len() > MAX_REPLY {
            return Err(ReplyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The body of `reply` as JSON of type `T`, within [`MAX_REPLY`].
pub(crate) async fn json<T: DeserializeOwned>(reply: reqwest::Response) -> Result<T, ReplyError> {
    Ok(serde_json::from_slice(&body(reply).await?)?)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A server that answers one request with a body of `len` bytes, announced or chunked.
    async fn serving(len: usize, announced: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let _ = stream.read(&mut [0; 4096]).await;
            let head = if announced {
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", len + 2)
            } else {
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_owned()
            };
            let mut body = vec![b' '; len];
            body.extend_from_slice(b"{}");
            let body = if announced {
                body
            } else {
                [format!("{:x}\r\n", body.len()).into_bytes(), body, b"\r\n0\r\n\r\n".to_vec()].concat()
            };
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
        });
        url
    }

    #[tokio::test]
    async fn replies_within_the_bound_are_read_and_larger_ones_refused_announced_or_not() {
        let http = client().unwrap();
        for announced in [true, false] {
            let reply = http.get(serving(1000, announced).await).send().await.unwrap();
            assert_eq!(json::<serde_json::Value>(reply).await.unwrap(), serde_json::json!({}));
            let reply = http.get(serving(MAX_REPLY, announced).await).send().await.unwrap();
            assert!(
                matches!(json::<serde_json::Value>(reply).await, Err(ReplyError::TooLarge)),
                "announced {announced}"
            );
        }
    }
}
