//! Whether the process holding a worker's port is a worker this coordinator, or the one before
//! it, started: only such a process is adopted, and so only such a process is ever signalled.
//!
//! Nothing the process says about itself is taken on trust. Three things must hold:
//! - the kernel names one process holding a listening socket that takes the port's connections:
//!   the socket's inode from `/proc/net/tcp` and `/proc/net/tcp6`, and its holder from the
//!   `socket:[inode]` links in `/proc/<pid>/fd` (a process of another user, whose links this
//!   coordinator cannot read, is never found, and so never adopted);
//! - that process runs the `worker` binary the coordinator spawns;
//! - it holds the coordinator's token ([`crate::token_file`]): asked `GET /identity` with a
//!   fresh challenge, it answers a proof bound to the challenge, its port and the pid the kernel
//!   named (see [`countapp_shared::token`]).

use std::collections::HashSet;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use countapp_shared::token::{self, IDENTITY_ROUTE, Identity};

use crate::control;
use crate::pool::Member;
use crate::supervisor::{CHECK_TIMEOUT, Context};

/// What holds a worker's port.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    /// No listening socket takes its connections.
    Nobody,
    /// A worker this coordinator or its predecessor started: the pid the kernel names.
    Ours(u32),
    /// Anything else, and why it is not taken for one of ours.
    Other(String),
}

/// What holds the port of the local worker `member`.
pub(crate) async fn holder(ctx: &Context, member: &Member) -> Holder {
    let Some(addr) = member.url.bind_addr() else { return Holder::Nobody };
    let worker_bin = ctx.worker_bin.clone();
    let found = tokio::task::spawn_blocking(move || listening_process(addr, &worker_bin)).await;
    let pid = match found {
        Ok(Ok(Some(pid))) => pid,
        Ok(Ok(None)) => return Holder::Nobody,
        Ok(Err(why)) => return Holder::Other(why),
        Err(e) => return Holder::Other(format!("cannot look for it: {e}")),
    };
    match proves_token(ctx, member, pid).await {
        Ok(()) => Holder::Ours(pid),
        Err(why) => Holder::Other(format!("pid {pid}, the worker binary, {why}")),
    }
}

/// The one process holding a listening socket that takes connections to `addr`, if it runs
/// `worker_bin`; `None` if no socket listens there.
fn listening_process(addr: SocketAddr, worker_bin: &Path) -> Result<Option<u32>, String> {
    let inodes = listening_inodes(addr);
    if inodes.is_empty() {
        return Ok(None);
    }
    let holders = holders(&inodes);
    let pid = match holders.as_slice() {
        [] => return Err("a process this coordinator cannot see into (another user's)".to_owned()),
        [pid] => *pid,
        pids => return Err(format!("{} processes ({pids:?})", pids.len())),
    };
    let exe =
        fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| format!("pid {pid}, whose binary is unknown: {e}"))?;
    // A binary rebuilt since the worker started shows as "<path> (deleted)".
    let exe_text = exe.to_string_lossy();
    let exe_path = Path::new(exe_text.strip_suffix(" (deleted)").unwrap_or(&exe_text));
    let ours = fs::canonicalize(worker_bin).is_ok_and(|bin| bin == exe_path);
    if !ours {
        return Err(format!("pid {pid}, running {}", exe.display()));
    }
    Ok(Some(pid))
}

/// Asks the process on `member`'s port to prove that it holds the coordinator's token, as the
/// process `pid`.
async fn proves_token(ctx: &Context, member: &Member, pid: u32) -> Result<(), String> {
    let challenge = token::fresh();
    let reply = ctx
        .http
        .get(format!("{}{IDENTITY_ROUTE}?challenge={challenge}", member.url))
        .timeout(CHECK_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("does not answer: {e}"))?;
    if !reply.status().is_success() {
        return Err(format!("does not hold this coordinator's token ({})", reply.status()));
    }
    let identity: Identity = control::json(reply).await.map_err(|e| format!("answers no proof: {e}"))?;
    if !token::is_proof(&identity.proof, &ctx.token, &challenge, member.url.port(), pid) {
        return Err("does not hold this coordinator's token (a wrong proof)".to_owned());
    }
    Ok(())
}

/// The inodes of the listening TCP sockets that take connections to `addr`: bound to its
/// address or to every address, on its port.
fn listening_inodes(addr: SocketAddr) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else { continue };
        inodes.extend(text.lines().skip(1).filter_map(|line| {
            let socket = parse_socket(line)?;
            (socket.listening && socket.local.port() == addr.port() && covers(socket.local.ip(), addr.ip()))
                .then_some(socket.inode)
        }));
    }
    inodes
}

/// Whether a socket bound to `bound` takes connections to `ip`.
fn covers(bound: IpAddr, ip: IpAddr) -> bool {
    let bound = match bound {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(bound, IpAddr::V4),
        v4 => v4,
    };
    bound == ip || bound.is_unspecified()
}

/// The processes holding any of `inodes`, from their `/proc/<pid>/fd` links.
fn holders(inodes: &HashSet<u64>) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(processes) = fs::read_dir("/proc") else { return pids };
    for process in processes.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let Ok(fds) = fs::read_dir(process.path().join("fd")) else { continue };
        let holds = fds.flatten().any(|fd| {
            let link = fs::read_link(fd.path()).unwrap_or_default();
            let inode = link.to_str().and_then(|l| l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok());
            inode.is_some_and(|inode| inodes.contains(&inode))
        });
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// One socket of `/proc/net/tcp{,6}`.
struct Socket {
    local: SocketAddr,
    listening: bool,
    inode: u64,
}

/// A line of `/proc/net/tcp` or `/proc/net/tcp6`: `sl local_address rem_address st ... inode`,
/// the address as hex words in the kernel's byte order, `ip:port`.
fn parse_socket(line: &str) -> Option<Socket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (ip, port) = fields.get(1)?.split_once(':')?;
    let words: Vec<[u8; 4]> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::to_ne_bytes))
        .collect::<Option<_>>()?;
    let ip = match words.as_slice() {
        [word] => IpAddr::V4(Ipv4Addr::from(*word)),
        [a, b, c, d] => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from([*a, *b, *c, *d].concat()).ok()?)),
        _ => return None,
    };
    let port = u16::from_str_radix(port, 16).ok()?;
    // State 0A is TCP_LISTEN.
    let listening = *fields.get(3)? == "0A";
    let inode = fields.get(9)?.parse().ok()?;
    Some(Socket { local: SocketAddr::new(ip, port), listening, inode })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn lines_of_the_kernels_tables_read_back_as_addresses() {
        let v4 = "   0: 0100007F:1389 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1";
        let socket = parse_socket(v4).unwrap();
        assert_eq!((socket.local, socket.listening, socket.inode), ("127.0.0.1:5001".parse().unwrap(), true, 4242));
        let v6 = "   1: 00000000000000000000000001000000:1389 00000000000000000000000000000000:0000 01 \
                  00000000:00000000 00:00000000 00000000     0        0 7 1";
        let socket = parse_socket(v6).unwrap();
        assert_eq!((socket.local, socket.listening), ("[::1]:5001".parse().unwrap(), false));
        assert!(parse_socket("  sl  local_address rem_address   st tx_queue").is_none());
    }

    #[test]
    fn a_socket_on_every_address_takes_connections_to_each() {
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert!(covers(local, local));
        assert!(covers(IpAddr::V4(Ipv4Addr::UNSPECIFIED), local));
        assert!(covers(IpAddr::V6(Ipv6Addr::UNSPECIFIED), local));
        assert!(covers(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), local));
        assert!(!covers(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), local));
        assert!(!covers(IpAddr::V6(Ipv6Addr::LOCALHOST), local));
    }

    #[test]
    fn the_holder_of_a_listening_socket_is_found_and_is_no_worker_unless_it_runs_the_worker_binary() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inodes = listening_inodes(addr);
        assert_eq!(inodes.len(), 1);
        assert_eq!(holders(&inodes), [std::process::id()]);
        let this_binary = std::env::current_exe().unwrap();
        assert_eq!(listening_process(addr, &this_binary), Ok(Some(std::process::id())));
        let other = listening_process(addr, Path::new("/bin/sh")).unwrap_err();
        assert!(other.contains(&this_binary.display().to_string()), "{other}");
        drop(listener);
        assert_eq!(listening_process(addr, &this_binary), Ok(None));
    }
}
