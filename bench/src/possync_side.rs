//! possync's side of each scenario: real terminals, in this process.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

use possync_catalog::PriceUpdate;
use possync_core::{
    Config, Delivery, LicenseKey, QueueType, Registry, Status, Terminal, TerminalId,
    TerminalSettings,
};
use possync_sdk::{Context, HandlerError, Payload, Plugin, Settings, Store};
use tokio::sync::watch;

use crate::workload::now_micros;

/// Publish times of messages handled and not yet counted as settled.
static PROBED: Mutex<VecDeque<i64>> = Mutex::new(VecDeque::new());

/// `bench_price_update`: a `price_update` with the time it was published,
/// for the latency scenario.
#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct ProbedPriceUpdate {
    #[serde(deserialize_with = "possync_sdk::ids::id")]
    product_id: String,
    new_price: f64,
    #[serde(default)]
    product_name: Option<String>,
    sent_at_us: i64,
}

impl ProbedPriceUpdate {
    fn price(self) -> PriceUpdate {
        PriceUpdate {
            product_id: self.product_id,
            new_price: self.new_price,
            product_name: self.product_name,
        }
    }
}

impl Payload for ProbedPriceUpdate {
    const TYPE: &'static str = "bench_price_update";

    fn validate(&self) -> Result<(), String> {
        PriceUpdate {
            product_id: self.product_id.clone(),
            new_price: self.new_price,
            product_name: None,
        }
        .validate()
    }
}

/// The price handler, then the publish time kept.
fn apply_probed(
    update: ProbedPriceUpdate,
    message: &Context<'_>,
    store: &mut dyn Store,
) -> Result<(), HandlerError> {
    let sent_at_us = update.sent_at_us;
    possync_catalog::apply_price(update.price(), message, store)?;
    if let Ok(mut probed) = PROBED.lock() {
        probed.push_back(sent_at_us);
    }
    Ok(())
}

fn latency_probe(_: &Settings) -> Result<Plugin, String> {
    Ok(Plugin::new("bench_latency_probe")
        .migrations(possync_catalog::MIGRATIONS)
        .on::<ProbedPriceUpdate>(apply_probed))
}

possync_sdk::register_builtin!(latency_probe);

/// A terminal running in this process.
pub(crate) struct Running {
    pub(crate) status: watch::Receiver<Status>,
    pub(crate) queue: String,
    pub(crate) dead_letter_queue: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), possync_core::TerminalError>>,
}

/// The settings every scenario shares.
pub(crate) fn config(
    url: &str,
    dir: &Path,
    license: &LicenseKey,
    terminal: &str,
    queue_type: QueueType,
    delivery: Delivery,
) -> Config {
    let mut config = Config::default();
    config.broker.urls = vec![url.to_owned()];
    config.broker.queue_type = queue_type;
    config.terminal.license_key = Some(license.clone());
    config.terminal.terminal_id = Some(TerminalId::new(terminal).expect("valid terminal id"));
    config.terminal.database = dir.join(format!("{license}-{terminal}.db"));
    config.terminal.delivery = delivery;
    config.terminal.queue_expiry_days = 1;
    config
}

pub(crate) async fn start(config: Config) -> anyhow::Result<Running> {
    let registry = Registry::from_config(&config.plugins)?;
    let terminal = Terminal::new(TerminalSettings::from_config(config)?, registry)?;
    let queue = terminal.topology().queue.clone();
    let dead_letter_queue = terminal.topology().dead_letter_queue.clone();
    let mut status = terminal.status();
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(terminal.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        status.wait_for(Status::is_live),
    )
    .await??;
    Ok(Running {
        status,
        queue,
        dead_letter_queue,
        stop,
        task,
    })
}

impl Running {
    pub(crate) async fn wait_applied(&mut self, count: u64) -> anyhow::Result<()> {
        tokio::time::timeout(
            std::time::Duration::from_secs(600),
            self.status.wait_for(|s| s.applied >= count),
        )
        .await??;
        Ok(())
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await??;
        Ok(())
    }

    /// Stops the terminal and deletes its queues, so runs leave nothing behind.
    pub(crate) async fn stop_and_delete(
        self,
        connection: &lapin::Connection,
    ) -> anyhow::Result<()> {
        let queues = [self.queue.clone(), self.dead_letter_queue.clone()];
        self.stop().await?;
        crate::workload::delete_queues(connection, &queues).await;
        Ok(())
    }
}

/// Collects publish-to-ack latencies of `bench_price_update` messages
/// until `count` were settled: each time the terminal reports a settled
/// batch, the oldest probed publish times that many messages old are done.
pub(crate) async fn collect_latencies(mut status: watch::Receiver<Status>, count: u64) -> Vec<i64> {
    let mut seen = 0u64;
    let mut latencies = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    while seen < count {
        if status.changed().await.is_err() {
            break;
        }
        let applied = status.borrow_and_update().applied;
        let now = now_micros();
        if let Ok(mut probed) = PROBED.lock() {
            for _ in seen..applied {
                if let Some(sent) = probed.pop_front() {
                    latencies.push(now - sent);
                }
            }
        }
        seen = applied;
    }
    latencies
}

/// One round of an on/off comparison: the same backlog of `count` changes
/// drained twice by one terminal, with `switch` turning a setting off and
/// on (the order alternating with `round`), as `Trial { baseline: off,
/// possync: on }`. `what` names the setting in progress lines.
pub(crate) async fn drain_off_and_on(
    url: &str,
    dir: &Path,
    count: usize,
    round: usize,
    what: &str,
    scenario: String,
    switch: impl Fn(&mut Config, bool),
) -> anyhow::Result<crate::Trial> {
    use crate::workload::{self, Format, in_turn, license};
    let connection = workload::connect(url).await?;
    let mut took = [None, None];
    for turn in 0..2 {
        let on = (turn + round) % 2 == 1;
        crate::progress(&format!(
            "{what}: drain of {count} with it {}",
            if on { "on" } else { "off" }
        ));
        let key = license(what);
        let mut config = self::config(
            url,
            dir,
            &key,
            "t1",
            possync_core::QueueType::Classic,
            possync_core::Delivery::Durable,
        );
        config.terminal.collapse_min_batch = 0;
        switch(&mut config, on);
        start(config.clone()).await?.stop().await?;
        workload::publish_backlog(
            &connection,
            &config.broker,
            &key,
            count,
            Format::Original,
            in_turn,
        )
        .await?;
        let stopwatch = crate::Stopwatch::start();
        let mut terminal = start(config).await?;
        terminal.wait_applied(count as u64).await?;
        took[usize::from(on)] = Some(stopwatch.stop());
        terminal.stop_and_delete(&connection).await?;
    }
    workload::close([connection]).await;
    let [Some(off), Some(on)] = took else {
        anyhow::bail!("a drain of {what} did not run");
    };
    Ok(crate::Trial {
        scenario,
        count,
        possync: on,
        baseline: off,
        memory_kib: None,
    })
}
