//! Which `Host` a request may name. A web page can point a name of its own
//! at 127.0.0.1 (DNS rebinding) and then read this endpoint as if it were
//! its own site; the browser still sends that name as `Host`, so refusing
//! names we do not know defeats it. An IP address cannot be rebound, so any
//! IP address is fine: that keeps a status endpoint on a LAN address
//! reachable as `http://192.168.1.20:9464/`.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The hosts this endpoint answers for.
#[derive(Debug)]
pub(super) struct AllowedHosts {
    port: u16,
    /// From `[status] allowed_hosts`, lowercase.
    names: Vec<String>,
}

/// Why a request was refused; the text is the response body.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum HostRefused {
    /// No `Host` header.
    #[error(
        "the request names no host: send a Host header with localhost, an IP address of this machine, or a name in [status] allowed_hosts"
    )]
    Missing,
    /// A host we do not answer for.
    #[error(
        "this status endpoint answers for localhost and IP addresses on port {port}, and for the names in [status] allowed_hosts; not for {host:?}"
    )]
    Unknown {
        /// The host as the request gave it.
        host: String,
        /// The port the endpoint listens on.
        port: u16,
    },
}

impl AllowedHosts {
    pub(super) fn new(port: u16, names: &[String]) -> Self {
        Self {
            port,
            names: names.iter().map(|n| n.to_ascii_lowercase()).collect(),
        }
    }

    /// Checks the `Host` of a request (`name`, `name:port`, `[v6]:port`).
    pub(super) fn check(&self, host: Option<&str>) -> Result<(), HostRefused> {
        let host = host.ok_or(HostRefused::Missing)?;
        let lowercase = host.to_ascii_lowercase();
        let allowed = self.names.contains(&lowercase)
            || split(&lowercase).is_some_and(|(name, port)| {
                let port_fits = port.is_none_or(|p| p.parse::<u16>().ok() == Some(self.port));
                let name_fits = match name {
                    Name::Ip => true,
                    Name::Dns(name) => name == "localhost" || self.names.iter().any(|n| n == name),
                };
                port_fits && name_fits
            });
        if allowed {
            Ok(())
        } else {
            Err(HostRefused::Unknown {
                host: host.to_owned(),
                port: self.port,
            })
        }
    }
}

enum Name<'a> {
    Ip,
    Dns(&'a str),
}

/// The name and the port of a `Host`; `None` if it is malformed.
fn split(host: &str) -> Option<(Name<'_>, Option<&str>)> {
    if let Some(bracketed) = host.strip_prefix('[') {
        let (address, rest) = bracketed.split_once(']')?;
        address.parse::<Ipv6Addr>().ok()?;
        let port = match rest {
            "" => None,
            rest => Some(rest.strip_prefix(':')?),
        };
        return Some((Name::Ip, port));
    }
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    if name.parse::<Ipv4Addr>().is_ok() {
        Some((Name::Ip, port))
    } else {
        Some((Name::Dns(name), port))
    }
}

#[cfg(test)]
mod tests {
    use super::{AllowedHosts, HostRefused};

    fn hosts(names: &[&str]) -> AllowedHosts {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        AllowedHosts::new(9464, &names)
    }

    #[test]
    fn localhost_and_ip_addresses_on_the_status_port_are_answered() {
        let allowed = hosts(&[]);
        for host in [
            "localhost",
            "localhost:9464",
            "LocalHost:9464",
            "127.0.0.1",
            "127.0.0.1:9464",
            "[::1]",
            "[::1]:9464",
            "192.168.1.20:9464",
            "[fe80::1]:9464",
        ] {
            assert_eq!(allowed.check(Some(host)), Ok(()), "{host}");
        }
    }

    #[test]
    fn other_names_other_ports_and_malformed_hosts_are_refused() {
        let allowed = hosts(&[]);
        for host in [
            "evil.example",
            "evil.example:9464",
            "localhost.evil.example",
            "127.0.0.1.evil.example:9464",
            "localhost:8080",
            "127.0.0.1:80",
            "[::1]:1",
            "[::1",
            "[evil.example]:9464",
            "::1",
            "",
        ] {
            assert!(
                matches!(allowed.check(Some(host)), Err(HostRefused::Unknown { .. })),
                "{host}"
            );
        }
        assert_eq!(allowed.check(None), Err(HostRefused::Missing));
    }

    #[test]
    fn allowed_hosts_adds_names_on_the_status_port_and_exact_name_port_pairs() {
        let allowed = hosts(&["Till-3.store.lan", "localhost:8080"]);
        for host in [
            "till-3.store.lan",
            "till-3.store.lan:9464",
            "localhost:8080",
        ] {
            assert_eq!(allowed.check(Some(host)), Ok(()), "{host}");
        }
        for host in [
            "till-3.store.lan:80",
            "till-4.store.lan",
            "evil.example:8080",
        ] {
            assert!(allowed.check(Some(host)).is_err(), "{host}");
        }
    }
}
