//! `possync publish ...`

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use possync_core::{Config, LicenseKey, Publisher};
use possync_sdk::{Envelope, Payload};

#[derive(Debug, Subcommand)]
pub(crate) enum PublishCommand {
    /// Set a product's price (creates the product on terminals that lack it).
    #[cfg(feature = "catalog")]
    PriceUpdate {
        #[command(flatten)]
        to: Stores,
        /// The product's id.
        #[arg(long, value_name = "ID")]
        product_id: String,
        /// The new price: a finite number of 0 or more.
        #[arg(long, value_parser = price, allow_hyphen_values = true)]
        price: f64,
        /// The product's name.
        #[arg(long, value_name = "NAME")]
        product_name: Option<String>,
    },
    /// Create or replace a product.
    #[cfg(feature = "catalog")]
    ProductUpdate {
        #[command(flatten)]
        to: Stores,
        /// The product's id.
        #[arg(long, value_name = "ID")]
        product_id: String,
        /// The product's name.
        #[arg(long)]
        name: String,
        /// The price: a finite number of 0 or more.
        #[arg(long, value_parser = price, allow_hyphen_values = true)]
        price: f64,
        /// The category's id.
        #[arg(long, value_name = "ID")]
        category_id: String,
        /// The icon the POS shows.
        #[arg(long, value_name = "NAME")]
        icon_name: Option<String>,
    },
    /// Delete a product.
    #[cfg(feature = "catalog")]
    ProductDelete {
        #[command(flatten)]
        to: Stores,
        /// The product's id.
        #[arg(long, value_name = "ID")]
        product_id: String,
    },
    /// Create or replace a category.
    #[cfg(feature = "catalog")]
    CategoryUpdate {
        #[command(flatten)]
        to: Stores,
        /// The category's id.
        #[arg(long, value_name = "ID")]
        category_id: String,
        /// The category's name.
        #[arg(long)]
        name: String,
        /// The icon the POS shows.
        #[arg(long, value_name = "NAME")]
        icon_name: Option<String>,
    },
    /// Set a product's picture from an image file (PNG, JPEG, WebP or GIF);
    /// terminals need the product_images plugin.
    ImageUpdate {
        #[command(flatten)]
        to: Stores,
        /// The product's id.
        #[arg(long, value_name = "ID")]
        product_id: String,
        /// The image file.
        #[arg(long, value_name = "FILE")]
        file: std::path::PathBuf,
    },
    /// Remove a product's picture.
    ImageDelete {
        #[command(flatten)]
        to: Stores,
        /// The product's id.
        #[arg(long, value_name = "ID")]
        product_id: String,
    },
    /// Delete a modifier group (create or replace one with `raw --type
    /// modifier_group_update`); terminals need the modifier_groups plugin.
    ModifierGroupDelete {
        #[command(flatten)]
        to: Stores,
        /// The group's id.
        #[arg(long, value_name = "ID")]
        group_id: String,
    },
    /// Publish a whole catalog from a file to one or more stores, with
    /// progress and a summary. The file holds JSON lines
    /// ({"type": "price_update", "payload": {...}}) or CSV with a `type`
    /// column and one column per payload field. Bad lines are reported with
    /// their number and skipped.
    Bulk {
        #[command(flatten)]
        to: Stores,
        /// The catalog: .jsonl or .csv.
        #[arg(long, value_name = "FILE")]
        file: std::path::PathBuf,
        /// Publish nothing if any line is bad.
        #[arg(long)]
        stop_on_error: bool,
    },
    /// Publish a message of any type, with its payload as JSON.
    Raw {
        #[command(flatten)]
        to: Stores,
        /// The message type, for example `price_update`.
        #[arg(long = "type", value_name = "TYPE")]
        message_type: String,
        /// The payload, a JSON object.
        #[arg(long, value_name = "JSON")]
        payload: String,
    },
}

/// The stores a message goes to.
#[derive(Debug, Args)]
pub(crate) struct Stores {
    /// A store's license key; repeat to publish to several stores.
    #[arg(long = "license", value_name = "KEY", required = true)]
    licenses: Vec<LicenseKey>,
}

/// Reads a price given on the command line.
fn price(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{PRICE_RULE}; {text:?} is not a number"))?;
    check_price(value)
}

const PRICE_RULE: &str = "a price must be a finite number of 0 or more, like 12.99";

/// `value` if it is a price: NaN and infinity have no JSON form (they would
/// go out as `null`) and a negative price is a slip of the keyboard, so
/// both are refused before anything is sent.
pub(crate) fn check_price(value: f64) -> Result<f64, String> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(format!("{PRICE_RULE}, not {value}"))
    }
}

fn envelopes<M: Payload>(to: &Stores, message: &M) -> anyhow::Result<Vec<Envelope>> {
    to.licenses
        .iter()
        .map(|key| {
            message
                .to_envelope(key.as_str())
                .context("cannot encode the message")
        })
        .collect()
}

pub(crate) async fn run(config: &Config, command: PublishCommand) -> anyhow::Result<ExitCode> {
    let envelopes = match command {
        PublishCommand::Bulk {
            to,
            file,
            stop_on_error,
        } => return bulk(config, &to, &file, stop_on_error).await,
        #[cfg(feature = "catalog")]
        PublishCommand::PriceUpdate {
            to,
            product_id,
            price,
            product_name,
        } => envelopes(
            &to,
            &possync_catalog::PriceUpdate {
                product_id,
                new_price: price,
                product_name,
            },
        )?,
        #[cfg(feature = "catalog")]
        PublishCommand::ProductUpdate {
            to,
            product_id,
            name,
            price,
            category_id,
            icon_name,
        } => envelopes(
            &to,
            &possync_catalog::ProductUpdate {
                product_id,
                product_name: name,
                price,
                category_id: Some(category_id),
                icon_name,
            },
        )?,
        #[cfg(feature = "catalog")]
        PublishCommand::ProductDelete { to, product_id } => {
            envelopes(&to, &possync_catalog::ProductDelete { product_id })?
        }
        #[cfg(feature = "catalog")]
        PublishCommand::CategoryUpdate {
            to,
            category_id,
            name,
            icon_name,
        } => envelopes(
            &to,
            &possync_catalog::CategoryUpdate {
                category_id,
                category_name: name,
                icon_name,
            },
        )?,
        PublishCommand::ImageUpdate {
            to,
            product_id,
            file,
        } => {
            let content_type = match file
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                Some("png") => "image/png",
                Some("jpg" | "jpeg") => "image/jpeg",
                Some("webp") => "image/webp",
                Some("gif") => "image/gif",
                _ => anyhow::bail!("{}: name a .png, .jpg, .webp or .gif file", file.display()),
            };
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            envelopes(
                &to,
                &possync_plugin_product_images::ImageUpdate::new(product_id, content_type, &bytes),
            )?
        }
        PublishCommand::ImageDelete { to, product_id } => envelopes(
            &to,
            &possync_plugin_product_images::ImageDelete { product_id },
        )?,
        PublishCommand::ModifierGroupDelete { to, group_id } => envelopes(
            &to,
            &possync_plugin_modifier_groups::ModifierGroupDelete { group_id },
        )?,
        PublishCommand::Raw {
            to,
            message_type,
            payload,
        } => {
            let payload: serde_json::Value =
                serde_json::from_str(&payload).context("--payload is not valid JSON")?;
            if !payload.is_object() {
                anyhow::bail!("--payload must be a JSON object, like '{{\"product_id\": \"P1\"}}'");
            }
            to.licenses
                .iter()
                .map(|key| Envelope::new(message_type.clone(), key.as_str(), payload.clone()))
                .collect()
        }
    };
    let publisher = Publisher::connect(&config.broker)
        .await?
        .with_max_message_bytes(config.terminal.max_message_bytes);
    let published = publisher.publish_envelopes(envelopes).await;
    publisher.close().await;
    for message in published? {
        println!(
            "confirmed {} (message id {})",
            message.routing_key, message.message_id
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn bulk(
    config: &Config,
    to: &Stores,
    file: &std::path::Path,
    stop_on_error: bool,
) -> anyhow::Result<ExitCode> {
    let (changes, bad) = crate::bulk::read_changes(file)?;
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
    let publisher = Publisher::connect(&config.broker)
        .await?
        .with_max_message_bytes(config.terminal.max_message_bytes);
    let started = std::time::Instant::now();
    let (confirmed, failed) = crate::bulk::publish(&publisher, &changes, &to.licenses).await;
    publisher.close().await;
    for (store, err) in &failed {
        eprintln!("store {store}: {err}");
    }
    println!(
        "published {confirmed} change(s) to {} store(s) in {:.1} s, all confirmed by the broker; {} bad line(s) skipped; {} store(s) failed",
        to.licenses.len() - failed.len(),
        started.elapsed().as_secs_f64(),
        bad.len(),
        failed.len()
    );
    Ok(if bad.is_empty() && failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
