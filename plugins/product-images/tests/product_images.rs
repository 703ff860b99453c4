//! Product images against a real SQLite file and a real folder: files that
//! follow the database, images refused before they reach the disk, settings
//! checked at start, and an older database's tombstones kept.

use std::path::Path;

use possync_plugin_product_images::{ImageDelete, ImageUpdate, MIGRATIONS, plugin, sha256_hex};
use possync_sdk::{HandlerError, Migration, Plugin, Settings};
use possync_testkit::{Applied, Error, TestTerminal, message};
use serde_json::json;

/// A terminal whose images go to `folder`, at most 2048 bytes each.
fn till(folder: &Path) -> TestTerminal {
    let settings = json!({ "images_dir": folder, "max_image_bytes": 2048 });
    TestTerminal::with_settings(plugin, Settings::new("product_images", settings)).expect("starts")
}

fn files(folder: &Path) -> usize {
    std::fs::read_dir(folder).expect("images folder").count()
}

fn image_path(till: &TestTerminal, product: &str) -> String {
    let rows = till
        .query(&format!(
            "SELECT path FROM product_images WHERE product_id = '{product}'"
        ))
        .expect("reads");
    rows[0][0].as_str().expect("a path").to_owned()
}

#[test]
fn an_image_is_written_whole_under_its_hash_and_its_file_goes_with_its_delete() {
    let folder = tempfile::tempdir().expect("tempdir");
    let mut till = till(folder.path());
    let picture: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
    let update = ImageUpdate::new("CAP", "image/png", &picture);
    assert_eq!(till.apply(message(&update)), Ok(Applied::Changed));
    let path = image_path(&till, "CAP");
    assert!(
        path.ends_with(&format!("{}.png", sha256_hex(&picture))),
        "{path}"
    );
    assert_eq!(std::fs::read(&path).expect("the file"), picture);
    let delete = ImageDelete {
        product_id: "CAP".into(),
    };
    assert_eq!(till.apply(message(&delete)), Ok(Applied::Changed));
    assert!(!Path::new(&path).exists(), "removed after the commit");
}

#[test]
fn a_wrong_hash_a_large_image_or_an_unknown_type_never_reaches_the_disk() {
    let folder = tempfile::tempdir().expect("tempdir");
    let mut till = till(folder.path());
    let mut wrong_hash = ImageUpdate::new("LAT", "image/png", &[1; 100]);
    wrong_hash.sha256 = Some("0".repeat(64));
    let too_big = ImageUpdate::new("BIG", "image/jpeg", &[7; 4096]);
    let not_an_image = ImageUpdate::new("PDF", "application/pdf", &[1; 10]);
    for (image, reason) in [
        (wrong_hash, "sha256 mismatch"),
        (too_big, "over the limit of 2048"),
        (not_an_image, "not an image type the POS shows"),
    ] {
        let Err(HandlerError::Permanent(refused)) = till.apply(message(&image)) else {
            panic!("{reason}: refused for good");
        };
        assert!(refused.contains(reason), "{refused}");
    }
    assert_eq!(files(folder.path()), 0);
}

#[test]
fn a_file_written_for_a_change_that_rolls_back_is_removed() {
    let folder = tempfile::tempdir().expect("tempdir");
    let mut till = till(folder.path());
    till.connection()
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON product_images
             BEGIN SELECT RAISE(ABORT, 'refused for the test'); END;",
        )
        .expect("a trigger");
    let refused = till.apply(message(&ImageUpdate::new("CAP", "image/png", &[1; 100])));
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(files(folder.path()), 0, "no file without its row");
}

#[test]
fn a_picture_two_products_share_stays_while_one_of_them_refers_to_it() {
    let folder = tempfile::tempdir().expect("tempdir");
    let mut till = till(folder.path());
    let (first, second) = ([1u8; 1000], [2u8; 1000]);
    for (product, picture) in [("CAP", &first), ("LAT", &first), ("CAP", &second)] {
        let update = ImageUpdate::new(product, "image/png", picture);
        assert_eq!(till.apply(message(&update)), Ok(Applied::Changed));
    }
    assert_eq!(
        std::fs::read(image_path(&till, "LAT")).expect("LAT's file"),
        first
    );
    assert_eq!(files(folder.path()), 2);
}

#[test]
fn a_late_update_after_a_delete_is_stale_and_writes_no_file() {
    let folder = tempfile::tempdir().expect("tempdir");
    let mut till = till(folder.path());
    let delete = ImageDelete {
        product_id: "CAP".into(),
    };
    till.apply(message(&delete).with_version(20))
        .expect("applies");
    let late = message(&ImageUpdate::new("CAP", "image/png", &[1; 100])).with_version(10);
    assert!(matches!(till.apply(late), Ok(Applied::Stale(_))));
    assert_eq!(files(folder.path()), 0);
}

#[test]
fn settings_are_checked_when_the_plugin_starts() {
    let folder = tempfile::tempdir().expect("tempdir");
    let missing = TestTerminal::with_settings(plugin, Settings::new("product_images", json!({})));
    let Err(Error::Plugin(reason)) = missing else {
        panic!("images_dir is required");
    };
    assert!(
        reason.contains("[plugins.product_images.settings]") && reason.contains("images_dir"),
        "{reason}"
    );
    let typo = json!({ "images_dir": folder.path(), "max_image_byte": 1 });
    let typo = TestTerminal::with_settings(plugin, Settings::new("product_images", typo));
    assert!(matches!(typo, Err(Error::Plugin(reason)) if reason.contains("max_image_byte")));
    let nested = folder.path().join("a/b");
    let created = json!({ "images_dir": nested });
    TestTerminal::with_settings(plugin, Settings::new("product_images", created)).expect("starts");
    assert!(nested.is_dir(), "images_dir is created");
}

#[test]
fn an_older_database_keeps_its_tombstones_in_the_shared_table() {
    let folder = tempfile::tempdir().expect("tempdir");
    let path = folder.path().join("till.db");
    fn before(_: &Settings) -> Result<Plugin, String> {
        const FIRST: &[Migration] = &[MIGRATIONS[1]];
        Ok(Plugin::new("product_images").migrations(FIRST))
    }
    let old = TestTerminal::open(&path, before, Settings::new("product_images", json!({})))
        .expect("an old database");
    old.connection()
        .execute_batch(
            "INSERT INTO product_image_tombstones (product_id, sync_version) VALUES ('CAP', 20);",
        )
        .expect("a tombstone of the old kind");
    drop(old);
    let settings = json!({ "images_dir": folder.path().join("images") });
    let till = TestTerminal::open(&path, plugin, Settings::new("product_images", settings))
        .expect("upgrades");
    assert_eq!(
        till.query("SELECT entity, id, sync_version FROM possync_tombstones")
            .expect("reads"),
        [json!(["product_images", "CAP", 20])]
    );
}

#[test]
fn an_image_sent_without_its_hash_is_hashed_on_arrival() {
    let folder = tempfile::tempdir().expect("tempdir");
    let mut till = till(folder.path());
    let picture = b"\x89PNG not really".to_vec();
    let mut update = ImageUpdate::new("TEA", "image/png", &picture);
    update.sha256 = None;
    assert_eq!(till.apply(message(&update)), Ok(Applied::Changed));
    let path = image_path(&till, "TEA");
    assert!(
        path.ends_with(&format!("{}.png", sha256_hex(&picture))),
        "{path}"
    );
}

#[test]
fn a_publisher_checking_payloads_needs_no_images_folder() {
    let settings = Settings::new("product_images", json!({})).checking_only();
    let plugin = plugin(&settings).expect("builds without images_dir");
    assert!(format!("{plugin:?}").contains("image_update"), "{plugin:?}");
}

#[test]
fn an_image_sent_without_its_content_type_is_known_by_its_first_bytes() {
    let folder = tempfile::tempdir().expect("tempdir");
    let mut till = till(folder.path());
    let mut jpeg = ImageUpdate::new("CAKE", "image/jpeg", b"\xff\xd8\xff\xe0 a cake");
    jpeg.content_type = None;
    assert_eq!(till.apply(message(&jpeg)), Ok(Applied::Changed));
    assert!(image_path(&till, "CAKE").ends_with(".jpg"));
    let mut text = ImageUpdate::new("NOTE", "image/png", b"just some words");
    text.content_type = None;
    let refused = till.apply(message(&text)).expect_err("not an image");
    assert!(
        refused
            .to_string()
            .contains("not a PNG, JPEG, WebP or GIF image"),
        "{refused}"
    );
}
