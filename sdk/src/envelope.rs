use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::HandlerError;

/// One message as it travels on the wire: `{type, license_key, payload, timestamp}`.
///
/// The four fields of the original format are all a message needs. possync's
/// publisher adds `message_id`, `version` (stale updates are dropped) and
/// `publisher_id` with `publisher_seq` (duplicates are dropped without a
/// record per message); `possync backend`'s relay adds `seq`, the store's
/// sequence number, which then orders the change, `catalog`, the id of
/// the backend database that gave it, and `head`, the store's latest
/// `seq` when a backlog follows. Messages from other
/// publishers without them still apply. Fields this version does not know
/// are ignored.
///
/// Two envelopes are equal when their fields are, the payload compared as
/// JSON text.
///
/// ```
/// use possync_sdk::Envelope;
///
/// let wire = r#"{"type":"price_update","license_key":"STORE-1",
///                "payload":{"product_id":"P1","new_price":2.5},
///                "timestamp":"2025-11-27T10:30:00Z"}"#;
/// let envelope: Envelope = serde_json::from_str(wire).unwrap();
/// assert_eq!(envelope.message_type, "price_update");
/// assert_eq!(envelope.message_id, None); // the original back office sends none
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Envelope {
    /// The message type, for example `price_update`; it selects the handler.
    #[serde(rename = "type")]
    pub message_type: String,
    /// The store this message is for.
    pub license_key: String,
    /// The type-specific body, as the JSON text it arrived in: the handler
    /// decodes it once, straight into its own type, with
    /// [`payload_as`](Self::payload_as).
    pub payload: Box<RawValue>,
    /// When the back office made the change (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Unique per message; a message seen before is not applied again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Microseconds since the Unix epoch, strictly increasing for one
    /// publisher: orders updates of the same entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// The store's sequence number, given by `possync backend` (per store,
    /// gapless, from 1): when present it orders the store's changes and
    /// clocks order nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// The catalog that gave `seq`: the id of the `possync backend`
    /// database, made once when that database is created. A store's `seq`
    /// means something only within one catalog, so a terminal follows the
    /// catalog of the first sequenced message it applies for its store and
    /// dead-letters a sequenced message from any other (two backends
    /// publish to the store, or the backend's database was replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<String>,
    /// The store's last `seq` among the changes the backend's relay sent
    /// with this one, when higher than `seq`: a terminal draining a
    /// backlog learns how far it has at least to go. Absent on the last
    /// of them; changes the relay had not read yet are not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<i64>,
    /// Which publisher connection sent the message (possync's publisher
    /// names each of its connections uniquely).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher_id: Option<String>,
    /// The message's number among those of `publisher_id`, from 1: a
    /// terminal drops a message numbered at or below the last it applied
    /// from that publisher, without a record per message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher_seq: Option<i64>,
}

/// Where an update stands in the order of changes to its entity.
///
/// An exact version (from possync's publisher) is unique per change, so a
/// change with an equal version is a duplicate. A version derived from the
/// legacy `timestamp` has second precision, so two different changes may
/// share it; those apply in arrival order.
///
/// ```
/// use possync_sdk::Version;
///
/// let exact = Version { micros: 42, exact: true };
/// assert!(!exact.supersedes(42)); // the same change again
/// let legacy = Version { micros: 42, exact: false };
/// assert!(legacy.supersedes(42)); // another change in the same second
/// ```
///
/// # What a `sync_version` column holds
///
/// One integer per row, the order of the change that wrote it
/// ([`Version::column`]):
///
/// | the change carried | the column holds |
/// |---|---|
/// | nothing to order it | `0` |
/// | a `version` or a `timestamp` | its microseconds since the Unix epoch |
/// | a `seq` (the store's sequence number, from `possync backend`) | [`Version::SEQUENCED`] + `seq` |
///
/// A sequenced change therefore outranks every change ordered by a clock
/// (2^62 microseconds is some 146,000 years), and sequenced changes order
/// among themselves by `seq` alone: once a row holds a sequenced change,
/// only a sequenced change with a higher `seq` replaces it. A message sent
/// straight to the exchange by another publisher, arriving after a
/// sequenced change of the same entity, is stale on purpose: the backend
/// consumes those messages too and relays them with a `seq` of their own,
/// which then applies. Read a row's `seq` back with [`Version::seq_of`].
///
/// ```
/// use possync_sdk::Version;
///
/// let seq = Version::sequenced(7);
/// assert_eq!(seq.seq(), Some(7));
/// assert!(seq.supersedes(1_764_239_400_000_000)); // newer than any clock
/// assert!(!seq.supersedes(Version::sequenced(8).micros)); // not newer than seq 8
/// assert!(Version::sequenced(9).supersedes(Version::sequenced(8).micros));
/// // What the column of a row written by seq 7 says:
/// assert_eq!(Version::seq_of(Version::SEQUENCED + 7), Some(7));
/// assert_eq!(Version::seq_of(1_764_239_400_000_000), None); // written by a clock
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// Microseconds since the Unix epoch.
    pub micros: i64,
    /// Whether `micros` identifies this change uniquely.
    pub exact: bool,
}

impl Version {
    /// The base of sequenced orders: a change with `seq` is ordered at
    /// `SEQUENCED + seq`, above every clock-derived order (2^62).
    pub const SEQUENCED: i64 = 1 << 62;

    /// The largest `seq` an order can carry.
    pub const MAX_SEQ: i64 = i64::MAX - Self::SEQUENCED;

    /// The order of the store's change number `seq` (exact: one change per
    /// number). `seq` is at least 1 and at most [`Version::MAX_SEQ`];
    /// others are clamped into that range (the terminal refuses such
    /// messages before any handler sees them).
    pub fn sequenced(seq: i64) -> Self {
        Self {
            micros: Self::SEQUENCED + seq.clamp(1, Self::MAX_SEQ),
            exact: true,
        }
    }

    /// The `seq` this order stands for, if it is a sequenced one.
    pub fn seq(self) -> Option<i64> {
        if self.exact {
            Self::seq_of(self.micros)
        } else {
            None
        }
    }

    /// The `seq` of the change that wrote a `sync_version` column holding
    /// `stored`; `None` when a clock-ordered (or unordered) change wrote it.
    pub fn seq_of(stored: i64) -> Option<i64> {
        (stored > Self::SEQUENCED).then(|| stored - Self::SEQUENCED)
    }

    /// What a `sync_version` column stores for a change at `order`: its
    /// microseconds (for a sequenced change, [`Version::SEQUENCED`] + its
    /// `seq`), or 0 for a message that carries no order.
    pub fn column(order: Option<Version>) -> crate::Value {
        crate::Value::Integer(order.map_or(0, |v| v.micros))
    }

    /// Whether a change at `self` should replace what is stored at `stored`.
    pub fn supersedes(self, stored: i64) -> bool {
        if self.exact {
            self.micros > stored
        } else {
            self.micros >= stored
        }
    }
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        self.message_type == other.message_type
            && self.license_key == other.license_key
            && self.payload.get() == other.payload.get()
            && self.timestamp == other.timestamp
            && self.message_id == other.message_id
            && self.version == other.version
            && self.seq == other.seq
            && self.catalog == other.catalog
            && self.publisher_id == other.publisher_id
            && self.publisher_seq == other.publisher_seq
    }
}

impl Envelope {
    /// A new envelope with no timestamp, id or version.
    pub fn new(
        message_type: impl Into<String>,
        license_key: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        let payload = serde_json::value::to_raw_value(&payload)
            .expect("a serde_json::Value always serializes");
        Self::with_raw_payload(message_type, license_key, payload)
    }

    /// A new envelope around a payload that is JSON text already.
    pub fn with_raw_payload(
        message_type: impl Into<String>,
        license_key: impl Into<String>,
        payload: Box<RawValue>,
    ) -> Self {
        Self {
            message_type: message_type.into(),
            license_key: license_key.into(),
            payload,
            timestamp: None,
            message_id: None,
            version: None,
            seq: None,
            catalog: None,
            head: None,
            publisher_id: None,
            publisher_seq: None,
        }
    }

    /// Sets the timestamp (RFC 3339).
    #[must_use]
    pub fn with_timestamp(mut self, timestamp: impl Into<String>) -> Self {
        self.timestamp = Some(timestamp.into());
        self
    }

    /// Sets the message id.
    #[must_use]
    pub fn with_message_id(mut self, message_id: impl Into<String>) -> Self {
        self.message_id = Some(message_id.into());
        self
    }

    /// Sets the version (microseconds since the Unix epoch).
    #[must_use]
    pub fn with_version(mut self, version: i64) -> Self {
        self.version = Some(version);
        self
    }

    /// Sets the store's sequence number.
    #[must_use]
    pub fn with_seq(mut self, seq: i64) -> Self {
        self.seq = Some(seq);
        self
    }

    /// Sets the catalog that gave the `seq` (see [`Envelope::catalog`]).
    #[must_use]
    pub fn with_catalog(mut self, catalog: impl Into<String>) -> Self {
        self.catalog = Some(catalog.into());
        self
    }

    /// Sets the store's head `seq` when the message was sent, if above
    /// its own (see [`Envelope::head`]).
    #[must_use]
    pub fn with_head(mut self, head: i64) -> Self {
        self.head = (self.seq.is_none_or(|seq| head > seq)).then_some(head);
        self
    }

    /// Sets the publisher connection's id and the message's number on it.
    #[must_use]
    pub fn with_publisher_seq(mut self, publisher_id: impl Into<String>, seq: i64) -> Self {
        self.publisher_id = Some(publisher_id.into());
        self.publisher_seq = Some(seq);
        self
    }

    /// Decodes the payload into the handler's own type.
    ///
    /// A payload that does not fit is a message that can never apply, so the
    /// error is [`HandlerError::Permanent`] and names the problem.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_str(self.payload.get()).map_err(|err| {
            HandlerError::permanent(format!("invalid {} payload: {err}", self.message_type))
        })
    }

    /// The order of this change: its `seq` if present (see
    /// [`Version::sequenced`]: clocks order nothing then), else `version`,
    /// else `timestamp`.
    ///
    /// `None` when the message carries none of them (or an unreadable
    /// timestamp): such a message applies unconditionally, as in the
    /// original system.
    ///
    /// ```
    /// use possync_sdk::{Envelope, Version};
    ///
    /// let relayed = Envelope::new("price_update", "STORE-1", serde_json::json!({}))
    ///     .with_timestamp("2025-11-27T10:30:00Z")
    ///     .with_version(42)
    ///     .with_seq(3);
    /// assert_eq!(relayed.order(), Some(Version::sequenced(3)));
    /// ```
    pub fn order(&self) -> Option<Version> {
        Self::order_of(self.seq, self.version, self.timestamp.as_deref())
    }

    /// [`order`](Self::order) from the fields alone, for a host that reads
    /// them without building an `Envelope`.
    #[doc(hidden)]
    pub fn order_of(
        seq: Option<i64>,
        version: Option<i64>,
        timestamp: Option<&str>,
    ) -> Option<Version> {
        if let Some(seq) = seq {
            return Some(Version::sequenced(seq));
        }
        if let Some(micros) = version {
            // A clock never reaches a sequenced order, whatever it claims.
            return Some(Version {
                micros: micros.min(Version::SEQUENCED - 1),
                exact: true,
            });
        }
        parse_rfc3339_micros(timestamp?).map(|micros| Version {
            micros,
            exact: false,
        })
    }
}

/// Parses the `YYYY-MM-DDTHH:MM:SS[.fff][Z|±HH:MM]` timestamps the back office
/// sends, without pulling a date library into every plugin. A timestamp
/// without an offset is UTC, as the original back office meant it.
///
/// It reads bytes, never slices the text: a timestamp comes off the wire, and
/// a multi-byte character where a digit belongs must be refused, not panic.
fn parse_rfc3339_micros(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let (date_time, rest) = bytes.split_at_checked(19)?;
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(at, byte)| date_time[at] != byte)
        || !matches!(date_time[10], b'T' | b't' | b' ')
    {
        return None;
    }
    let number = |at: usize, len: usize| digits(date_time.get(at..at + len)?);
    let (year, month, day) = (number(0, 4)?, number(5, 2)?, number(8, 2)?);
    let (hour, minute, second) = (number(11, 2)?, number(14, 2)?, number(17, 2)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let (micros, rest) = match rest.split_first() {
        Some((b'.', fraction)) => {
            let count = fraction.iter().take_while(|b| b.is_ascii_digit()).count();
            if count == 0 {
                return None;
            }
            // Digits past microseconds are dropped, not rounded.
            let kept = digits(&fraction[..count.min(6)])?;
            let scale = 10i64.pow(u32::try_from(6 - count.min(6)).ok()?);
            (kept * scale, &fraction[count..])
        }
        _ => (0, rest),
    };
    let offset_secs = match rest {
        [] | [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let magnitude = digits(&[*h1, *h2])? * 3600 + digits(&[*m1, *m2])? * 60;
            if *sign == b'-' { -magnitude } else { magnitude }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(seconds * 1_000_000 + micros)
}

/// The value of a run of ASCII digits; `None` if any byte is not one.
fn digits(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0i64, |value, &b| {
        b.is_ascii_digit().then(|| value * 10 + i64::from(b - b'0'))
    })
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_original_wire_format_and_ignores_unknown_fields() {
        let json = r#"{"type":"price_update","license_key":"EXTRO-LIFE-ABC123",
            "payload":{"product_id":"PROD-001","product_name":"Cappuccino","new_price":12.99},
            "timestamp":"2025-11-27T10:30:00Z","something_new":[1,2]}"#;
        let envelope: Envelope = serde_json::from_str(json).expect("decodes");
        assert_eq!(envelope.message_type, "price_update");
        assert_eq!(envelope.license_key, "EXTRO-LIFE-ABC123");
        assert_eq!(envelope.message_id, None);
        assert_eq!(
            envelope.order(),
            Some(Version {
                micros: 1_764_239_400_000_000,
                exact: false
            })
        );
    }

    #[test]
    fn the_payload_is_kept_as_sent_and_decoded_on_demand() {
        let json = r#"{"type":"t","license_key":"K","payload":{"b":1, "a":[true]}}"#;
        let envelope: Envelope = serde_json::from_str(json).expect("decodes");
        assert_eq!(envelope.payload.get(), r#"{"b":1, "a":[true]}"#);
        let value: serde_json::Value = envelope.payload_as().expect("any JSON");
        assert_eq!(value["a"][0], true);
        let err = envelope.payload_as::<Vec<i64>>().expect_err("not a list");
        assert!(err.to_string().contains("invalid t payload"), "{err}");
    }

    #[test]
    fn a_message_without_a_payload_is_not_an_envelope() {
        let err = serde_json::from_str::<Envelope>(r#"{"type":"t","license_key":"K"}"#)
            .expect_err("the payload is part of the wire format");
        assert!(err.to_string().contains("missing field `payload`"), "{err}");
    }

    #[test]
    fn a_version_orders_exactly_and_wins_over_the_timestamp() {
        let envelope = Envelope::new("t", "K", serde_json::json!({}))
            .with_timestamp("2025-11-27T10:30:00Z")
            .with_version(42);
        assert_eq!(
            envelope.order(),
            Some(Version {
                micros: 42,
                exact: true
            })
        );
        assert!(
            !Version {
                micros: 42,
                exact: true
            }
            .supersedes(42)
        );
        assert!(
            Version {
                micros: 42,
                exact: false
            }
            .supersedes(42)
        );
    }

    #[test]
    fn a_seq_orders_above_every_clock_and_by_seq_alone() {
        let late_clock = Envelope::new("t", "K", serde_json::json!({}))
            .with_timestamp("2025-11-27T10:40:00Z")
            .with_seq(1);
        let early_clock = Envelope::new("t", "K", serde_json::json!({}))
            .with_timestamp("2025-11-27T10:30:00Z")
            .with_version(i64::MAX)
            .with_seq(2);
        let (first, second) = (
            late_clock.order().expect("ordered"),
            early_clock.order().expect("ordered"),
        );
        assert!(second.supersedes(first.micros), "seq 2 follows seq 1");
        assert!(!first.supersedes(second.micros));
        assert!(!second.supersedes(second.micros), "the same seq again");
        let clock = Envelope::new("t", "K", serde_json::json!({})).with_version(i64::MAX);
        let clock = clock.order().expect("ordered");
        assert!(first.supersedes(clock.micros));
        assert!(!clock.supersedes(first.micros), "a clock never beats a seq");
        assert_eq!(
            (first.seq(), second.seq(), clock.seq()),
            (Some(1), Some(2), None)
        );
    }

    #[test]
    fn a_seq_out_of_range_is_clamped_never_wrapped() {
        assert_eq!(Version::sequenced(0).seq(), Some(1));
        assert_eq!(Version::sequenced(-5).seq(), Some(1));
        assert_eq!(Version::sequenced(i64::MAX).seq(), Some(Version::MAX_SEQ));
        assert_eq!(Version::seq_of(0), None);
        assert_eq!(Version::seq_of(Version::SEQUENCED), None);
    }

    #[test]
    fn timestamps_with_offsets_and_fractions_are_understood() {
        let utc = parse_rfc3339_micros("2025-11-27T10:30:00.5Z");
        let offset = parse_rfc3339_micros("2025-11-27T12:30:00.500+02:00");
        assert_eq!(utc, offset);
        assert_eq!(parse_rfc3339_micros("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_micros("yesterday"), None);
        assert_eq!(parse_rfc3339_micros("2025-13-27T10:30:00Z"), None);
    }

    #[test]
    fn a_timestamp_with_non_ascii_bytes_is_unreadable_not_a_panic() {
        for text in [
            "2025-11-27T10:30:00+\u{20ac}00",
            "2025-11-27T10:30:00-\u{e9}:0",
            "2025-11-27T10:30:00.\u{20ac}",
            "2025-11-27T10:30:00\u{20ac}",
            "2025-11-27T1\u{e9}30:00Z",
            "\u{20ac}025-11-27T10:30:00Z",
            "2025-11-27T10:30:00+01\u{e9}0",
        ] {
            assert_eq!(parse_rfc3339_micros(text), None, "{text}");
        }
    }

    #[test]
    fn the_time_of_day_must_be_separated_by_colons() {
        assert_eq!(parse_rfc3339_micros("2025-11-27T10-30-00Z"), None);
        assert_eq!(parse_rfc3339_micros("2025-11-27T10:30x00Z"), None);
        assert_eq!(parse_rfc3339_micros("2025-11-27T10x30:00Z"), None);
        assert_eq!(parse_rfc3339_micros("2025-11-27T10:30:00+0100"), None);
    }

    #[test]
    fn a_timestamp_without_an_offset_is_utc() {
        assert_eq!(
            parse_rfc3339_micros("2025-11-27T10:30:00"),
            parse_rfc3339_micros("2025-11-27T10:30:00Z")
        );
        assert_eq!(
            parse_rfc3339_micros("2025-11-27T10:30:00.250"),
            parse_rfc3339_micros("2025-11-27T10:30:00.25Z")
        );
        assert_eq!(
            parse_rfc3339_micros("2025-11-27T10:30:00"),
            Some(1_764_239_400_000_000)
        );
        assert_eq!(parse_rfc3339_micros("2025-11-27T10:30:00."), None);
    }

    proptest::proptest! {
        #[test]
        fn any_text_as_a_timestamp_never_panics(text in "\\PC{0,40}") {
            let _ = parse_rfc3339_micros(&text);
        }

        #[test]
        fn a_valid_prefix_with_any_suffix_never_panics(suffix in "\\PC{0,12}", fraction in "[0-9]{0,9}") {
            let _ = parse_rfc3339_micros(&format!("2025-11-27T10:30:00{suffix}"));
            let _ = parse_rfc3339_micros(&format!("2025-11-27T10:30:00.{fraction}{suffix}"));
            let _ = parse_rfc3339_micros(&format!("2025-11-27T10:30:00+{suffix}"));
        }

        #[test]
        fn a_timestamp_with_any_character_spliced_in_never_panics(
            at in 0usize..26, c in proptest::char::any()
        ) {
            let mut text = String::from("2025-11-27T10:30:00.5+02:00");
            text.insert(at, c);
            let _ = parse_rfc3339_micros(&text);
            let mut replaced: Vec<char> = "2025-11-27T10:30:00.5+02:00".chars().collect();
            replaced[at] = c;
            let _ = parse_rfc3339_micros(&replaced.into_iter().collect::<String>());
        }

        #[test]
        fn an_envelope_with_any_timestamp_never_panics_when_ordered(text in "\\PC{0,40}") {
            let envelope = Envelope::new("t", "K", serde_json::json!({})).with_timestamp(text);
            let _ = envelope.order();
        }
    }
}
