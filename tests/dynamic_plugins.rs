//! Plugins for real: libraries built as cdylibs, loaded from config, checked
//! before anything in them runs, applying messages that came through the
//! broker; a panic in any of a plugin's entry points contained and reported
//! with the plugin's name.

mod common;

use common::*;
use possync_core::{Config, PluginSetting, Publisher, Registry, State, Status};
use possync_plugin_modifier_groups::{Modifier, ModifierGroupDelete, ModifierGroupUpdate};
use possync_plugin_product_images::{DEFAULT_MAX_IMAGE_BYTES, ImageDelete, ImageUpdate};
use possync_sdk::__ffi::SdkVersion;
use possync_sdk::__ffi::host::LoadedPlugin;
use possync_sdk::{Envelope, Payload};

fn with_plugins(dir: &std::path::Path, store: &possync_core::LicenseKey) -> Config {
    let mut config = terminal_config(dir, store, "till-1");
    config.plugins.insert(
        "modifier_groups".into(),
        dynamic_plugin("possync-plugin-modifier-groups", serde_json::json!({})),
    );
    config.plugins.insert(
        "product_images".into(),
        dynamic_plugin(
            "possync-plugin-product-images",
            serde_json::json!({ "images_dir": dir.join("images"), "max_image_bytes": 2048 }),
        ),
    );
    config
}

/// `possync publish image-update` of `file` as `product`'s picture, by a
/// publisher whose config names the images plugin (it checks the payload
/// with it, and needs no images folder for that); the content type is told
/// from the picture's first bytes.
fn image_update(
    store: &possync_core::LicenseKey,
    product: &str,
    file: &std::path::Path,
) -> std::process::Command {
    let mut command = possync_command(&[
        "publish",
        "image-update",
        "--license",
        store.as_str(),
        "--product-id",
        product,
        "--file",
        file.to_str().expect("utf-8"),
    ]);
    command.env(
        "POSSYNC_PLUGINS__PRODUCT_IMAGES__PATH",
        plugin_library("possync-plugin-product-images"),
    );
    command
}

/// Where `product`'s picture is, as `product_images` records it.
fn image_path(db: &rusqlite::Connection, product: &str) -> String {
    db.query_row(
        "SELECT path FROM product_images WHERE product_id = ?1",
        [product],
        |r| r.get(0),
    )
    .expect("image row")
}

fn milk(modifiers: &[(&str, &str, f64)], products: &[&str]) -> ModifierGroupUpdate {
    ModifierGroupUpdate {
        group_id: "milk".into(),
        group_name: "Milk".into(),
        min_select: 0,
        max_select: 1,
        modifiers: modifiers
            .iter()
            .map(|(id, name, delta)| Modifier {
                modifier_id: (*id).into(),
                name: (*name).into(),
                price_delta: *delta,
            })
            .collect(),
        product_ids: products.iter().map(|p| (*p).to_string()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn modifier_groups_from_a_loaded_plugin_land_in_their_tables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("modifiers");
    let config = with_plugins(dir.path(), &store);
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let stores = [store.clone()];

    publisher
        .publish(
            &stores,
            &milk(&[("oat", "Oat", 0.5), ("soy", "Soy", 0.4)], &["CAP", "LAT"]),
        )
        .await
        .expect("confirmed");
    terminal.wait_applied(1).await;
    let db = terminal.db();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM modifier_groups WHERE id = 'milk' AND name = 'Milk' AND max_select = 1"
        ),
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM modifiers WHERE group_id = 'milk'"
        ),
        2
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM product_modifier_groups WHERE group_id = 'milk'"
        ),
        2
    );

    // An update replaces modifiers and links as a whole.
    publisher
        .publish(&stores, &milk(&[("oat", "Oat milk", 0.6)], &["CAP"]))
        .await
        .expect("confirmed");
    terminal.wait_applied(2).await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM modifiers WHERE group_id = 'milk' AND id = 'oat' AND name = 'Oat milk'"
        ),
        1
    );
    assert_eq!(count(&db, "SELECT count(*) FROM modifiers"), 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM product_modifier_groups"),
        1
    );

    publisher
        .publish(
            &stores,
            &ModifierGroupDelete {
                group_id: "milk".into(),
            },
        )
        .await
        .expect("confirmed");
    terminal.wait_applied(3).await;
    assert_eq!(count(&db, "SELECT count(*) FROM modifier_groups"), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM modifiers"), 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM product_modifier_groups"),
        0
    );

    // min_select above max_select can never apply.
    let mut bad = milk(&[], &[]);
    bad.min_select = 3;
    publisher.publish(&stores, &bad).await.expect("confirmed");
    terminal.wait_settled(3, 1).await;
    assert!(
        quarantine_reasons(&db)
            .iter()
            .any(|r| r.contains("min_select 3 is more than max_select 1"))
    );
    publisher.close().await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn images_are_written_whole_and_bad_ones_never_reach_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("images");
    let config = with_plugins(dir.path(), &store);
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let stores = [store.clone()];
    let picture: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();

    publisher
        .publish(&stores, &ImageUpdate::new("CAP", "image/png", &picture))
        .await
        .expect("confirmed");
    terminal.wait_applied(1).await;
    let db = terminal.db();
    let (path, sha256): (String, String) = db
        .query_row(
            "SELECT path, sha256 FROM product_images WHERE product_id = 'CAP'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("image row");
    assert_eq!(
        std::fs::read(&path).expect("image file"),
        picture,
        "the file holds exactly the image"
    );
    assert!(path.ends_with(&format!("{sha256}.png")), "{path}");

    let mut wrong_hash = ImageUpdate::new("LAT", "image/png", &picture);
    wrong_hash.sha256 = Some("0".repeat(64));
    let too_big = ImageUpdate::new("BIG", "image/jpeg", &vec![7u8; 4096]);
    publisher
        .publish(&stores, &wrong_hash)
        .await
        .expect("confirmed");
    publisher
        .publish(&stores, &too_big)
        .await
        .expect("confirmed");
    terminal.wait_settled(1, 2).await;
    let reasons = quarantine_reasons(&db);
    assert!(
        reasons.iter().any(|r| r.contains("sha256 mismatch")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("over the limit of 2048")),
        "{reasons:?}"
    );
    let files: Vec<_> = std::fs::read_dir(dir.path().join("images"))
        .expect("images dir")
        .collect();
    assert_eq!(
        files.len(),
        1,
        "only the good image was written, and no temporary file is left"
    );

    publisher
        .publish(
            &stores,
            &ImageDelete {
                product_id: "CAP".into(),
            },
        )
        .await
        .expect("confirmed");
    terminal.wait_applied(2).await;
    assert_eq!(count(&db, "SELECT count(*) FROM product_images"), 0);
    assert!(
        !std::path::Path::new(&path).exists(),
        "the file of a deleted image is removed"
    );
    publisher.close().await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_picture_two_products_share_survives_one_of_them_moving_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("shared");
    let config = with_plugins(dir.path(), &store);
    let terminal = RunningTerminal::start(config.clone()).await;
    let topology = terminal.topology.clone();
    terminal.stop().await;
    let first: Vec<u8> = vec![1; 1000];
    let second: Vec<u8> = vec![2; 1000];
    let messages = [
        ImageUpdate::new("CAP", "image/png", &first),
        // CAP moves on to another picture while LAT takes the first one:
        // waiting in the queue together, these usually apply in one batch.
        ImageUpdate::new("CAP", "image/png", &second),
        ImageUpdate::new("LAT", "image/png", &first),
    ];
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    for message in &messages {
        publisher
            .publish(std::slice::from_ref(&store), message)
            .await
            .expect("confirmed");
    }
    assert_eq!(queue_depth(&topology.queue).await, 3);
    let mut terminal = RunningTerminal::start(config).await;
    terminal.wait_applied(3).await;

    let db = terminal.db();
    for (product, picture) in [("CAP", &second), ("LAT", &first)] {
        let path: String = db
            .query_row(
                "SELECT path FROM product_images WHERE product_id = ?1",
                [product],
                |row| row.get(0),
            )
            .expect("image row");
        assert_eq!(
            &std::fs::read(&path).expect("the file a row refers to exists"),
            picture,
            "{product}"
        );
    }
    let files = std::fs::read_dir(dir.path().join("images"))
        .expect("images dir")
        .count();
    assert_eq!(files, 2, "one file per picture, no orphan");
    publisher.close().await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_publishes_new_types_raw_and_lists_loaded_plugins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("raw");
    let config = with_plugins(dir.path(), &store);
    let mut terminal = RunningTerminal::start(config).await;
    let payload = r#"{"group_id":"size","group_name":"Size","min_select":1,"max_select":1,"modifiers":[{"modifier_id":"L","name":"Large","price_delta":0.8}],"product_ids":["CAP"]}"#;
    let output = possync(&[
        "publish",
        "raw",
        "--license",
        store.as_str(),
        "--type",
        "modifier_group_update",
        "--payload",
        payload,
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    terminal.wait_applied(1).await;
    assert_eq!(
        count(
            &terminal.db(),
            "SELECT count(*) FROM modifiers WHERE id = 'L' AND group_id = 'size'"
        ),
        1
    );

    let picture = dir.path().join("cappuccino.png");
    std::fs::write(&picture, b"\x89PNG pretend picture").expect("write picture");
    let output = image_update(&store, "CAP", &picture).output().expect("run");
    assert!(output.status.success(), "{}", text(&output.stderr));
    terminal.wait_applied(2).await;
    assert_eq!(
        std::fs::read(image_path(&terminal.db(), "CAP")).expect("file"),
        b"\x89PNG pretend picture"
    );
    terminal.stop().await;

    let library = plugin_library("possync-plugin-modifier-groups");
    let (line, _) = listed(
        "modifier_groups",
        "POSSYNC_PLUGINS__MODIFIER_GROUPS__PATH",
        &library,
    );
    for expected in [
        "modifier_group_update, modifier_group_delete",
        "yes",
        env!("CARGO_PKG_VERSION"),
        library.to_str().expect("utf-8"),
    ] {
        assert!(
            line.contains(expected),
            "{expected:?} missing from {line:?}"
        );
    }
}

/// `possync plugins list` with the library at `path` as `[plugins.<name>]`
/// (`variable` is its path's environment variable): the plugin's line and
/// the log.
fn listed(name: &str, variable: &str, path: &std::path::Path) -> (String, String) {
    let output = possync_command(&["plugins", "list"])
        .env(variable, path)
        .output()
        .expect("run");
    let log = text(&output.stderr);
    assert!(output.status.success(), "{log}");
    let listing = text(&output.stdout);
    let line = listing
        .lines()
        .find(|line| line.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in {listing}"));
    (line.to_owned(), log)
}

fn load_error(name: &str, setting: PluginSetting) -> String {
    let mut plugins = std::collections::BTreeMap::new();
    plugins.insert(name.to_owned(), setting);
    Registry::from_config(&plugins)
        .expect_err("refused")
        .to_string()
}

/// The registry with the `panicky` fixture, panicking in `stage`.
fn panicky(stage: &str) -> PluginSetting {
    dynamic_plugin(
        "possync-fixture-panicky",
        serde_json::json!({ "panic_in": stage }),
    )
}

/// The fixtures refused here abort the process if anything of theirs is
/// called: each refusal happens before any of the plugin's code runs.
#[test]
fn a_plugin_built_with_an_incompatible_sdk_is_refused_naming_both_versions_and_what_to_rebuild() {
    let ours = possync_sdk::SDK_VERSION;
    let line = SdkVersion::CURRENT.line();

    let older = load_error(
        "old",
        dynamic_plugin("possync-fixture-old-sdk", serde_json::json!({})),
    );
    assert!(
        older.starts_with("plugin old: "),
        "names the plugin: {older}"
    );
    assert!(
        older.contains(&format!(
            "was built with possync-sdk 0.2.0, this possync has {ours}: rebuild it against possync-sdk {line}"
        )),
        "{older}"
    );

    let newer_version = SdkVersion::CURRENT.next_breaking().to_string();
    let newer = load_error(
        "new",
        dynamic_plugin("possync-fixture-newer-sdk", serde_json::json!({})),
    );
    assert!(
        newer.starts_with("plugin new: "),
        "names the plugin: {newer}"
    );
    assert!(
        newer.contains(&format!(
            "was built with possync-sdk {newer_version}, this possync has {ours}: rebuild it against possync-sdk {line}, or upgrade possync to one whose possync-sdk is {}",
            SdkVersion::CURRENT.next_breaking().line()
        )),
        "{newer}"
    );
}

/// The fixture aborts the process if anything of it is called.
#[test]
fn a_plugin_built_with_a_pre_release_of_the_sdk_is_refused_unless_possync_has_that_very_version() {
    let ours = possync_sdk::SDK_VERSION;
    assert!(
        !ours.contains('-'),
        "this possync's SDK is a release; the fixture claims a pre-release of it"
    );
    let pre_release = load_error(
        "alpha",
        dynamic_plugin("possync-fixture-prerelease-sdk", serde_json::json!({})),
    );
    assert!(
        pre_release.starts_with("plugin alpha: ")
            && pre_release.contains(&format!(
                "was built with possync-sdk {ours}-alpha.1, this possync has {ours}: a plugin built with a pre-release of possync-sdk loads only in a possync with that very version; rebuild it against a release of possync-sdk {}",
                SdkVersion::CURRENT.line()
            )),
        "names both versions and what to rebuild: {pre_release}"
    );
}

#[test]
fn a_plugin_whose_boundary_types_are_laid_out_differently_is_refused() {
    let changed = load_error(
        "changed",
        dynamic_plugin("possync-fixture-layout-changed", serde_json::json!({})),
    );
    assert!(
        changed.starts_with("plugin changed: ")
            && changed.contains("laid out differently (layout fingerprint ")
            && changed.contains(&format!(
                "rebuild it against possync-sdk {}",
                possync_sdk::SDK_VERSION
            )),
        "{changed}"
    );
}

#[test]
fn libraries_that_are_not_possync_plugins_of_this_format_are_refused_with_a_message_that_says_what_to_do()
 {
    let old_format = load_error(
        "old",
        dynamic_plugin("possync-fixture-old-format", serde_json::json!({})),
    );
    assert!(
        old_format.contains("uses plugin format 1, this possync reads format 2")
            && old_format.contains(&format!(
                "rebuild the plugin against possync-sdk {}",
                SdkVersion::CURRENT.line()
            )),
        "{old_format}"
    );

    let missing = load_error(
        "ghost",
        PluginSetting::Dynamic(possync_core::DynamicPlugin {
            path: "/nonexistent/libghost.so".into(),
            enabled: true,
            settings: Default::default(),
        }),
    );
    assert!(
        missing.contains("no file at /nonexistent/libghost.so"),
        "{missing}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let text_file = dir.path().join("libtext.so");
    std::fs::write(&text_file, "not a library").expect("write");
    let garbage = load_error(
        "text",
        PluginSetting::Dynamic(possync_core::DynamicPlugin {
            path: text_file,
            enabled: true,
            settings: Default::default(),
        }),
    );
    assert!(garbage.contains("is not a loadable library"), "{garbage}");

    let foreign = load_error(
        "foreign",
        dynamic_plugin("possync-fixture-not-a-plugin", serde_json::json!({})),
    );
    assert!(
        foreign.contains("not a possync plugin") && foreign.contains("export_plugin!"),
        "{foreign}"
    );
}

#[test]
fn a_plugin_that_panics_or_fails_while_loading_is_refused_with_its_name() {
    let registration = load_error("panicky", panicky("registration"));
    assert!(
        registration.starts_with("plugin panicky (")
            && registration.contains("panicked during registration: registration blew up"),
        "{registration}"
    );

    let describe = load_error("panicky", panicky("describe"));
    assert!(
        describe.starts_with("plugin panicky (")
            && describe.contains("panicked while describing itself")
            && describe.contains("schema blew up"),
        "{describe}"
    );

    let fails = load_error(
        "panicky",
        dynamic_plugin(
            "possync-fixture-panicky",
            serde_json::json!({ "fail_to_register": true }),
        ),
    );
    assert!(
        fails.contains("failed to register: settings say fail"),
        "{fails}"
    );

    let typo = load_error(
        "panicky",
        dynamic_plugin(
            "possync-fixture-panicky",
            serde_json::json!({ "panic_inn": "handle" }),
        ),
    );
    assert!(
        typo.contains("[plugins.panicky.settings] is not valid") && typo.contains("panic_inn"),
        "{typo}"
    );
}

#[test]
fn a_refused_plugin_stops_the_cli_with_the_message_not_a_crash() {
    let output = possync_command(&["plugins", "list"])
        .env(
            "POSSYNC_PLUGINS__OLD__PATH",
            plugin_library("possync-fixture-old-sdk"),
        )
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("built with possync-sdk 0.2.0"),
        "{}",
        text(&output.stderr)
    );

    // Disabled, it is listed with the reason instead.
    let output = possync_command(&["plugins", "list"])
        .env(
            "POSSYNC_PLUGINS__OLD__PATH",
            plugin_library("possync-fixture-old-sdk"),
        )
        .env("POSSYNC_PLUGINS__OLD__ENABLED", "false")
        .output()
        .expect("run");
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("not loaded: plugin old"),
        "{}",
        text(&output.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_built_with_a_newer_sdk_of_the_same_line_loads_and_applies_through_a_terminal() {
    // The fixture claims a newer patch than this possync's SDK.
    let claimed = SdkVersion::CURRENT.with_patch(SdkVersion::CURRENT.patch + 9);
    let loaded = LoadedPlugin::load(
        &plugin_library("possync-fixture-compatible"),
        "notes",
        &serde_json::json!({}),
        false,
    )
    .expect("loads");
    assert_eq!(loaded.sdk_version(), claimed.to_string());
    assert_ne!(loaded.sdk_version(), possync_sdk::SDK_VERSION);
    drop(loaded);

    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("compatible");
    let mut config = terminal_config(dir.path(), &store, "till-1");
    config.plugins.insert(
        "notes".into(),
        dynamic_plugin("possync-fixture-compatible", serde_json::json!({})),
    );
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    publisher
        .publish_envelopes(vec![
            Envelope::new(
                "note_update",
                store.as_str(),
                serde_json::json!({ "product_id": "CAP", "text": "with oat milk" }),
            )
            .with_message_id("note-1")
            .with_version(42)
            .with_timestamp("2026-11-25T13:52:22Z"),
            Envelope::new(
                "note_update",
                store.as_str(),
                serde_json::json!({ "product_id": "", "text": "no product" }),
            ),
        ])
        .await
        .expect("confirmed");
    terminal.wait_settled(1, 1).await;
    let db = terminal.db();
    let note: (String, String, String, i64, String) = db
        .query_row(
            "SELECT text, license_key, message_id, sync_version, updated_at
             FROM notes WHERE product_id = 'CAP'",
            [],
            |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            },
        )
        .expect("the note the plugin wrote");
    assert_eq!(
        note,
        (
            "with oat milk".to_owned(),
            store.as_str().to_owned(),
            "note-1".to_owned(),
            42,
            "2026-11-25T13:52:22Z".to_owned()
        ),
        "the payload and the message's context crossed intact"
    );
    let reasons = quarantine_reasons(&db);
    assert!(
        reasons[0].contains("invalid note_update payload: product_id is empty"),
        "the plugin's own check dead-letters: {reasons:?}"
    );
    publisher.close().await;
    terminal.stop().await;

    // Listed by the name config gives it, which is not the plugin's own.
    let (line, log) = listed(
        "notes",
        "POSSYNC_PLUGINS__NOTES__PATH",
        &plugin_library("possync-fixture-compatible"),
    );
    assert!(
        line.contains("note_update") && line.contains(env!("CARGO_PKG_VERSION")),
        "{line}"
    );
    assert!(log.contains("plugin_renamed"), "{log}");
}

/// A terminal with the `panicky` fixture panicking in `stage` (two tries
/// a message), to which `messages` (type and payload) have been published.
async fn panicky_terminal(
    dir: &std::path::Path,
    stage: &str,
    messages: &[(&str, serde_json::Value)],
) -> (Config, RunningTerminal, Publisher) {
    let store = unique_license(&format!("panicky-{stage}"));
    let mut config = terminal_config(dir, &store, "till-1");
    config.terminal.max_attempts = 2;
    config.plugins.insert("panicky".into(), panicky(stage));
    let terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    publisher
        .publish_envelopes(messages.iter().map(|(message_type, payload)| {
            Envelope::new(*message_type, store.as_str(), payload.clone())
        }))
        .await
        .expect("confirmed");
    (config, terminal, publisher)
}

/// The terminal applied one message and dead-lettered one after two tries,
/// with a reason that names the plugin and says `panic`; it is still live.
async fn one_applied_one_dead_lettered(
    mut terminal: RunningTerminal,
    publisher: Publisher,
    panic: &str,
) {
    terminal.wait_settled(1, 1).await;
    let reasons = quarantine_reasons(&terminal.db());
    assert!(
        reasons[0].contains("failed 2 times")
            && reasons[0].contains("panicky")
            && reasons[0].contains(panic),
        "{reasons:?}"
    );
    assert!(terminal.status.borrow().is_live());
    publisher.close().await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_that_panics_in_a_plugin_is_quarantined_and_the_terminal_runs_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, terminal, publisher) = panicky_terminal(
        dir.path(),
        "handle",
        &[
            ("panicky_update", serde_json::json!({ "n": 1 })),
            (
                "price_update",
                serde_json::json!({ "product_id": "AFTER", "new_price": 1.0 }),
            ),
        ],
    )
    .await;
    let db = terminal.db();
    one_applied_one_dead_lettered(terminal, publisher, "panicky handler refuses 1").await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM products WHERE id = 'AFTER'"),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_check_that_panics_in_a_plugin_is_reported_with_its_name_and_its_message_quarantined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, terminal, publisher) = panicky_terminal(
        dir.path(),
        "check",
        &[
            ("panicky_check", serde_json::json!({ "n": 7 })),
            ("panicky_update", serde_json::json!({ "n": 8 })),
        ],
    )
    .await;
    // On a terminal the check runs before the handler.
    let db = terminal.db();
    one_applied_one_dead_lettered(terminal, publisher, "validation blew up on 7").await;
    assert_eq!(count(&db, "SELECT count(*) FROM panicky WHERE n = 8"), 1);

    // A publisher checking the payload first is told which plugin panicked.
    let refused = Registry::from_config(&config.plugins)
        .expect("loads")
        .check("panicky_check", r#"{"n": 7}"#)
        .expect_err("refused")
        .to_string();
    assert!(
        refused.contains("plugin panicky panicked checking the payload: validation blew up on 7"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_effect_that_panics_in_a_plugin_is_contained_and_its_message_stays_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ran = dir.path().join("effects-ran");
    let (_, mut terminal, publisher) = panicky_terminal(
        dir.path(),
        "effect",
        &[
            (
                "panicky_update",
                serde_json::json!({ "n": 1, "effect_ran": ran }),
            ),
            (
                "panicky_update",
                serde_json::json!({ "n": 2, "effect_ran": ran }),
            ),
        ],
    )
    .await;
    terminal.wait_applied(2).await;
    // Each message's effect ran once, after its commit, and panicked.
    let runs = || std::fs::read(&ran).map_or(0, |bytes| bytes.len());
    eventually("both effects to run", || runs() >= 2).await;
    assert_eq!(runs(), 2);
    let db = terminal.db();
    assert_eq!(count(&db, "SELECT count(*) FROM panicky"), 2);
    assert_eq!(count(&db, "SELECT count(*) FROM possync_quarantine"), 0);
    assert!(terminal.status.borrow().is_live());
    publisher.close().await;
    terminal.stop().await;
}

/// A batch in which one message fails runs again with a savepoint per
/// message: the effects of the first pass, rolled back, never run; those of
/// the pass that commits run once.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_run_again_after_a_failed_message_runs_each_effect_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ran = dir.path().join("effects-ran");
    let (_, mut terminal, publisher) = panicky_terminal(
        dir.path(),
        "effect",
        &[
            (
                "panicky_update",
                serde_json::json!({ "n": 1, "effect_ran": ran }),
            ),
            ("panicky_update", serde_json::json!({ "n": "not a number" })),
            (
                "panicky_update",
                serde_json::json!({ "n": 3, "effect_ran": ran }),
            ),
        ],
    )
    .await;
    terminal.wait_settled(2, 1).await;
    let runs = || std::fs::read(&ran).map_or(0, |bytes| bytes.len());
    eventually("both effects to run", || runs() >= 2).await;
    assert_eq!(runs(), 2);
    assert_eq!(count(&terminal.db(), "SELECT count(*) FROM panicky"), 2);
    publisher.close().await;
    terminal.stop().await;
}

/// A storage error crosses the boundary as one: the terminal holds the
/// batch and says Stalled with the plugin's reason, never dead-letters the
/// message however often it fails, and applies it once the plugin's
/// storage takes writes again.
#[tokio::test(flavor = "multi_thread")]
async fn a_storage_error_from_a_plugin_stalls_the_terminal_until_it_passes_and_dead_letters_nothing()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let full = dir.path().join("disk-full");
    std::fs::write(&full, b"").expect("mark the disk full");
    let tries = || std::fs::read(dir.path().join("disk-full.tries")).map_or(0, |t| t.len());
    let store = unique_license("storage");
    let mut config = terminal_config(dir.path(), &store, "till-1");
    config.terminal.max_attempts = 2;
    config.plugins.insert(
        "panicky".into(),
        dynamic_plugin("possync-fixture-panicky", serde_json::json!({})),
    );
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    publisher
        .publish_envelopes([
            Envelope::new(
                "panicky_update",
                store.as_str(),
                serde_json::json!({ "n": 1, "storage_full_while": full }),
            ),
            Envelope::new(
                "price_update",
                store.as_str(),
                serde_json::json!({ "product_id": "AFTER", "new_price": 1.0 }),
            ),
        ])
        .await
        .expect("confirmed");

    let stalled = terminal
        .wait_for(|s| matches!(s.state, State::Stalled { .. }))
        .await;
    let state = terminal.status.borrow().state.clone();
    assert!(stalled, "the terminal says Stalled: {state:?}");
    let reason = state.reason().unwrap_or_default();
    assert!(
        reason.contains("panicky") && reason.contains("panicky's disk is full while"),
        "the reason is the plugin's: {reason}"
    );
    // More tries than max_attempts, and still nothing dead-lettered.
    eventually("more tries than max_attempts", || tries() > 2).await;
    let db = terminal.db();
    assert_eq!(quarantine_reasons(&db), Vec::<String>::new());
    assert_eq!(queue_depth(&terminal.topology.dead_letter_queue).await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM panicky"), 0);

    std::fs::remove_file(&full).expect("free the disk");
    terminal.wait_applied(2).await;
    assert!(terminal.wait_for(Status::is_live).await, "Live again");
    assert_eq!(count(&db, "SELECT count(*) FROM panicky WHERE n = 1"), 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM products WHERE id = 'AFTER'"),
        1
    );
    assert_eq!(quarantine_reasons(&db), Vec::<String>::new());
    assert_eq!(queue_depth(&terminal.topology.dead_letter_queue).await, 0);
    publisher.close().await;
    terminal.stop().await;
}

#[test]
fn a_plugin_that_panics_when_dropped_is_logged_not_fatal_and_its_log_reaches_possyncs() {
    // In this process: the registry goes, the plugin's Drop panics in the
    // plugin, and the process goes on.
    let mut plugins = std::collections::BTreeMap::new();
    plugins.insert("panicky".to_owned(), panicky("drop"));
    drop(Registry::from_config(&plugins).expect("loads"));

    // Through the CLI, the plugin's own log line and the contained panic
    // are in possync's log.
    let output = possync_command(&["plugins", "list"])
        .env(
            "POSSYNC_PLUGINS__PANICKY__PATH",
            plugin_library("possync-fixture-panicky"),
        )
        .env("POSSYNC_PLUGINS__PANICKY__SETTINGS__PANIC_IN", "drop")
        .output()
        .expect("run");
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        text(&output.stdout).contains("panicky_update"),
        "{}",
        text(&output.stdout)
    );
    assert!(
        stderr.contains("plugin_log") && stderr.contains("will panic in Drop"),
        "the plugin's log line went through possync's log: {stderr}"
    );
    assert!(
        stderr.contains("plugin_drop_panicked") && stderr.contains("drop blew up"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disabled_dynamic_plugin_acknowledges_its_messages_unapplied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("dynoff");
    let mut config = with_plugins(dir.path(), &store);
    if let Some(PluginSetting::Dynamic(plugin)) = config.plugins.get_mut("modifier_groups") {
        plugin.enabled = false;
    }
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let stores = [store.clone()];
    publisher
        .publish(&stores, &milk(&[("oat", "Oat", 0.5)], &["CAP"]))
        .await
        .expect("confirmed");
    publisher
        .publish(
            &stores,
            &ImageDelete {
                product_id: "X".into(),
            },
        )
        .await
        .expect("confirmed");
    terminal.wait_applied(1).await;
    let db = terminal.db();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sqlite_master WHERE name = 'modifier_groups'"
        ),
        0,
        "a disabled plugin's migrations do not run"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM possync_quarantine"), 0);
    assert_eq!(queue_depth(&terminal.topology.queue).await, 0);
    publisher.close().await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_mebibyte_image_publishes_and_applies_with_the_default_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("big-image");
    let mut config = terminal_config(dir.path(), &store, "till-1");
    config.plugins.insert(
        "product_images".into(),
        dynamic_plugin(
            "possync-plugin-product-images",
            serde_json::json!({ "images_dir": dir.path().join("images") }),
        ),
    );
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let mut picture = b"\x89PNG\r\n\x1a\n".to_vec();
    picture.extend((8..1024 * 1024u32).map(|i| (i % 253) as u8));
    let file = dir.path().join("big.png");
    std::fs::write(&file, &picture).expect("write image");

    let output = image_update(&store, "CAP", &file).output().expect("run");
    assert!(output.status.success(), "{}", text(&output.stderr));
    terminal.wait_applied(1).await;
    assert!(
        std::fs::read(image_path(&terminal.db(), "CAP")).expect("image file") == picture,
        "the file holds exactly the image"
    );
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_terminals_limit_is_refused_before_it_is_sent_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("too-big");
    let config = terminal_config(dir.path(), &store, "till-1");
    let mut terminal = RunningTerminal::start(config.clone()).await;

    // The largest image the plugin takes by default fits the default limit.
    let largest = vec![7u8; DEFAULT_MAX_IMAGE_BYTES];
    let fits = ImageUpdate::new("CAP", "image/png", &largest)
        .to_envelope(store.as_str())
        .expect("envelope");
    assert!(
        serde_json::to_vec(&fits).expect("json").len() + 1024 < config.terminal.max_message_bytes,
        "an image of the plugin's default max_image_bytes fits terminal.max_message_bytes"
    );

    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let too_big = ImageUpdate::new("BIG", "image/png", &vec![7u8; 7 * 1024 * 1024]);
    let err = publisher
        .publish(std::slice::from_ref(&store), &too_big)
        .await
        .expect_err("refused")
        .to_string();
    assert!(err.contains("terminal.max_message_bytes"), "{err}");
    publisher.close().await;

    // The CLI takes the limit from its config.
    let picture = dir.path().join("small.png");
    std::fs::write(&picture, vec![7u8; 4096]).expect("write image");
    let output = image_update(&store, "CAP", &picture)
        .env("POSSYNC_TERMINAL__MAX_MESSAGE_BYTES", "2048")
        .output()
        .expect("run");
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("over the terminals' limit of 2048 bytes (terminal.max_message_bytes)"),
        "{stderr}"
    );

    // Neither reached the terminal: a small message after them is the first it sees.
    publish_raw(
        &format!("license.{store}.teleport"),
        format!(r#"{{"type":"teleport","license_key":"{store}","payload":{{}}}}"#).as_bytes(),
    )
    .await;
    terminal.wait_settled(0, 1).await;
    assert_eq!(
        quarantine_reasons(&terminal.db()).len(),
        1,
        "only the small message arrived"
    );
    terminal.stop().await;
}
