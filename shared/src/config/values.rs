//! The value types of `config.yaml`'s keys, each checked as it is read, so that a [`Config`]
//! (super::Config) holds nothing unchecked and every error names what was wrong with its key.
//!
//! Each type serializes back to the form it reads, so a config can be handed from the
//! coordinator to the workers it spawns and read there by the same code.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A duration: `500ms`, `5s`, `2m`, `1h` (units as humantime reads them), or a plain number of
/// seconds, such as `worker_persist: 0.5`, which is what files written before units existed hold.
///
/// Bounded on both sides: below a millisecond the timers it drives would spin, and past a day
/// it is a typo (and `1e19` seconds would overflow the clock arithmetic of whoever adds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(Duration);

impl Seconds {
    /// The shortest duration accepted.
    pub const MIN: Duration = Duration::from_millis(1);
    /// The longest duration accepted: a day.
    pub const MAX: Duration = Duration::from_secs(24 * 60 * 60);

    /// `duration`, if it is within the bounds.
    pub fn new(duration: Duration) -> Option<Seconds> {
        (Seconds::MIN..=Seconds::MAX).contains(&duration).then_some(Seconds(duration))
    }

    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }

    fn from_f64(seconds: f64) -> Option<Seconds> {
        Duration::try_from_secs_f64(seconds).ok().and_then(Seconds::new)
    }

    /// A duration written with its unit, such as `500ms` or `2m`. A bare number in quotes is
    /// refused: quoted, it is text, and a unit says what the text means.
    fn from_text(text: &str) -> Option<Seconds> {
        humantime::parse_duration(text.trim()).ok().and_then(Seconds::new)
    }
}

// Seconds as a plain number: the form every reader of a handed-over config takes, and the one
// the config's version digest was always computed over.
impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.0.as_secs_f64())
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecondsVisitor;
        impl Visitor<'_> for SecondsVisitor {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration from 1ms to 24h, like 500ms, 5s or 2m (a plain number is seconds)")
            }
            fn visit_f64<E: de::Error>(self, seconds: f64) -> Result<Seconds, E> {
                Seconds::from_f64(seconds).ok_or_else(|| E::invalid_value(de::Unexpected::Float(seconds), &self))
            }
            fn visit_u64<E: de::Error>(self, seconds: u64) -> Result<Seconds, E> {
                Seconds::from_f64(seconds as f64)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(seconds), &self))
            }
            fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<Seconds, E> {
                Seconds::from_f64(seconds as f64)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Signed(seconds), &self))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Seconds, E> {
                Seconds::from_text(text).ok_or_else(|| E::invalid_value(de::Unexpected::Str(text), &self))
            }
        }
        deserializer.deserialize_any(SecondsVisitor)
    }
}

/// A size in bytes: `16MiB`, `512KiB`, `1GiB`, `2TiB`, `100B` (binary units, a space before the
/// unit allowed, a fraction too where the result is whole: `1.5KiB`), or a plain number of bytes,
/// as files written before units existed hold. Never zero.
///
/// Only the binary units: `MB` means 10^6 to some and 2^20 to others, so it is refused with a
/// message that names the units accepted rather than guessed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Bytes(u64);

impl Bytes {
    /// `n` bytes, if it is not zero.
    pub const fn new(n: u64) -> Option<Bytes> {
        if n == 0 { None } else { Some(Bytes(n)) }
    }

    /// The number of bytes.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The size in memory; the config's bounds keep it within `usize`.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }

    /// A size written with its unit, such as `16MiB` or `1.5 KiB`. A bare number in quotes is
    /// refused, as for durations.
    pub fn parse(text: &str) -> Option<Bytes> {
        let text = text.trim();
        let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, unit) = text.split_at(split);
        let shift = match unit.trim_start() {
            "B" => 0,
            "KiB" => 10,
            "MiB" => 20,
            "GiB" => 30,
            "TiB" => 40,
            _ => return None,
        };
        let bytes = match number.split_once('.') {
            None => number.parse::<u64>().ok()?.checked_mul(1 << shift)?,
            Some((whole, fraction)) => {
                // Exact for the sizes a config holds: a fraction of a unit must come out whole.
                let digits = format!("{whole}{fraction}").parse::<u128>().ok()?;
                let scale = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
                let scaled = digits.checked_mul(1 << shift)?;
                if scaled % scale != 0 {
                    return None;
                }
                u64::try_from(scaled / scale).ok()?
            }
        };
        Bytes::new(bytes)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl Visitor<'_> for BytesVisitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like 512KiB, 16MiB or 1GiB (units B, KiB, MiB, GiB, TiB), or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Bytes, E> {
                Bytes::new(n).ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(n), &self))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Bytes, E> {
                u64::try_from(n)
                    .ok()
                    .and_then(Bytes::new)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Signed(n), &self))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Bytes, E> {
                Bytes::parse(text).ok_or_else(|| E::invalid_value(de::Unexpected::Str(text), &self))
            }
        }
        deserializer.deserialize_any(BytesVisitor)
    }
}

/// A positive whole number, such as a count of bytes or of items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Positive(u64);

impl Positive {
    /// `n`, if it is not zero.
    pub const fn new(n: u64) -> Option<Positive> {
        if n == 0 { None } else { Some(Positive(n)) }
    }

    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The number as a size in memory; the config's bounds keep it within `usize`.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PositiveVisitor;
        impl Visitor<'_> for PositiveVisitor {
            type Value = Positive;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a positive whole number")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Positive, E> {
                Positive::new(n).ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(n), &self))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Positive, E> {
                u64::try_from(n)
                    .ok()
                    .and_then(Positive::new)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Signed(n), &self))
            }
        }
        deserializer.deserialize_any(PositiveVisitor)
    }
}

/// A directory (or a file), relative to the config file's own until [`Dir::resolve`] makes it
/// absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Dir(PathBuf);

impl Dir {
    /// `path` as a directory.
    pub fn new(path: impl Into<PathBuf>) -> Dir {
        Dir(path.into())
    }

    /// The directory, resolved against `base_dir` if it was relative.
    pub fn resolve(&self, base_dir: &Path) -> Dir {
        Dir(base_dir.join(&self.0))
    }
}

impl std::ops::Deref for Dir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Dir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Dir {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let path = String::deserialize(deserializer)?;
        if path.is_empty() {
            return Err(de::Error::invalid_value(de::Unexpected::Str(""), &"a directory path"));
        }
        Ok(Dir(PathBuf::from(path)))
    }
}

/// The coordinator's listening address: `IP:PORT`, or `localhost:PORT` as worker URLs allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub SocketAddr);

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Listen {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let localhost = || {
            let port = text.strip_prefix("localhost:")?.parse::<u16>().ok()?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        };
        match text.parse::<SocketAddr>().ok().or_else(localhost) {
            Some(addr) => Ok(Listen(addr)),
            None => Err(de::Error::invalid_value(de::Unexpected::Str(&text), &"an address like 127.0.0.1:5000")),
        }
    }
}

/// When a worker fsyncs its write-ahead log (see "Durability" in the README).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "one of always, everysec, never")]
pub enum FsyncPolicy {
    /// Fsync before every acknowledgement; concurrent requests share one fsync.
    Always,
    /// Write before the acknowledgement, fsync at least once a second: survives any process
    /// crash and loses at most about a second to a power cut.
    #[default]
    EverySec,
    /// Write before the acknowledgement and leave fsync to the OS.
    Never,
}

/// Which store keeps the tenants' id sets: the `store` key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "json or redis")]
pub enum StoreKind {
    /// Per-tenant JSON files under `database`.
    #[default]
    Json,
    /// One Redis set per tenant, at `redis_url`.
    Redis,
}

/// A Redis server's URL, `redis://HOST:PORT`, or `rediss://HOST:PORT` over TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL, as the redis crate takes it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it asks for TLS: `rediss://`.
    pub fn is_tls(&self) -> bool {
        self.0.starts_with("rediss://")
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let url = String::deserialize(deserializer)?;
        let rest = url.strip_prefix("redis://").or_else(|| url.strip_prefix("rediss://"));
        if rest.is_some_and(|rest| !rest.is_empty()) {
            Ok(RedisUrl(url))
        } else {
            Err(de::Error::invalid_value(
                de::Unexpected::Str(&url),
                &"a URL like redis://127.0.0.1:6379 (or rediss:// for TLS)",
            ))
        }
    }
}

/// How the processes write their logs: the `log_format` key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "text or json")]
pub enum LogFormat {
    /// One line a message, for a person reading the terminal or the file.
    #[default]
    Text,
    /// One JSON object a line, for a log shipper (Loki, Elasticsearch, journald's JSON export).
    Json,
}

impl LogFormat {
    /// Whether this is the default, left out of the config handed to workers so that the
    /// config's version is the same as before the key existed.
    pub fn is_text(&self) -> bool {
        *self == LogFormat::Text
    }
}
