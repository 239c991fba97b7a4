//! HTTP/1.1 on the wire between the coordinator and a worker: a forwarded request written into
//! a connection's outgoing bytes, and a worker's reply cut out of its incoming bytes.
//!
//! Only what the hop needs: requests are written with `Content-Length`, and replies are framed
//! by `Content-Length` or chunked encoding, the two ways actix-web frames them. A reply framed
//! only by the end of the connection is refused, which costs that connection, not the request:
//! the request is tried again elsewhere.
//!
//! A reply is untrusted input: whatever answers on a worker's address may send anything. Its
//! head and its body are bounded ([`MAX_REPLY_HEAD`], [`MAX_REPLY_BODY`]) and nothing is
//! reserved from the length a reply announces, so a reply announcing a terabyte costs its
//! connection, not the coordinator's memory.

use actix_web::http::header::HeaderValue;
use actix_web::http::{Method, StatusCode};
use bytes::{Bytes, BytesMut};

/// Headers a reply may carry, at most.
const MAX_HEADERS: usize = 32;
/// The longest reply head accepted, status line and headers: a worker's are under 200 bytes.
pub(crate) const MAX_REPLY_HEAD: usize = 8 << 10;
/// The largest reply body accepted: a worker answers a count, an acknowledgement or an error
/// message, none near a kilobyte; the largest, the counts of `MAX_COUNTS_TENANTS` tenants of
/// `max_key_bytes` each, a few MiB.
pub(crate) const MAX_REPLY_BODY: usize = 32 << 20;

/// What a forwarded request asks of a worker: whether the worker answers it at once (see
/// `pool::Member::answers_at_once`), and how long it may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `POST /items`, answered once the batch is durable.
    Batch,
    /// A read of the sets: counts, membership.
    Read,
    /// A request the worker takes its time over: a listing, or the counts of many tenants.
    Waits,
    /// A request that waits for a barrier across the workers (a strong read, a batch posted
    /// with `wait=counted`, a delete): it takes its time too, and shares a barrier with those
    /// sent to the same worker.
    Barrier,
}

impl Kind {
    /// Whether the worker takes its time over the request: it then goes on a connection of its
    /// own, with the longer hop timeout.
    pub(crate) fn takes_time(self) -> bool {
        matches!(self, Kind::Waits | Kind::Barrier)
    }
}

/// A request to forward, as the client sent it.
pub(crate) struct Forward {
    /// `GET` or `POST`.
    pub(crate) method: Method,
    /// The path and query exactly as the client sent them.
    pub(crate) target: Bytes,
    /// The body, shared with the client's request rather than copied; empty for a `GET`.
    pub(crate) body: Bytes,
    /// What it asks of the worker.
    pub(crate) kind: Kind,
}

/// A worker's reply, read whole.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    /// The worker's `Retry-After`, if it sent one.
    pub(crate) retry_after: Option<HeaderValue>,
    pub(crate) body: Bytes,
    /// The worker closes the connection after this reply (`Connection: close`).
    pub(crate) closes: bool,
}

/// Why a worker's bytes are not a reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum WireError {
    #[error("malformed reply head: {0}")]
    Head(String),
    #[error("malformed reply framing: {0}")]
    Framing(&'static str),
    #[error("a reply {0}")]
    TooLarge(String),
}

/// Whether `target` may be written as a request target: an origin-form path, with nothing that
/// could end the request line or start a header.
pub(crate) fn valid_target(target: &[u8]) -> bool {
    target.first() == Some(&b'/') && target.iter().all(|&b| b > b' ' && b != 0x7f)
}

/// Appends `request` to `out`, with `host` (the worker's `host:port`) as its `Host`.
pub(crate) fn write_request(out: &mut Vec<u8>, request: &Forward, host: &[u8]) {
    out.extend_from_slice(request.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(&request.target);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host);
    if request.method == Method::POST || !request.body.is_empty() {
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(request.body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&request.body);
}

/// Cuts the first whole reply off the front of `buf`; `None` while it is not all there yet.
/// Informational (1xx) replies are skipped.
pub(crate) fn read_reply(buf: &mut BytesMut) -> Result<Option<Reply>, WireError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut head = httparse::Response::new(&mut headers);
        let head_len = match head.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_REPLY_HEAD => {
                return Err(WireError::TooLarge(format!("head over {MAX_REPLY_HEAD} bytes")));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(WireError::Head(e.to_string())),
        };
        let code = head.code.unwrap_or_default();
        let status = StatusCode::from_u16(code).map_err(|e| WireError::Head(e.to_string()))?;
        if status.is_informational() {
            let _ = buf.split_to(head_len);
            continue;
        }
        let mut length = None;
        let mut chunked = false;
        let mut closes = head.version == Some(0);
        let mut retry_after = None;
        for header in head.headers.iter() {
            let name = header.name;
            if name.eq_ignore_ascii_case("content-length") {
                let value = std::str::from_utf8(header.value).ok().and_then(|v| v.trim().parse::<usize>().ok());
                let value = value.ok_or(WireError::Framing("invalid content-length"))?;
                if length.is_some_and(|l| l != value) {
                    return Err(WireError::Framing("conflicting content-length headers"));
                }
                length = Some(value);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = last_token_is(header.value, b"chunked");
                if !chunked {
                    return Err(WireError::Framing("a transfer-encoding other than chunked"));
                }
            } else if name.eq_ignore_ascii_case("connection") {
                closes |= has_token(header.value, b"close");
            } else if name.eq_ignore_ascii_case("retry-after") {
                retry_after = HeaderValue::from_bytes(header.value).ok();
            }
        }
        let no_body = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let body = if no_body {
            let _ = buf.split_to(head_len);
            Bytes::new()
        } else if chunked {
            match dechunk(&buf[head_len..])? {
                None => return Ok(None),
                Some((body, used)) => {
                    let _ = buf.split_to(head_len + used);
                    body
                }
            }
        } else if let Some(length) = length {
            if length > MAX_REPLY_BODY {
                return Err(WireError::TooLarge(format!("body of {length} bytes, over {MAX_REPLY_BODY}")));
            }
            // The connection's reads make room as bytes come, never from the announced length.
            let total = head_len + length;
            if buf.len() < total {
                return Ok(None);
            }
            buf.split_to(total).freeze().slice(head_len..)
        } else {
            return Err(WireError::Framing("a reply with neither content-length nor chunked encoding"));
        };
        return Ok(Some(Reply { status, retry_after, body, closes }));
    }
}

/// A chunked body at the front of `bytes`: the body and the bytes it took, trailers included;
/// `None` while it is not all there yet. The body is bounded by [`MAX_REPLY_BODY`], and its
/// encoding (sizes, extensions, trailers) by [`MAX_REPLY_HEAD`] more.
fn dechunk(bytes: &[u8]) -> Result<Option<(Bytes, usize)>, WireError> {
    let too_large = || WireError::TooLarge(format!("chunked body over {MAX_REPLY_BODY} bytes"));
    let incomplete = || if bytes.len() > MAX_REPLY_BODY + MAX_REPLY_HEAD { Err(too_large()) } else { Ok(None) };
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = find_crlf(&bytes[at..]) else { return incomplete() };
        let line = &bytes[at..at + line_end];
        let size_digits = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size_digits)
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .ok_or(WireError::Framing("invalid chunk size"))?;
        at += line_end + 2;
        if size == 0 {
            // Trailers, if any, up to an empty line.
            loop {
                let Some(line_end) = find_crlf(&bytes[at..]) else { return incomplete() };
                at += line_end + 2;
                if line_end == 0 {
                    return Ok(Some((Bytes::from(body), at)));
                }
            }
        }
        if size > MAX_REPLY_BODY - body.len() {
            return Err(too_large());
        }
        let end = at + size;
        if bytes.len() < end + 2 {
            return incomplete();
        }
        if &bytes[end..end + 2] != b"\r\n" {
            return Err(WireError::Framing("a chunk not followed by CRLF"));
        }
        body.extend_from_slice(&bytes[at..end]);
        at = end + 2;
    }
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(|t| t.trim_ascii())
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

fn last_token_is(value: &[u8], token: &[u8]) -> bool {
    tokens(value).last().is_some_and(|t| t.eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(method: Method, target: &str, body: &str) -> String {
        let mut out = Vec::new();
        let request = Forward {
            method,
            target: Bytes::copy_from_slice(target.as_bytes()),
            body: Bytes::copy_from_slice(body.as_bytes()),
            kind: Kind::Read,
        };
        write_request(&mut out, &request, b"127.0.0.1:7001");
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn requests_are_written_with_the_raw_target_and_a_length_when_they_carry_a_body() {
        assert_eq!(
            written(Method::GET, "/items/%2E%2E/count?x=1", ""),
            "GET /items/%2E%2E/count?x=1 HTTP/1.1\r\nhost: 127.0.0.1:7001\r\n\r\n"
        );
        assert_eq!(
            written(Method::POST, "/items", "[1]"),
            "POST /items HTTP/1.1\r\nhost: 127.0.0.1:7001\r\ncontent-type: application/json\r\ncontent-length: 3\r\n\r\n[1]"
        );
        assert!(written(Method::POST, "/items", "").contains("content-length: 0\r\n\r\n"));
    }

    #[test]
    fn only_an_origin_form_target_without_spaces_or_controls_is_valid() {
        assert!(valid_target(b"/items/a%20b/count"));
        assert!(valid_target("/items/é/count".as_bytes()));
        for bad in [&b""[..], b"items", b"/a b", b"/a\r\nx: y", b"/a\tb", b"/a\x7f"] {
            assert!(!valid_target(bad), "{bad:?}");
        }
    }

    #[test]
    fn pipelined_replies_are_cut_one_by_one_whatever_the_reads_split() {
        let stream = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\ncontent-type: application/json\r\n\r\n{\"count\":3}\
HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 2\r\n\r\n{}\
HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3;ext=1\r\n:1}\r\n0\r\nx-trailer: y\r\n\r\n\
HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n";
        // Fed in every split of two reads, the replies come out the same.
        for split in 0..=stream.len() {
            let mut buf = BytesMut::new();
            let mut replies = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                buf.extend_from_slice(part);
                while let Some(reply) = read_reply(&mut buf).unwrap() {
                    replies.push(reply);
                }
            }
            assert!(buf.is_empty(), "split {split}: left {buf:?}");
            let seen: Vec<_> = replies
                .iter()
                .map(|r| (r.status.as_u16(), String::from_utf8_lossy(&r.body).into_owned(), r.closes))
                .collect();
            assert_eq!(
                seen,
                [
                    (200, "{\"count\":3}".to_owned(), false),
                    (503, "{}".to_owned(), false),
                    (200, "{\"a\":1}".to_owned(), false),
                    (204, String::new(), true),
                ],
                "split {split}"
            );
            assert_eq!(replies[1].retry_after.as_ref().unwrap(), "1");
        }
    }

    #[test]
    fn bytes_that_are_no_reply_are_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nab\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(read_reply(&mut buf).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_reply_over_the_bounds_is_refused_as_soon_as_its_bytes_show_it() {
        let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "x".repeat(64 << 10));
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        for bad in [
            // Refused from the head alone: no body is waited for.
            "HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n".to_owned(),
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", MAX_REPLY_BODY + 1),
            format!("HTTP/1.1 200 OK\r\n{}\r\n", "x: y\r\n".repeat(MAX_HEADERS + 1)),
            format!("{chunked}ffffffffffffffff\r\n"),
            // Refused once the bytes in exceed what a reply may hold.
            format!("HTTP/1.1 200 OK\r\nx: {}", "y".repeat(MAX_REPLY_HEAD)),
            format!("{chunked}{}", chunk.repeat(MAX_REPLY_BODY / (64 << 10) + 1)),
            format!("{chunked}1;{}", "e".repeat(MAX_REPLY_BODY + MAX_REPLY_HEAD)),
        ] {
            let mut buf = BytesMut::from(bad.as_bytes());
            let refused = read_reply(&mut buf);
            assert!(
                matches!(refused, Err(WireError::TooLarge(_) | WireError::Head(_))),
                "{}: {refused:?}",
                bad.get(..60).unwrap_or(&bad)
            );
        }
    }

    #[test]
    fn replies_up_to_the_bounds_are_read() {
        let body = "x".repeat(MAX_REPLY_BODY);
        let mut buf =
            BytesMut::from(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes());
        assert_eq!(read_reply(&mut buf).unwrap().unwrap().body.len(), MAX_REPLY_BODY);
        let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
        let mut buf =
            BytesMut::from(format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{chunked}").as_bytes());
        assert_eq!(read_reply(&mut buf).unwrap().unwrap().body.len(), MAX_REPLY_BODY);
    }

    #[test]
    fn a_reply_of_http_1_0_closes_the_connection() {
        let mut buf = BytesMut::from(&b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"[..]);
        assert!(read_reply(&mut buf).unwrap().unwrap().closes);
    }
}
