//! Notices for the staff: published from the CLI, kept in the table the POS
//! app reads, shown on the status page and in `possync notices list` until
//! they expire or are acknowledged, and on the change feed. (Through the
//! backend's API: `tests/publish_backend.rs`.)

mod common;

use common::*;
use possync_notices as _;

fn rfc3339_in(seconds: i64) -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
    at.replace_nanosecond(0)
        .expect("whole seconds")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formats")
}

fn showing(db: &rusqlite::Connection) -> Vec<String> {
    let mut statement = db
        .prepare("SELECT id FROM notices_active ORDER BY id")
        .expect("the notices plugin's view");
    statement
        .query_map([], |row| row.get(0))
        .expect("reads")
        .collect::<rusqlite::Result<_>>()
        .expect("reads")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_shows_on_the_page_and_in_the_table_until_it_expires_or_is_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("notice");
    let (config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    let database = config.terminal.database.clone();
    let mut terminal = RunningTerminal::start(config).await;
    let expires_at = rfc3339_in(8);
    for args in [
        vec![
            "--notice-id",
            "N1",
            "--text",
            "Price list changes at 18:00",
            "--severity",
            "warning",
            "--expires-at",
            &expires_at,
        ],
        vec![
            "--notice-id",
            "N2",
            "--text",
            "Item recalled: batch 42",
            "--severity",
            "critical",
        ],
        vec![
            "--notice-id",
            "N3",
            "--text",
            "Till 2: count the drawer",
            "--terminals",
            r#"["till-2"]"#,
        ],
    ] {
        let mut command = vec!["publish", "notice", "--license", store.as_str()];
        command.extend(args);
        let output = possync(&command);
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    terminal.wait_applied(3).await;
    let db = terminal.db();
    assert_eq!(showing(&db), ["N1", "N2"], "N3 is for another till");
    let (_, page) = http_get(port, "/").await;
    assert!(page.contains("Price list changes at 18:00"), "{page}");
    assert!(page.contains("Item recalled: batch 42"), "{page}");
    assert!(!page.contains("count the drawer"), "{page}");
    let kinds: String = db
        .query_row("SELECT group_concat(kinds) FROM possync_feed", [], |row| {
            row.get(0)
        })
        .expect("the change feed has them");
    assert!(kinds.contains(r#"["notice","notice","u"]"#), "{kinds}");

    let notices = |args: &[&str]| {
        let mut command = vec!["notices"];
        command.extend_from_slice(args);
        possync_command(&command)
            .env("POSSYNC_TERMINAL__DATABASE", &database)
            .output()
            .expect("run possync")
    };
    let listed = notices(&["list"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let listed = text(&listed.stdout);
    assert!(
        listed.contains("N1") && listed.contains("N2") && !listed.contains("N3"),
        "{listed}"
    );

    let acked = notices(&["ack", "N2"]);
    assert!(acked.status.success(), "{}", text(&acked.stderr));
    assert_eq!(showing(&db), ["N1"]);
    let unknown = notices(&["ack", "N9"]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("no notice \"N9\""),
        "{}",
        text(&unknown.stderr)
    );

    // Past its expiry it leaves the table's view, the page and the list.
    eventually("N1 to expire", || showing(&db).is_empty()).await;
    let (_, page) = http_get(port, "/").await;
    assert!(!page.contains("Price list changes"), "{page}");
    let all = text(&notices(&["list", "--all"]).stdout);
    assert!(
        all.contains("expired")
            && all.contains("acknowledged")
            && all.contains("for other terminals"),
        "{all}"
    );
    assert!(text(&notices(&["list"]).stdout).contains("no notices showing"));
    terminal.stop().await;
}
