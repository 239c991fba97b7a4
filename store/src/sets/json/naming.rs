//! How a tenant name becomes a file name: never the raw name, so that no tenant can reach
//! outside the database (`../x`), and no two tenants share files (`a` and `A` on a
//! case-insensitive file system, or two names too long for one path component).

use sha2::{Digest, Sha256};

/// How many characters of the tenant name the directory keeps, for the people reading `db/`.
const READABLE_PREFIX: usize = 24;

/// The stem of `tenant`'s file names: a readable, lower-case prefix of the name in which every
/// character other than `[a-z0-9_-]` becomes `_`, a dot, and 32 hex digits of the name's SHA-256.
///
/// The hash is what keeps names apart; the prefix only helps an operator find a tenant. Each
/// tenant's file also records the full name, so the store detects the (astronomically
/// unlikely) case of two names sharing a hash instead of mixing their ids.
pub(crate) fn tenant_file_stem(tenant: &str) -> String {
    let mut name: String = tenant
        .chars()
        .take(READABLE_PREFIX)
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    name.push('.');
    let digest = Sha256::digest(tenant.as_bytes());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for byte in &digest[..16] {
        name.push(char::from(HEX[usize::from(byte >> 4)]));
        name.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_distinct_safe_and_short() {
        let long = "é".repeat(128);
        let tenants = ["a", "A", "a b", "../x", "..", "%2e%2e", ".", " ", "a/b", "a\\b", "\0", &long];
        let names: HashSet<String> = tenants.iter().map(|t| tenant_file_stem(t)).collect();
        assert_eq!(names.len(), tenants.len());
        for name in &names {
            assert!(name.len() <= READABLE_PREFIX + 33, "{name}");
            assert!(!name.starts_with('.'), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)), "{name}");
        }
    }

    #[test]
    fn the_name_is_stable() {
        // Every worker, and every version of the worker, must find a tenant at the same place.
        assert_eq!(tenant_file_stem("t1"), "t1.628b49d96dcde97a430dd4f597705899");
    }
}
