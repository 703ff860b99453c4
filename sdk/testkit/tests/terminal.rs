//! The test kit applies messages with the terminal's semantics: commit or
//! roll back with the handler's effects, duplicates dropped, stale changes
//! reported, panics contained, migrations run once.

use std::sync::Mutex;

use possync_sdk::{
    Context, Decision, HandlerError, Migration, Payload, Plugin, Settings, Store, TOMBSTONES,
    Versioned,
};
use possync_testkit::{Applied, Error, TestTerminal, message};
use serde_json::json;

#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct NoteUpdate {
    id: String,
    text: String,
}

impl Payload for NoteUpdate {
    const TYPE: &'static str = "note_update";

    fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() {
            return Err("id must not be empty".into());
        }
        Ok(())
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct NoteDelete {
    id: String,
}

impl Payload for NoteDelete {
    const TYPE: &'static str = "note_delete";
}

const NOTES: Versioned = Versioned::new("notes", "id");

/// Effects the handlers ran, in order.
static EFFECTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn effect(store: &mut dyn Store, text: &str) {
    let (committed, undone) = (format!("committed {text}"), format!("undone {text}"));
    store.after_commit(Box::new(move || effects().push(committed)));
    store.on_rollback(Box::new(move || effects().push(undone)));
}

fn effects() -> std::sync::MutexGuard<'static, Vec<String>> {
    EFFECTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn update(note: NoteUpdate, message: &Context, store: &mut dyn Store) -> Result<(), HandlerError> {
    let decision = NOTES.decide(store, &note.id, message.order())?;
    if decision == Decision::Stale {
        return Ok(());
    }
    store.execute(
        "INSERT OR REPLACE INTO notes (id, text, sync_version) VALUES (?1, ?2, ?3)",
        &[
            note.id.as_str().into(),
            note.text.as_str().into(),
            possync_sdk::Version::column(message.order()),
        ],
    )?;
    NOTES.revive(store, &note.id, decision)?;
    effect(store, &note.text);
    match note.text.as_str() {
        "fail" => Err(HandlerError::transient("told to fail")),
        "panic" => panic!("told to panic"),
        _ => Ok(()),
    }
}

fn delete(note: NoteDelete, message: &Context, store: &mut dyn Store) -> Result<(), HandlerError> {
    if NOTES.is_newer(store, &note.id, message.order())? {
        NOTES.delete(store, &note.id, message.order())?;
    }
    Ok(())
}

fn plugin(_: &Settings) -> Result<Plugin, String> {
    Ok(Plugin::new("notes")
        .migrations(&[
            TOMBSTONES,
            Migration::new(
                "notes/1",
                "CREATE TABLE notes (id TEXT PRIMARY KEY, text TEXT, sync_version INTEGER NOT NULL)",
            ),
        ])
        .on::<NoteUpdate>(update)
        .on::<NoteDelete>(delete))
}

fn note(id: &str, text: &str) -> NoteUpdate {
    NoteUpdate {
        id: id.into(),
        text: text.into(),
    }
}

#[test]
fn a_message_that_applies_is_committed_and_its_after_commit_effects_run() {
    let mut till = TestTerminal::new(plugin).expect("starts");
    let applied = till.apply(message(&note("N1", "kept")));
    assert_eq!(applied, Ok(Applied::Changed));
    assert_eq!(
        till.query("SELECT id, text FROM notes").expect("reads"),
        [json!(["N1", "kept"])]
    );
    assert!(effects().contains(&"committed kept".to_owned()));
    assert!(!effects().contains(&"undone kept".to_owned()));
}

#[test]
fn a_failing_or_panicking_handler_changes_nothing_and_its_writes_are_undone() {
    let mut till = TestTerminal::new(plugin).expect("starts");
    let failed = till.apply(message(&note("N1", "fail")).with_message_id("m-1"));
    assert_eq!(failed, Err(HandlerError::transient("told to fail")));
    let panicked = till.apply(message(&note("N2", "panic")));
    assert_eq!(
        panicked,
        Err(HandlerError::Panicked("told to panic".into()))
    );
    assert_eq!(
        till.query("SELECT * FROM notes").expect("reads"),
        [] as [serde_json::Value; 0]
    );
    assert!(effects().contains(&"undone fail".to_owned()));
    assert!(effects().contains(&"undone panic".to_owned()));
    assert!(!effects().contains(&"committed fail".to_owned()));
    // The failed message's id was rolled back with it: it applies when sent again.
    let again = till.apply(message(&note("N1", "fine")).with_message_id("m-1"));
    assert_eq!(again, Ok(Applied::Changed));
}

#[test]
fn a_message_id_applied_before_is_a_duplicate_and_the_handler_does_not_run() {
    let mut till = TestTerminal::new(plugin).expect("starts");
    let first = message(&note("N1", "first")).with_message_id("m-1");
    assert_eq!(till.apply(first), Ok(Applied::Changed));
    let twin = message(&note("N1", "second")).with_message_id("m-1");
    assert_eq!(till.apply(twin), Ok(Applied::Duplicate));
    assert_eq!(
        till.query("SELECT text FROM notes").expect("reads"),
        [json!(["first"])]
    );
}

#[test]
fn an_older_change_is_reported_stale_and_a_delete_keeps_older_updates_out() {
    let mut till = TestTerminal::new(plugin).expect("starts");
    assert_eq!(
        till.apply(message(&note("N1", "v20")).with_version(20)),
        Ok(Applied::Changed)
    );
    let Ok(Applied::Stale(stale)) = till.apply(message(&note("N1", "v10")).with_version(10)) else {
        panic!("an older update is stale");
    };
    assert_eq!(
        (
            stale[0].id.as_str(),
            stale[0].incoming.micros,
            stale[0].stored
        ),
        ("N1", 10, 20)
    );
    let delete = message(&NoteDelete { id: "N1".into() }).with_version(30);
    assert_eq!(till.apply(delete), Ok(Applied::Changed));
    let late = till.apply(message(&note("N1", "v25")).with_version(25));
    assert!(matches!(late, Ok(Applied::Stale(_))), "{late:?}");
    assert_eq!(
        till.apply(message(&note("N1", "v40")).with_version(40)),
        Ok(Applied::Changed)
    );
    assert_eq!(
        till.query("SELECT text FROM notes").expect("reads"),
        [json!(["v40"])]
    );
    assert_eq!(
        till.query("SELECT count(*) FROM possync_tombstones")
            .expect("reads"),
        [json!([0])],
        "the newer update revived the note"
    );
}

#[test]
fn a_payload_the_type_refuses_never_reaches_the_handler() {
    let mut till = TestTerminal::new(plugin).expect("starts");
    let empty = message(&note("", "text"));
    let refused = till.check(&empty).expect_err("an empty id");
    assert!(
        refused.to_string().contains("id must not be empty"),
        "{refused}"
    );
    assert!(matches!(till.apply(empty), Err(HandlerError::Permanent(_))));
    let unknown = possync_sdk::Envelope::new("other_update", "TEST-STORE", json!({}));
    assert!(matches!(
        till.apply(unknown),
        Err(HandlerError::Permanent(_))
    ));
}

#[test]
fn reopening_a_database_runs_no_migration_twice_and_keeps_its_rows() {
    let folder = tempfile::tempdir().expect("tempdir");
    let path = folder.path().join("till.db");
    let settings = || Settings::new("notes", json!({}));
    let mut till = TestTerminal::open(&path, plugin, settings()).expect("creates");
    till.apply(message(&note("N1", "kept"))).expect("applies");
    drop(till);
    let till = TestTerminal::open(&path, plugin, settings()).expect("reopens");
    assert_eq!(
        till.query("SELECT count(*) FROM notes").expect("reads"),
        [json!([1])]
    );
}

#[test]
fn a_plugin_that_refuses_its_settings_or_panics_is_an_error_that_says_so() {
    fn strict(settings: &Settings) -> Result<Plugin, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Strict {
            #[allow(dead_code)]
            folder: String,
        }
        settings.get::<Strict>()?;
        Ok(Plugin::new("strict"))
    }
    fn panicking(_: &Settings) -> Result<Plugin, String> {
        panic!("no plugin today")
    }
    let err = TestTerminal::new(strict).expect_err("a required setting");
    assert!(
        matches!(&err, Error::Plugin(reason) if reason.contains("missing field `folder`")),
        "{err}"
    );
    let err = TestTerminal::new(panicking).expect_err("a panic");
    assert!(
        err.to_string().contains("panicked: no plugin today"),
        "{err}"
    );
}
