//! The status endpoint of a terminal: `/healthz`, `/status` (JSON),
//! `/metrics` (Prometheus) and `/`, a page a store manager reads at a glance.
//! Off by default; on loopback by default when on.

mod accept;
mod allowed_hosts;
mod events;
mod json;
mod metrics;
mod page;
mod routes;
mod snapshot;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub(crate) use accept::Limits;

use crate::registry::PluginInfo;
use crate::status::Status;

/// What every response is built from.
#[derive(Debug)]
pub(crate) struct StatusView {
    pub(crate) status: watch::Receiver<Status>,
    pub(crate) license_key: String,
    pub(crate) terminal_id: String,
    pub(crate) database: PathBuf,
    pub(crate) plugins: Vec<PluginInfo>,
    /// Where committed changes come from, for `/events`.
    pub(crate) feed: crate::feed::FeedSender,
    /// Whether the terminal keeps a change feed (`terminal.feed_keep`).
    pub(crate) feed_on: bool,
}

/// The status endpoint, bound and ready to serve.
#[derive(Debug)]
pub(crate) struct StatusServer {
    listener: TcpListener,
    router: Router,
    limits: Limits,
}

impl StatusServer {
    /// Answers on `listener` for `localhost`, IP addresses and
    /// `allowed_hosts`, on the port it listens on.
    pub(crate) fn new(
        listener: TcpListener,
        view: StatusView,
        allowed_hosts: &[String],
        limits: Limits,
    ) -> std::io::Result<Self> {
        let port = listener.local_addr()?.port();
        let hosts = allowed_hosts::AllowedHosts::new(port, allowed_hosts);
        Ok(Self {
            listener,
            router: routes::router(view, hosts, limits.streams),
            limits,
        })
    }

    /// Serves until the task is aborted; accept errors do not end it.
    pub(crate) async fn run(self) {
        accept::serve(self.listener, self.router, self.limits).await;
    }
}
