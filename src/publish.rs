//! `possync publish ...`

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Arg, ArgAction, Args, Subcommand};
use possync_core::{Config, LicenseKey, Publisher, Registry};
use possync_sdk::Envelope;

use crate::backend_client::{BackendClient, Outgoing};
use crate::fields::{self, Field};

#[derive(Debug, Subcommand)]
pub(crate) enum PublishCommand {
    /// Publish a whole catalog from a file to one or more stores, with
    /// progress and a summary. The file holds JSON lines
    /// ({"type": "price_update", "payload": {...}}) or CSV with a `type`
    /// column and one column per payload field. Each line is checked by the
    /// plugin that handles its type; bad lines are reported with their
    /// number and skipped.
    Bulk {
        #[command(flatten)]
        to: Stores,
        #[command(flatten)]
        wait: WaitApplied,
        /// The catalog: .jsonl or .csv.
        #[arg(long, value_name = "FILE")]
        file: std::path::PathBuf,
        /// Publish nothing if any line is bad.
        #[arg(long)]
        stop_on_error: bool,
    },
    /// Publish a message of any type, with its payload as JSON, unchecked:
    /// for a type only the terminals' plugins know.
    Raw {
        #[command(flatten)]
        to: Stores,
        #[command(flatten)]
        wait: WaitApplied,
        /// The message type, for example `price_update`.
        #[arg(long = "type", value_name = "TYPE")]
        message_type: String,
        /// The payload, a JSON object.
        #[arg(long, value_name = "JSON")]
        payload: String,
    },
    /// List the message types this possync can check and publish, with
    /// their fields.
    Types,
    /// A message of a type a plugin handles: `possync publish <TYPE> --help`
    /// shows its fields.
    #[command(external_subcommand)]
    Typed(Vec<String>),
}

/// The stores a message goes to.
#[derive(Debug, Args)]
pub(crate) struct Stores {
    /// A store's license key; repeat to publish to several stores.
    #[arg(long = "license", value_name = "KEY", required = true)]
    licenses: Vec<LicenseKey>,
}

/// How long to wait for the terminals, when asked to.
#[derive(Debug, Args)]
pub(crate) struct WaitApplied {
    /// Wait until every terminal of each store that the backend knows has
    /// applied the change, at most SECS seconds (60 without a value); name
    /// those that have not when the time is up and exit 1. Needs a
    /// [backend]: it learns from the terminals' delivery receipts.
    #[arg(
        long = "wait-applied",
        value_name = "SECS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = DEFAULT_WAIT_SECS,
        value_parser = parse_wait,
    )]
    wait_applied: Option<Duration>,
}

/// `--wait-applied` without a value.
const DEFAULT_WAIT_SECS: &str = "60";

/// `30`, `30s`, `2m`: a wait of at most a day.
fn parse_wait(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.strip_suffix('m') {
        Some(minutes) => (minutes, 60),
        None => (text.strip_suffix('s').unwrap_or(text), 1),
    };
    match number.parse::<u64>().ok().and_then(|n| n.checked_mul(unit)) {
        Some(secs) if secs <= 86_400 => Ok(Duration::from_secs(secs)),
        _ => Err(format!(
            "{text:?} is not a wait: give seconds (`30`, `30s`) or minutes (`2m`), at most a day"
        )),
    }
}

pub(crate) async fn run(config: &Config, command: PublishCommand) -> anyhow::Result<ExitCode> {
    let (envelopes, wait) = match command {
        PublishCommand::Bulk {
            to,
            wait,
            file,
            stop_on_error,
        } => {
            let registry = registry(config)?;
            return bulk(
                config,
                &registry,
                &to,
                &file,
                stop_on_error,
                wait.wait_applied,
            )
            .await;
        }
        PublishCommand::Types => {
            print!("{}", types_help(&registry(config)?));
            return Ok(ExitCode::SUCCESS);
        }
        PublishCommand::Typed(mut args) => {
            // `--config` after the type names the config to use, as before it.
            let chosen = match take_option(&mut args, "config", Some("-c")) {
                Some(path) => Some(Config::load(Some(std::path::Path::new(&path)))?.config),
                None => None,
            };
            let _ = take_option(&mut args, "log-format", None);
            let config = chosen.as_ref().unwrap_or(config);
            let limit = config.terminal.max_message_bytes;
            return match typed(&registry(config)?, &args, limit)? {
                Ok((envelopes, wait)) => send(config, envelopes, wait).await,
                Err(refused) => {
                    eprintln!("{refused}");
                    Ok(ExitCode::from(2))
                }
            };
        }
        PublishCommand::Raw {
            to,
            wait,
            message_type,
            payload,
        } => {
            let payload: serde_json::Value =
                serde_json::from_str(&payload).context("--payload is not valid JSON")?;
            if !payload.is_object() {
                anyhow::bail!("--payload must be a JSON object, like '{{\"product_id\": \"P1\"}}'");
            }
            let envelopes = to
                .licenses
                .iter()
                .map(|key| Envelope::new(message_type.clone(), key.as_str(), payload.clone()))
                .collect();
            (envelopes, wait.wait_applied)
        }
    };
    send(config, envelopes, wait).await
}

/// Publishes `envelopes` through the backend when one is configured, else
/// straight to the broker, and prints each change's fate and its path.
async fn send(
    config: &Config,
    envelopes: Vec<Envelope>,
    wait: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    if wait.is_some() && config.backend.is_none() {
        anyhow::bail!(NO_BACKEND_TO_WAIT);
    }
    if let Some(link) = &config.backend {
        let client = BackendClient::new(link);
        let changes = envelopes
            .into_iter()
            .map(|envelope| Outgoing {
                store: envelope.license_key,
                message_type: envelope.message_type,
                payload: envelope.payload,
            })
            .collect::<Vec<_>>();
        // One key for the command: its retries apply the changes once.
        let key = format!("publish-{}", uuid::Uuid::now_v7());
        let answered = tokio::task::block_in_place(|| client.submit(&changes, &key))?;
        for change in &answered {
            println!("via backend {}: {change}", client.url());
        }
        let Some(wait) = wait else {
            return Ok(ExitCode::SUCCESS);
        };
        let heads = answered
            .iter()
            .filter_map(|change| Some((change.store.clone(), change.seq?)));
        return tokio::task::block_in_place(|| wait_applied(&client, heads, wait));
    }
    let publisher = Publisher::connect(&config.broker)
        .await?
        .with_max_message_bytes(config.terminal.max_message_bytes);
    let published = publisher.publish_envelopes(envelopes).await;
    publisher.close().await;
    for message in published? {
        println!(
            "directly to the broker: confirmed {} (message id {})",
            message.routing_key, message.message_id
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Why `--wait-applied` cannot be done here.
const NO_BACKEND_TO_WAIT: &str = "--wait-applied needs a [backend] in the config (url and token): the catalog of record learns from the terminals' delivery receipts what they applied; without one, publish confirms only that the broker has the messages";

/// Waits until every known terminal of each store applied its highest seq
/// in `heads` (the last change per store), printing what happened; exit 1
/// when one has not within `wait`.
fn wait_applied(
    client: &BackendClient,
    heads: impl Iterator<Item = (String, i64)>,
    wait: Duration,
) -> anyhow::Result<ExitCode> {
    let mut last: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
    for (store, seq) in heads {
        let entry = last.entry(store).or_insert(seq);
        *entry = (*entry).max(seq);
    }
    let started = std::time::Instant::now();
    let mut all = true;
    for (store, seq) in last {
        let left = wait.saturating_sub(started.elapsed());
        let applied = client.wait_applied(&store, seq, left)?;
        let elapsed = started.elapsed().as_secs_f64();
        if applied.terminals.is_empty() {
            println!(
                "store {store}: no terminal of this store has reported to the backend yet, so none is waited for"
            );
        } else if applied.complete {
            let names: Vec<&str> = applied
                .terminals
                .iter()
                .map(|t| t.terminal.as_str())
                .collect();
            println!(
                "store {store}: seq {seq} applied by all {} terminal(s) ({}) after {elapsed:.1} s",
                names.len(),
                names.join(", ")
            );
        } else {
            all = false;
            let pending: Vec<String> = applied
                .terminals
                .iter()
                .filter(|t| applied.pending.contains(&t.terminal))
                .map(|t| {
                    let state = match t.offline_since_ms {
                        Some(ms) => format!(
                            "offline since {}",
                            possync_core::moment_text(ms, possync_core::unix_now_ms())
                        ),
                        None => t.state.clone(),
                    };
                    format!(
                        "{} ({state}, applied up to {})",
                        t.terminal, t.applied_up_to
                    )
                })
                .collect();
            println!(
                "store {store}: seq {seq} not applied after {:.0} s by {} of {} terminal(s): {}",
                wait.as_secs_f64(),
                pending.len(),
                applied.terminals.len(),
                pending.join(", ")
            );
        }
    }
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn bulk(
    config: &Config,
    registry: &Registry,
    to: &Stores,
    file: &std::path::Path,
    stop_on_error: bool,
    wait: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    if wait.is_some() && config.backend.is_none() {
        anyhow::bail!(NO_BACKEND_TO_WAIT);
    }
    let (changes, bad) = crate::bulk::read_changes(registry, file)?;
    for line in &bad {
        eprintln!("{}:{}: {}", file.display(), line.line, line.reason);
    }
    if stop_on_error && !bad.is_empty() {
        anyhow::bail!(
            "{} bad line(s) in {}; nothing was published (--stop-on-error)",
            bad.len(),
            file.display()
        );
    }
    let started = std::time::Instant::now();
    let failed = match &config.backend {
        Some(link) => {
            let client = BackendClient::new(link);
            let sent = tokio::task::block_in_place(|| {
                crate::bulk::submit(&client, &changes, &to.licenses)
            });
            for (store, err) in &sent.failed {
                eprintln!("store {store}: {err:#}");
            }
            let heads: Vec<String> = sent
                .heads
                .iter()
                .map(|(store, seq)| format!("store {store} seq {seq}"))
                .collect();
            println!(
                "published {} change(s) to {} store(s) via backend {} in {:.1} s, each durable in the catalog of record ({} stale); {}; {} bad line(s) skipped; {} store(s) failed",
                sent.sequenced + sent.stale,
                to.licenses.len() - sent.failed.len(),
                client.url(),
                started.elapsed().as_secs_f64(),
                sent.stale,
                if heads.is_empty() {
                    "no store's head moved".to_owned()
                } else {
                    heads.join(", ")
                },
                bad.len(),
                sent.failed.len()
            );
            if let Some(wait) = wait {
                let heads = sent
                    .heads
                    .iter()
                    .map(|(store, seq)| (store.to_string(), *seq));
                let waited = tokio::task::block_in_place(|| wait_applied(&client, heads, wait))?;
                if waited != ExitCode::SUCCESS {
                    return Ok(waited);
                }
            }
            sent.failed.len()
        }
        None => {
            let publisher = Publisher::connect(&config.broker)
                .await?
                .with_max_message_bytes(config.terminal.max_message_bytes);
            let (confirmed, failed) =
                crate::bulk::publish(&publisher, &changes, &to.licenses).await;
            publisher.close().await;
            for (store, err) in &failed {
                eprintln!("store {store}: {err}");
            }
            println!(
                "published {confirmed} change(s) to {} store(s) directly to the broker in {:.1} s, all confirmed by the broker; {} bad line(s) skipped; {} store(s) failed",
                to.licenses.len() - failed.len(),
                started.elapsed().as_secs_f64(),
                bad.len(),
                failed.len()
            );
            failed.len()
        }
    };
    Ok(if bad.is_empty() && failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The plugins this publisher knows: the built-in ones and the libraries
/// named in `[plugins]`, so a back office checks what its terminals apply.
fn registry(config: &Config) -> anyhow::Result<Registry> {
    Ok(Registry::for_publishing(&config.plugins)?)
}

/// The message types `registry` knows, one per line with their fields, for
/// `possync publish types` and `possync publish --help`.
pub(crate) fn types_help(registry: &Registry) -> String {
    let mut text = String::new();
    for plugin in registry.plugins().iter().filter(|p| p.enabled) {
        for message_type in &plugin.message_types {
            let fields = registry
                .schema(message_type)
                .map(|schema| fields::of_schema(&schema))
                .unwrap_or_default();
            let names: Vec<String> = fields
                .iter()
                .map(|f| {
                    let flag = format!("--{} {}", kebab(&f.name), f.value_name());
                    if f.required {
                        flag
                    } else {
                        format!("[{flag}]")
                    }
                })
                .collect();
            text.push_str(&format!(
                "  {} {}\n      ({}: {})\n",
                kebab(message_type),
                names.join(" "),
                plugin.name,
                plugin.description
            ));
        }
    }
    text
}

/// `price_update` as a command: `price-update`.
fn kebab(name: &str) -> String {
    name.replace('_', "-")
}

/// A publish command of a type some plugin handles, parsed by the fields
/// its schema gives: the envelopes for every store, or why the payload is
/// refused. `--help` and argument errors exit here, as clap does.
fn typed(
    registry: &Registry,
    args: &[String],
    max_file_bytes: usize,
) -> anyhow::Result<Result<Typed, String>> {
    let Some(named) = args.first() else {
        anyhow::bail!("name a message type: possync publish <TYPE> ...");
    };
    let message_type = named.replace('-', "_");
    let Some(schema) = registry.schema(&message_type) else {
        let known = registry
            .plugins()
            .into_iter()
            .filter(|p| p.enabled)
            .flat_map(|p| p.message_types)
            .map(|t| kebab(&t))
            .collect::<Vec<_>>()
            .join(", ");
        return Ok(Err(format!(
            "error: no plugin here handles message type {named:?} (known: {known}); name its plugin library in [plugins], or send it unchecked with `possync publish raw --type {message_type} ...`"
        )));
    };
    let fields = fields::of_schema(&schema);
    let matches = command_for(named, &schema, &fields, max_file_bytes)
        .try_get_matches_from(args)
        .unwrap_or_else(|err| err.exit());
    let payload = match matches.get_one::<String>("payload") {
        Some(json) => match serde_json::from_str::<serde_json::Value>(json) {
            Ok(serde_json::Value::Object(map)) => {
                if let Err(reason) = fields::check_bounds(&fields, &map) {
                    return Ok(Err(format!("error: {reason}")));
                }
                map
            }
            _ => return Ok(Err("error: --payload must be a JSON object".into())),
        },
        None => fields
            .iter()
            .filter_map(|f| {
                let value = matches
                    .try_get_one::<serde_json::Value>(&f.name)
                    .ok()
                    .flatten()
                    .or_else(|| {
                        matches
                            .try_get_one::<serde_json::Value>(&format!("{}@file", f.name))
                            .ok()
                            .flatten()
                    })?;
                Some((f.name.clone(), value.clone()))
            })
            .collect(),
    };
    let payload = serde_json::Value::Object(payload);
    if let Err(err) = registry.check(&message_type, &payload.to_string()) {
        return Ok(Err(format!("error: {err}")));
    }
    let licenses = matches
        .get_many::<LicenseKey>("license")
        .into_iter()
        .flatten();
    let wait = matches.get_one::<Duration>("wait-applied").copied();
    Ok(Ok((
        licenses
            .map(|key| Envelope::new(message_type.clone(), key.as_str(), payload.clone()))
            .collect(),
        wait,
    )))
}

/// A typed command's messages, and how long to wait for the terminals.
type Typed = (Vec<Envelope>, Option<Duration>);

/// The options of a publish command itself; a field by one of these names
/// is given through `--payload`.
const OWN_OPTIONS: &[&str] = &[
    "license",
    "payload",
    "wait-applied",
    "help",
    "config",
    "log-format",
];

/// The command line of one message type, from its schema.
fn command_for(
    named: &str,
    schema: &serde_json::Value,
    fields: &[Field],
    max_file_bytes: usize,
) -> clap::Command {
    let about = schema["description"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("Publish a {} message.", named.replace('-', "_")));
    let mut command = clap::Command::new(named.to_owned())
        .bin_name(format!("possync publish {named}"))
        .about(about)
        .arg(
            Arg::new("license")
                .long("license")
                .value_name("KEY")
                .required(true)
                .action(ArgAction::Append)
                .value_parser(|text: &str| text.parse::<LicenseKey>().map_err(|e| e.to_string()))
                .help("A store's license key; repeat to publish to several stores."),
        )
        .arg(
            Arg::new("payload")
                .long("payload")
                .value_name("JSON")
                .help("The whole payload as a JSON object, instead of one option per field."),
        )
        .arg(
            Arg::new("wait-applied")
                .long("wait-applied")
                .value_name("SECS")
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value(DEFAULT_WAIT_SECS)
                .value_parser(parse_wait)
                .help("Wait until every terminal of each store that the backend knows has applied the change, at most SECS seconds (60 without a value); name those that have not when the time is up and exit 1. Needs a [backend]."),
        );
    let mut taken: Vec<String> = OWN_OPTIONS.iter().map(|o| (*o).to_owned()).collect();
    let mut only_in_payload = Vec::new();
    for field in fields {
        let long = kebab(&field.name);
        if taken.contains(&long) {
            only_in_payload.push(field.name.clone());
            continue;
        }
        taken.push(long.clone());
        let parser = field.clone();
        let mut arg = Arg::new(field.name.clone())
            .long(long)
            .value_name(field.value_name())
            .allow_hyphen_values(true)
            .conflicts_with("payload")
            .value_parser(move |text: &str| match text.strip_prefix('@') {
                Some(path) if parser.base64 => fields::read_base64_file(path, max_file_bytes),
                _ => parser.parse(text),
            });
        for alias in field.aliases.iter().map(|a| kebab(a)) {
            if !taken.contains(&alias) {
                taken.push(alias.clone());
                arg = arg.visible_alias(alias);
            }
        }
        if let Some(description) = &field.description {
            arg = arg.help(description.clone());
        }
        let file_option = field
            .file_option
            .as_deref()
            .map(kebab)
            .filter(|option| !taken.contains(option));
        if let Some(option) = file_option {
            taken.push(option.clone());
            let id = format!("{}@file", field.name);
            command = command.arg(
                Arg::new(id.clone())
                    .long(option)
                    .value_name("FILE")
                    .conflicts_with_all(["payload".to_owned(), field.name.clone()])
                    .value_parser(move |path: &str| fields::read_base64_file(path, max_file_bytes))
                    .help(format!("Reads {} from a file.", field.name)),
            );
            if field.required {
                arg = arg.required_unless_present_any(["payload".to_owned(), id]);
            }
        } else if field.required {
            arg = arg.required_unless_present("payload");
        }
        command = command.arg(arg);
    }
    if !only_in_payload.is_empty() {
        command = command.after_help(format!(
            "Give {} in --payload: the name is one of this command's own options.",
            only_in_payload.join(", ")
        ));
    }
    command
}

/// A global option given after the message type (`possync publish TYPE
/// --config FILE ...`): taken out of `args`, as clap would have taken it
/// before the type.
fn take_option(args: &mut Vec<String>, long: &str, short: Option<&str>) -> Option<String> {
    let prefix = format!("--{long}=");
    let index = args.iter().position(|arg| {
        arg == &format!("--{long}") || short.is_some_and(|s| arg == s) || arg.starts_with(&prefix)
    })?;
    let arg = args.remove(index);
    match arg.strip_prefix(&prefix) {
        Some(value) => Some(value.to_owned()),
        None if index < args.len() => Some(args.remove(index)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_named_like_an_own_option_is_given_in_the_payload() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "license": {"type": "string"},
                "payload": {"type": "string"},
                "table_id": {"type": "string", "x-possync-aliases": ["license", "id"]}
            },
            "required": ["license", "table_id"]
        });
        let fields = fields::of_schema(&schema);
        let command = command_for("table-update", &schema, &fields, 1024);
        command.clone().debug_assert();
        let matches = command
            .try_get_matches_from(["table-update", "--license", "S1", "--id", "T1"])
            .expect("the alias works and the colliding names are left out");
        assert_eq!(
            matches.get_one::<serde_json::Value>("table_id"),
            Some(&serde_json::json!("T1"))
        );
    }

    #[test]
    fn a_wait_is_seconds_or_minutes_up_to_a_day() {
        assert_eq!(parse_wait("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_wait("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_wait("2m"), Ok(Duration::from_secs(120)));
        for refused in ["", "-1", "1h", "86401", "307445734561825861m"] {
            assert!(parse_wait(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn global_options_after_the_type_are_taken_out() {
        let mut args: Vec<String> = [
            "price-update",
            "--config=a.toml",
            "-c",
            "b.toml",
            "--license",
            "S",
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(
            take_option(&mut args, "config", Some("-c")).as_deref(),
            Some("a.toml")
        );
        assert_eq!(
            take_option(&mut args, "config", Some("-c")).as_deref(),
            Some("b.toml")
        );
        assert_eq!(args, ["price-update", "--license", "S"]);
    }
}
