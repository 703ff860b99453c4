//! The notice plugin against a real SQLite file: what a notice writes, what
//! the view `notices_active` shows on which terminal and until when, and
//! the notices refused.

use possync_notices::{Notice, Severity, notices_plugin};
use possync_sdk::HandlerError;
use possync_testkit::{TestTerminal, message};

/// A till whose status row names it `terminal_id`, as a terminal's does.
fn till(terminal_id: &str) -> TestTerminal {
    let till = TestTerminal::new(notices_plugin).expect("the plugin starts");
    till.connection()
        .execute_batch(&format!(
            "CREATE TABLE possync_status (id INTEGER PRIMARY KEY, terminal_id TEXT NOT NULL);
             INSERT INTO possync_status VALUES (1, '{terminal_id}');"
        ))
        .expect("a status row");
    till
}

fn notice(id: &str, text: &str) -> Notice {
    Notice {
        notice_id: id.into(),
        text: text.into(),
        severity: Severity::Info,
        expires_at: None,
        terminals: None,
    }
}

fn active(till: &TestTerminal) -> Vec<String> {
    till.query("SELECT id FROM notices_active ORDER BY id")
        .expect("reads the view")
        .into_iter()
        .map(|row| row[0].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn a_notice_shows_until_it_expires_or_is_acknowledged() {
    let mut till = till("till-1");
    let mut later = notice("N1", "Price list changes at 18:00");
    later.severity = Severity::Warning;
    later.expires_at = Some("2999-12-24T18:00:00.25+01:00".into());
    let mut past = notice("N2", "Yesterday's offer");
    past.expires_at = Some("2000-01-01T00:00:00Z".into());
    for n in [&later, &past, &notice("N3", "Item recalled: batch 42")] {
        till.apply(message(n)).expect("applies");
    }
    assert_eq!(
        active(&till),
        ["N1", "N3"],
        "an expired notice does not show"
    );
    let stored = till
        .query("SELECT severity, expires_at FROM notices WHERE id = 'N1'")
        .expect("reads");
    assert_eq!(stored[0][0], "warning");
    assert_eq!(
        stored[0][1], "2999-12-24T17:00:01Z",
        "kept in UTC to the second (rounded up), so that text order is time order"
    );

    till.connection()
        .execute(
            "UPDATE notices SET acknowledged_at = '2026-12-02T10:00:00Z' WHERE id = 'N3'",
            [],
        )
        .expect("the POS app acknowledges");
    assert_eq!(active(&till), ["N1"]);
    // The same notice delivered again stays acknowledged.
    till.apply(message(&notice("N3", "Item recalled: batch 42")))
        .expect("applies");
    assert_eq!(active(&till), ["N1"]);
    // Changed, it shows again.
    till.apply(message(&notice("N3", "Item recalled: batches 42 and 43")))
        .expect("applies");
    assert_eq!(active(&till), ["N1", "N3"]);
}

#[test]
fn a_notice_for_some_terminals_shows_only_on_those() {
    let mut first = till("till-1");
    let mut second = till("till-2");
    let mut for_first = notice("N1", "Till 1: count the drawer");
    for_first.terminals = Some(vec!["till-1".into(), "till-9".into()]);
    for till in [&mut first, &mut second] {
        till.apply(message(&for_first)).expect("applies");
        till.apply(message(&notice("N2", "For everyone")))
            .expect("applies");
    }
    assert_eq!(active(&first), ["N1", "N2"]);
    assert_eq!(active(&second), ["N2"]);
}

#[test]
fn notices_without_text_or_with_an_unreadable_expiry_are_refused() {
    let till = till("till-1");
    let mut bad_time = notice("N1", "text");
    bad_time.expires_at = Some("tomorrow at six".into());
    let mut far = notice("N1", "text");
    far.expires_at = Some("9999-12-31T23:30:00-01:00".into());
    let mut empty_terminal = notice("N1", "text");
    empty_terminal.terminals = Some(vec![" ".into()]);
    for (bad, says) in [
        (notice("N1", "  "), "text must not be empty"),
        (notice("", "text"), "notice_id must not be empty"),
        (bad_time, "is not an RFC 3339 time"),
        (far, "is out of range"),
        (empty_terminal, "empty terminal id"),
    ] {
        let refused = till.check(&message(&bad)).expect_err("refused");
        assert!(
            matches!(&refused, HandlerError::Permanent(reason) if reason.contains(says)),
            "{refused:?} should say {says:?}"
        );
    }
}
