//! A stand-in for RabbitMQ inside one process, with the same topic routing:
//! for the demo on a machine without a broker, and for unit tests of
//! handlers. It keeps messages in memory only, so it offers none of the
//! broker's guarantees across restarts; possync's delivery, reliability and
//! security are tested against RabbitMQ.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use possync_sdk::Envelope;
use tokio::sync::Notify;

use crate::dispatch::Outcome;
use crate::inbound::Inbound;
use crate::publisher::{PublishError, Published, VersionClock, encode};
use crate::topology::TerminalTopology;

/// Routes envelopes to terminal queues by `license.<KEY>.<type>`, as the
/// `pos_license_events` topic exchange does. Clones share the same queues.
#[derive(Debug, Clone, Default)]
pub struct InProcessBroker {
    exchange: Arc<Mutex<Exchange>>,
    versions: Arc<VersionClock>,
}

#[derive(Debug, Default)]
struct Exchange {
    /// (binding pattern, queue name)
    bindings: Vec<(String, String)>,
    queues: HashMap<String, Arc<Queue>>,
    dead_letters: Vec<DeadLetter>,
}

/// A message a terminal could not apply, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The queue it was taken from.
    pub queue: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Why it cannot apply.
    pub reason: String,
    /// The message as published.
    pub body: Vec<u8>,
}

#[derive(Debug, Default)]
struct Queue {
    messages: Mutex<VecDeque<Inbound>>,
    /// Holds a permit when a message arrived while nobody waited.
    arrived: Notify,
}

impl Queue {
    fn messages(&self) -> MutexGuard<'_, VecDeque<Inbound>> {
        // A panic while holding this lock cannot leave the queue half-changed.
        self.messages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl InProcessBroker {
    /// An empty exchange with no queues.
    pub fn new() -> Self {
        Self::default()
    }

    fn exchange(&self) -> MutexGuard<'_, Exchange> {
        self.exchange
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes envelopes as [`crate::Publisher`] does (message id, version
    /// and timestamp filled in), each to every queue bound to its routing key.
    ///
    /// Fails like a mandatory publish to RabbitMQ: a message no queue is
    /// bound for is an error, and those after it are not published.
    pub fn publish_envelopes(
        &self,
        envelopes: impl IntoIterator<Item = Envelope>,
    ) -> Result<Vec<Published>, PublishError> {
        let timestamp = crate::publisher::now_rfc3339();
        let mut published = Vec::new();
        for envelope in envelopes {
            let license_key = envelope.license_key.clone();
            let encoded = encode(envelope, &self.versions, timestamp.as_deref())?;
            let exchange = self.exchange();
            let mut delivered = false;
            for (pattern, queue) in &exchange.bindings {
                if !topic_matches(pattern, &encoded.routing_key) {
                    continue;
                }
                if let Some(queue) = exchange.queues.get(queue) {
                    queue.messages().push_back(Inbound {
                        tag: 0,
                        routing_key: encoded.routing_key.clone(),
                        body: encoded.body.to_vec(),
                        redelivered: false,
                        requeued: false,
                    });
                    queue.arrived.notify_one();
                    delivered = true;
                }
            }
            if !delivered {
                return Err(PublishError::Unroutable {
                    routing_key: encoded.routing_key,
                    license_key,
                });
            }
            published.push(Published {
                routing_key: encoded.routing_key,
                message_id: encoded.message_id,
            });
        }
        Ok(published)
    }

    /// Every message a terminal dead-lettered so far.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.exchange().dead_letters.clone()
    }

    /// Declares the terminal's queue and binding, as the terminal does on
    /// RabbitMQ, and consumes from it.
    pub(crate) fn subscribe(&self, topology: &TerminalTopology) -> InProcessInbox {
        let mut exchange = self.exchange();
        let queue = Arc::clone(exchange.queues.entry(topology.queue.clone()).or_default());
        let binding = (topology.binding_key.clone(), topology.queue.clone());
        if !exchange.bindings.contains(&binding) {
            exchange.bindings.push(binding);
        }
        InProcessInbox {
            broker: self.clone(),
            name: topology.queue.clone(),
            queue,
            next_tag: 0,
        }
    }
}

/// A terminal's consumer on an in-process queue.
#[derive(Debug)]
pub(crate) struct InProcessInbox {
    broker: InProcessBroker,
    name: String,
    queue: Arc<Queue>,
    next_tag: u64,
}

impl InProcessInbox {
    /// Waits for the next message. Cancel-safe: a message leaves the queue
    /// only when it is returned.
    pub(crate) async fn next(&mut self) -> Inbound {
        loop {
            if let Some(inbound) = self.try_next() {
                return inbound;
            }
            self.queue.arrived.notified().await;
        }
    }

    pub(crate) fn try_next(&mut self) -> Option<Inbound> {
        let mut inbound = self.queue.messages().pop_front()?;
        self.next_tag += 1;
        inbound.tag = self.next_tag;
        Some(inbound)
    }

    /// Settles a committed batch: dead letters go to the broker's list, the
    /// rest are done.
    pub(crate) fn settle(&mut self, batch: &[Inbound], outcomes: &[Outcome]) {
        for (inbound, outcome) in batch.iter().zip(outcomes) {
            if let Outcome::DeadLetter { reason, .. } = outcome {
                self.broker.exchange().dead_letters.push(DeadLetter {
                    queue: self.name.clone(),
                    routing_key: inbound.routing_key.clone(),
                    reason: reason.clone(),
                    body: inbound.body.clone(),
                });
            }
        }
    }

    /// Puts messages back at the head of the queue, in their order.
    pub(crate) fn requeue(&mut self, batch: &[Inbound]) {
        let mut messages = self.queue.messages();
        for inbound in batch.iter().rev() {
            let mut again = inbound.clone();
            again.redelivered = true;
            messages.push_front(again);
        }
        drop(messages);
        if !batch.is_empty() {
            self.queue.arrived.notify_one();
        }
    }

    /// Messages waiting in the queue.
    pub(crate) fn depth(&self) -> u64 {
        self.queue.messages().len() as u64
    }
}

/// Whether `routing_key` matches an AMQP topic `pattern`: words split on
/// '.', `*` stands for exactly one word, `#` for zero or more.
fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    matches_words(&pattern, &key)
}

fn matches_words(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| matches_words(rest, &key[skip..])),
        Some((word, rest)) => match key.split_first() {
            Some((first, key_rest)) => {
                (*word == "*" || word == first) && matches_words(rest, key_rest)
            }
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn topic_patterns_match_as_on_rabbitmq() {
        let cases = [
            ("license.STORE-1.#", "license.STORE-1.price_update", true),
            ("license.STORE-1.#", "license.STORE-1", true),
            ("license.STORE-1.#", "license.STORE-1.a.b", true),
            ("license.STORE-1.#", "license.STORE-12.price_update", false),
            ("license.STORE-1.#", "license.STORE-2.price_update", false),
            (
                "license.*.price_update",
                "license.STORE-1.price_update",
                true,
            ),
            (
                "license.*.price_update",
                "license.STORE-1.product_update",
                false,
            ),
            ("license.*", "license.STORE-1.price_update", false),
            ("#", "anything.at.all", true),
            ("#.price_update", "license.STORE-1.price_update", true),
            ("license.#.update", "license.update", true),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(topic_matches(pattern, key), expected, "{pattern} vs {key}");
        }
    }
}
