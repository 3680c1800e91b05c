//! The `oci-tag-proxy` binary: parse the configuration, bind, serve until SIGINT/SIGTERM.

use anyhow::Context;
use clap::Parser;

use oci_tag_proxy::config::{Cli, Settings};

mod healthcheck;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `oci-tag-proxy healthcheck`: for container health checks, where there is no shell or curl.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "healthcheck")
    {
        let args = std::env::args_os().skip(2);
        std::process::exit(healthcheck::run(
            args.map(|a| a.to_string_lossy().into_owned()),
        ));
    }
    let _log = oci_tag_proxy::telemetry::init();
    let settings = Settings::try_from(Cli::parse())?;
    // Cached answers and connections both take descriptors (see `sendfile`).
    let open_files = oci_tag_proxy::sendfile::raise_open_file_limit();
    tracing::debug!(?open_files, "open-file limit");
    tracing::debug!(?settings, "configuration");
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    oci_tag_proxy::serve(settings, listener, oci_tag_proxy::shutdown::signal()).await?;
    Ok(())
}
