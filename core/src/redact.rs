//! Keeping secrets out of logs and printed config.
//!
//! A password may hold any character, `/`, `@`, `:`, `#` and `?` too, and a
//! URL that holds one unescaped cannot be parsed the way a URL parser would.
//! So the userinfo is taken to end at the *last* `@`: when a URL is
//! ambiguous, more of it is hidden, never less.

/// The pieces of `scheme://[userinfo@]host[/path]` but the userinfo.
pub(crate) struct UrlParts<'a> {
    pub(crate) scheme: &'a str,
    pub(crate) host: &'a str,
    pub(crate) path: &'a str,
}

/// Splits a URL, dropping its userinfo; `None` without a `scheme://`.
pub(crate) fn url_parts(url: &str) -> Option<UrlParts<'_>> {
    let (scheme, rest) = url.split_once("://")?;
    let rest = rest.rsplit_once('@').map_or(rest, |(_userinfo, rest)| rest);
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    Some(UrlParts { scheme, host, path })
}

/// Where the password of `url` is: the byte range between the first `:` of
/// the userinfo and the last `@`. Text without `scheme://` counts from its
/// start, so `amqp:user:pw@host`, which no URL parser takes, hides `user:pw`.
/// Without any `@`, `amqp://user:pw` (the host forgotten) hides what
/// follows the `:` unless it reads as a port.
fn password_range(url: &str) -> Option<std::ops::Range<usize>> {
    let Some(at) = url.rfind('@') else {
        let start = url.find("://")? + 3;
        // A colon in the path or the query is no password's.
        let authority = url[start..]
            .find(['/', '?', '#'])
            .map_or(url.len(), |i| start + i);
        let colon = start + url[start..authority].find(':')?;
        let end = url[colon..].find('/').map_or(url.len(), |i| colon + i);
        let after = &url[colon + 1..end];
        let port = after.len() <= 5 && after.parse::<u16>().is_ok();
        return (!port && !after.is_empty()).then_some(colon + 1..end);
    };
    let start = url.find("://").map_or(0, |i| i + 3).min(at);
    let colon = start + url[start..at].find(':')?;
    Some(colon + 1..at)
}

/// Where the values of the query's secret parameters are (`password=`,
/// `sslpassword=`, any name ending in `password`, as PostgreSQL URLs take
/// them), outside `skip` (the userinfo's password, already hidden).
fn query_secret_ranges(
    url: &str,
    skip: Option<&std::ops::Range<usize>>,
) -> Vec<std::ops::Range<usize>> {
    let after_userinfo = url
        .rfind('@')
        .map_or_else(|| url.find("://").map_or(0, |i| i + 3), |at| at + 1);
    let after_userinfo = skip.map_or(after_userinfo, |skip| after_userinfo.max(skip.end));
    let Some(question) = url[after_userinfo..].find('?') else {
        return Vec::new();
    };
    let start = after_userinfo + question + 1;
    let end = url[start..].find('#').map_or(url.len(), |i| start + i);
    let mut ranges = Vec::new();
    let mut offset = start;
    for pair in url[start..end].split('&') {
        if let Some((name, value)) = pair.split_once('=') {
            let name = percent_decoded(name).to_ascii_lowercase();
            if name.ends_with("password") && !value.is_empty() {
                let value_start = offset + pair.len() - value.len();
                ranges.push(value_start..value_start + value.len());
            }
        }
        offset += pair.len() + 1;
    }
    ranges
}

/// Every secret range of `url`: the userinfo's password, then the secret
/// query parameters' values, in order and apart.
fn secret_ranges(url: &str) -> Vec<std::ops::Range<usize>> {
    let password = password_range(url);
    let mut ranges: Vec<_> = password.clone().into_iter().collect();
    ranges.extend(query_secret_ranges(url, password.as_ref()));
    ranges
}

/// The URL with its passwords (in the userinfo, and in `password=` or
/// `sslpassword=` query parameters) replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut shown = 0;
    for range in secret_ranges(url) {
        out.push_str(&url[shown..range.start]);
        out.push_str("***");
        shown = range.end;
    }
    out.push_str(&url[shown..]);
    out
}

/// Every spelling of `url` and of its passwords in `text` replaced, for
/// error details that libraries wrote (the URL parser quotes a URL it
/// cannot read whole).
pub(crate) fn redact_secrets(text: &str, url: &str) -> String {
    let mut text = text.replace(url, &redact_url(url));
    let password = password_range(url);
    if let Some(range) = &password {
        let password = &url[range.clone()];
        // Without `scheme://` the user may be part of the range: try both readings.
        let after_last_colon = password.rsplit(':').next().unwrap_or(password);
        for candidate in [password, after_last_colon] {
            for spelling in [candidate.to_owned(), percent_decoded(candidate)] {
                if !spelling.is_empty() {
                    text = text.replace(&spelling, "***");
                }
            }
        }
    }
    for range in query_secret_ranges(url, password.as_ref()) {
        let value = &url[range];
        for spelling in [value.to_owned(), percent_decoded(value)] {
            if !spelling.is_empty() {
                text = text.replace(&spelling, "***");
            }
        }
    }
    text
}

/// A config error with the values of secret settings left out (a type error
/// quotes the value it found) and URLs elsewhere redacted.
pub(crate) fn redact_config_error(err: figment::Error) -> figment::Error {
    let errors: Vec<figment::Error> = err.into_iter().map(redact_one).collect();
    // `into_iter` yields the newest first; chaining rebuilds from the oldest.
    let mut chained: Option<figment::Error> = None;
    for error in errors.into_iter().rev() {
        chained = Some(match chained {
            Some(older) => older.chain(error),
            None => error,
        });
    }
    chained.unwrap_or_else(|| figment::Error::from("invalid configuration"))
}

fn redact_one(mut error: figment::Error) -> figment::Error {
    use figment::error::Kind;
    let secret = matches!(
        error.path.as_slice(),
        [section, key, ..] if (section == "admin" && key == "password") || (section == "broker" && key == "url")
    );
    let hide = |actual| redact_actual(actual, secret);
    error.kind = match error.kind {
        Kind::InvalidType(actual, expected) => Kind::InvalidType(hide(actual), expected),
        Kind::InvalidValue(actual, expected) => Kind::InvalidValue(hide(actual), expected),
        Kind::Unsupported(actual) => Kind::Unsupported(hide(actual)),
        other => other,
    };
    error
}

fn redact_actual(actual: figment::error::Actual, secret: bool) -> figment::error::Actual {
    use figment::error::Actual;
    let kind = match &actual {
        Actual::Str(text) if !secret => return Actual::Str(redact_url(text)),
        _ if !secret => return actual,
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a number",
        Actual::Char(_) => "a character",
        Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        _ => return actual,
    };
    Actual::Other(format!("{kind} (not shown: this setting holds a secret)"))
}

/// `%XX` escapes decoded; invalid ones and invalid UTF-8 kept as they are.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::{redact_secrets, redact_url};

    #[test]
    fn hides_the_password_and_keeps_the_rest() {
        assert_eq!(
            redact_url("amqp://guest:s3cr3t@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("amqps://u:p@a@b/v"), "amqps://u:***@b/v");
        assert_eq!(redact_url("amqp://host:5672/%2f"), "amqp://host:5672/%2f");
    }

    #[test]
    fn a_password_with_any_character_a_url_reserves_is_hidden() {
        for password in [
            "pa/ss",
            "p@ss",
            "pa:ss",
            "pa#ss",
            "pa?ss",
            "pa%2Fss",
            "p%40ss",
            "12345",
            "pässwörd€",
            "a/b@c:d#e?f",
            "/",
            "@",
            "",
        ] {
            let url = format!("amqp://shop:{password}@broker.example:5672/%2f");
            assert_eq!(
                redact_url(&url),
                "amqp://shop:***@broker.example:5672/%2f",
                "{password}"
            );
        }
    }

    #[test]
    fn a_password_in_a_url_whose_host_was_forgotten_is_hidden() {
        for (url, shown) in [
            ("amqp://shop:s3cretPW", "amqp://shop:***"),
            ("amqp://shop:s3cret/PW/%2f", "amqp://shop:***/PW/%2f"),
            ("amqps://shop:pw€", "amqps://shop:***"),
            ("amqp://127.0.0.1:5672/%2f", "amqp://127.0.0.1:5672/%2f"),
            ("amqp://localhost", "amqp://localhost"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn a_password_in_text_that_is_not_quite_a_url_is_hidden() {
        assert_eq!(redact_url("amqp:shop:s3cr3t@host"), "amqp:***@host");
        assert_eq!(redact_url("shop:s3cr3t@host/v"), "shop:***@host/v");
        assert_eq!(redact_url("amqp://shop@host/v"), "amqp://shop@host/v");
    }

    #[test]
    fn a_password_echoed_in_an_error_is_hidden_in_every_spelling() {
        let url = "amqp:shop:p%2Fss-W0rd@host";
        let detail = format!("Invalid URL: '{url}' (password p/ss-W0rd, or p%2Fss-W0rd)");
        let scrubbed = redact_secrets(&detail, url);
        assert!(!scrubbed.contains("W0rd"), "{scrubbed}");
        assert!(scrubbed.contains("amqp:***@host"), "{scrubbed}");
        assert_eq!(
            redact_secrets("connection refused", "amqp://u:p@h"),
            "connection refused"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_password_is_hidden(password in "\\PC{0,24}", user in "[a-z0-9._-]{1,12}") {
            let url = format!("amqps://{user}:{password}@broker.example:5671/shop?heartbeat=10");
            proptest::prop_assert_eq!(
                redact_url(&url),
                format!("amqps://{user}:***@broker.example:5671/shop?heartbeat=10")
            );
        }
    }

    #[test]
    fn a_password_in_the_query_is_hidden_as_postgresql_urls_carry_it() {
        for (url, shown) in [
            (
                "postgres://possync@db.example/catalog?password=S3cret&sslmode=require",
                "postgres://possync@db.example/catalog?password=***&sslmode=require",
            ),
            (
                "postgresql://db.example/catalog?sslmode=verify-full&sslpassword=K3y&user=u",
                "postgresql://db.example/catalog?sslmode=verify-full&sslpassword=***&user=u",
            ),
            (
                "postgres://u:pw@h/db?PASSWORD=Other#frag",
                "postgres://u:***@h/db?PASSWORD=***#frag",
            ),
            ("postgres://h/db?password=", "postgres://h/db?password="),
            (
                "postgres://h/db?sslmode=disable",
                "postgres://h/db?sslmode=disable",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        let url = "postgres://h/db?password=p%2Fss-W0rd";
        let scrubbed = redact_secrets(
            "bad password p/ss-W0rd in postgres://h/db?password=p%2Fss-W0rd",
            url,
        );
        assert!(!scrubbed.contains("W0rd"), "{scrubbed}");
    }
}
