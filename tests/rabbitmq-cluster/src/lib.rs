//! A RabbitMQ cluster on this one machine, for possync's own tests and
//! benchmarks: each node in a network namespace of its own, the nodes and
//! this machine joined by a bridge, so that a node can be killed, stopped
//! and started again, or cut off the network and healed.
//!
//! It needs root, iproute2 and Debian's `rabbitmq-server` package. The
//! namespaces, links and node folders it makes are fixed names, so one
//! cluster runs at a time on a machine: starting one removes whatever an
//! earlier, crashed run left behind, and dropping it removes everything.

mod network;
mod node;

use std::time::{Duration, Instant};

pub use network::Slot;
pub use node::Node;

/// What went wrong, said for the person running the tests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command of the harness failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status and error output.
        detail: String,
    },
    /// A node did not get ready in time.
    #[error("node {node} did not start within {waited:?}; its log ends with:\n{log_tail}")]
    NotStarted {
        /// The node's name.
        node: String,
        /// How long it was given.
        waited: Duration,
        /// The last lines of its output and log.
        log_tail: String,
    },
    /// Something of the machine: a folder, a file.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The harness's result.
pub type Result<T> = std::result::Result<T, Error>;

/// How long a node may take to start; a node that waits for its peers
/// after a power cut takes longest.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// A running cluster; dropped, it is gone.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<Node>,
    network: network::Network,
    // The folders outlive the processes that write to them.
    _folder: tempfile::TempDir,
    // Last: the slot is taken until everything else is gone.
    _slot_lock: std::fs::File,
}

impl Cluster {
    /// Starts `size` nodes joined into one cluster in slot 0 and waits
    /// until each runs.
    pub fn start(size: usize) -> Result<Self> {
        Self::start_in(Slot::new(0), size)
    }

    /// Starts `size` nodes joined into one cluster in `slot` (clusters in
    /// other slots run beside it) and waits until each runs. The first
    /// node starts alone; the others join it.
    pub fn start_in(slot: Slot, size: usize) -> Result<Self> {
        // Another process's cluster in this slot is waited for, not removed
        // as a leftover under its feet.
        let lock_path =
            std::env::temp_dir().join(format!("possync-rabbitmq-slot{}.lock", slot.number()));
        let slot_lock = std::fs::File::create(&lock_path).map_err(|source| Error::Io {
            what: format!("creating {}", lock_path.display()),
            source,
        })?;
        slot_lock.lock().map_err(|source| Error::Io {
            what: format!("taking {}", lock_path.display()),
            source,
        })?;
        network::Network::remove_leftovers(slot);
        let folder = tempfile::Builder::new()
            .prefix("possync-rabbitmq-cluster.")
            .tempdir()
            .map_err(|source| Error::Io {
                what: "creating the cluster's folder".into(),
                source,
            })?;
        let network = network::Network::create(slot, size)?;
        let peers: Vec<String> = (0..size).map(|index| node::name_of(slot, index)).collect();
        let nodes = (0..size)
            .map(|index| Node::prepare(slot, index, folder.path(), &peers))
            .collect::<Result<Vec<_>>>()?;
        // From here on, a failure drops the cluster, which removes it all.
        let mut cluster = Self {
            nodes,
            network,
            _folder: folder,
            _slot_lock: slot_lock,
        };
        cluster.start_node(0)?;
        for index in 1..size {
            cluster.nodes[index].spawn()?;
        }
        for index in 1..size {
            cluster.nodes[index].wait_started(START_TIMEOUT)?;
        }
        Ok(cluster)
    }

    /// The cluster's nodes, in order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The AMQP URL of every node, in order, with `query` (such as
    /// `heartbeat=5`) appended when not empty.
    pub fn urls(&self, query: &str) -> Vec<String> {
        self.nodes.iter().map(|node| node.url(query)).collect()
    }

    /// Starts node `index` (stopped or killed before) and waits until it runs.
    pub fn start_node(&mut self, index: usize) -> Result<()> {
        self.nodes[index].spawn()?;
        self.nodes[index].wait_started(START_TIMEOUT)
    }

    /// Starts every node that is down at once, as after a power cut, and
    /// waits until all run.
    pub fn start_all(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            if !node.is_running() {
                node.spawn()?;
            }
        }
        for node in &mut self.nodes {
            node.wait_started(START_TIMEOUT)?;
        }
        Ok(())
    }

    /// Kills node `index` with SIGKILL, every process of its namespace
    /// with it: what a crash or a pulled plug does.
    pub fn kill_node(&mut self, index: usize) -> Result<()> {
        self.nodes[index].kill()
    }

    /// Stops node `index` the way an operator does (`rabbitmqctl stop`).
    pub fn stop_node(&mut self, index: usize) -> Result<()> {
        self.nodes[index].stop()
    }

    /// Cuts node `index` off the network: neither the other nodes nor any
    /// client reach it, and nothing tells them so.
    pub fn cut_off(&self, index: usize) -> Result<()> {
        self.network.set_link(index, false)
    }

    /// Connects node `index` to the network again.
    pub fn heal(&self, index: usize) -> Result<()> {
        self.network.set_link(index, true)
    }

    /// Runs `rabbitmqctl` against node `index`; its standard output.
    pub fn rabbitmqctl(&self, index: usize, args: &[&str]) -> Result<String> {
        self.nodes[index].rabbitmqctl(args)
    }

    /// The index of the node that leads quorum queue `queue`, asked of
    /// node `ask`; `None` while the queue has no leader.
    pub fn leader_of(&self, queue: &str, ask: usize) -> Result<Option<usize>> {
        // Asked of the queue's Raft members alone: `list_queues` waits on
        // every queue of the vhost, and times out while any is unresponsive.
        let status =
            self.nodes[ask].rabbitmq_queues(&["quorum_status", queue, "--formatter", "json"])?;
        Ok(leader_in(&status)
            .and_then(|leader| self.nodes.iter().position(|node| node.name() == leader)))
    }

    /// Waits until every node sees all of them running, and the quorum
    /// queues have a leader again.
    pub fn wait_joined(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let expected = self.nodes.len();
        loop {
            let joined = self.nodes.iter().enumerate().all(|(index, _)| {
                self.rabbitmqctl(index, &["cluster_status", "--formatter", "json"])
                    .map(|status| running_nodes(&status) == expected)
                    .unwrap_or(false)
            });
            if joined {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotStarted {
                    node: "cluster".into(),
                    waited: timeout,
                    log_tail: self
                        .rabbitmqctl(0, &["cluster_status"])
                        .unwrap_or_else(|err| err.to_string()),
                });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The node `quorum_status --formatter json` names as the leader.
fn leader_in(status: &str) -> Option<&str> {
    // One object per member: `{"Node Name":"rabbit@…","Raft State":"leader",…}`.
    status.split('}').find_map(|member| {
        member.contains("\"Raft State\":\"leader\"").then(|| {
            member
                .split_once("\"Node Name\":\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(name, _)| name)
        })?
    })
}

/// How many nodes `cluster_status --formatter json` lists as running.
fn running_nodes(status: &str) -> usize {
    // The JSON holds `"running_nodes":["rabbit@…",…]`; counted without a
    // JSON parser, which this harness does not otherwise need.
    status
        .split_once("\"running_nodes\":[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list.matches("rabbit@").count())
        .unwrap_or(0)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The network goes after this, when its field is dropped.
        for node in &mut self.nodes {
            let _ = node.kill();
        }
    }
}

/// Runs `command` for at most [`COMMAND_TIMEOUT`]; its standard output, or
/// an error with its standard error. A CLI call to a node that is cut off
/// can wait for minutes.
fn run(command: &mut std::process::Command) -> Result<String> {
    use std::io::Read;
    let line = format!("{command:?}");
    let io = |source| Error::Io {
        what: format!("running {line}"),
        source,
    };
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(io)?;
    // Read on threads of their own: a full pipe would stall the child.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = stdout.as_mut() {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = stderr.as_mut() {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io)? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) if status.success() => Ok(stdout),
        Some(status) => Err(Error::Command {
            command: line,
            detail: format!("{status}: {}{}", stderr.trim(), stdout.trim()),
        }),
        None => Err(Error::Command {
            command: line,
            detail: format!("no answer within {COMMAND_TIMEOUT:?}"),
        }),
    }
}

/// How long one command of the harness may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::{leader_in, running_nodes};

    #[test]
    fn finds_the_leader_in_a_quorum_status() {
        let status = r#"[{"Node Name":"rabbit@10.0.0.1","Raft State":"follower","Term":2},{"Node Name":"rabbit@10.0.0.2","Raft State":"leader","Term":2}]"#;
        assert_eq!(leader_in(status), Some("rabbit@10.0.0.2"));
        assert_eq!(leader_in("[]"), None);
    }

    #[test]
    fn counts_the_running_nodes_of_a_cluster_status() {
        let status = r#"{"disk_nodes":["rabbit@a","rabbit@b"],"running_nodes":["rabbit@10.0.0.1","rabbit@10.0.0.2"],"versions":{}}"#;
        assert_eq!(running_nodes(status), 2);
        assert_eq!(running_nodes("{}"), 0);
    }
}
