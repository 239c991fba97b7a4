//! The system tests' own load, with exact accounting of every batch: which ones the server
//! acknowledged, and, through marker tenants, which ones it applied, acknowledged or not.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::Client;

use crate::client::{batch, try_count};

/// Load on a server: client threads posting batches of fresh ids (never in another batch) over
/// a few tenants, until stopped (or, bounded, after `MAX_BATCHES` each), recording which batches
/// were acknowledged.
///
/// Each batch also carries marker ids, so that [`Tally::check_counted`] can read back whether
/// the server applied it, acknowledged or not: batch `seq` of client `c` puts 2^(`seq` %
/// [`Load::GROUP`]) ids of its own in the marker tenant `<prefix>~batches-<c>-<seq / GROUP>`.
/// Batches are all-or-nothing, so that tenant's count is the sum of the powers of two of its
/// group's batches that were applied: a bitmask naming each of them, at one marker tenant per
/// [`Load::GROUP`] batches (each a tenant the server stores, and the check reads, on its own).
pub struct Load {
    /// The data tenants, `<prefix>-0..3`.
    pub tenants: Vec<String>,
    prefix: String,
    stop: Arc<AtomicBool>,
    clients: Vec<thread::JoinHandle<Tally>>,
}

/// One batch a load sent: which client sent it, its sequence number there, and whether the
/// server acknowledged it (200).
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// The client thread, from 0.
    pub client: usize,
    /// The batch's number among that client's, from 0.
    pub seq: usize,
    /// Whether the server answered 200.
    pub acked: bool,
}

impl Sent {
    /// The batch's group of [`Load::GROUP`], whose marker tenant it shares.
    fn group(&self) -> (usize, usize) {
        (self.client, self.seq / Load::GROUP)
    }

    /// The batch's bit in its group's marker count.
    fn bit(&self) -> u64 {
        1 << (self.seq % Load::GROUP)
    }
}

/// What a load did: every batch it sent, and every failed request, as text.
#[derive(Debug, Default)]
pub struct Tally {
    /// The data tenants, `<prefix>-0..3`; each batch has [`Load::PER_TENANT`] ids in each.
    pub tenants: Vec<String>,
    prefix: String,
    /// Every batch sent, acknowledged or not.
    pub batches: Vec<Sent>,
    /// Every failed request, as text.
    pub errors: Vec<String>,
    /// Every 503 with Retry-After the server answered, including those of batches acknowledged
    /// when sent again: how much it pushed back.
    pub pushbacks: usize,
}

/// How the clients of a [`Load`] post.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Stop at the first failed request (the server went away).
    stop_on_error: bool,
    /// The pause before each batch.
    pause: Duration,
    /// How long a client waits for a reply.
    timeout: Duration,
    /// Each batch also puts an id in a tenant of its own, so that the merges make a tenant
    /// file for every batch, as `countapp-load --exact` has them do.
    tenant_per_batch: bool,
}

/// Times a client of a [`Load`] sends a batch a server pushed back (503 with Retry-After).
const PUSHBACK_RETRIES: usize = 10;

/// Threads that read counts at once while checking: a few hundred markers in well under a
/// second.
const READERS: usize = 8;

impl Load {
    /// Data items per batch; a multiple of the tenant count.
    pub const BATCH: usize = 150;
    /// Data tenants.
    pub const TENANTS: usize = 3;
    /// Ids per data tenant in each batch.
    pub const PER_TENANT: u64 = (Load::BATCH / Load::TENANTS) as u64;
    /// Batches of a client that share a marker tenant: 8 adds 32 marker ids to a batch on
    /// average, and makes 8 times fewer tenants than a marker tenant per batch.
    pub const GROUP: usize = 8;
    /// Batches per client at most, so that a load nobody stops still ends.
    pub const MAX_BATCHES: usize = 20_000;

    /// Starts `clients` threads posting to `url` over the tenants `<prefix>-0..3`. With
    /// `stop_on_error`, a client stops at its first failed request (the server went away);
    /// otherwise it records the failure and goes on.
    pub fn start(url: &str, clients: usize, prefix: &str, stop_on_error: bool) -> Load {
        Load::spawn(
            url,
            clients,
            prefix,
            Pace { stop_on_error, pause: Duration::ZERO, timeout: Duration::from_secs(10), tenant_per_batch: false },
        )
    }

    /// [`Load::start`], going on through failures, with a new tenant in every batch besides
    /// the data tenants: the load under which merging works hardest.
    pub fn start_tenant_per_batch(url: &str, clients: usize, prefix: &str) -> Load {
        let pace = Pace {
            stop_on_error: false,
            pause: Duration::ZERO,
            timeout: Duration::from_secs(10),
            tenant_per_batch: true,
        };
        Load::spawn(url, clients, prefix, pace)
    }

    /// Starts `clients` threads that go on through failures, each posting a batch every `pause`
    /// or so and waiting up to `timeout` for each reply: a load that outlasts network cuts.
    pub fn start_paced(url: &str, clients: usize, prefix: &str, pause: Duration, timeout: Duration) -> Load {
        Load::spawn(url, clients, prefix, Pace { stop_on_error: false, pause, timeout, tenant_per_batch: false })
    }

    fn spawn(url: &str, clients: usize, prefix: &str, pace: Pace) -> Load {
        let tenants: Vec<String> = (0..Load::TENANTS).map(|t| format!("{prefix}-{t}")).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|c| {
                let (url, prefix, stop) = (url.to_owned(), prefix.to_owned(), stop.clone());
                thread::spawn(move || Load::client(&url, c, &prefix, &stop, pace))
            })
            .collect();
        Load { tenants, prefix: prefix.to_owned(), stop, clients }
    }

    fn client(url: &str, c: usize, prefix: &str, stop: &AtomicBool, pace: Pace) -> Tally {
        let client = Client::builder().timeout(pace.timeout).build().unwrap();
        let mut tally = Tally::default();
        for seq in 0..Load::MAX_BATCHES {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            thread::sleep(pace.pause);
            let sent = Sent { client: c, seq, acked: false };
            let mut items: Vec<(String, String)> = (0..Load::BATCH)
                .map(|i| (format!("{prefix}-{}", i % Load::TENANTS), format!("c{c}-b{seq}-i{i}")))
                .collect();
            let marker = marker(prefix, sent.group());
            items.extend((0..sent.bit()).map(|k| (marker.clone(), format!("b{seq}-{k}"))));
            if pace.tenant_per_batch {
                items.push((format!("{prefix}~tenant-{c}-{seq}"), "1".to_owned()));
            }
            let items: Vec<(&str, &str)> = items.iter().map(|(t, id)| (t.as_str(), id.as_str())).collect();
            let body = batch(&items);
            let failure = post_retrying(&client, url, &body, &mut tally.pushbacks).err();
            tally.batches.push(Sent { acked: failure.is_none(), ..sent });
            if let Some(failure) = failure {
                tally.errors.push(failure);
                if pace.stop_on_error {
                    break;
                }
            }
        }
        tally
    }

    /// Stops the clients and gathers what they did.
    pub fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally { tenants: self.tenants, prefix: self.prefix, ..Tally::default() };
        for client in self.clients {
            let tally = client.join().unwrap();
            total.batches.extend(tally.batches);
            total.errors.extend(tally.errors);
            total.pushbacks += tally.pushbacks;
        }
        total
    }
}

/// `POST {url}/items` with `body`, as any well-behaved client does it: a server pushing back
/// under load (503 with Retry-After) is asked again when it says, up to a few times (the
/// refused batch was stored nowhere, and sending it again is idempotent anyway). `Err` is why
/// it was not acknowledged: a batch still pushed back after those tries starts with
/// [`PUSHED_BACK`]. Each push-back adds one to `pushbacks`.
fn post_retrying(client: &Client, url: &str, body: &str, pushbacks: &mut usize) -> Result<(), String> {
    let mut failure = String::new();
    for _ in 0..PUSHBACK_RETRIES {
        let reply =
            client.post(format!("{url}/items")).header("content-type", "application/json").body(body.to_owned()).send();
        match reply {
            Ok(r) if r.status() == StatusCode::OK => return Ok(()),
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE && r.headers().contains_key("retry-after") => {
                *pushbacks += 1;
                let after = r.headers()["retry-after"].to_str().ok().and_then(|v| v.parse().ok()).unwrap_or(1);
                failure = format!("{}: {}", r.status(), r.text().unwrap_or_default());
                thread::sleep(Duration::from_secs(after).min(Duration::from_secs(1)));
            }
            Ok(r) => return Err(format!("{}: {}", r.status(), r.text().unwrap_or_default())),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("{PUSHED_BACK} {PUSHBACK_RETRIES} times, last: {failure}"))
}

/// How the failure of a batch that the server kept pushing back begins.
pub const PUSHED_BACK: &str = "pushed back";

/// The marker tenant of a group of batches, (client, group): `~` keeps it apart from the data
/// tenants.
fn marker(prefix: &str, (client, group): (usize, usize)) -> String {
    format!("{prefix}~batches-{client}-{group}")
}

/// How a load's batches fared, once accounted for: every acknowledged one was applied, and of
/// the unacknowledged ones (whose reply never came), `applied` were applied anyway.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Accounting {
    /// Acknowledged batches, each counted.
    pub acked: usize,
    /// Unacknowledged batches.
    pub unacked: usize,
    /// Unacknowledged batches that were applied all the same.
    pub applied: usize,
}

impl std::fmt::Display for Accounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Accounting { acked, unacked, applied } = self;
        write!(f, "{acked} acknowledged batches all counted; of {unacked} unacknowledged, {applied} applied")
    }
}

/// The batches that share a marker tenant: the group, and the indexes of its batches in
/// [`Tally::batches`].
struct Group {
    id: (usize, usize),
    batches: Vec<usize>,
}

impl Tally {
    /// The batches the server acknowledged.
    pub fn acked_batches(&self) -> usize {
        self.batches.iter().filter(|b| b.acked).count()
    }

    /// Accounts for every batch exactly at `url`, polling for at most `within` until it holds:
    /// every acknowledged batch is applied by its marker (else that batch was LOST, and is
    /// named), and each data tenant counts exactly the ids of the batches applied, acknowledged
    /// or not (else items were lost or invented there). A count that is not answered (such as a
    /// 503 while a store is down) is read again on the next poll.
    pub fn check_counted(&self, client: &Client, url: &str, within: Duration) -> Accounting {
        let mut groups: Vec<Group> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for (b, sent) in self.batches.iter().enumerate() {
            let g = *index.entry(sent.group()).or_insert_with(|| {
                groups.push(Group { id: sent.group(), batches: Vec::new() });
                groups.len() - 1
            });
            groups[g].batches.push(b);
        }
        let markers: Vec<String> = groups.iter().map(|group| marker(&self.prefix, group.id)).collect();
        let deadline = Instant::now() + within;
        // The markers are read once the data tenants hold at least the acknowledged ids, rather
        // than on every poll while the server is still merging.
        let acked = self.acked_batches() as u64 * Load::PER_TENANT;
        while Instant::now() < deadline {
            let counts = try_counts(client, url, self.tenants.iter().map(String::as_str));
            if counts.iter().all(|n| n.is_some_and(|n| n >= acked)) {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let mut marks: Vec<Option<u64>> = vec![None; groups.len()];
        // A group of acknowledged batches seen all applied stays so: only the others are read
        // again.
        let mut settled = vec![false; groups.len()];
        loop {
            let unsettled: Vec<usize> = (0..groups.len()).filter(|&g| !settled[g]).collect();
            let read = try_counts(client, url, unsettled.iter().map(|&g| markers[g].as_str()));
            for (&g, count) in unsettled.iter().zip(read) {
                marks[g] = count;
                let batches = groups[g].batches.iter().map(|&b| self.batches[b]);
                settled[g] = batches.clone().all(|b| b.acked) && count == Some(batches.map(|b| b.bit()).sum());
            }
            let counts = try_counts(client, url, self.tenants.iter().map(String::as_str));
            let fates = self.fates(&groups, &marks, &counts);
            if fates.exact() {
                return fates.accounting;
            }
            assert!(Instant::now() < deadline, "{url}: the load is not accounted for within {within:?}:\n{fates}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Judges one reading of the markers and data tenants.
    fn fates<'t>(&'t self, groups: &[Group], marks: &[Option<u64>], counts: &[Option<u64>]) -> Fates<'t> {
        let mut fates = Fates {
            tally: self,
            accounting: Accounting::default(),
            lost: Vec::new(),
            invented: Vec::new(),
            unread: 0,
            tenants: Vec::new(),
        };
        for (group, &mark) in groups.iter().zip(marks) {
            let Some(mark) = mark else {
                fates.unread += group.batches.len();
                continue;
            };
            let sent: u64 = group.batches.iter().map(|&b| self.batches[b].bit()).sum();
            if mark & !sent != 0 {
                fates.invented.push((marker(&self.prefix, group.id), mark));
            }
            for sent in group.batches.iter().map(|&b| self.batches[b]) {
                match (sent.acked, mark & sent.bit() != 0) {
                    (true, true) => fates.accounting.acked += 1,
                    (true, false) => fates.lost.push(sent),
                    (false, true) => fates.accounting.applied += 1,
                    (false, false) => {}
                }
            }
        }
        fates.accounting.unacked = self.batches.len() - self.acked_batches();
        let applied = (self.acked_batches() + fates.accounting.applied) as u64;
        fates.tenants =
            self.tenants.iter().zip(counts).map(|(t, &n)| (t.as_str(), n, applied * Load::PER_TENANT)).collect();
        fates
    }
}

/// One reading of a load's fate: what is off, if anything.
#[derive(Debug)]
struct Fates<'t> {
    tally: &'t Tally,
    accounting: Accounting,
    /// Acknowledged batches that their marker says were not applied.
    lost: Vec<Sent>,
    /// Marker tenants, with their count, that count ids of batches never sent.
    invented: Vec<(String, u64)>,
    /// Batches whose marker's count was not answered.
    unread: usize,
    /// Per data tenant: its name, its count if answered, and the ids of the batches applied.
    tenants: Vec<(&'t str, Option<u64>, u64)>,
}

impl Fates<'_> {
    fn exact(&self) -> bool {
        let tenants_exact = self.tenants.iter().all(|&(_, n, expected)| n == Some(expected));
        self.lost.is_empty() && self.invented.is_empty() && self.unread == 0 && tenants_exact
    }
}

impl std::fmt::Display for Fates<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        /// Batches named in full; the rest are only counted.
        const NAMED: usize = 20;
        let Accounting { acked, unacked, applied } = self.accounting;
        writeln!(
            f,
            "{} batches sent: {acked} acknowledged and applied; of {unacked} unacknowledged, {applied} applied",
            self.tally.batches.len()
        )?;
        if !self.lost.is_empty() {
            let named: Vec<String> =
                self.lost.iter().take(NAMED).map(|b| format!("client {} batch {}", b.client, b.seq)).collect();
            let more = self.lost.len().saturating_sub(NAMED);
            let more = if more > 0 { format!(" and {more} more") } else { String::new() };
            let tenants = self.tally.tenants.join(", ");
            writeln!(
                f,
                "LOST {} acknowledged batches, each {} ids in each of {tenants}: {}{more}",
                self.lost.len(),
                Load::PER_TENANT,
                named.join(", ")
            )?;
        }
        for (marker, count) in &self.invented {
            writeln!(f, "INVENTED: marker {marker} counts {count}, ids of batches never sent")?;
        }
        if self.unread > 0 {
            writeln!(f, "{} batches' markers not answered", self.unread)?;
        }
        for &(tenant, n, expected) in &self.tenants {
            let off = match n {
                None => "no count answered".to_owned(),
                Some(n) if n < expected => format!("counts {n}: {} LOST", expected - n),
                Some(n) if n > expected => format!("counts {n}: {} INVENTED", n - expected),
                Some(n) => format!("counts {n}"),
            };
            writeln!(f, "{tenant}: the batches applied hold {expected} ids; {off}")?;
        }
        Ok(())
    }
}

/// The counts of `tenants` at `url`, read by a few threads at once, in order; `None` where no
/// count was answered.
fn try_counts<'a>(client: &Client, url: &str, tenants: impl Iterator<Item = &'a str>) -> Vec<Option<u64>> {
    let tenants: Vec<&str> = tenants.collect();
    let next = AtomicUsize::new(0);
    let mut counts = vec![None; tenants.len()];
    thread::scope(|scope| {
        let readers: Vec<_> = (0..READERS.min(tenants.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut read = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(tenant) = tenants.get(i) else { return read };
                        read.push((i, try_count(client, url, tenant)));
                    }
                })
            })
            .collect();
        for reader in readers {
            for (i, count) in reader.join().unwrap() {
                counts[i] = count;
            }
        }
    });
    counts
}
