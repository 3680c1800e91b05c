//! The `oci-tag-proxy` binary: parse the configuration, bind, serve until SIGINT/SIGTERM.

use anyhow::Context;
use clap::Parser;

use oci_tag_proxy::config::{Cli, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    oci_tag_proxy::telemetry::init();
    let settings = Settings::try_from(Cli::parse())?;
    tracing::debug!(?settings, "configuration");
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    oci_tag_proxy::serve(settings, listener, oci_tag_proxy::shutdown::signal()).await?;
    Ok(())
}
