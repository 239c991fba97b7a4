//! The token a coordinator hands the workers it spawns: what they require on `POST /shutdown`
//! and `PUT /config`, and what a coordinator restarted after a crash tells its predecessor's
//! workers apart by.
//!
//! A worker proves it holds the token without sending it: the coordinator asks `GET
//! /identity?challenge=<hex>` with a fresh random challenge, and the worker answers an
//! HMAC-SHA256, keyed by the token, of the challenge, its port and its pid. Whatever answers on
//! a worker's port learns nothing of the token from the challenge, and a proof is good for one
//! challenge and for the one process the coordinator found holding that port: another process
//! cannot pass on a genuine worker's proof as its own.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The route on which a worker proves it holds its coordinator's token.
pub const IDENTITY_ROUTE: &str = "/identity";

/// The longest challenge a worker answers, in hex digits.
pub const MAX_CHALLENGE: usize = 128;

/// A worker's reply on [`IDENTITY_ROUTE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The worker's own pid, as it sees it; the coordinator relies on the one `/proc` shows.
    pub pid: u32,
    /// [`proof`] of the token for the challenge, the worker's port and its pid, in hex.
    pub proof: String,
}

/// A fresh random token, or challenge: 128 bits, in hex.
pub fn fresh() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Whether `text` is a token or challenge as [`fresh`] makes them, or a challenge a worker
/// answers: hex digits only, 1 to [`MAX_CHALLENGE`] of them.
pub fn is_hex(text: &str) -> bool {
    (1..=MAX_CHALLENGE).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `a` and `b` are equal, compared in constant time: how long the comparison takes
/// tells nothing about where they differ.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The proof that the process `pid`, listening on `port`, holds `token`, for `challenge`: an
/// HMAC-SHA256 in hex.
pub fn proof(token: &str, challenge: &str, port: u16, pid: u32) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(format!("countapp identity\n{challenge}\n{port}\n{pid}").as_bytes());
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `presented` is the proof of `token` for `challenge`, `port` and `pid`.
pub fn is_proof(presented: &str, token: &str, challenge: &str, port: u16, pid: u32) -> bool {
    same(presented, &proof(token, challenge, port, pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_for_its_token_challenge_port_and_pid_only() {
        let (token, challenge) = (fresh(), fresh());
        let good = proof(&token, &challenge, 5001, 42);
        assert!(is_proof(&good, &token, &challenge, 5001, 42));
        assert!(!is_proof(&good, &fresh(), &challenge, 5001, 42));
        assert!(!is_proof(&good, &token, &fresh(), 5001, 42));
        assert!(!is_proof(&good, &token, &challenge, 5002, 42));
        assert!(!is_proof(&good, &token, &challenge, 5001, 43));
        assert!(!is_proof(&good[1..], &token, &challenge, 5001, 42));
        assert!(!good.contains(&token));
    }

    #[test]
    fn fresh_tokens_are_hex_and_differ() {
        let (a, b) = (fresh(), fresh());
        assert!(is_hex(&a) && a.len() == 32 && a != b);
        for bad in ["", "xyz", "12 34", &"a".repeat(MAX_CHALLENGE + 1)] {
            assert!(!is_hex(bad), "{bad:?}");
        }
    }
}
