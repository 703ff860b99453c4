//! One RabbitMQ node: its folder, its config, its process in its namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::network::{Slot, kill_all_in, processes_in};
use crate::{Error, Result, run};

/// The node name of node `index`: long names, by address, so that no
/// host name needs resolving.
pub(crate) fn name_of(slot: Slot, index: usize) -> String {
    format!("rabbit@{}", slot.address(index))
}

/// One node of a [`crate::Cluster`].
#[derive(Debug)]
pub struct Node {
    slot: Slot,
    index: usize,
    name: String,
    folder: PathBuf,
    process: Option<Child>,
}

impl Node {
    /// Writes the node's folder and config; starts nothing.
    pub(crate) fn prepare(
        slot: Slot,
        index: usize,
        cluster_folder: &Path,
        peers: &[String],
    ) -> Result<Self> {
        let folder = cluster_folder.join(format!("node{}", index + 1));
        let write = |name: &str, contents: &str| {
            std::fs::write(folder.join(name), contents).map_err(|source| Error::Io {
                what: format!("writing {name} of node {}", index + 1),
                source,
            })
        };
        for sub in ["home", "data", "log"] {
            std::fs::create_dir_all(folder.join(sub)).map_err(|source| Error::Io {
                what: format!("creating the folder of node {}", index + 1),
                source,
            })?;
        }
        // The same cookie on every node and for rabbitmqctl: one cluster.
        write("home/.erlang.cookie", "POSSYNCTESTCLUSTER")?;
        set_owner_only(&folder.join("home/.erlang.cookie"))?;
        let mut config = String::from(
            "listeners.tcp.default = 5672\n\
             # Clients connect from the bridge, not from loopback.\n\
             loopback_users = none\n\
             # A node cut off from the others stops serving, so its clients go elsewhere.\n\
             cluster_partition_handling = pause_minority\n\
             cluster_formation.peer_discovery_backend = classic_config\n\
             cluster_formation.randomized_startup_delay_range.min = 0\n\
             cluster_formation.randomized_startup_delay_range.max = 0\n\
             log.console = false\n\
             log.file.level = info\n",
        );
        for (number, peer) in peers.iter().enumerate() {
            config.push_str(&format!(
                "cluster_formation.classic_config.nodes.{} = {peer}\n",
                number + 1
            ));
        }
        write("rabbitmq.conf", &config)?;
        // Nodes notice a peer gone within seconds, not the minute Erlang waits by default.
        write("advanced.config", "[{kernel, [{net_ticktime, 10}]}].\n")?;
        write("enabled_plugins", "[].\n")?;
        // Replaces Debian's rabbitmq-env.conf, which pins the node to loopback.
        write("rabbitmq-env.conf", "")?;
        Ok(Self {
            slot,
            index,
            name: name_of(slot, index),
            folder,
            process: None,
        })
    }

    /// `rabbit@<address>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The AMQP URL of this node, with `query` appended when not empty.
    pub fn url(&self, query: &str) -> String {
        let base = format!(
            "amqp://guest:guest@{}:5672/%2f",
            self.slot.address(self.index)
        );
        if query.is_empty() {
            base
        } else {
            format!("{base}?{query}")
        }
    }

    /// The Erlang VM's process id, while it runs.
    pub fn beam_pid(&self) -> Option<u32> {
        processes_in(&self.slot.namespace(self.index))
            .into_iter()
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "beam.smp")
            })
    }

    /// Resident memory of the node's VM, in bytes.
    pub fn resident_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.beam_pid()?)).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    }

    /// File descriptors the node's VM holds open.
    pub fn open_files(&self) -> Option<usize> {
        std::fs::read_dir(format!("/proc/{}/fd", self.beam_pid()?))
            .ok()
            .map(Iterator::count)
    }

    /// Whether the node's process runs (it may still be starting).
    pub fn is_running(&mut self) -> bool {
        match &mut self.process {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Runs `rabbitmqctl` against this node.
    pub fn rabbitmqctl(&self, args: &[&str]) -> Result<String> {
        let mut command = self.tool("rabbitmqctl");
        command.args(["-l", "-n", &self.name]).args(args);
        run(&mut command)
    }

    /// Runs `rabbitmq-queues` against this node.
    pub fn rabbitmq_queues(&self, args: &[&str]) -> Result<String> {
        let mut command = self.tool("rabbitmq-queues");
        command.args(["-l", "-n", &self.name]).args(args);
        run(&mut command)
    }

    pub(crate) fn spawn(&mut self) -> Result<()> {
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.folder.join("log/console.log"))
            .map_err(|source| Error::Io {
                what: "opening the node's console log".into(),
                source,
            })?;
        let errors = output.try_clone().map_err(|source| Error::Io {
            what: "opening the node's console log".into(),
            source,
        })?;
        let server = rabbitmq_bin().join("rabbitmq-server");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.slot.namespace(self.index)])
            // As many files as this machine allows (RabbitMQ advises tens of
            // thousands): room for thousands of connections in the sizing
            // benchmark.
            .args(["sh", "-c", "ulimit -n \"$(ulimit -Hn)\"; exec \"$@\"", "--"])
            .arg(server)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors);
        self.set_environment(&mut command);
        command
            .env("RABBITMQ_CONFIG_FILE", self.folder.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                self.folder.join("advanced.config"),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.folder.join("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", self.folder.join("data"))
            .env("RABBITMQ_LOG_BASE", self.folder.join("log"))
            .env("RABBITMQ_PID_FILE", self.folder.join("rabbit.pid"));
        let child = command.spawn().map_err(|source| Error::Io {
            what: format!("starting node {}", self.name),
            source,
        })?;
        self.process = Some(child);
        Ok(())
    }

    /// Waits until the node has booted, or fails with the end of its log.
    pub(crate) fn wait_started(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .rabbitmqctl(&["await_startup", "--timeout", "5", "-q"])
                .is_ok()
            {
                return Ok(());
            }
            if !self.is_running() || Instant::now() > deadline {
                return Err(Error::NotStarted {
                    node: self.name.clone(),
                    waited: timeout,
                    log_tail: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub(crate) fn kill(&mut self) -> Result<()> {
        kill_all_in(&self.slot.namespace(self.index));
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            child.wait().map_err(|source| Error::Io {
                what: format!("waiting for node {} to end", self.name),
                source,
            })?;
        }
        Ok(())
    }

    pub(crate) fn stop(&mut self) -> Result<()> {
        self.rabbitmqctl(&["stop", "-q"])?;
        if let Some(mut child) = self.process.take() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// A RabbitMQ tool with this node's cookie and none of the machine's
    /// own broker settings.
    fn tool(&self, name: &str) -> Command {
        let mut command = Command::new(rabbitmq_bin().join(name));
        self.set_environment(&mut command);
        command
    }

    fn set_environment(&self, command: &mut Command) {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RABBITMQ_") {
                command.env_remove(key);
            }
        }
        command
            .env("HOME", self.folder.join("home"))
            .env(
                "RABBITMQ_CONF_ENV_FILE",
                self.folder.join("rabbitmq-env.conf"),
            )
            .env("RABBITMQ_USE_LONGNAME", "true")
            .env("RABBITMQ_NODENAME", &self.name)
            .env_remove("ERL_FLAGS")
            .env_remove("ERL_EPMD_ADDRESS");
    }

    fn log_tail(&self) -> String {
        let mut tail = String::new();
        for log in ["log/console.log", &format!("log/{}.log", self.name)] {
            if let Ok(text) = std::fs::read_to_string(self.folder.join(log)) {
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(15);
                tail.push_str(&lines[from..].join("\n"));
                tail.push('\n');
            }
        }
        tail
    }
}

/// Where the RabbitMQ scripts that run as the calling user live: Debian's
/// `/usr/sbin` wrappers switch to the `rabbitmq` user and its settings.
fn rabbitmq_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("POSSYNC_RABBITMQ_BIN") {
        return PathBuf::from(dir);
    }
    PathBuf::from("/usr/lib/rabbitmq/bin")
}

fn set_owner_only(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        Error::Io {
            what: "making the cookie private".into(),
            source,
        }
    })
}
