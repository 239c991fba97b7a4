//! Hosts of their own for the multi-host system test: Linux network namespaces on this machine,
//! each with its own address on a private /24, plugged into one bridge (the switch, in a
//! namespace of its own). The test's namespace is plugged in too, so that the test reaches every
//! host at its address, and no host reaches anything else. A host's link can be cut (its end of
//! the cable down: the switch loses it, as if unplugged) and healed.
//!
//! Names carry this process's id, so that concurrent runs keep apart; everything is deleted when
//! the [`Network`] is dropped, even after a failed test. Creating namespaces needs root (or
//! `CAP_SYS_ADMIN`): where that fails, [`Network::new`] says why, for the test to skip.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A switch with hosts plugged in, and the test's own namespace on it as `<subnet>.254`.
pub struct Network {
    /// Prefix of every name here: namespaces and links.
    prefix: String,
    /// The first three octets of the subnet, like `10.213.7`.
    subnet: String,
    /// The switch's namespace.
    switch: String,
    /// The namespaces created, the switch first.
    namespaces: Vec<String>,
    /// The test namespace's end of its link to the switch, once made.
    root_link: Option<String>,
}

/// A host: a namespace with one link to the switch.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace's name.
    pub netns: String,
    /// Its address on the network.
    pub addr: String,
    /// Its end of the link to the switch.
    link: String,
}

impl Host {
    /// The command that runs `program` on this host: `ip netns exec <netns> <program>`, which
    /// execs the program, so the child's pid is the program's own.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns]).arg(program);
        command
    }
}

/// Runs `ip args...`; its error output if it failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Runs `ip args...`, failing the test if it fails.
fn ip_ok(args: &[&str]) {
    ip(args).unwrap_or_else(|e| panic!("{e}"));
}

impl Network {
    /// An empty switch, with the test's namespace plugged in; `Err` with the reason if network
    /// namespaces cannot be created here.
    pub fn new() -> Result<Network, String> {
        static NETWORKS: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        // At most 15 bytes for a link name: "ca" + pid (7 digits at most) + n + host + "s".
        let prefix = format!("ca{pid}{}", NETWORKS.fetch_add(1, Ordering::Relaxed));
        let switch = format!("{prefix}-switch");
        // Leftovers of an earlier run that had this pid and died before cleaning up.
        let _ = ip(&["netns", "del", &switch]);
        ip(&["netns", "add", &switch])?;
        let mut network = Network {
            prefix: prefix.clone(),
            subnet: free_subnet(pid),
            switch: switch.clone(),
            namespaces: vec![switch.clone()],
            root_link: None,
        };
        ip_ok(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &switch, "link", "set", "br0", "up"]);
        let (root, port) = (format!("{prefix}r"), format!("{prefix}rs"));
        let _ = ip(&["link", "del", &root]);
        ip_ok(&["link", "add", &root, "type", "veth", "peer", "name", &port, "netns", &switch]);
        network.root_link = Some(root.clone());
        ip_ok(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
        ip_ok(&["addr", "add", &format!("{}.254/24", network.subnet), "dev", &root]);
        ip_ok(&["link", "set", &root, "up"]);
        Ok(network)
    }

    /// A new host named `name` (one lowercase letter) at `<subnet>.<number>`, plugged in.
    pub fn host(&mut self, name: char, number: u8) -> Host {
        assert!(name.is_ascii_lowercase() && (1..=253).contains(&number), "host {name} at .{number}");
        let netns = format!("{}-{name}", self.prefix);
        let (link, port) = (format!("{}{name}", self.prefix), format!("{}{name}s", self.prefix));
        let _ = ip(&["netns", "del", &netns]);
        ip_ok(&["netns", "add", &netns]);
        self.namespaces.push(netns.clone());
        ip_ok(&["-n", &netns, "link", "set", "lo", "up"]);
        ip_ok(&["link", "add", &link, "netns", &netns, "type", "veth", "peer", "name", &port, "netns", &self.switch]);
        ip_ok(&["-n", &self.switch, "link", "set", &port, "master", "br0", "up"]);
        let addr = format!("{}.{number}", self.subnet);
        ip_ok(&["-n", &netns, "addr", "add", &format!("{addr}/24"), "dev", &link]);
        ip_ok(&["-n", &netns, "link", "set", &link, "up"]);
        Host { netns, addr, link }
    }

    /// Cuts `host` off: its end of the link goes down, and nothing reaches it or leaves it.
    pub fn cut(&self, host: &Host) {
        ip_ok(&["-n", &host.netns, "link", "set", &host.link, "down"]);
    }

    /// Plugs `host` back in.
    pub fn heal(&self, host: &Host) {
        ip_ok(&["-n", &host.netns, "link", "set", &host.link, "up"]);
    }
}

/// A /24 under 10.213.0.0/16 that the test's namespace has no route to yet, starting from one
/// picked by `pid`, so that concurrent runs take different ones.
fn free_subnet(pid: u32) -> String {
    let routes = Command::new("ip").args(["-4", "route", "show"]).output().map(|o| o.stdout).unwrap_or_default();
    let routes = String::from_utf8_lossy(&routes);
    (0..250)
        .map(|i| format!("10.213.{}", (pid + i) % 250))
        .find(|subnet| !routes.contains(&format!("{subnet}.")))
        .expect("a free /24 under 10.213.0.0/16")
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its links, and the far ends of their veth pairs with them.
        for netns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", netns]) {
                eprintln!("cleanup: {e}");
            }
        }
        if let Some(root) = &self.root_link {
            let _ = ip(&["link", "del", root]);
        }
    }
}
