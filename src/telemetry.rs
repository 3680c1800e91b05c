//! Logging: `tracing` to stderr, level from `RUST_LOG` (default `info`).
//!
//! At the default level every request logs one line, so at thousands of requests a second
//! the log must not cost a `write(2)` on the request's thread each. Lines go through
//! `tracing_appender`'s non-blocking writer: a channel to one writer thread, which writes to a
//! buffered stderr and flushes whenever the channel runs empty. A quiet service therefore
//! writes each line at once, and a busy one writes many lines per system call. It never drops
//! a line: when the channel (128k lines) is full, the request waits.

use std::io::{BufWriter, IsTerminal};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Flushes the log when dropped: keep it until the process ends.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _worker: Option<WorkerGuard>,
}

/// Installs the global subscriber. Safe to call more than once (later calls install nothing
/// and return a guard that does nothing).
pub fn init() -> LogGuard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(BufWriter::new(std::io::stderr()));
    match tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: a file or a log collector gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer)
        .try_init()
    {
        Ok(()) => LogGuard {
            _worker: Some(guard),
        },
        Err(_) => LogGuard { _worker: None },
    }
}
