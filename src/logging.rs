//! Logging set-up: `tracing` with an env-filter, to stderr or a file.
//!
//! The default level is `warn`, so the guest console on stdout stays clean.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Errors setting up logging.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The filter does not parse.
    #[error("invalid --log-level `{filter}`: {source}")]
    Filter {
        /// The text given.
        filter: String,
        /// Why.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// The log file cannot be opened.
    #[error("cannot open log file {path}: {source}")]
    File {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Installs the global subscriber. `level` wins over `RUST_LOG`.
pub fn init(level: Option<&str>, file: Option<&Path>) -> Result<(), LoggingError> {
    let text = level
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "warn".to_string());
    let filter = EnvFilter::try_new(&text).map_err(|source| LoggingError::Filter {
        filter: text.clone(),
        source,
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_thread_names(true);
    match file {
        Some(p) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| LoggingError::File {
                    path: p.display().to_string(),
                    source,
                })?;
            builder.with_ansi(false).with_writer(Mutex::new(f)).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}
