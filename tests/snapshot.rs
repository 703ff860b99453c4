//! Converging from any state: a terminal with a gap (a first start in a
//! store with history, a queue made again, a database put back from an
//! older copy) asks the backend for a snapshot of its store's catalog,
//! swaps it in whole, applies what came after it, and ends holding what
//! the backend holds, row by row. The backend's checkpoints prove it does,
//! and find a catalog changed behind possync's back.

mod common;

use common::catalog::{
    BackendCatalog, assert_terminal_holds, backend_for, history, repricing, start_answering,
    submit, wait_quiet, wait_until_holds,
};
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_new_terminal_converges_from_a_snapshot_while_changes_stream_in() {
    const PRODUCTS: usize = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("snap-new");
    let backend = backend_for("snap-new", &store).await;
    // The store's first change, then a till that runs all along: it takes
    // its own snapshot of that one change, then every later change from its
    // queue, and nothing of the new till's snapshot.
    let first = submit(&backend, history(&store, 0)[..1].to_vec(), "first").await;
    backend.wait_published(&store, first).await;
    let mut old_till = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    assert!(old_till.wait_for(|s| s.sync.synced_up_to == first).await);
    // A till of another store (no backend serves it): it gets nothing.
    let other_store = unique_license("snap-other");
    let other_till =
        RunningTerminal::start(terminal_config(dir.path(), &other_store, "till-1")).await;
    let mut head =
        first + submit(&backend, history(&store, PRODUCTS)[1..].to_vec(), "history").await;

    // A new till starts while 1,000 changes stream in.
    let streaming = {
        let api = backend.api.clone();
        let changes = repricing(&store, 1_000, PRODUCTS, 1);
        tokio::spawn(async move {
            for (i, batch) in changes.chunks(50).enumerate() {
                api.submit_until_answered(batch.to_vec(), &format!("stream-{i}"))
                    .await;
            }
        })
    };
    let mut new_till = RunningTerminal::start(terminal_config(dir.path(), &store, "till-2")).await;
    streaming.await.expect("streamed");
    head += 1_000;
    backend.wait_published(&store, head).await;
    wait_quiet(&mut new_till, head, "the new till").await;
    wait_quiet(&mut old_till, head, "the old till").await;

    let catalog = backend.catalog(&store).await;
    assert_eq!(catalog.products.len(), PRODUCTS - PRODUCTS / 10);
    assert_terminal_holds(&new_till, &catalog, "the new till");
    assert_terminal_holds(&old_till, &catalog, "the old till");
    let new_status = new_till.stop().await;
    assert_eq!(new_status.sync.gap, None);
    assert!(
        new_status.applied < 2_000,
        "the new till applied the snapshot, not the history: {} messages",
        new_status.applied
    );
    let other_status = other_till.stop().await;
    assert_eq!(
        (
            other_status.applied,
            other_status.quarantined,
            other_status.duplicates
        ),
        (0, 0, 0),
        "another store's till received nothing of the snapshot"
    );
    let old_status = old_till.stop().await;
    assert_eq!(
        (old_status.applied, old_status.quarantined),
        (u64::try_from(head - first).expect("positive"), 0),
        "the old till applied every change after its own snapshot once, and nothing of the new till's"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_whose_queue_was_made_again_heals_from_a_snapshot() {
    const PRODUCTS: usize = 500;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("snap-queue");
    let backend = backend_for("snap-queue", &store).await;
    let config = terminal_config(dir.path(), &store, "till-1");
    let mut till = RunningTerminal::start(config.clone()).await;
    let mut head = submit(&backend, history(&store, PRODUCTS), "history").await;
    backend.wait_published(&store, head).await;
    wait_quiet(&mut till, head, "the till").await;
    let queue = till.topology.queue.clone();
    till.stop().await;

    // Its queue expires while it is off, and changes go on.
    delete_queue(queue.as_str()).await;
    head += submit(&backend, repricing(&store, 300, PRODUCTS, 2), "missed").await;
    backend.wait_published(&store, head).await;

    let mut till = RunningTerminal::start(config).await;
    head += submit(&backend, repricing(&store, 100, PRODUCTS, 3), "after").await;
    backend.wait_published(&store, head).await;
    wait_quiet(&mut till, head, "the till").await;
    assert_terminal_holds(&till, &backend.catalog(&store).await, "the till");
    assert_eq!(till.stop().await.sync.gap, None, "healed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_put_back_from_an_older_copy_heals_from_a_snapshot() {
    const PRODUCTS: usize = 500;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("snap-restored");
    let backend = backend_for("snap-restored", &store).await;
    let config = terminal_config(dir.path(), &store, "till-1");
    let database = config.terminal.database.clone();
    let mut till = RunningTerminal::start(config.clone()).await;
    let mut head = submit(&backend, history(&store, PRODUCTS), "history").await;
    backend.wait_published(&store, head).await;
    wait_quiet(&mut till, head, "the till").await;
    till.stop().await;
    let backup = dir.path().join("backup.db");
    std::fs::copy(&database, &backup).expect("backup");

    let mut till = RunningTerminal::start(config.clone()).await;
    head += submit(&backend, repricing(&store, 300, PRODUCTS, 2), "later").await;
    backend.wait_published(&store, head).await;
    wait_quiet(&mut till, head, "the till").await;
    till.stop().await;

    std::fs::copy(&backup, &database).expect("restored");
    let mut till = RunningTerminal::start(config).await;
    wait_quiet(&mut till, head, "the restored till").await;
    assert_terminal_holds(&till, &backend.catalog(&store).await, "the restored till");
    let status = till.stop().await;
    assert_eq!(status.sync.gap, None, "healed");
    assert_eq!(status.sync.synced_up_to, head);
}

#[tokio::test(flavor = "multi_thread")]
async fn modifier_groups_and_product_images_take_part_in_a_snapshot() {
    use possync_plugin_product_images::ImageUpdate;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::unique_license("snap-plugins");
    let library = |package: &str| plugin_library(package).display().to_string();
    let mut backend = common::backend::Backend::with_upstream_for("snap-plugins", &[&store]);
    backend.configure_relay("checkpoint_every_secs = 1\n");
    backend.configure(&format!(
        "\n[plugins.modifier_groups]\npath = {:?}\n\n[plugins.product_images]\npath = {:?}\n\n[plugins.product_images.settings]\nimages_dir = {:?}\n",
        library("possync-plugin-modifier-groups"),
        library("possync-plugin-product-images"),
        dir.path().join("backend-images").display().to_string(),
    ));
    common::catalog::start_answering(&mut backend).await;
    let change = |kind: &str, payload: serde_json::Value| serde_json::json!({"store": store.as_str(), "type": kind, "payload": payload});
    let pictures: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 2_000]).collect();
    let mut changes = vec![change(
        "product_update",
        serde_json::json!({"product_id": "P1", "product_name": "Coffee", "price": 2.5}),
    )];
    for g in 0..3 {
        changes.push(change(
            "modifier_group_update",
            serde_json::json!({"group_id": format!("G{g}"), "group_name": format!("Group {g}"),
                "min_select": 0, "max_select": 2, "product_ids": ["P1"],
                "modifiers": [{"modifier_id": format!("M{g}"), "name": "Oat milk", "price_delta": 0.4}]}),
        ));
    }
    changes.push(change(
        "modifier_group_delete",
        serde_json::json!({"group_id": "G2"}),
    ));
    for (i, picture) in pictures.iter().enumerate() {
        let image = ImageUpdate::new(format!("P{i}"), "image/png", picture);
        changes.push(change(
            <ImageUpdate as possync_sdk::Payload>::TYPE,
            serde_json::to_value(&image).expect("JSON"),
        ));
    }
    let head = common::catalog::submit(&backend, changes, "plugins").await;
    backend.wait_published(&store, head).await;

    let images = dir.path().join("till-images");
    let mut config = terminal_config(dir.path(), &store, "till-1");
    config.plugins.insert(
        "modifier_groups".into(),
        dynamic_plugin("possync-plugin-modifier-groups", serde_json::json!({})),
    );
    config.plugins.insert(
        "product_images".into(),
        dynamic_plugin(
            "possync-plugin-product-images",
            serde_json::json!({ "images_dir": images }),
        ),
    );
    let mut till = RunningTerminal::start(config).await;
    assert!(till.wait_for(|s| s.sync.synced_up_to == head).await);
    let db = till.db();
    assert_eq!(
        count(&db, "SELECT count(*) FROM modifier_groups"),
        2,
        "G2 was deleted before the snapshot"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM modifiers WHERE id IN ('M0', 'M1')"
        ),
        2
    );
    for (i, picture) in pictures.iter().enumerate() {
        let path: String = db
            .query_row(
                "SELECT path FROM product_images WHERE product_id = ?1",
                [format!("P{i}")],
                |row| row.get(0),
            )
            .expect("an image row");
        let written = std::fs::read(images.join(&path))
            .or_else(|_| std::fs::read(&path))
            .expect("its file");
        assert_eq!(&written, picture, "P{i}'s picture");
    }
    // What the dynamic plugins export sums as the backend's states do.
    assert!(
        till.wait_for(|s| s.sync.verified.is_some_and(|v| v.seq == head))
            .await,
        "verified at the head: {:?}",
        till.status.borrow().sync
    );
    till.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_catalog_changed_behind_possyncs_back_is_found_at_the_next_checkpoint_and_healed() {
    const PRODUCTS: usize = 500;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("snap-verify");
    let mut backend = common::backend::Backend::with_upstream_for("snap-verify", &[&store]);
    backend.configure_relay("checkpoint_every_secs = 1\n");
    start_answering(&mut backend).await;
    let mut till = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let head = submit(&backend, history(&store, PRODUCTS), "history").await;
    backend.wait_published(&store, head).await;
    wait_quiet(&mut till, head, "the till").await;
    assert!(
        till.wait_for(|s| s.sync.verified.is_some_and(|v| v.seq == head))
            .await,
        "verified at the head: {:?}",
        till.status.borrow().sync
    );
    let applied = till.status.borrow().applied;

    // Someone edits the till's database by hand: a price, a product gone,
    // one the back office never had, a category renamed.
    let db = till.db();
    db.execute_batch(
        "UPDATE products SET price = 999 WHERE id = 'P1';
         DELETE FROM products WHERE id = 'P2';
         INSERT INTO products (id, name, price) VALUES ('ROGUE', 'Rogue', 1.0);
         UPDATE categories SET name = 'Renamed' WHERE id = 'C1';",
    )
    .expect("changed behind possync's back");
    let catalog = backend.catalog(&store).await;
    wait_until_holds(&db, &catalog, "the healed till").await;
    assert!(
        till.wait_for(|s| s.sync.gap.is_none() && s.sync.verified.is_some_and(|v| v.seq == head))
            .await,
        "verified again: {:?}",
        till.status.borrow().sync
    );
    let status = till.stop().await;
    assert_eq!(
        (status.applied, status.quarantined),
        (applied, 0),
        "healed by a snapshot: no change was applied twice"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_the_tills_plugins_cannot_restore_leaves_the_till_as_it_was() {
    const PRODUCTS: usize = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("snap-partial");
    let backend = backend_for("snap-partial", &store).await;
    // A till that takes prices and categories but not whole products.
    let mut config = terminal_config(dir.path(), &store, "till-1");
    config
        .plugins
        .insert("product".into(), possync_core::PluginSetting::Toggle(false));
    let mut till = RunningTerminal::start(config.clone()).await;
    let head = submit(&backend, history(&store, PRODUCTS), "history").await;
    backend.wait_published(&store, head).await;
    wait_quiet(&mut till, head, "the till").await;
    let held = common::catalog::terminal_catalog(&till.db());
    assert!(!held.products.is_empty() && !held.categories.is_empty());
    let queue = till.topology.queue.clone();
    till.stop().await;

    delete_queue(queue.as_str()).await;
    let mut till = RunningTerminal::start(config).await;
    assert!(
        till.wait_for(|s| matches!(s.state, possync_core::State::Live { .. })
            && s.sync
                .gap
                .is_some_and(|gap| gap.cause == possync_core::GapCause::QueueRecreated))
            .await
    );
    // Time for the snapshot, which holds products this till cannot
    // restore: it must not replace what the till holds.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        common::catalog::terminal_catalog(&till.db()),
        held,
        "the till holds what it held"
    );
    let status = till.stop().await;
    assert_eq!(
        status.sync.gap.map(|gap| gap.cause),
        Some(possync_core::GapCause::QueueRecreated),
        "the gap stays open: only a snapshot the till can restore closes it"
    );
}
