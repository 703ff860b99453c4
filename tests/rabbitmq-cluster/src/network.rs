//! The nodes' network: a namespace per node, each joined by a veth pair to
//! a bridge on this machine, which holds the address clients connect from.

use std::process::Command;

use crate::{Result, run};

/// The most nodes a leftover of an earlier run can have.
const MAX_NODES: usize = 9;

/// Which of the clusters that can run side by side (0 to 9): each has
/// names and a subnet of its own. Every name fits Linux's 15 characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(u8);

impl Slot {
    /// Slot `number`, taken modulo 10.
    pub fn new(number: u8) -> Self {
        Self(number % 10)
    }

    /// The slot's number.
    pub fn number(self) -> u8 {
        self.0
    }

    fn bridge(self) -> String {
        format!("possync-rmq{}", self.0)
    }

    /// The namespace of node `index`.
    pub(crate) fn namespace(self, index: usize) -> String {
        format!("possync-rmq{}{}", self.0, index + 1)
    }

    /// The address of node `index`.
    pub(crate) fn address(self, index: usize) -> String {
        format!("10.231.{}.{}", 70 + self.0, 11 + index)
    }

    /// This machine's address on the bridge.
    fn host_address(self) -> String {
        format!("10.231.{}.1", 70 + self.0)
    }

    /// This machine's end of node `index`'s link.
    fn host_link(self, index: usize) -> String {
        format!("possync-rmq{}{}h", self.0, index + 1)
    }
}

#[derive(Debug)]
pub(crate) struct Network {
    slot: Slot,
    size: usize,
}

impl Network {
    /// Makes the bridge and a namespace with a link to it for each node;
    /// what it made is removed again if a step fails.
    pub(crate) fn create(slot: Slot, size: usize) -> Result<Self> {
        let network = Self { slot, size };
        let bridge = slot.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", slot.host_address()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for index in 0..size {
            let namespace = slot.namespace(index);
            let link = slot.host_link(index);
            ip(&["netns", "add", &namespace])?;
            ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &namespace,
            ])?;
            ip(&["link", "set", &link, "master", &bridge, "up"])?;
            let inside = |args: &[&str]| {
                let mut full = vec!["netns", "exec", namespace.as_str(), "ip"];
                full.extend_from_slice(args);
                ip(&full)
            };
            inside(&[
                "addr",
                "add",
                &format!("{}/24", slot.address(index)),
                "dev",
                "eth0",
            ])?;
            inside(&["link", "set", "eth0", "up"])?;
            inside(&["link", "set", "lo", "up"])?;
        }
        Ok(network)
    }

    /// Takes node `index`'s link down (`up == false`) or up again.
    pub(crate) fn set_link(&self, index: usize, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.slot.host_link(index), state])?;
        Ok(())
    }

    /// Removes the namespaces, links and bridge an earlier run left, and
    /// kills whatever still runs in those namespaces.
    pub(crate) fn remove_leftovers(slot: Slot) {
        for index in 0..MAX_NODES {
            kill_all_in(&slot.namespace(index));
        }
        remove(slot, MAX_NODES);
    }
}

impl Drop for Network {
    /// Removes what [`Network::create`] made; the node processes are gone by then.
    fn drop(&mut self) {
        remove(self.slot, self.size);
    }
}

fn remove(slot: Slot, size: usize) {
    for index in 0..size {
        // The host end first: a namespace is freed lazily, and its link
        // would linger a moment after `netns del`.
        let _ = ip(&["link", "del", &slot.host_link(index)]);
        let _ = ip(&["netns", "del", &slot.namespace(index)]);
    }
    let _ = ip(&["link", "del", &slot.bridge()]);
}

/// The processes running in `namespace`.
pub(crate) fn processes_in(namespace: &str) -> Vec<u32> {
    ip(&["netns", "pids", namespace])
        .map(|pids| {
            pids.lines()
                .filter_map(|pid| pid.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process in `namespace`.
pub(crate) fn kill_all_in(namespace: &str) {
    let pids: Vec<String> = processes_in(namespace).iter().map(u32::to_string).collect();
    if !pids.is_empty() {
        let _ = Command::new("kill").arg("-9").args(&pids).output();
    }
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}
