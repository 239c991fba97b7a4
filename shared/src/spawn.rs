//! How a coordinator hands a worker it spawns what it runs with: environment variables, which,
//! unlike arguments, other users cannot read in the process list.

/// The token the worker accepts on `POST /shutdown` and `PUT /config`.
pub const TOKEN_ENV: &str = "COUNTAPP_SHUTDOWN_TOKEN";
/// The config in force, as JSON ([`crate::config::Config::to_json`]): the last good one, even
/// while the file is being edited into something invalid.
pub const CONFIG_ENV: &str = "COUNTAPP_CONFIG";
/// The worker's log file, which is its stdout and stderr: the worker rotates it by size, so that
/// it goes on doing so when a restarted coordinator adopts it.
pub const LOG_FILE_ENV: &str = "COUNTAPP_LOG_FILE";
