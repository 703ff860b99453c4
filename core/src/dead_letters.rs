//! A terminal's dead-letter queue, as `possync quarantine` works it: the
//! broker's copies of quarantined messages, found by their body's digest
//! (kept with each row) and taken out when the row is dropped or requeued.

use std::collections::HashMap;

use lapin::options::{BasicAckOptions, BasicGetOptions};
use sha2::Digest as _;

use crate::config::Config;
use crate::connection::{self, BrokerError};
use crate::identity::{LicenseKey, TerminalId};
use crate::topology::TerminalTopology;

/// What [`take_dead_letters`] did.
#[derive(Debug, Default)]
pub struct TakenDeadLetters {
    /// Messages taken (two rows of the same body take two copies).
    pub taken: u64,
    /// Messages looked at.
    pub searched: u64,
    /// The dead-letter queue's name.
    pub queue: String,
}

/// Takes out of the dead-letter queue of terminal `terminal_id` of store
/// `license_key` one message per entry of `digests` (SHA-256 of the body,
/// hex; a digest listed twice takes two copies), through the first broker
/// URL that answers; every other message stays. Each message found is
/// first handed to `found` (digest, whole body), and taken only if it
/// returns true: what it keeps of the body is kept before the broker's
/// copy goes. A queue that does not exist holds nothing.
pub async fn take_dead_letters(
    config: &Config,
    license_key: &LicenseKey,
    terminal_id: &TerminalId,
    digests: &[String],
    found: &mut (dyn FnMut(&str, &[u8]) -> bool + Send),
) -> Result<TakenDeadLetters, BrokerError> {
    let topology = TerminalTopology::new(config, license_key, terminal_id);
    let mut last = None;
    for url in &config.broker.urls {
        match take_from(config, url, &topology.dead_letter_queue, digests, found).await {
            Err(err @ (BrokerError::Unreachable { .. } | BrokerError::Timeout { .. })) => {
                last = Some(err);
            }
            done => return done,
        }
    }
    Err(last.unwrap_or(BrokerError::ConnectionLost))
}

async fn take_from(
    config: &Config,
    url: &str,
    queue: &str,
    digests: &[String],
    found: &mut (dyn FnMut(&str, &[u8]) -> bool + Send),
) -> Result<TakenDeadLetters, BrokerError> {
    let timeout = config.broker.confirm_timeout_secs;
    let connection = connection::connect(&config.broker, url, "possync quarantine").await?;
    let channel = connection::within(
        timeout,
        "opening a channel",
        url,
        connection.create_channel(),
    )
    .await?;
    let mut taken = TakenDeadLetters {
        queue: queue.to_owned(),
        ..TakenDeadLetters::default()
    };
    let declared = crate::consumer::passive_declare(
        &channel,
        queue,
        timeout,
        url,
        "looking at the dead-letter queue",
    )
    .await;
    let present = match declared {
        Ok(declared) => u64::from(declared.message_count()),
        // Never declared, or expired: nothing to take.
        Err(BrokerError::NotFound { .. }) => return Ok(taken),
        Err(BrokerError::Protocol { source, .. }) if is_not_found(&source) => return Ok(taken),
        Err(err) => return Err(err),
    };
    let mut wanted: HashMap<&str, usize> = HashMap::new();
    for digest in digests {
        *wanted.entry(digest.as_str()).or_default() += 1;
    }
    // Messages taken without an ack stay ours until the channel closes,
    // which puts back every one not acknowledged: only the copies looked
    // for leave the queue.
    while taken.searched < present && !wanted.is_empty() {
        let got = connection::within(
            timeout,
            "reading the dead-letter queue",
            url,
            channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }),
        )
        .await?;
        let Some(message) = got else { break };
        taken.searched += 1;
        let digest: String = sha2::Sha256::digest(&message.delivery.data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let want = wanted.get_mut(digest.as_str());
        if let Some(left) = want {
            *left -= 1;
            if *left == 0 {
                wanted.remove(digest.as_str());
            }
            if !found(&digest, &message.delivery.data) {
                continue;
            }
            connection::within(
                timeout,
                "taking a message out of the dead-letter queue",
                url,
                channel.basic_ack(
                    message.delivery.delivery_tag,
                    BasicAckOptions { multiple: false },
                ),
            )
            .await?;
            taken.taken += 1;
        }
    }
    let _ = connection::within(timeout, "closing", url, channel.close(200, "done".into())).await;
    let _ = connection::within(
        timeout,
        "closing",
        url,
        connection.close(200, "done".into()),
    )
    .await;
    Ok(taken)
}

fn is_not_found(err: &lapin::Error) -> bool {
    err.to_string().contains("NOT_FOUND")
}
