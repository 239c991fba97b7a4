//! The mixed workload (`--mix`): among the batches, a share of counts, membership checks,
//! `POST /counts` and deletes, each answer checked against what the run had acknowledged before
//! the request was sent and what it had sent by the time the answer came, and the final set
//! check carried across deletes.
//!
//! What keeps the accounting exact is that the tool never lets a batch and a delete of the same
//! tenant overlap: each tenant has a gate, which batches and reads hold shared and a delete
//! holds alone, from before its request is made until its answer is in. Every batch is then
//! wholly before a delete of each of its tenants (its ids are gone once the delete is
//! acknowledged) or wholly after it (they count), never in between, and a read never races a
//! delete of what it reads. Without deletes in the mix there are no gates.
//!
//! A strong read must reach, per tenant, the distinct ids acknowledged since its last delete
//! (before any: its count before the load) by the time the request is sent: a lower bound only,
//! since batches of other connections are in flight while it runs. Every read, strong or
//! eventual (`--consistency`), may count no more than the tenant's count before the load and
//! every distinct id sent to it since, acknowledged or not, by the time the answer came (an upper
//! bound that deletes never lower, since an eventual read may be from before one), and a
//! membership check must never find an id that was never sent. An eventual read owes nothing
//! more: it may be from before any of the run's batches.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use countapp_shared::api::{Consistency, Contains, Count, Counts};
use hyper::{Method, StatusCode};
use rand::RngExt;
use rand::rngs::SmallRng;
use serde::Serialize;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::check::Ledger;
use crate::drive::Op;
use crate::http::{Connection, PostOp};
use crate::stats::Failure;
use crate::workload::{Deletes, Generator};

/// The kinds of request of the mixed workload, as the report names them, in [`Kind`] order.
pub const KINDS: &[&str] = &["batch", "strong", "contains", "counts", "delete"];

/// Tenants one `POST /counts` asks for unless `--counts-tenants` says otherwise.
pub const COUNTS_TENANTS: u32 = 16;

/// Ids one membership check asks about unless `--contains-ids` says otherwise.
pub const CONTAINS_IDS: u32 = 20;

/// Wrong answers described in the report; the figure counts them all.
const LISTED: usize = 10;

/// The pause before a final membership check asks again after a failure.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// Ids per connection and deleted tenant, on either side of its last delete, that the final
/// check asks about.
pub const AROUND_DELETE: u64 = 1000;

/// How the mixed workload asks its reads: with which consistency, and how big a `POST /counts`
/// and a membership check are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Reads {
    /// The `consistency` of every read of the mix: its counts, membership checks and `POST
    /// /counts` (the kinds "strong", "contains" and "counts", whichever it is).
    pub consistency: Consistency,
    /// Tenants one `POST /counts` asks for: consecutive ones from the request's position, as
    /// many as there are at most.
    pub counts_tenants: usize,
    /// Ids one membership check asks about: four in five (rounded down) picked among those the
    /// connection had acknowledged for the tenant, true owed to a strong check, and the rest ids
    /// it never sent, false owed to any check; all of them ids never sent while it has
    /// acknowledged none for the tenant.
    pub contains_ids: usize,
}

impl Default for Reads {
    fn default() -> Self {
        Reads {
            consistency: Consistency::Strong,
            counts_tenants: COUNTS_TENANTS as usize,
            contains_ids: CONTAINS_IDS as usize,
        }
    }
}

impl fmt::Display for Reads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} reads, POST /counts of {} tenants, contains of {} ids",
            self.name(),
            self.counts_tenants,
            self.contains_ids
        )
    }
}

impl Reads {
    /// The query of every read: `consistency=strong` or `consistency=eventual`.
    fn query(&self) -> &'static str {
        match self.consistency {
            Consistency::Strong => "consistency=strong",
            Consistency::Eventual => "consistency=eventual",
        }
    }

    /// The consistency as the report and the wrong answers name it.
    fn name(&self) -> &'static str {
        match self.consistency {
            Consistency::Strong => "strong",
            Consistency::Eventual => "eventual",
        }
    }

    /// Of the ids of a membership check, how many are picked among those acknowledged, and how
    /// many are ids never sent.
    fn probe(&self) -> (usize, usize) {
        let known = self.contains_ids * 4 / 5;
        (known, self.contains_ids - known)
    }
}

/// One kind of request of the mixed workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Batch,
    Strong,
    Contains,
    Counts,
    Delete,
}

/// The shares of the requests that are not batches, from `--mix`; the rest are batches. The
/// reads are strong unless [`Reads`] says otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Mix {
    /// `GET /items/<tenant>/count?consistency=strong`.
    pub strong: f64,
    /// `POST /items/<tenant>/contains?consistency=strong`.
    pub contains: f64,
    /// `POST /counts?consistency=strong`.
    pub counts: f64,
    /// `DELETE /items/<tenant>`.
    pub delete: f64,
}

impl FromStr for Mix {
    type Err = String;

    /// Parses `strong=0.05,contains=0.05,counts=0.02,delete=0.001`: any of the four, each once,
    /// shares from 0 to 1 that add up to 1 at most.
    fn from_str(text: &str) -> Result<Mix, String> {
        let mut mix = Mix::default();
        let mut named = Vec::new();
        for part in text.split(',').map(str::trim).filter(|part| !part.is_empty()) {
            let (name, share) = part.split_once('=').ok_or_else(|| format!("{part:?} is not NAME=SHARE"))?;
            let share = match share.trim().parse::<f64>() {
                Ok(share) if (0.0..=1.0).contains(&share) => share,
                _ => return Err(format!("the share of {name} must be a number from 0 to 1")),
            };
            let slot = match name.trim() {
                "strong" => &mut mix.strong,
                "contains" => &mut mix.contains,
                "counts" => &mut mix.counts,
                "delete" => &mut mix.delete,
                other => return Err(format!("unknown request {other:?}: strong, contains, counts or delete")),
            };
            if named.contains(&name) {
                return Err(format!("{name} is given twice"));
            }
            named.push(name);
            *slot = share;
        }
        if named.is_empty() {
            return Err("name at least one of strong, contains, counts, delete".into());
        }
        if mix.strong + mix.contains + mix.counts + mix.delete > 1.0 + 1e-9 {
            return Err("the shares add up to more than 1".into());
        }
        Ok(mix)
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.1}% batches, {:.1}% strong counts, {:.1}% contains, {:.1}% POST /counts, {:.2}% deletes",
            self.share("batch") * 100.0,
            self.strong * 100.0,
            self.contains * 100.0,
            self.counts * 100.0,
            self.delete * 100.0
        )
    }
}

impl Mix {
    /// The share of the requests of kind `name` (one of [`KINDS`]).
    pub fn share(&self, name: &str) -> f64 {
        match name {
            "strong" => self.strong,
            "contains" => self.contains,
            "counts" => self.counts,
            "delete" => self.delete,
            _ => 1.0 - self.strong - self.contains - self.counts - self.delete,
        }
    }

    /// The kind of request a uniform draw from 0 to 1 makes.
    fn pick(&self, draw: f64) -> Kind {
        let mut edge = 0.0;
        let shares = [
            (self.strong, Kind::Strong),
            (self.contains, Kind::Contains),
            (self.counts, Kind::Counts),
            (self.delete, Kind::Delete),
        ];
        for (share, kind) in shares {
            edge += share;
            if draw < edge {
                return kind;
            }
        }
        Kind::Batch
    }
}

/// What the connections of a mixed run share.
#[derive(Debug)]
pub struct Board {
    /// Per tenant, the distinct ids acknowledged since its last delete (before any, its count
    /// before the load): what a strong read of it sent now must reach.
    floors: Vec<AtomicU64>,
    /// Per tenant, its count before the load and the distinct ids sent to it since, acknowledged
    /// or not, deletes notwithstanding: what no read of it answered now may exceed.
    ceilings: Vec<AtomicU64>,
    /// The tenants' deletes, which the generators read too.
    deletes: Arc<Deletes>,
    /// With deletes in the mix, one gate per tenant (see the module's comment).
    gates: Option<Vec<Arc<RwLock<()>>>>,
    /// Wrong answers, and the first [`LISTED`] of them described.
    wrong: AtomicU64,
    described: Mutex<Vec<String>>,
}

impl Board {
    /// The board of a run over tenants whose counts before the load were `baselines`; with
    /// `gates` when the mix deletes.
    pub fn new(baselines: &[u64], gates: bool) -> Self {
        let tenants = baselines.len();
        Board {
            floors: baselines.iter().map(|&count| AtomicU64::new(count)).collect(),
            ceilings: baselines.iter().map(|&count| AtomicU64::new(count)).collect(),
            deletes: Arc::new(Deletes::new(tenants)),
            gates: gates.then(|| (0..tenants).map(|_| Arc::new(RwLock::new(()))).collect()),
            wrong: AtomicU64::new(0),
            described: Mutex::new(Vec::new()),
        }
    }

    /// The tenants' deletes.
    pub fn deletes(&self) -> &Arc<Deletes> {
        &self.deletes
    }

    fn floor(&self, tenant: usize) -> u64 {
        self.floors[tenant].load(Ordering::Relaxed)
    }

    fn ceiling(&self, tenant: usize) -> u64 {
        self.ceilings[tenant].load(Ordering::Relaxed)
    }

    fn wrong(&self, what: String) -> Failure {
        self.wrong.fetch_add(1, Ordering::Relaxed);
        let mut described = self.described.lock().expect("no thread panics holding it");
        if described.len() < LISTED {
            described.push(what);
        }
        Failure::Wrong
    }

    /// The wrong answers of the run: how many, and the first ones described.
    pub fn wrong_answers(&self) -> (u64, Vec<String>) {
        (self.wrong.load(Ordering::Relaxed), self.described.lock().expect("no thread panics holding it").clone())
    }
}

/// One connection of the mixed workload: a batch poster whose requests are, by the shares of
/// its [`Mix`], reads (as its [`Reads`] say) and deletes instead.
pub struct MixOp {
    post: PostOp,
    board: Arc<Board>,
    mix: Mix,
    reads: Reads,
    rng: SmallRng,
    kind: Kind,
    /// The tenants of the request prepared, ascending.
    tenants: Vec<usize>,
    /// For a read: per tenant asked, the floor its count must reach.
    floors: Vec<u64>,
    /// For a membership check: per id asked, the answer owed.
    owed: Vec<bool>,
    body: Bytes,
    /// The gates held for the request prepared, until its answer is in.
    shared: Vec<OwnedRwLockReadGuard<()>>,
    alone: Option<OwnedRwLockWriteGuard<()>>,
}

impl MixOp {
    /// Mixes `mix` into `post`'s batches, its reads asked as `reads` say; `post`'s generator
    /// must record the board's deletes.
    pub fn new(post: PostOp, board: Arc<Board>, mix: Mix, reads: Reads) -> Self {
        MixOp {
            post,
            board,
            mix,
            reads,
            rng: rand::make_rng(),
            kind: Kind::Batch,
            tenants: Vec::new(),
            floors: Vec::new(),
            owed: Vec::new(),
            body: Bytes::new(),
            shared: Vec::new(),
            alone: None,
        }
    }

    /// The stream of batches, which holds what the run sent.
    pub fn generator(&self) -> &Generator {
        self.post.generator()
    }

    /// Takes the gates of the request's tenants: shared, or alone for a delete. In ascending
    /// order, and a delete takes one only, so that no two connections wait on each other.
    async fn enter(&mut self) {
        let Some(gates) = &self.board.gates else { return };
        if self.kind == Kind::Delete {
            self.alone = Some(gates[self.tenants[0]].clone().write_owned().await);
        } else {
            for &t in &self.tenants {
                self.shared.push(gates[t].clone().read_owned().await);
            }
        }
    }

    async fn exchange(&mut self, method: Method, uri: hyper::Uri) -> Result<Bytes, Failure> {
        let connection: &mut Connection = self.post.connection();
        let request = connection.target().request(method, uri, std::mem::take(&mut self.body));
        match connection.exchange(request).await? {
            (StatusCode::OK, body) => Ok(body),
            (status, _) => Err(Failure::Status(status.as_u16())),
        }
    }

    /// Checks `count`, the answer for tenant `t`, named `name`, to a read described as `what`
    /// ("count of"): at least `floor` when strong, and, strong or eventual, at most what the
    /// tenant may hold now that the answer is in.
    fn check_count(&self, what: &str, (t, name): (usize, &str), floor: u64, count: u64) -> Result<(), Failure> {
        let consistency = self.reads.name();
        if self.reads.consistency == Consistency::Strong && count < floor {
            return Err(self.board.wrong(format!(
                "{consistency} {what} {name} was {count}, below the {floor} ids acknowledged before it"
            )));
        }
        let ceiling = self.board.ceiling(t);
        if count > ceiling {
            return Err(self.board.wrong(format!(
                "{consistency} {what} {name} was {count}, above the {ceiling} ids it held before the load or \
                 was sent since"
            )));
        }
        Ok(())
    }

    async fn send_unguarded(&mut self) -> Result<u64, Failure> {
        let target = self.post.connection().target().clone();
        match self.kind {
            Kind::Batch => {
                let items = self.post.send().await?;
                // Before the gates open: no delete of these tenants can come in between.
                for (t, fresh) in self.post.generator().last_batch_fresh() {
                    self.board.floors[t].fetch_add(fresh, Ordering::Relaxed);
                }
                Ok(items)
            }
            Kind::Strong => {
                let t = self.tenants[0];
                let uri = target.tenant_uri(t, &format!("/count?{}", self.reads.query()));
                let body = self.exchange(Method::GET, uri).await?;
                let count = serde_json::from_slice::<Count>(&body).map_err(|_| Failure::BadReply)?.count;
                self.check_count("count of", (t, target.name(t)), self.floors[0], count)?;
                Ok(0)
            }
            Kind::Contains => {
                let t = self.tenants[0];
                let uri = target.tenant_uri(t, &format!("/contains?{}", self.reads.query()));
                let body = self.exchange(Method::POST, uri).await?;
                let answers = serde_json::from_slice::<Contains>(&body).map_err(|_| Failure::BadReply)?.contains;
                if answers.len() != self.owed.len() {
                    return Err(Failure::BadReply);
                }
                // An eventual check may be from before the ids acknowledged: only those never
                // sent are owed.
                let strong = self.reads.consistency == Consistency::Strong;
                let missed =
                    self.owed.iter().zip(&answers).filter(|&(&owed, &answer)| strong && owed && !answer).count();
                let invented = self.owed.iter().zip(&answers).filter(|&(&owed, &answer)| !owed && answer).count();
                if missed + invented > 0 {
                    return Err(self.board.wrong(format!(
                        "{} contains of {}: {missed} ids acknowledged before it answered false, {invented} ids \
                         never sent answered true",
                        self.reads.name(),
                        target.name(t)
                    )));
                }
                Ok(0)
            }
            Kind::Counts => {
                let body = self.exchange(Method::POST, target.uri(&format!("/counts?{}", self.reads.query()))).await?;
                let counts = serde_json::from_slice::<Counts>(&body).map_err(|_| Failure::BadReply)?.counts;
                for (&t, &floor) in self.tenants.iter().zip(&self.floors) {
                    let count = *counts.get(target.name(t)).ok_or(Failure::BadReply)?;
                    self.check_count("POST /counts of", (t, target.name(t)), floor, count)?;
                }
                Ok(0)
            }
            Kind::Delete => {
                let t = self.tenants[0];
                let outcome = self.exchange(Method::DELETE, target.tenant_uri(t, "")).await;
                // Even a delete that failed may have removed the ids: none is owed any more.
                // Recorded before the gate opens, so that the next batch sees it.
                self.board.floors[t].store(0, Ordering::Relaxed);
                self.board.deletes.ended(t, outcome.is_ok());
                outcome.map(|_| 0)
            }
        }
    }
}

impl Op for MixOp {
    const KINDS: &'static [&'static str] = KINDS;

    async fn prepare(&mut self, start: u64, units: u64) -> anyhow::Result<()> {
        self.kind = self.mix.pick(self.rng.random());
        let tenants = self.post.connection().target().tenants();
        let first = (start % tenants as u64) as usize;
        let span = match self.kind {
            Kind::Batch => units as usize,
            Kind::Counts => self.reads.counts_tenants,
            Kind::Strong | Kind::Contains | Kind::Delete => 1,
        };
        self.tenants.clear();
        self.tenants.extend((0..span.min(tenants)).map(|i| (first + i) % tenants));
        self.tenants.sort_unstable();
        self.enter().await;
        // Read under the gates: no delete of these tenants moves them until the answer is in.
        self.floors.clear();
        self.floors.extend(self.tenants.iter().map(|&t| self.board.floor(t)));
        let mut body = BytesMut::new();
        match self.kind {
            Kind::Batch => {
                self.post.prepare(start, units).await?;
                // Before the batch is sent: from then on the server may count its ids.
                for (t, fresh) in self.post.generator().last_batch_fresh() {
                    self.board.ceilings[t].fetch_add(fresh, Ordering::Relaxed);
                }
                return Ok(());
            }
            Kind::Contains => {
                let (known, unknown) = self.reads.probe();
                let generator = self.post.generator_mut();
                // With no id acknowledged for the tenant yet, all of them are ids never sent, so
                // that every membership check asks about as many.
                let probe = match generator.probe(first, known, unknown) {
                    probe if probe.len() < self.reads.contains_ids => {
                        generator.probe(first, 0, self.reads.contains_ids)
                    }
                    probe => probe,
                };
                self.owed = probe.iter().map(|&(_, owed)| owed).collect();
                let ids: Vec<&str> =
                    probe.iter().map(|(id, _)| std::str::from_utf8(id).expect("ids are alphanumeric")).collect();
                serde_json::to_writer((&mut body).writer(), &ids).expect("strings serialize");
            }
            Kind::Counts => {
                let target = self.post.connection().target().clone();
                let names: Vec<&str> = self.tenants.iter().map(|&t| target.name(t)).collect();
                serde_json::to_writer((&mut body).writer(), &names).expect("strings serialize");
            }
            Kind::Strong | Kind::Delete => {}
        }
        self.body = body.freeze();
        Ok(())
    }

    async fn send(&mut self) -> Result<u64, Failure> {
        let outcome = self.send_unguarded().await;
        self.shared.clear();
        self.alone = None;
        outcome
    }

    fn kind(&self) -> usize {
        self.kind as usize
    }
}

/// Settles the ledger and the counts before the load of a run whose tenants were deleted: a
/// tenant's count before the load is gone once a delete of it was acknowledged, and may or may
/// not be after deletes that all failed; the ids acknowledged before its last delete were
/// taken out of its tally already, by the generators.
pub fn settle(baselines: &mut [u64], ledger: &mut Ledger, deletes: &Deletes) {
    for (t, (baseline, tally)) in baselines.iter_mut().zip(&mut ledger.tallies).enumerate() {
        let (deleted, gone) = deletes.history(t);
        if deleted {
            if !gone {
                tally.sent += *baseline;
            }
            *baseline = 0;
        }
    }
}

/// The final membership check of the deleted tenants: ids acknowledged before a tenant's last
/// acknowledged delete must be gone, and ids acknowledged since its last delete must be there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Membership {
    /// Tenants deleted at least once, whose ids around their last delete were asked about.
    pub tenants: usize,
    /// Ids asked about that must be gone, and those of them found.
    pub gone_asked: u64,
    pub gone_found: u64,
    /// Ids asked about that must be there, and those of them missing.
    pub kept_asked: u64,
    pub kept_missing: u64,
}

impl Membership {
    /// Adds the answers for ids that must be gone and for ids that must be there.
    pub fn add(&mut self, gone: &[bool], kept: &[bool]) {
        self.gone_asked += gone.len() as u64;
        self.gone_found += gone.iter().filter(|&&found| found).count() as u64;
        self.kept_asked += kept.len() as u64;
        self.kept_missing += kept.iter().filter(|&&found| !found).count() as u64;
    }

    /// True when every id was on the right side of its tenant's delete.
    pub fn passed(&self) -> bool {
        self.gone_found == 0 && self.kept_missing == 0
    }
}

/// What the mixed workload found beyond the set check, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct MixFindings {
    /// The shares asked for.
    pub shares: Mix,
    /// How the reads were asked.
    pub reads: Reads,
    /// Answers that broke the API's promise (a strong read below what was acknowledged before
    /// it, any read above what was sent, a membership check wrong either way), and the first
    /// ones described.
    pub wrong_answers: u64,
    pub wrong: Vec<String>,
    /// The final membership check of the deleted tenants, unless the check was skipped.
    pub membership: Option<Membership>,
}

impl MixFindings {
    /// True when no answer was wrong and every id was on the right side of its delete.
    pub fn passed(&self) -> bool {
        self.wrong_answers == 0 && self.membership.as_ref().is_none_or(Membership::passed)
    }
}

/// Asks the server, strongly, whether each of `ids` is in `tenant`, in requests of at most the
/// API's limit; a 503 (push-back) is retried after a pause, a few times.
pub async fn contains(connection: &mut Connection, tenant: usize, ids: &[Vec<u8>]) -> anyhow::Result<Vec<bool>> {
    const TRIES: u32 = 10;
    let target = connection.target().clone();
    let mut answers = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(countapp_shared::api::MAX_CONTAINS_IDS) {
        let list: Vec<&str> = chunk.iter().map(|id| std::str::from_utf8(id).expect("ids are alphanumeric")).collect();
        let body = Bytes::from(serde_json::to_vec(&list).expect("strings serialize"));
        let mut tries = 0;
        let reply = loop {
            let uri = target.tenant_uri(tenant, "/contains?consistency=strong");
            let request = target.request(Method::POST, uri, body.clone());
            let failure = match connection.exchange(request).await {
                Ok((StatusCode::OK, reply)) => break reply,
                Ok((status, _)) => Failure::Status(status.as_u16()),
                Err(failure) => failure,
            };
            tries += 1;
            anyhow::ensure!(tries < TRIES, "POST contains of {}: {failure}", target.name(tenant));
            tokio::time::sleep(RETRY_PAUSE).await;
        };
        let reply: Contains = serde_json::from_slice(&reply)?;
        anyhow::ensure!(reply.contains.len() == chunk.len(), "a contains answer of the wrong length");
        answers.extend(reply.contains);
    }
    Ok(answers)
}

/// Asks the server, after the run, about the ids this run's connections acknowledged around
/// each deleted tenant's last delete ([`AROUND_DELETE`] per connection on either side).
pub async fn check_membership(
    mut connection: Connection,
    ops: &mut [MixOp],
    deletes: &Deletes,
) -> anyhow::Result<Membership> {
    let mut membership = Membership::default();
    for tenant in (0..connection.target().tenants()).filter(|&t| deletes.history(t).0) {
        membership.tenants += 1;
        let (mut gone, mut kept) = (Vec::new(), Vec::new());
        for op in ops.iter_mut() {
            let (before, since) = op.post.generator_mut().around_last_delete(tenant, AROUND_DELETE);
            gone.extend(before);
            kept.extend(since);
        }
        let gone = contains(&mut connection, tenant, &gone).await?;
        let kept = contains(&mut connection, tenant, &kept).await?;
        membership.add(&gone, &kept);
    }
    Ok(membership)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Tally, Verdict};
    use crate::workload::Shape;

    #[test]
    fn shares_parse_and_pick_in_order() {
        let mix: Mix = "strong=0.05, contains=0.05,counts=0.02,delete=0.001".parse().unwrap();
        assert_eq!(mix, Mix { strong: 0.05, contains: 0.05, counts: 0.02, delete: 0.001 });
        assert_eq!(mix.pick(0.0), Kind::Strong);
        assert_eq!(mix.pick(0.07), Kind::Contains);
        assert_eq!(mix.pick(0.11), Kind::Counts);
        assert_eq!(mix.pick(0.1205), Kind::Delete);
        assert_eq!(mix.pick(0.122), Kind::Batch);
        assert_eq!("delete=1".parse::<Mix>().unwrap().pick(0.999), Kind::Delete);
        assert!((mix.share("batch") - 0.879).abs() < 1e-9);
        assert_eq!(mix.share("counts"), 0.02);
        for bad in ["", "strong", "strong=2", "reads=0.1", "strong=0.1,strong=0.2", "strong=0.6,counts=0.6"] {
            assert!(bad.parse::<Mix>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_membership_check_asks_four_in_five_known_ids() {
        let probe = |contains_ids| Reads { contains_ids, ..Reads::default() }.probe();
        assert_eq!((probe(20), probe(1000), probe(1), probe(7)), ((16, 4), (800, 200), (0, 1), (5, 2)));
        let eventual = Reads { consistency: Consistency::Eventual, ..Reads::default() };
        assert_eq!((eventual.query(), Reads::default().query()), ("consistency=eventual", "consistency=strong"));
    }

    /// One connection, one tenant, batches of 10 fresh ids: the ids of `acked` batches are
    /// acknowledged, and after the batches numbered in `deletes` comes a delete, acknowledged or
    /// not. Returns the ledger and the generator.
    fn run(
        repeat: f64,
        batches: u64,
        acked: impl Fn(u64) -> bool,
        deletes: &[(u64, bool)],
    ) -> (Ledger, Generator, Arc<Deletes>) {
        let shape = Shape::new(16, 1, 1, repeat);
        let record = Arc::new(Deletes::new(1));
        let mut generator = Generator::new(&shape, 0).with_deletes(record.clone());
        for b in 0..batches {
            generator.next_batch(b * 10, 10).unwrap();
            if acked(b) {
                generator.acknowledged();
            }
            for &(_, acknowledged) in deletes.iter().filter(|&&(after, _)| after == b) {
                record.ended(0, acknowledged);
            }
        }
        let mut ledger = Ledger { tallies: vec![Tally::default()], ..Ledger::default() };
        generator.add_to(&mut ledger, false);
        (ledger, generator, record)
    }

    #[test]
    fn a_delete_takes_the_ids_before_it_out_of_the_tally() {
        // 5 batches, a delete, 3 more: 30 ids owed, and no more may count.
        let (ledger, mut generator, deletes) = run(0.3, 8, |_| true, &[(4, true)]);
        // Repeats drew only on the ids of the tenant's current life, so each count is exact.
        assert_eq!(ledger.tallies[0].acked, ledger.tallies[0].sent);
        let owed = ledger.tallies[0].acked;
        assert!((21..=30).contains(&owed), "{owed}");
        let mut baselines = vec![7];
        let mut ledger = ledger;
        settle(&mut baselines, &mut ledger, &deletes);
        assert_eq!(baselines, [0], "the count before the load was deleted too");
        assert!(Verdict::judge(&baselines, &ledger, &[owed]).passed());
        // An id that had to be deleted still counts: the count is over.
        let over = Verdict::judge(&baselines, &ledger, &[owed + 1]);
        assert_eq!((over.unexpected, over.passed()), (1, false));
        // An id acknowledged after the delete is missing: the count is short.
        let short = Verdict::judge(&baselines, &ledger, &[owed - 1]);
        assert_eq!((short.lost, short.passed()), (1, false));
        // The final membership check names the ids on either side.
        let (gone, kept) = generator.around_last_delete(0, 1000);
        assert!(gone.len() >= 10 && gone.len() as u64 + owed <= 80, "{}", gone.len());
        assert_eq!(kept.len() as u64, owed);
        assert!(gone.iter().all(|id| !kept.contains(id)));
    }

    #[test]
    fn a_failed_delete_owes_nothing_from_before_yet_may_leave_it() {
        // Batch 1 failed; a delete after batch 2 failed too; then 2 batches acknowledged.
        let (mut ledger, mut generator, deletes) = run(0.3, 5, |b| b != 1, &[(2, false)]);
        let tally = ledger.tallies[0];
        let mut baselines = vec![4];
        settle(&mut baselines, &mut ledger, &deletes);
        assert_eq!(baselines, [0]);
        // Owed: the ids of batches 3 and 4 only; allowed: every id sent, and the 4 from before.
        assert_eq!(ledger.tallies[0], Tally { acked: tally.acked, sent: tally.sent + 4 });
        assert!(Verdict::judge(&baselines, &ledger, &[tally.acked]).passed());
        assert!(Verdict::judge(&baselines, &ledger, &[tally.sent + 4]).passed());
        assert!(!Verdict::judge(&baselines, &ledger, &[tally.sent + 5]).passed());
        assert!(!Verdict::judge(&baselines, &ledger, &[tally.acked - 1]).passed());
        // Nothing is gone for good, since no delete was acknowledged.
        let (gone, kept) = generator.around_last_delete(0, 1000);
        assert_eq!((gone.len(), kept.len() as u64), (0, tally.acked));
    }

    #[test]
    fn after_a_failed_delete_the_last_acknowledged_one_still_rules_what_is_gone() {
        // Deletes after batch 1 (acknowledged) and batch 3 (failed): batches 0-1 gone for good,
        // 2-3 may count or not, 4-5 must count.
        let (ledger, mut generator, _) = run(0.0, 6, |_| true, &[(1, true), (3, false)]);
        let (gone, kept) = generator.around_last_delete(0, 1000);
        assert_eq!((gone.len(), kept.len()), (20, 20));
        assert_eq!(ledger.tallies[0], Tally { acked: 20, sent: 40 });
    }

    #[test]
    fn membership_fails_on_a_deleted_id_found_or_a_kept_id_missing() {
        let mut membership = Membership::default();
        membership.add(&[false, false], &[true, true, true]);
        assert!(membership.passed());
        let mut found = membership.clone();
        found.add(&[true], &[]);
        assert_eq!((found.gone_found, found.passed()), (1, false));
        let mut missing = membership;
        missing.add(&[], &[false]);
        assert_eq!((missing.kept_missing, missing.passed()), (1, false));
    }

    #[test]
    fn probes_owe_true_for_ids_acknowledged_in_the_current_life_only() {
        let (_, mut generator, deletes) = run(0.3, 3, |_| true, &[]);
        let before: Vec<Vec<u8>> = generator.probe(0, 50, 0).into_iter().map(|(id, _)| id).collect();
        assert_eq!(before.len(), 50);
        deletes.ended(0, true);
        // Right after the delete, nothing is owed: only ids never sent, owed false.
        let probe = generator.probe(0, 5, 3);
        assert_eq!(probe.len(), 3);
        assert!(probe.iter().all(|(id, owed)| !owed && !before.contains(id)));
        generator.next_batch(30, 10).unwrap();
        generator.acknowledged();
        let probe = generator.probe(0, 5, 3);
        assert_eq!(probe.iter().filter(|(_, owed)| *owed).count(), 5);
        assert!(probe.iter().all(|(id, _)| !before.contains(id)));
    }
}
