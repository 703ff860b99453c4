//! What arrives from the terminal's queue, and the checks it passes before
//! any handler sees it: size, envelope, license key, routing key.

use std::borrow::Cow;

use possync_sdk::{Context, Envelope, Version};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::identity::LicenseKey;

mod scan;

pub(crate) use scan::plain_member;

/// A message taken from the terminal's queue, not yet settled.
#[derive(Debug, Clone)]
pub(crate) struct Inbound {
    pub(crate) tag: u64,
    pub(crate) routing_key: String,
    pub(crate) body: Vec<u8>,
    /// The broker delivered it before (it may have failed a try).
    pub(crate) redelivered: bool,
    /// Taken from the quarantine by its operator, not from the queue.
    pub(crate) requeued: bool,
}

impl Inbound {
    /// Identifies the message across deliveries: its id, else its body.
    pub(crate) fn key(&self, envelope: &Message<'_>) -> String {
        match &envelope.message_id {
            Some(id) => format!("id:{id}"),
            None => format!("body:{:016x}", fnv1a(&self.body)),
        }
    }
}

/// An envelope as the terminal reads it: the fields of [`Envelope`], with
/// the same names and defaults, as text borrowed from the message's body
/// where the body allows (no escape in the string), so that decoding
/// allocates nothing per field.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Message<'a> {
    #[serde(rename = "type", borrow)]
    pub(crate) message_type: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) license_key: Cow<'a, str>,
    /// The payload's JSON text, as sent.
    #[serde(borrow, deserialize_with = "raw_json")]
    pub(crate) payload: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub(crate) timestamp: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub(crate) message_id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(crate) version: Option<i64>,
    #[serde(default)]
    pub(crate) seq: Option<i64>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub(crate) catalog: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(crate) head: Option<i64>,
    #[serde(default, borrow, deserialize_with = "text")]
    pub(crate) publisher_id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(crate) publisher_seq: Option<i64>,
}

impl<'a> Message<'a> {
    /// The message's order ([`Envelope::order`]).
    pub(crate) fn order(&self) -> Option<Version> {
        Envelope::order_of(self.seq, self.version, self.timestamp.as_deref())
    }

    /// What its handler is told of it.
    pub(crate) fn context(&self) -> Context<'_> {
        Context::from_parts(
            &self.message_type,
            &self.license_key,
            self.message_id.as_deref(),
            self.timestamp.as_deref(),
            self.order(),
        )
    }
}

impl From<Envelope> for Message<'static> {
    fn from(envelope: Envelope) -> Self {
        Self {
            message_type: Cow::Owned(envelope.message_type),
            license_key: Cow::Owned(envelope.license_key),
            payload: Cow::Owned(String::from(Box::<str>::from(envelope.payload))),
            timestamp: envelope.timestamp.map(Cow::Owned),
            message_id: envelope.message_id.map(Cow::Owned),
            version: envelope.version,
            seq: envelope.seq,
            catalog: envelope.catalog.map(Cow::Owned),
            head: envelope.head,
            publisher_id: envelope.publisher_id.map(Cow::Owned),
            publisher_seq: envelope.publisher_seq,
        }
    }
}

/// An optional string, borrowed from the body unless it holds an escape
/// (serde borrows a `Cow` only when told to, and an `Option` does not pass
/// that on).
fn text<'de: 'a, 'a, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Cow<'a, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Text<'a>>::deserialize(deserializer)?.map(|Text(text)| text))
}

/// A JSON value's text, always borrowed: the raw text keeps its escapes.
fn raw_json<'de: 'a, 'a, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Cow<'a, str>, D::Error> {
    <&'a RawValue>::deserialize(deserializer).map(|raw| Cow::Borrowed(raw.get()))
}

/// Decodes `body` as an envelope, in one pass, borrowing what it can.
fn decode(body: &[u8]) -> Result<Message<'_>, String> {
    // Text checked as UTF-8 once, in one pass over the body, spares the
    // parser a check of each string and of the payload; a body that is not
    // UTF-8 is parsed from bytes, which refuses it only where a field it
    // reads holds the invalid bytes.
    let text = std::str::from_utf8(body).ok();
    if let Some(message) = text.and_then(scan::read) {
        return Ok(message);
    }
    let borrowed: Result<Message<'_>, _> = match text {
        Some(text) => serde_json::from_str(text),
        None => serde_json::from_slice(body),
    };
    if let Ok(message) = borrowed {
        return Ok(message);
    }
    // Refused: the SDK's own decode words why (and, were the two ever to
    // disagree, its reading wins).
    let owned: Result<Envelope, _> = match text {
        Some(text) => serde_json::from_str(text),
        None => serde_json::from_slice(body),
    };
    owned
        .map(Message::from)
        .map_err(|err| format!("not a valid envelope: {err}"))
}

/// A stable 64-bit hash (FNV-1a): the key must survive restarts and upgrades.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Decodes and validates a body from the broker; the error is the reason
/// to dead-letter it. Input from the network: it must never panic.
pub(crate) fn check_envelope<'a>(
    body: &'a [u8],
    routing_key: &str,
    license_key: &LicenseKey,
    max_message_bytes: usize,
) -> Result<Message<'a>, String> {
    if body.len() > max_message_bytes {
        return Err(format!(
            "message is {} bytes, over the limit of {max_message_bytes} (terminal.max_message_bytes)",
            body.len()
        ));
    }
    let envelope = decode(body)?;
    if envelope.license_key != license_key.as_str() {
        return Err(format!(
            "envelope license_key {:?} is not this terminal's ({license_key})",
            envelope.license_key
        ));
    }
    // A license key holds no '.', so its word is exactly what follows "license.".
    let routed_type = routing_key
        .strip_prefix("license.")
        .and_then(|rest| rest.strip_prefix(license_key.as_str()))
        .and_then(|rest| match rest {
            "" => Some(None),
            _ => rest.strip_prefix('.').map(Some),
        });
    match routed_type {
        None => Err(format!(
            "routing key {routing_key:?} is not for this terminal's license"
        )),
        // A publisher that routes by one type and sends another is confused;
        // applying the body would bypass whatever the key was bound for.
        Some(Some(routed)) if routed != envelope.message_type => Err(format!(
            "routing key {routing_key:?} says type {routed:?} but the body says {:?}",
            envelope.message_type
        )),
        Some(_) => check_sequence_fields(envelope),
    }
}

/// The numbers that order and deduplicate a message must be usable: a
/// `seq` out of range could not be ordered, and half a publisher stamp
/// could not be told from a duplicate.
fn check_sequence_fields(envelope: Message<'_>) -> Result<Message<'_>, String> {
    if let Some(seq) = envelope.seq
        && !(1..=Version::MAX_SEQ).contains(&seq)
    {
        return Err(format!(
            "seq {seq} is out of range (1 to {})",
            Version::MAX_SEQ
        ));
    }
    match (&envelope.publisher_id, envelope.publisher_seq) {
        (None, None) => Ok(envelope),
        (Some(id), Some(seq)) if !id.is_empty() && seq >= 1 => Ok(envelope),
        (Some(_), Some(seq)) if seq < 1 => Err(format!("publisher_seq {seq} is below 1")),
        _ => Err(
            "publisher_id and publisher_seq come together (a non-empty id and a number from 1)"
                .to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key() -> LicenseKey {
        LicenseKey::new("STORE-1").expect("valid")
    }

    const ROUTING: &str = "license.STORE-1.price_update";

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                prop::collection::btree_map(".{0,12}", inner, 0..8)
                    .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// A JSON string's text as a sender may write it: plain, empty, or
    /// with any of the escapes JSON allows.
    fn json_text() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => "[a-zA-Z0-9:.+ -]{1,20}".prop_map(|s| format!("\"{s}\"")),
            1 => Just("\"\"".to_owned()),
            1 => "\\PC{0,12}".prop_map(|s| serde_json::Value::from(s).to_string()),
            1 => "[a-z]{0,4}".prop_map(|s| format!("\"{s}\\u002d{s}\\/\\n\"")),
            1 => Just(r#""\ud83d\ude00 ok""#.to_owned()),
            1 => Just(r#""\u0000""#.to_owned()),
        ]
    }

    /// Anything else a field may hold: null, numbers serde reads or
    /// refuses as an `i64`, any JSON.
    fn odd_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_owned()),
            Just("1.0".to_owned()),
            Just("-0".to_owned()),
            Just("18446744073709551615".to_owned()),
            Just("9223372036854775808".to_owned()),
            json().prop_map(|v| v.to_string()),
        ]
    }

    /// One member of an envelope: a known key or another, spelt plainly or
    /// escaped, mostly holding what the key means, sometimes anything.
    fn field() -> impl Strategy<Value = (String, String)> {
        let text_key = prop_oneof![
            8 => prop::sample::select(vec![
                "type", "license_key", "timestamp", "message_id", "catalog", "publisher_id",
                "something_new", "seqs", "types",
            ])
            .prop_map(|k| format!("\"{k}\"")),
            1 => Just(r#""\u0074imestamp""#.to_owned()),
            1 => Just(r#""catalog\/x""#.to_owned()),
        ];
        let number_key = prop::sample::select(vec!["version", "seq", "head", "publisher_seq"])
            .prop_map(|k| format!("\"{k}\""));
        prop_oneof![
            5 => (text_key, prop_oneof![8 => json_text(), 1 => odd_value()]),
            3 => (number_key, prop_oneof![
                8 => any::<i64>().prop_map(|n| n.to_string()),
                1 => odd_value(),
            ]),
            1 => (Just("\"payload\"".to_owned()), json().prop_map(|v| v.to_string())),
        ]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..4096)) {
            let _ = check_envelope(&body, ROUTING, &key(), 1 << 20);
        }

        #[test]
        fn any_json_in_any_field_never_panics(
            message_type in json(), license in json(), payload in json(), timestamp in json(), version in json()
        ) {
            let body = serde_json::json!({
                "type": message_type, "license_key": license, "payload": payload,
                "timestamp": timestamp, "version": version,
            });
            let bytes = serde_json::to_vec(&body).expect("encodes");
            if let Ok(envelope) = check_envelope(&bytes, ROUTING, &key(), 1 << 20) {
                let _ = envelope.order();
            }
        }

        /// The borrowed decode is only a faster way to the SDK's reading:
        /// whatever a field holds (plain text, escapes, any JSON, nothing,
        /// a key twice), both accept the same bodies and read the same
        /// fields; plain text is borrowed, not copied.
        #[test]
        fn a_body_reads_as_the_sdk_envelope_reads_it(
            fields in prop::collection::vec(field(), 0..8),
            named in any::<bool>(),
        ) {
            let mut members: Vec<String> = Vec::new();
            if named {
                // Mostly a type and a store, so that most bodies decode and
                // their fields are compared.
                members.push(r#""type":"price_update""#.into());
                members.push(r#""license_key":"STORE-1""#.into());
                members.push(r#""payload": { "a" : [1, "x\/y"] }"#.into());
            }
            members.extend(fields.into_iter().map(|(key, value)| format!("{key}:{value}")));
            let body = format!("{{{}}}", members.join(","));
            let sdk = serde_json::from_str::<Envelope>(&body).map(Message::from);
            let ours = decode(body.as_bytes());
            if let Some(scanned) = scan::read(&body) {
                let by_serde = serde_json::from_str::<Message<'_>>(&body);
                prop_assert_eq!(Some(&scanned), by_serde.as_ref().ok(), "{}", body);
            }
            prop_assert_eq!(sdk.is_ok(), ours.is_ok(), "{}", body);
            if let (Ok(sdk), Ok(ours)) = (sdk, ours) {
                for text in [Some(&ours.message_type), Some(&ours.license_key), ours.timestamp.as_ref(),
                             ours.message_id.as_ref(), ours.catalog.as_ref(), ours.publisher_id.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    prop_assert_eq!(matches!(text, Cow::Borrowed(_)), body.contains(&format!("\"{text}\"")),
                        "{:?} in {}", text, body);
                }
                prop_assert_eq!(sdk, ours);
            }
        }

        #[test]
        fn any_routing_key_never_panics(routing_key in ".{0,80}") {
            let body = br#"{"type":"price_update","license_key":"STORE-1","payload":{}}"#;
            let _ = check_envelope(body, &routing_key, &key(), 1 << 20);
        }
    }

    #[test]
    fn strings_without_escapes_are_borrowed_and_with_them_are_still_read() {
        let plain = br#"{"type":"price_update","license_key":"STORE-1","payload":{"a":1},"message_id":"m-1","catalog":"c","seq":3}"#;
        let message = decode(plain).expect("decodes");
        assert!(matches!(message.message_id, Some(Cow::Borrowed("m-1"))));
        assert!(matches!(message.payload, Cow::Borrowed(r#"{"a":1}"#)));
        let escaped = br#"{"type":"price_update","license_key":"STORE-1","payload":{"p":"a\/b"},"message_id":"m\u002d1","timestamp":"2025-11-27T10:30:00+01:00"}"#;
        let message = decode(escaped).expect("decodes");
        assert!(matches!(message.message_id, Some(Cow::Owned(ref id)) if id == "m-1"));
        assert!(matches!(
            message.timestamp,
            Some(Cow::Borrowed("2025-11-27T10:30:00+01:00"))
        ));
        // The payload goes to its handler as sent, escapes and all.
        assert_eq!(message.payload, r#"{"p":"a\/b"}"#);
    }

    #[test]
    fn hostile_shapes_are_refused_with_a_reason() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let cases: Vec<Vec<u8>> = vec![
            deep.into_bytes(),
            br#"{"type":"price_update","license_key":"STORE-1","payload":{},"version":1e999999}"#.to_vec(),
            br#"{"type":"price_update","license_key":"STORE-1","payload":{},"version":123456789012345678901234567890}"#.to_vec(),
            br#"{"type":7,"license_key":"STORE-1","payload":{}}"#.to_vec(),
            b"{\"type\":\"price_update\",\"license_key\":\"STORE-1\xff\",\"payload\":{}}".to_vec(),
            vec![0xff, 0xfe, 0x00],
            Vec::new(),
        ];
        for body in cases {
            let reason = check_envelope(&body, ROUTING, &key(), 1 << 20).expect_err("refused");
            assert!(reason.starts_with("not a valid envelope"), "{reason}");
        }
        let big = vec![b' '; 2048];
        let reason = check_envelope(&big, ROUTING, &key(), 1024).expect_err("too large");
        assert!(reason.contains("over the limit of 1024"), "{reason}");
    }

    #[test]
    fn only_routing_keys_of_this_license_pass() {
        let body = br#"{"type":"price_update","license_key":"STORE-1","payload":{}}"#;
        for routing_key in ["license.STORE-1.price_update", "license.STORE-1"] {
            assert!(
                check_envelope(body, routing_key, &key(), 1 << 20).is_ok(),
                "{routing_key}"
            );
        }
        for routing_key in [
            "license.STORE-10.price_update",
            "license.STORE-.price_update",
            "license.STORE-1x",
            "licence.STORE-1.price_update",
            "license..STORE-1",
            "STORE-1.license.price_update",
            "",
        ] {
            let reason = check_envelope(body, routing_key, &key(), 1 << 20).expect_err("refused");
            assert!(
                reason.contains("is not for this terminal's license"),
                "{reason}"
            );
        }
    }

    #[test]
    fn a_routing_key_whose_type_differs_from_the_body_is_refused_with_both_types() {
        let body = br#"{"type":"price_update","license_key":"STORE-1","payload":{}}"#;
        for routing_key in [
            "license.STORE-1.product_delete",
            "license.STORE-1.a.b",
            "license.STORE-1.",
        ] {
            let reason = check_envelope(body, routing_key, &key(), 1 << 20).expect_err("refused");
            assert!(
                reason.contains("but the body says \"price_update\""),
                "{routing_key}: {reason}"
            );
        }
    }

    #[test]
    fn odd_timestamps_and_versions_only_change_the_order() {
        for timestamp in [
            "",
            "9999-99-99T99:99:99Z",
            "2025-11-27T10:30:00+99:99",
            "\u{0}",
            "2025-11-27T10:30:00.99999999999999999999Z",
        ] {
            let envelope =
                Envelope::new("t", "STORE-1", serde_json::json!({})).with_timestamp(timestamp);
            let _ = envelope.order();
        }
    }

    #[test]
    fn a_seq_or_publisher_stamp_that_cannot_order_or_deduplicate_is_refused() {
        let check = |extra: &str| {
            let body = format!(
                r#"{{"type":"price_update","license_key":"STORE-1","payload":{{}}{extra}}}"#
            );
            check_envelope(body.as_bytes(), ROUTING, &key(), 1 << 20).map(|_| ())
        };
        assert!(check(r#","seq":1"#).is_ok());
        assert!(check(r#","publisher_id":"p","publisher_seq":1"#).is_ok());
        for (extra, says) in [
            (r#","seq":0"#, "seq 0 is out of range"),
            (r#","seq":-3"#, "seq -3 is out of range"),
            (r#","seq":9223372036854775807"#, "out of range"),
            (
                r#","publisher_id":"p","publisher_seq":0"#,
                "publisher_seq 0 is below 1",
            ),
            (r#","publisher_id":"p""#, "come together"),
            (r#","publisher_seq":4"#, "come together"),
            (r#","publisher_id":"","publisher_seq":4"#, "come together"),
        ] {
            let reason = check(extra).expect_err(extra);
            assert!(reason.contains(says), "{extra}: {reason}");
        }
    }
}
