//! A real browser for the system tests: Debian's headless Chromium, driven over WebDriver by
//! `chromedriver` on a free loopback port, with a fresh profile in a temporary directory. When
//! dropped, even by a failing test, the session is closed and chromedriver and every Chromium
//! process of that profile are killed.
//!
//! The tests are synchronous; [`Browser`] runs each WebDriver command on its own small runtime.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::client::client;
use crate::cluster::{STARTUP, free_port};
use crate::node::Node;
use crate::procs::processes_with;

/// Chromium's flags: headless as root, and no traffic of its own (updates, sync, safe browsing,
/// crash reports) beyond the pages the test opens.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-dev-shm-usage",
    "--window-size=1280,1500",
];

/// How long one WebDriver command may take before the test fails. Failures name the test's line
/// (`#[track_caller]`), not this file's.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// Headless Chromium under chromedriver; see the module's doc.
pub struct Browser {
    runtime: tokio::runtime::Runtime,
    session: Option<Client>,
    profile: tempfile::TempDir,
    driver: Node,
}

/// The path of `program` on `PATH`, if it is there.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

impl Browser {
    /// Starts chromedriver and a Chromium session. Panics, naming the fix, when either is not
    /// installed (`make tests` installs both, through `scripts/ensure-packages.sh`).
    pub fn start() -> Browser {
        let missing =
            "run `scripts/ensure-packages.sh chromium:chromium chromedriver:chromium-driver` (make tests does)";
        let chromium = which("chromium").unwrap_or_else(|| panic!("chromium is not installed: {missing}"));
        let chromedriver = which("chromedriver").unwrap_or_else(|| panic!("chromedriver is not installed: {missing}"));
        let profile = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut command = Command::new(chromedriver);
        command.arg(format!("--port={port}"));
        let driver = Node::spawn(command, "127.0.0.1", port, &profile.path().join("chromedriver.log"));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut browser = Browser { runtime, session: None, profile, driver };
        browser.wait_driver_ready();

        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|flag| (*flag).to_owned()).collect();
        args.push(format!("--user-data-dir={}", browser.profile.path().join("chromium").display()));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        });
        let Value::Object(capabilities) = capabilities else { unreachable!("a JSON object") };
        let url = browser.driver.url();
        let session = browser.runtime.block_on(async {
            tokio::time::timeout(
                STARTUP,
                ClientBuilder::new(HttpConnector::new()).capabilities(capabilities).connect(&url),
            )
            .await
        });
        match session {
            Ok(Ok(session)) => browser.session = Some(session),
            Ok(Err(e)) => panic!("chromedriver could not start chromium: {e}\n{}", browser.driver.log()),
            Err(_) => panic!("chromium did not start within {STARTUP:?}\n{}", browser.driver.log()),
        }
        browser
    }

    fn wait_driver_ready(&mut self) {
        let http = client();
        let deadline = Instant::now() + STARTUP;
        loop {
            assert!(self.driver.is_running(), "chromedriver exited:\n{}", self.driver.log());
            let status: Option<Value> =
                http.get(format!("{}/status", self.driver.url())).send().ok().and_then(|r| r.json().ok());
            if status.is_some_and(|s| s["value"]["ready"] == true) {
                return;
            }
            assert!(Instant::now() < deadline, "chromedriver not ready in {STARTUP:?}:\n{}", self.driver.log());
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs one WebDriver command, bounded by [`COMMAND_TIMEOUT`].
    #[track_caller]
    fn run<T>(&self, what: &str, command: impl AsyncFnOnce(&Client) -> Result<T, fantoccini::error::CmdError>) -> T {
        let session = self.session.as_ref().expect("the session is open");
        match self.runtime.block_on(async { tokio::time::timeout(COMMAND_TIMEOUT, command(session)).await }) {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => panic!("{what}: {e}"),
            Err(_) => panic!("{what}: no answer within {COMMAND_TIMEOUT:?}"),
        }
    }

    /// Opens `url`.
    #[track_caller]
    pub fn goto(&self, url: &str) {
        self.run(&format!("opening {url}"), async |s| s.goto(url).await);
    }

    /// The rendered text of every element matching the CSS `selector`, in document order.
    #[track_caller]
    pub fn texts(&self, selector: &str) -> Vec<String> {
        // Read in the page in one go: the page re-renders each second, and an element found in
        // one WebDriver call may be replaced before the next reads its text.
        let script = "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText.trim())";
        let texts = self.run(&format!("reading {selector}"), async |s| s.execute(script, vec![selector.into()]).await);
        serde_json::from_value(texts).unwrap_or_else(|e| panic!("reading {selector}: {e}"))
    }

    /// The rendered text of the first element matching `selector`, if there is one.
    #[track_caller]
    pub fn text(&self, selector: &str) -> Option<String> {
        self.texts(selector).into_iter().next()
    }

    /// Runs `script` in the page and returns what it returns.
    #[track_caller]
    pub fn script(&self, script: &str) -> Value {
        self.run("running a script", async |s| s.execute(script, Vec::new()).await)
    }

    /// Types `text` into the field `selector`, replacing what it held.
    #[track_caller]
    pub fn fill(&self, selector: &str, text: &str) {
        self.run(&format!("typing into {selector}"), async |s| {
            let field = s.find(Locator::Css(selector)).await?;
            field.clear().await?;
            field.send_keys(text).await
        });
    }

    /// Clicks the element `selector`.
    #[track_caller]
    pub fn click(&self, selector: &str) {
        self.run(&format!("clicking {selector}"), async |s| s.find(Locator::Css(selector)).await?.click().await);
    }

    /// Saves a PNG of the window at `path`.
    #[track_caller]
    pub fn screenshot(&self, path: &Path) {
        let png = self.run("taking a screenshot", async |s| s.screenshot().await);
        std::fs::write(path, png).unwrap();
    }

    /// Polls the text of `selector` until `check` holds for it, for at most `within`; returns
    /// that text. The failure names the text last seen.
    #[track_caller]
    pub fn wait_text(&self, selector: &str, within: Duration, what: &str, check: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let text = self.text(selector);
            if let Some(text) = text.as_deref().filter(|t| check(t)) {
                return text.to_owned();
            }
            assert!(started.elapsed() < within, "{what}: not within {within:?}; {selector} shows {text:?}");
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ =
                self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), session.close()).await });
        }
        // Whatever the session left behind: every Chromium process runs with the profile's path.
        let needle = self.profile.path().as_os_str().as_encoded_bytes();
        for pid in processes_with(needle) {
            // It may have exited since it was listed.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        self.driver.kill();
    }
}
