//! Modifier groups against a real SQLite file: a group replaced as a whole,
//! deleted with a tombstone, refused when it cannot apply, and an older
//! database's tombstones kept.

use possync_plugin_modifier_groups::{
    MIGRATIONS, Modifier, ModifierGroupDelete, ModifierGroupUpdate, plugin,
};
use possync_sdk::{HandlerError, Migration, Plugin, Settings};
use possync_testkit::{Applied, TestTerminal, message};
use serde_json::json;

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

fn delete_milk() -> ModifierGroupDelete {
    ModifierGroupDelete {
        group_id: "milk".into(),
    }
}

fn rows(till: &TestTerminal, sql: &str) -> Vec<serde_json::Value> {
    till.query(sql).expect("reads")
}

#[test]
fn an_update_replaces_the_group_its_modifiers_and_its_products_as_a_whole() {
    let mut till = TestTerminal::new(plugin).expect("starts");
    let first = milk(&[("oat", "Oat", 0.5), ("soy", "Soy", 0.4)], &["CAP", "LAT"]);
    assert_eq!(till.apply(message(&first)), Ok(Applied::Changed));
    assert_eq!(
        rows(
            &till,
            "SELECT id, name, min_select, max_select FROM modifier_groups"
        ),
        [json!(["milk", "Milk", 0, 1])]
    );
    assert_eq!(rows(&till, "SELECT count(*) FROM modifiers"), [json!([2])]);
    let second = milk(&[("oat", "Oat milk", 0.6)], &["CAP"]);
    assert_eq!(till.apply(message(&second)), Ok(Applied::Changed));
    assert_eq!(
        rows(
            &till,
            "SELECT id, group_id, name, price_delta FROM modifiers"
        ),
        [json!(["oat", "milk", "Oat milk", 0.6])]
    );
    assert_eq!(
        rows(
            &till,
            "SELECT product_id, group_id FROM product_modifier_groups"
        ),
        [json!(["CAP", "milk"])]
    );
}

#[test]
fn a_delete_removes_everything_of_the_group_and_keeps_late_updates_out() {
    let mut till = TestTerminal::new(plugin).expect("starts");
    let group = milk(&[("oat", "Oat", 0.5)], &["CAP"]);
    till.apply(message(&group).with_version(10))
        .expect("applies");
    assert_eq!(
        till.apply(message(&delete_milk()).with_version(20)),
        Ok(Applied::Changed)
    );
    for table in ["modifier_groups", "modifiers", "product_modifier_groups"] {
        assert_eq!(
            rows(&till, &format!("SELECT count(*) FROM {table}")),
            [json!([0])],
            "{table}"
        );
    }
    let late = till.apply(message(&group).with_version(15));
    assert!(matches!(late, Ok(Applied::Stale(_))), "{late:?}");
    assert_eq!(
        till.apply(message(&group).with_version(30)),
        Ok(Applied::Changed)
    );
    assert_eq!(
        rows(&till, "SELECT count(*) FROM possync_tombstones"),
        [json!([0])]
    );
}

#[test]
fn a_group_that_can_never_apply_is_refused_with_the_reason() {
    let mut till = TestTerminal::new(plugin).expect("starts");
    let mut inverted = milk(&[], &[]);
    inverted.min_select = 3;
    let twice = milk(&[("oat", "Oat", 0.5), ("oat", "Oat", 0.5)], &[]);
    let nameless = milk(&[(" ", "Oat", 0.5)], &[]);
    for (group, reason) in [
        (inverted, "min_select 3 is more than max_select 1"),
        (twice, "modifier oat appears twice"),
        (nameless, "a modifier_id is empty"),
    ] {
        let refused = till.apply(message(&group)).expect_err(reason);
        assert!(refused.to_string().contains(reason), "{refused}");
    }
    till.apply(message(&milk(&[("oat", "Oat", 0.5)], &[])))
        .expect("applies");
    let mut thief = milk(&[("oat", "Oat", 0.5)], &[]);
    thief.group_id = "sugar".into();
    let Err(HandlerError::Permanent(reason)) = till.apply(message(&thief)) else {
        panic!("a modifier of another group is refused");
    };
    assert!(reason.contains("already belongs to group milk"), "{reason}");
}

#[test]
fn an_older_database_keeps_its_tombstones_in_the_shared_table() {
    let folder = tempfile::tempdir().expect("tempdir");
    let path = folder.path().join("till.db");
    fn before(_: &Settings) -> Result<Plugin, String> {
        const FIRST: &[Migration] = &[MIGRATIONS[1]];
        Ok(Plugin::new("modifier_groups").migrations(FIRST))
    }
    let settings = || Settings::new("modifier_groups", json!({}));
    let old = TestTerminal::open(&path, before, settings()).expect("an old database");
    old.connection()
        .execute_batch(
            "INSERT INTO modifier_group_tombstones (id, sync_version) VALUES ('milk', 20);",
        )
        .expect("a tombstone of the old kind");
    drop(old);
    let mut till = TestTerminal::open(&path, plugin, settings()).expect("upgrades");
    assert_eq!(
        rows(
            &till,
            "SELECT entity, id, sync_version FROM possync_tombstones"
        ),
        [json!(["modifier_groups", "milk", 20])]
    );
    let late = till.apply(message(&milk(&[], &[])).with_version(10));
    assert!(matches!(late, Ok(Applied::Stale(_))), "{late:?}");
}
