//! A light terminal: the release `possync` binary run as a till runs it,
//! one `possync terminal` process against the local broker, measured from
//! the outside. How soon it is Live after it was started, what it keeps
//! resident when idle, and its peak while it drains a backlog of a store's
//! changes published by possync's own publisher.
//!
//! The benchmark builds nothing: it runs the binary `--possync-binary`
//! names (by default `possync-terminal` of the `release-stripped` build of
//! this workspace; `possync` itself is run as `possync terminal`).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use possync_core::{Config, LicenseKey, TerminalId, TerminalTopology};
use serde_json::json;

use crate::snapshot::{CATEGORIES, product_payload};
use crate::workload::{self, license};
use crate::{Row, progress};

/// The targets of issue 19, in KiB and milliseconds.
const IDLE_TARGET_KIB: u64 = 8 * 1024;
const DRAIN_TARGET_KIB: u64 = 16 * 1024;
const LIVE_TARGET_MS: f64 = 200.0;

/// What the scenario is asked to do.
pub(crate) struct Footprint {
    pub(crate) url: String,
    pub(crate) binary: PathBuf,
    pub(crate) changes: usize,
    pub(crate) products: usize,
    pub(crate) idle: Duration,
}

/// What `/proc/<pid>/status` says of a process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss: u64,
    peak: u64,
    anon: u64,
    file: u64,
    threads: u64,
}

impl Memory {
    fn of(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Some(Self {
            rss: field("VmRSS:"),
            peak: field("VmHWM:"),
            anon: field("RssAnon:"),
            file: field("RssFile:"),
            threads: field("Threads:"),
        })
    }

    fn text(self) -> String {
        format!(
            "{} KiB ({} anon + {} file, {} threads)",
            self.rss, self.anon, self.file, self.threads
        )
    }
}

/// One round's figures.
struct Round {
    first_live: Duration,
    restart_live: Duration,
    backlog_live: Duration,
    idle: Memory,
    drain_peak: Memory,
    drained_in: Duration,
    after_drain: Memory,
}

/// A `possync terminal` process, with the lines it logs.
struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    /// Starts the terminal; returns once it logged that it is Live, with
    /// the time from the start.
    fn start(binary: &Path, config: &Path) -> anyhow::Result<(Self, Duration)> {
        let started = Instant::now();
        let mut command = Command::new(binary);
        command.arg("--config").arg(config);
        // `possync-terminal` is the terminal alone; `possync` takes a command.
        if binary
            .file_name()
            .is_none_or(|name| name != "possync-terminal")
        {
            command.arg("terminal");
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Only the file configures it: a POSSYNC_ variable of the shell
        // would change what is measured.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("POSSYNC_") {
                command.env_remove(name);
            }
        }
        let mut child = command.spawn().map_err(|err| {
            anyhow::anyhow!(
                "cannot run {}: {err}; build it with `cargo build --profile release-stripped -p possync --bin possync-terminal` or name it with --possync-binary",
                binary.display()
            )
        })?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("the terminal's stderr is not piped"))?;
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = Self { child, lines };
        let deadline = started + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match process.lines.recv_timeout(left) {
                // `events::live`: "Live: receiving this store's changes".
                Ok(line) if line.contains("Live: receiving") => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = process.child.kill();
                    anyhow::bail!("the terminal was not Live within 60 s");
                }
            }
        }
        let took = started.elapsed();
        Ok((process, took))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn memory(&self) -> anyhow::Result<Memory> {
        Memory::of(self.pid()).ok_or_else(|| anyhow::anyhow!("the terminal is gone"))
    }

    /// Stops it as a service manager does (SIGTERM) and waits for its end.
    fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(status.success(), "the terminal stopped with {status}");
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                anyhow::bail!("the terminal did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The store's changes, as a back office sends them: its categories, its
/// products (a name of a few words, a price, a category, an icon for one
/// in four), then price changes on products picked at random; the last
/// change names a product no other does, to see when all are applied.
fn backlog(store: &LicenseKey, count: usize, products: usize) -> Vec<possync_sdk::Envelope> {
    let pick = workload::shuffled(products);
    let key = store.as_str();
    let catalog = (0..CATEGORIES)
        .map(|i| {
            possync_sdk::Envelope::new(
                "category_update",
                key,
                json!({"category_id": format!("CAT-{i:02}"), "category_name": format!("Category {i}")}),
            )
        })
        .chain((0..products).map(|i| possync_sdk::Envelope::new("product_update", key, product_payload(i))));
    let prices = (0..).map(|i: usize| {
        possync_sdk::Envelope::new(
            "price_update",
            key,
            json!({"product_id": format!("SKU-{:07}", pick(i)), "new_price": 1.0 + i as f64 / 100.0}),
        )
    });
    let mut changes: Vec<_> = catalog
        .chain(prices)
        .take(count.saturating_sub(1))
        .collect();
    changes.push(possync_sdk::Envelope::new(
        "product_update",
        key,
        json!({"product_id": "SKU-LAST", "product_name": "The last change", "price": 1.0}),
    ));
    changes
}

/// Whether the till's database holds the backlog's last change.
fn drained(database: &Path) -> bool {
    let Ok(connection) =
        rusqlite::Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return false;
    };
    connection
        .query_row(
            "SELECT count(*) FROM products WHERE id = 'SKU-LAST'",
            [],
            |row| row.get::<_, i64>(0),
        )
        .is_ok_and(|n| n > 0)
}

fn write_config(path: &Path, url: &str, store: &LicenseKey, database: &Path) -> anyhow::Result<()> {
    let text = format!(
        "[broker]\nurl = {url:?}\n\n[terminal]\nlicense_key = {:?}\nterminal_id = \"till-1\"\ndatabase = {:?}\nqueue_expiry_days = 1\n",
        store.as_str(),
        database.display().to_string(),
    );
    std::fs::write(path, text)?;
    Ok(())
}

/// One round: a first start, idle; a backlog published while it is off;
/// a start that drains it; a start on a quiet queue.
fn round(setup: &Footprint, dir: &Path, round: usize) -> anyhow::Result<(Round, Vec<String>)> {
    let store = license("light");
    let dir = dir.join(format!("light-{round}"));
    std::fs::create_dir_all(&dir)?;
    let database = dir.join("pos.db");
    let config_path = dir.join("terminal.toml");
    write_config(&config_path, &setup.url, &store, &database)?;
    let mut config = Config::default();
    config.broker.urls = vec![setup.url.clone()];
    config.terminal.queue_expiry_days = 1;
    let topology = TerminalTopology::new(&config, &store, &TerminalId::new("till-1")?);
    let queues = vec![topology.queue.clone(), topology.dead_letter_queue.clone()];

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = (|| -> anyhow::Result<(Round, Vec<String>)> {
        progress(&format!(
            "light terminal, round {}: a first start",
            round + 1
        ));
        let (terminal, first_live) = Process::start(&setup.binary, &config_path)?;
        std::thread::sleep(setup.idle);
        let idle = terminal.memory()?;
        let idle_smaps = smaps_top(terminal.pid());
        terminal.stop()?;

        progress(&format!(
            "light terminal: publishing {} changes while it is off",
            setup.changes
        ));
        let changes = backlog(&store, setup.changes, setup.products);
        runtime.block_on(async {
            let publisher = possync_core::Publisher::connect(&config.broker).await?;
            publisher.publish_envelopes(changes).await?;
            publisher.close().await;
            anyhow::Ok(())
        })?;

        let (terminal, backlog_live) = Process::start(&setup.binary, &config_path)?;
        let draining = Instant::now();
        let mut sampled_peak = 0;
        while !drained(&database) {
            if let Ok(memory) = terminal.memory() {
                sampled_peak = sampled_peak.max(memory.rss);
            }
            anyhow::ensure!(
                draining.elapsed() < Duration::from_secs(300),
                "the backlog was not drained within 300 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let drained_in = draining.elapsed();
        let drain_peak = terminal.memory()?;
        std::thread::sleep(setup.idle);
        let after_drain = terminal.memory()?;
        terminal.stop()?;

        let (terminal, restart_live) = Process::start(&setup.binary, &config_path)?;
        terminal.stop()?;
        let notes = vec![
            format!("idle: {}", idle.text()),
            format!("idle, largest mappings: {idle_smaps}"),
            format!(
                "draining: peak {} KiB (sampled every 5 ms: {sampled_peak} KiB)",
                drain_peak.peak
            ),
            format!("idle after the drain: {}", after_drain.text()),
        ];
        Ok((
            Round {
                first_live,
                restart_live,
                backlog_live,
                idle,
                drain_peak,
                drained_in,
                after_drain,
            },
            notes,
        ))
    })();
    runtime.block_on(async {
        if let Ok(connection) = workload::connect(&setup.url).await {
            workload::delete_queues(&connection, &queues).await;
            workload::close([connection]).await;
        }
    });
    result
}

/// The largest resident mappings of a process, from `/proc/<pid>/smaps`.
fn smaps_top(pid: u32) -> String {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return "unreadable".into();
    };
    let mut mappings: Vec<(u64, String)> = Vec::new();
    let mut name = String::new();
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            let kib = rss
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            mappings.push((kib, name.clone()));
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|range| range.contains('-') && !range.ends_with(':'))
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            name = match fields.get(5) {
                Some(path) => path.rsplit('/').next().unwrap_or(path).to_string(),
                None => format!("anon {}", fields.get(1).unwrap_or(&"")),
            };
        }
    }
    mappings.sort_by_key(|(kib, _)| std::cmp::Reverse(*kib));
    mappings
        .iter()
        .take(6)
        .map(|(kib, name)| format!("{kib} {name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `rounds` rounds; the rows show each round and the medians against
/// the targets.
pub(crate) fn run(setup: &Footprint, dir: &Path, rounds: u32) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(
        setup.binary.exists(),
        "no possync binary at {}: build it with `cargo build --profile release-stripped -p possync --bin possync-terminal`, or name one with --possync-binary",
        setup.binary.display()
    );
    let mut done = Vec::new();
    let mut rows = Vec::new();
    for i in 0..rounds as usize {
        let (figures, notes) = round(setup, dir, i)?;
        for note in notes {
            progress(&format!("light terminal, round {}: {note}", i + 1));
        }
        let rate = setup.changes as f64 / figures.drained_in.as_secs_f64();
        rows.push(Row {
            scenario: format!("light terminal, round {}", i + 1),
            possync: format!(
                "Live in {:.0} ms (first start), {:.0} ms (restart), {:.0} ms (restart onto a backlog) · idle {} KiB, {} threads · draining {} changes: peak {} KiB, {:.0} changes/s · idle after {} KiB",
                ms(figures.first_live),
                ms(figures.restart_live),
                ms(figures.backlog_live),
                figures.idle.rss,
                figures.idle.threads,
                setup.changes,
                figures.drain_peak.peak,
                rate,
                figures.after_drain.rss,
            ),
            baseline: "-".into(),
            ratio: "-".into(),
        });
        done.push(figures);
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let worst = |values: &[f64]| values.iter().copied().fold(f64::NAN, f64::max);
    let live: Vec<f64> = done
        .iter()
        .flat_map(|r| [ms(r.first_live), ms(r.restart_live), ms(r.backlog_live)])
        .collect();
    let idle: Vec<f64> = done.iter().map(|r| r.idle.rss as f64).collect();
    let peak: Vec<f64> = done.iter().map(|r| r.drain_peak.peak as f64).collect();
    let verdict = |met: bool| if met { "met" } else { "missed" };
    rows.push(Row {
        scenario: format!("light terminal against the targets, {rounds} rounds (median, worst)"),
        possync: format!(
            "start→Live {:.0}, {:.0} ms (target < {LIVE_TARGET_MS:.0}): {} · idle {:.0}, {:.0} KiB (target ≤ {IDLE_TARGET_KIB}): {} · draining peak {:.0}, {:.0} KiB (target ≤ {DRAIN_TARGET_KIB}): {}",
            median(live.clone()),
            worst(&live),
            verdict(worst(&live) < LIVE_TARGET_MS),
            median(idle.clone()),
            worst(&idle),
            verdict(worst(&idle) <= IDLE_TARGET_KIB as f64),
            median(peak.clone()),
            worst(&peak),
            verdict(worst(&peak) <= DRAIN_TARGET_KIB as f64),
        ),
        baseline: "-".into(),
        ratio: "-".into(),
    });
    Ok(rows)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Where the stripped release build of this workspace puts `possync-terminal`.
pub(crate) fn default_binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release-stripped/possync-terminal")
}
