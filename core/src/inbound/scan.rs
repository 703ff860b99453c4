//! The envelope read by hand, for the bodies publishers really send: keys
//! and strings without escapes, integers, any JSON in the payload and in
//! keys the terminal does not know. Anything else (an escape, a float
//! where an integer goes, a key twice, a missing field) is left to serde,
//! which reads the same bodies the same way and words the refusals: this
//! only spares a body that needs none of serde's generality the cost of it,
//! which is most of what a terminal spends reading each message.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::Message;

/// Reads `text` as an envelope, or `None` when it is not in the plain
/// shape this reader knows (whether or not serde would accept it).
pub(super) fn read(text: &str) -> Option<Message<'_>> {
    let mut cursor = Cursor { text, pos: 0 };
    let mut fields = Fields::default();
    cursor.eat(b'{')?;
    if cursor.peek()? == b'}' {
        return None; // no type, no store, no payload
    }
    loop {
        let member = cursor.member()?;
        cursor.eat(b':')?;
        match member {
            Member::Type => once(&mut fields.message_type, cursor.plain_string()?)?,
            Member::LicenseKey => once(&mut fields.license_key, cursor.plain_string()?)?,
            Member::Payload => once(&mut fields.payload, cursor.raw_value()?)?,
            Member::Timestamp => once(&mut fields.timestamp, cursor.optional_text()?)?,
            Member::MessageId => once(&mut fields.message_id, cursor.optional_text()?)?,
            Member::Version => once(&mut fields.version, cursor.optional_integer()?)?,
            Member::Seq => once(&mut fields.seq, cursor.optional_integer()?)?,
            Member::Catalog => once(&mut fields.catalog, cursor.optional_text()?)?,
            Member::Head => once(&mut fields.head, cursor.optional_integer()?)?,
            Member::PublisherId => once(&mut fields.publisher_id, cursor.optional_text()?)?,
            Member::PublisherSeq => once(&mut fields.publisher_seq, cursor.optional_integer()?)?,
            // Unknown keys are ignored, as serde ignores them: their values
            // must still be JSON.
            Member::Other => {
                cursor.raw_value()?;
            }
        }
        match cursor.peek()? {
            b',' => cursor.pos += 1,
            b'}' => break,
            _ => return None,
        }
    }
    cursor.pos += 1;
    cursor.skip_whitespace();
    if cursor.pos != text.len() {
        return None;
    }
    Some(Message {
        message_type: fields.message_type?.into(),
        license_key: fields.license_key?.into(),
        payload: fields.payload?.into(),
        timestamp: fields.timestamp.flatten().map(Into::into),
        message_id: fields.message_id.flatten().map(Into::into),
        version: fields.version.flatten(),
        seq: fields.seq.flatten(),
        catalog: fields.catalog.flatten().map(Into::into),
        head: fields.head.flatten(),
        publisher_id: fields.publisher_id.flatten().map(Into::into),
        publisher_seq: fields.publisher_seq.flatten(),
    })
}

/// The envelope's members by key, and any other.
#[derive(Clone, Copy)]
enum Member {
    Type,
    LicenseKey,
    Payload,
    Timestamp,
    MessageId,
    Version,
    Seq,
    Catalog,
    Head,
    PublisherId,
    PublisherSeq,
    Other,
}

/// The text of the member `key` of a payload's top-level object when it is
/// a non-empty string without escapes or an integer, as serde reads an
/// entity id; `None` when it is anything else, or when a value before it is
/// not a plain string, number or literal: the caller asks serde then. The
/// payload has applied, so it is JSON; only the members up to `key` are
/// read. Of a key named twice this is the first member, where a map keeps
/// the last; a payload type derived with serde refuses such a payload, so
/// it never applies.
pub(crate) fn plain_member<'p>(payload: &'p str, key: &str) -> Option<Cow<'p, str>> {
    let mut cursor = Cursor {
        text: payload,
        pos: 0,
    };
    cursor.eat(b'{')?;
    loop {
        let name = cursor.plain_string()?;
        cursor.eat(b':')?;
        if name == key {
            let id = match cursor.peek()? {
                b'"' => Cow::Borrowed(cursor.plain_string()?),
                _ => Cow::Owned(cursor.integer()?.to_string()),
            };
            // A fraction or an exponent after an integer: serde reads a float.
            let ends = matches!(cursor.peek(), Some(b',' | b'}'));
            return (ends && !id.is_empty()).then_some(id);
        }
        match cursor.peek()? {
            b'"' => {
                cursor.plain_string()?;
            }
            b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => cursor.skip_scalar(),
            _ => return None,
        }
        cursor.eat(b',')?;
    }
}

/// What each key held, once seen; an optional field may hold `null`.
#[derive(Default)]
struct Fields<'a> {
    message_type: Option<&'a str>,
    license_key: Option<&'a str>,
    payload: Option<&'a str>,
    timestamp: Option<Option<&'a str>>,
    message_id: Option<Option<&'a str>>,
    version: Option<Option<i64>>,
    seq: Option<Option<i64>>,
    catalog: Option<Option<&'a str>>,
    head: Option<Option<i64>>,
    publisher_id: Option<Option<&'a str>>,
    publisher_seq: Option<Option<i64>>,
}

/// Fills `slot`; `None` when the key came before (serde refuses that).
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    match slot {
        Some(_) => None,
        None => {
            *slot = Some(value);
            Some(())
        }
    }
}

/// Where the first quote, backslash or control character of `bytes` is:
/// a string's end, or where it stops being plain. Eight bytes at a time,
/// since reading strings is most of what reading an envelope costs.
fn string_end(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Each mask sets the high bit of the bytes it matches, and may set it
    // wrongly only above a byte it matched: so its lowest bit is exact.
    let zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGH;
    let below_space = |word: u64| word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let Ok(chunk) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        // Little-endian: the lowest bit found is the first byte in the text.
        let word = u64::from_le_bytes(chunk);
        let found = zero(word ^ (ONES * u64::from(b'"')))
            | zero(word ^ (ONES * u64::from(b'\\')))
            | below_space(word);
        if found != 0 {
            return Some(offset + found.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    let rest = chunks.remainder();
    rest.iter()
        .position(|&byte| byte == b'"' || byte == b'\\' || byte < 0x20)
        .map(|at| offset + at)
}

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes().get(self.pos) {
            self.pos += 1;
        }
    }

    /// The next byte after whitespace, not taken.
    fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.bytes().get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        if self.peek()? != byte {
            return None;
        }
        self.pos += 1;
        Some(())
    }

    /// A string holding no escape and no control character.
    fn plain_string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.pos;
        let len = string_end(&self.bytes()[start..])?;
        if self.bytes()[start + len] != b'"' {
            return None;
        }
        self.pos = start + len + 1;
        // Both ends sit next to an ASCII quote: always a character boundary.
        self.text.get(start..start + len)
    }

    /// A member's key. The envelope's own are matched where they stand,
    /// closing quote included: a plain key is one of them exactly when the
    /// text starts with it and its quote.
    fn member(&mut self) -> Option<Member> {
        self.eat(b'"')?;
        let rest = &self.bytes()[self.pos..];
        let known = |key: &[u8], member: Member| {
            (rest.get(..key.len()) == Some(key)).then_some((member, key.len()))
        };
        let found = match rest.first()? {
            b't' => {
                known(b"type\"", Member::Type).or_else(|| known(b"timestamp\"", Member::Timestamp))
            }
            b'l' => known(b"license_key\"", Member::LicenseKey),
            b'p' => known(b"payload\"", Member::Payload)
                .or_else(|| known(b"publisher_id\"", Member::PublisherId))
                .or_else(|| known(b"publisher_seq\"", Member::PublisherSeq)),
            b'm' => known(b"message_id\"", Member::MessageId),
            b'v' => known(b"version\"", Member::Version),
            b's' => known(b"seq\"", Member::Seq),
            b'c' => known(b"catalog\"", Member::Catalog),
            b'h' => known(b"head\"", Member::Head),
            _ => None,
        };
        if let Some((member, len)) = found {
            self.pos += len;
            return Some(member);
        }
        // Any other key, read whole so that its end is found.
        self.pos -= 1;
        self.plain_string().map(|_| Member::Other)
    }

    /// A number or literal, not checked: what is read is known to be JSON.
    fn skip_scalar(&mut self) {
        while let Some(byte) = self.bytes().get(self.pos)
            && (byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'+' | b'.'))
        {
            self.pos += 1;
        }
    }

    fn null(&mut self) -> bool {
        self.skip_whitespace();
        let found = self.bytes()[self.pos..].starts_with(b"null");
        if found {
            self.pos += 4;
        }
        found
    }

    fn optional_text(&mut self) -> Option<Option<&'a str>> {
        if self.null() {
            return Some(None);
        }
        self.plain_string().map(Some)
    }

    /// An integer as JSON writes it (no leading zero, no fraction, no
    /// exponent) that an `i64` holds, but `-0`, which serde_json reads as
    /// a float.
    fn integer(&mut self) -> Option<i64> {
        self.skip_whitespace();
        let bytes = self.bytes();
        let negative = bytes.get(self.pos) == Some(&b'-');
        let pos = self.pos + usize::from(negative);
        let rest = bytes.get(pos..)?;
        // Nineteen digits fit in a u64 unchecked; a twentieth is past any i64.
        let mut value: u64 = 0;
        let mut len = 0;
        while let Some(&byte) = rest.get(len) {
            let digit = byte.wrapping_sub(b'0');
            if digit > 9 {
                break;
            }
            if len == 19 {
                return None;
            }
            value = value * 10 + u64::from(digit);
            len += 1;
        }
        let value = i64::try_from(value).ok()?;
        let digits = &rest[..len];
        let leading_zero = digits.len() > 1 && digits[0] == b'0';
        // A fraction or an exponent after the digits is refused where the
        // next member should begin.
        let negative_zero = negative && value == 0;
        if digits.is_empty() || leading_zero || negative_zero {
            return None;
        }
        self.pos = pos + digits.len();
        Some(if negative { -value } else { value })
    }

    fn optional_integer(&mut self) -> Option<Option<i64>> {
        if self.null() {
            return Some(None);
        }
        self.integer().map(Some)
    }

    /// Any JSON value, checked by serde_json exactly as serde's own reading
    /// checks it, as its text.
    fn raw_value(&mut self) -> Option<&'a str> {
        let rest = self.text.get(self.pos..)?;
        let mut deserializer = serde_json::Deserializer::from_str(rest);
        let raw = <&'a RawValue>::deserialize(&mut deserializer).ok()?.get();
        // The value is borrowed from `rest`, so where it ends in `rest` is
        // where reading goes on.
        let end = (raw.as_ptr() as usize).checked_sub(rest.as_ptr() as usize)? + raw.len();
        self.pos += end;
        Some(raw)
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn by_serde(body: &str) -> Option<Message<'_>> {
        serde_json::from_str(body).ok()
    }

    #[test]
    fn what_publishers_send_is_read_by_hand_as_serde_reads_it() {
        let bodies = [
            // The original back office app.
            r#"{"type":"price_update","license_key":"STORE-1","payload":{"product_id":"p-1","new_price":2.5},"timestamp":"2025-11-27T10:30:00Z"}"#,
            // possync's publisher.
            r#"{"type":"product_delete","license_key":"STORE-1","payload":{"product_id":"p-1"},"timestamp":"2025-11-27T10:30:00.5Z","message_id":"0193","version":7,"publisher_id":"p","publisher_seq":12}"#,
            // The backend's relay, with the payload last and spaces around.
            " { \"type\" : \"product\", \"license_key\":\"STORE-1\",\"message_id\":\"018f3c1e-0000-7000-8000-000000000001\",\"catalog\":\"0123456789abcdef0123456789abcdef\",\"timestamp\":\"2026-12-02T09:00:00.123456789Z\",\"version\":-3,\"seq\":42,\"head\":50,\"something_new\":[1,{\"x\":null}],\"payload\":{\"id\":\"p\",\"name\":\"caf\u{e9}\"} }\n",
            r#"{"types":[1],"seqs":"x","head_seq":{},"type":"t","timestamps":1,"license_key":"S","payload":null,"timestamp":null,"seq":null,"head":9223372036854775807,"version":-12}"#,
        ];
        for body in bodies {
            let scanned = read(body).unwrap_or_else(|| panic!("read by hand: {body}"));
            assert_eq!(Some(&scanned), by_serde(body).as_ref(), "{body}");
            assert!(matches!(scanned.message_type, Cow::Borrowed(_)));
        }
    }

    #[test]
    fn a_string_ends_at_its_first_quote_backslash_or_control_character() {
        for text in [
            "",
            "a",
            "abcdefg",
            "abcdefgh",
            "abcdefghijklmnopq",
            "caf\u{e9} \u{1f600}\u{7f}~",
        ] {
            for stop in ["\"", "\\", "\n", "\u{0}", "\u{1f}"] {
                for tail in ["", "x\"", "\"\"\"\"\"\"\"\"\""] {
                    let bytes = format!("{text}{stop}{tail}");
                    assert_eq!(string_end(bytes.as_bytes()), Some(text.len()), "{bytes:?}");
                }
            }
            assert_eq!(string_end(text.as_bytes()), None, "{text:?}");
        }
    }

    #[test]
    fn anything_beyond_the_plain_shape_is_left_to_serde() {
        let base = r#""type":"t","license_key":"S","payload":{}"#;
        for extra in [
            r#","message_id":"a\/b""#,
            r#","\u0074imestamp":"x""#,
            r#","version":1.0"#,
            r#","version":1e3"#,
            r#","seq":01"#,
            r#","seq":9223372036854775808"#,
            r#","seq":99999999999999999999"#,
            r#","seq":-9223372036854775808"#,
            r#","seq":-"#,
            r#","seq":-0"#,
            r#","seq":"1""#,
            r#","catalog":7"#,
            r#","type":"t""#,
            r#","x":[1,]"#,
            ",\"message_id\":\"a\tb\"",
            r#","#,
            r#","seq":nul"#,
            r#","timestamp":nul"#,
            r#","seq":nulll"#,
            r#","seq":nulx"#,
            // Whitespace JSON does not know.
            ",\u{c}\"seq\":1",
            ",\u{b}\"seq\":1",
            ",\u{a0}\"seq\":1",
            ",\u{feff}\"seq\":1",
        ] {
            let body = format!("{{{base}{extra}}}");
            assert_eq!(read(&body), None, "{body}");
        }
        for body in [
            "{}",
            r#"{"license_key":"S","payload":{}}"#,
            &format!("{{{base}}} x"),
            &format!("{{{base}"),
            &format!("[{{{base}}}]"),
            &format!("\u{feff}{{{base}}}"),
            &format!("{{{base}}}\u{c}"),
        ] {
            assert_eq!(read(body), None, "{body}");
        }
    }
}
