//! `possync admin`: per-terminal and per-publisher broker users with the
//! least permissions they need, through the RabbitMQ management HTTP API.
//!
//! Shared credentials isolate nothing: anyone holding them can bind
//! `license.#` and read every store. A provisioned terminal may only read
//! its own queue (which the administrator declares and binds for it); a
//! provisioned publisher may only publish well-formed `license.<KEY>.<type>`
//! keys to the exchange.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use rand::Rng;
use serde_json::json;

use crate::config::{Config, Delivery};
use crate::events;
use crate::identity::{LicenseKey, MAX_ID_LEN, TerminalId};
use crate::redact::{UrlParts, redact_secrets, redact_url, url_parts};
use crate::topology::TerminalTopology;

/// An administrative action that failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The management API does not answer.
    #[error(
        "cannot reach the RabbitMQ management API at {url} ({detail}); enable it with `rabbitmq-plugins enable rabbitmq_management` or set admin.url"
    )]
    Unreachable {
        /// The API's URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// The API refused the admin credentials.
    #[error(
        "the management API refused admin user {user:?} (HTTP {status}); set admin.user and admin.password (or POSSYNC_ADMIN__PASSWORD) to an administrator's"
    )]
    Unauthorized {
        /// The user.
        user: String,
        /// The HTTP status.
        status: u16,
    },
    /// A request failed.
    #[error("{what} failed: HTTP {status}: {body}")]
    Api {
        /// What was being done.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The API's answer.
        body: String,
    },
    /// The broker URL in config cannot carry new credentials.
    #[error("broker.url {0} cannot be used: {1}")]
    BrokerUrl(String, String),
    /// The output file cannot be written.
    #[error("cannot write {path}: {detail}")]
    Output {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
    /// A name is not valid.
    #[error(transparent)]
    InvalidId(#[from] crate::identity::InvalidId),
}

/// What `provision-terminal` created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// The broker user.
    pub user: String,
    /// What the user may do, for the operator.
    pub summary: String,
}

/// What `revoke-terminal` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The broker user.
    pub user: String,
    /// Whether the user existed.
    pub existed: bool,
    /// Connections closed.
    pub connections_closed: usize,
    /// Whether the queue was deleted too.
    pub queue_deleted: bool,
}

/// A client of the management API.
#[derive(Debug)]
pub struct Admin {
    agent: ureq::Agent,
    base: String,
    admin_user: String,
    authorization: String,
    vhost: String,
    config: Config,
}

/// The broker user of a terminal. `.` cannot occur in ids, so this name is
/// unambiguous.
pub fn terminal_user(license_key: &LicenseKey, terminal_id: &TerminalId) -> String {
    format!("possync.terminal.{license_key}.{terminal_id}")
}

/// The broker user of a publisher.
pub fn publisher_user(name: &TerminalId) -> String {
    format!("possync.publisher.{name}")
}

impl Admin {
    /// A client for the API in `config.admin`, acting on the vhost of `broker.url`.
    pub fn new(config: &Config) -> Result<Self, AdminError> {
        let url = config.broker.url();
        let uri: lapin::uri::AMQPUri = url.parse().map_err(|err: String| {
            AdminError::BrokerUrl(redact_url(url), redact_secrets(&err, url))
        })?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        let credentials = format!("{}:{}", config.admin.user, config.admin.password);
        Ok(Self {
            agent,
            base: config.admin.url.trim_end_matches('/').to_owned(),
            admin_user: config.admin.user.clone(),
            authorization: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(credentials)
            ),
            vhost: uri.vhost,
            config: config.clone(),
        })
    }

    /// Creates the terminal's user, its permissions and its queue, and
    /// writes a ready terminal config (mode 0600) to `output`: every broker
    /// URL of the list with the new credentials, and the TLS settings.
    /// `output` is created first, so a path that cannot be written stops
    /// this before a live terminal's password changes.
    pub fn provision_terminal(
        &self,
        license_key: &LicenseKey,
        terminal_id: &TerminalId,
        database: &Path,
        output: &Path,
    ) -> Result<Provisioned, AdminError> {
        let output = ReservedOutput::create(output)?;
        let user = terminal_user(license_key, terminal_id);
        let mut config = self.config.clone();
        config.terminal.license_key = Some(license_key.clone());
        config.terminal.terminal_id = Some(terminal_id.clone());
        config.terminal.delivery = Delivery::Durable;
        let topology = TerminalTopology::new(&config, license_key, terminal_id);
        self.declare_terminal_topology(&topology)?;
        let password = generate_password();
        self.put_user(&user, &password)?;
        let queue = escape(&topology.queue);
        self.request(
            "PUT",
            &format!("/api/permissions/{}/{}", self.vhost_path(), encode(&user)),
            Some(json!({
                "configure": "^$",
                "write": format!("^{}$", escape(&topology.exchange)),
                // Its queue, and its dead-letter queue for `possync quarantine`.
                "read": format!("^{queue}(\\.dead_letter)?$"),
            })),
            "setting the terminal's permissions",
        )?;
        self.request(
            "PUT",
            &format!(
                "/api/topic-permissions/{}/{}",
                self.vhost_path(),
                encode(&user)
            ),
            Some(json!({
                "exchange": topology.exchange,
                // Its own upstream keys only: never another terminal's, never a store's.
                "write": format!(
                    "^up\\.{}\\.{}\\.[a-z0-9_]{{1,64}}$",
                    escape(license_key.as_str()),
                    escape(terminal_id.as_str())
                ),
                "read": format!("^license\\.{}\\.", escape(license_key.as_str())),
            })),
            "setting the terminal's topic permissions",
        )?;
        let file = format!(
            "# Written by `possync admin provision-terminal` for terminal {terminal_id} of store {license_key}.\n\
             # It holds the terminal's broker password: keep it readable by its owner only.\n\n\
             [broker]\n\
             {broker}\
             queue_type = {queue_type}\n\
             # The administrator declared the queue; this user may only read it.\n\
             declare_topology = false\n\n\
             [terminal]\n\
             license_key = {license_key_text}\n\
             terminal_id = {terminal_id_text}\n\
             database = {database}\n\
             queue_expiry_days = {days}\n\
             max_attempts = {attempts}\n",
            broker = self.broker_lines(&user, &password)?,
            queue_type = quoted(&format!("{:?}", config.broker.queue_type).to_lowercase()),
            license_key_text = quoted(license_key.as_str()),
            terminal_id_text = quoted(terminal_id.as_str()),
            database = quoted(&database.display().to_string()),
            days = config.terminal.queue_expiry_days,
            attempts = config.terminal.max_attempts,
        );
        output.fill(&file)?;
        Ok(Provisioned {
            summary: format!(
                "broker user {user}: may read queue {} only (bound to {}) and publish upstream on up.{license_key}.{terminal_id}.<type> only; may not configure or bind",
                topology.queue, topology.binding_key
            ),
            user,
        })
    }

    /// Creates a publisher's user, which may only publish well-formed
    /// `license.<KEY>.<type>` keys to the exchange, and writes its config.
    pub fn provision_publisher(
        &self,
        name: &TerminalId,
        output: &Path,
    ) -> Result<Provisioned, AdminError> {
        let output = ReservedOutput::create(output)?;
        let user = publisher_user(name);
        let exchange = self.config.broker.exchange.clone();
        self.request(
            "PUT",
            &format!("/api/exchanges/{}/{}", self.vhost_path(), encode(&exchange)),
            Some(json!({ "type": "topic", "durable": true })),
            "declaring the exchange",
        )?;
        let password = generate_password();
        self.put_user(&user, &password)?;
        self.request(
            "PUT",
            &format!("/api/permissions/{}/{}", self.vhost_path(), encode(&user)),
            Some(json!({ "configure": "^$", "write": format!("^{}$", escape(&exchange)), "read": "^$" })),
            "setting the publisher's permissions",
        )?;
        self.request(
            "PUT",
            &format!(
                "/api/topic-permissions/{}/{}",
                self.vhost_path(),
                encode(&user)
            ),
            Some(json!({
                "exchange": exchange,
                "write": format!("^license\\.[A-Za-z0-9_-]{{1,{MAX_ID_LEN}}}\\.[a-z0-9_]{{1,64}}$"),
                "read": "^$",
            })),
            "setting the publisher's topic permissions",
        )?;
        let file = format!(
            "# Written by `possync admin provision-publisher` for publisher {name}.\n\
             # It holds the publisher's broker password: keep it readable by its owner only.\n\n\
             [broker]\n\
             {broker}\
             # The administrator declared the exchange; this user may only publish to it.\n\
             declare_topology = false\n",
            broker = self.broker_lines(&user, &password)?,
        );
        output.fill(&file)?;
        Ok(Provisioned {
            summary: format!(
                "broker user {user}: may publish to {} with keys license.<KEY>.<type> only; may not read, bind or configure",
                self.config.broker.exchange
            ),
            user,
        })
    }

    /// Deletes a terminal's user and closes its connections, so it cannot
    /// read again; with `delete_queue`, its queues go too.
    pub fn revoke_terminal(
        &self,
        license_key: &LicenseKey,
        terminal_id: &TerminalId,
        delete_queue: bool,
    ) -> Result<Revoked, AdminError> {
        let user = terminal_user(license_key, terminal_id);
        let (status, _) = self.call("DELETE", &format!("/api/users/{}", encode(&user)), None)?;
        let existed = match status {
            200..=299 => true,
            404 => false,
            _ => return Err(self.failure("deleting the terminal's user", status, String::new())),
        };
        // Deleting a user does not end the connections it already has. This
        // listing asks the connections themselves, not the statistics (which
        // lag by seconds).
        let (status, body) = self.call(
            "GET",
            &format!("/api/connections/username/{}", encode(&user)),
            None,
        )?;
        if !(200..=299).contains(&status) {
            return Err(self.failure("listing connections", status, body));
        }
        let connections: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        let mut connections_closed = 0;
        for connection in &connections {
            if let Some(name) = connection["name"].as_str() {
                let (status, _) = self.call(
                    "DELETE",
                    &format!("/api/connections/{}", encode(name)),
                    None,
                )?;
                if (200..=299).contains(&status) || status == 404 {
                    connections_closed += 1;
                }
            }
        }
        let mut queue_deleted = false;
        if delete_queue {
            let mut config = self.config.clone();
            config.terminal.delivery = Delivery::Durable;
            let topology = TerminalTopology::new(&config, license_key, terminal_id);
            for queue in [&topology.queue, &topology.dead_letter_queue] {
                let (status, body) = self.call(
                    "DELETE",
                    &format!("/api/queues/{}/{}", self.vhost_path(), encode(queue)),
                    None,
                )?;
                if !(200..=299).contains(&status) && status != 404 {
                    return Err(self.failure("deleting the terminal's queue", status, body));
                }
            }
            queue_deleted = true;
        }
        Ok(Revoked {
            user,
            existed,
            connections_closed,
            queue_deleted,
        })
    }

    fn declare_terminal_topology(&self, topology: &TerminalTopology) -> Result<(), AdminError> {
        let vhost = self.vhost_path();
        let arguments = |list: Vec<(&'static str, crate::topology::Argument)>| {
            serde_json::Value::Object(
                list.into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_json()))
                    .collect(),
            )
        };
        self.request(
            "PUT",
            &format!("/api/exchanges/{vhost}/{}", encode(&topology.exchange)),
            Some(json!({ "type": "topic", "durable": true })),
            "declaring the exchange",
        )?;
        self.request(
            "PUT",
            &format!(
                "/api/exchanges/{vhost}/{}",
                encode(&topology.dead_letter_exchange)
            ),
            Some(json!({ "type": "direct", "durable": true })),
            "declaring the dead-letter exchange",
        )?;
        let (status, body) = self.call(
            "PUT",
            &format!("/api/queues/{vhost}/{}", encode(&topology.dead_letter_queue)),
            Some(json!({ "durable": true, "arguments": arguments(topology.dead_letter_arguments()) })),
        )?;
        match status {
            200..=299 => {}
            // Made before dead-letter queues had an expiry: use it as it is.
            400 if body.contains("inequivalent arg") => {
                events::dead_letter_queue_kept(&topology.dead_letter_queue, &body);
            }
            _ => return Err(self.failure("declaring the dead-letter queue", status, body)),
        }
        self.request(
            "POST",
            &format!(
                "/api/bindings/{vhost}/e/{}/q/{}",
                encode(&topology.dead_letter_exchange),
                encode(&topology.dead_letter_queue)
            ),
            Some(json!({ "routing_key": topology.dead_letter_queue })),
            "binding the dead-letter queue",
        )?;
        self.request(
            "PUT",
            &format!("/api/queues/{vhost}/{}", encode(&topology.queue)),
            Some(json!({ "durable": true, "arguments": arguments(topology.queue_arguments()) })),
            "declaring the terminal's queue",
        )?;
        self.request(
            "POST",
            &format!(
                "/api/bindings/{vhost}/e/{}/q/{}",
                encode(&topology.exchange),
                encode(&topology.queue)
            ),
            Some(json!({ "routing_key": topology.binding_key })),
            "binding the terminal's queue",
        )?;
        Ok(())
    }

    /// The `[broker]` lines of a provisioned config: every broker URL of
    /// the list with the new credentials, the exchange, and the TLS files.
    fn broker_lines(&self, user: &str, password: &str) -> Result<String, AdminError> {
        let broker = &self.config.broker;
        let urls = broker
            .urls
            .iter()
            .map(|url| with_credentials(url, user, password).map(toml::Value::String))
            .collect::<Result<Vec<_>, _>>()?;
        let mut lines = format!(
            "url = {}\nexchange = {}\n",
            toml::Value::Array(urls),
            quoted(&broker.exchange)
        );
        for (key, path) in [
            ("tls_ca_file", &broker.tls_ca_file),
            ("tls_client_cert_file", &broker.tls_client_cert_file),
            ("tls_client_key_file", &broker.tls_client_key_file),
        ] {
            if let Some(path) = path {
                lines.push_str(&format!(
                    "{key} = {}\n",
                    quoted(&path.display().to_string())
                ));
            }
        }
        Ok(lines)
    }

    fn put_user(&self, user: &str, password: &str) -> Result<(), AdminError> {
        self.request(
            "PUT",
            &format!("/api/users/{}", encode(user)),
            Some(json!({ "password": password, "tags": "" })),
            "creating the broker user",
        )
    }

    fn vhost_path(&self) -> String {
        encode(&self.vhost)
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        what: &str,
    ) -> Result<(), AdminError> {
        let (status, text) = self.call(method, path, body)?;
        if (200..=299).contains(&status) {
            Ok(())
        } else {
            Err(self.failure(what, status, text))
        }
    }

    fn failure(&self, what: &str, status: u16, body: String) -> AdminError {
        if status == 401 {
            AdminError::Unauthorized {
                user: self.admin_user.clone(),
                status,
            }
        } else {
            AdminError::Api {
                what: what.to_owned(),
                status,
                body,
            }
        }
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, String), AdminError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |err: ureq::Error| AdminError::Unreachable {
            url: self.base.clone(),
            detail: err.to_string(),
        };
        let response = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.authorization)
                .call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.authorization)
                .header("X-Reason", "revoked by possync admin")
                .call(),
            ("POST", Some(body)) => self
                .agent
                .post(&url)
                .header("Authorization", &self.authorization)
                .send_json(&body),
            (_, Some(body)) => self
                .agent
                .put(&url)
                .header("Authorization", &self.authorization)
                .send_json(&body),
            (_, None) => self
                .agent
                .put(&url)
                .header("Authorization", &self.authorization)
                .send_empty(),
        };
        let mut response = response.map_err(unreachable)?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        Ok((status, text))
    }
}

/// 32 random letters and digits: 190 bits, and nothing a URL must escape.
fn generate_password() -> String {
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// `url` with its user and password replaced.
fn with_credentials(url: &str, user: &str, password: &str) -> Result<String, AdminError> {
    let UrlParts {
        scheme, host, path, ..
    } = url_parts(url).ok_or_else(|| {
        AdminError::BrokerUrl(
            redact_url(url),
            "it has no scheme (amqp:// or amqps://)".into(),
        )
    })?;
    Ok(format!(
        "{scheme}://{}:{password}@{host}{path}",
        encode(user)
    ))
}

/// Escapes `text` for a regular expression of RabbitMQ's permissions:
/// every character that is not a letter or digit is escaped, so a key can
/// never widen a pattern (RabbitMQ before 4.2.4 does not escape `{username}`).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if !c.is_ascii_alphanumeric() {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Percent-encodes a path segment of the management API.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `text` as a TOML string, quoted and escaped.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The output file, created empty (mode 0600: it will hold a password)
/// before anything changes on the broker: a path that cannot be written
/// stops provisioning before a live till's password is rotated. Removed
/// again if provisioning fails before it is filled.
struct ReservedOutput {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
}

impl ReservedOutput {
    fn create(path: &Path) -> Result<Self, AdminError> {
        let refused = |detail: String| AdminError::Output {
            path: path.display().to_string(),
            detail,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(path).map_err(|err| match err.kind() {
            std::io::ErrorKind::AlreadyExists => {
                refused("it exists; remove it or choose another --output".into())
            }
            std::io::ErrorKind::NotFound => refused(format!(
                "its folder {} does not exist; create it or choose another --output",
                path.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .display()
            )),
            _ => refused(err.to_string()),
        })?;
        Ok(Self {
            path: path.to_owned(),
            file: Some(file),
        })
    }

    /// Writes the config; the broker user exists by now, so a failure says so.
    fn fill(mut self, contents: &str) -> Result<(), AdminError> {
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        let written = file
            .write_all(contents.as_bytes())
            .and_then(|()| file.sync_all());
        written.map_err(|err| {
            let _ = std::fs::remove_file(&self.path);
            AdminError::Output {
                path: self.path.display().to_string(),
                detail: format!(
                    "{err}; the broker user's new password is lost with it: run the command again with a writable --output"
                ),
            }
        })
    }
}

impl Drop for ReservedOutput {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_keys_literal_in_permission_patterns() {
        assert_eq!(escape("possync.A-1.t_2"), "possync\\.A\\-1\\.t\\_2");
    }

    #[test]
    fn new_credentials_replace_the_old_and_keep_host_and_vhost() {
        assert_eq!(
            with_credentials(
                "amqp://guest:guest@10.0.0.1:5672/%2f",
                "possync.terminal.K.t",
                "pw"
            )
            .expect("url"),
            "amqp://possync.terminal.K.t:pw@10.0.0.1:5672/%2f"
        );
        assert_eq!(
            with_credentials("amqps://host", "u", "p").expect("url"),
            "amqps://u:p@host"
        );
    }
}
