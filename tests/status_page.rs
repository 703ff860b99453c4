//! The status endpoint: what an operator's tools and a store manager see.

mod common;

use common::browser::LivePage;
use common::*;
use possync_core::Publisher;
use possync_sdk::Envelope;

#[tokio::test(flavor = "multi_thread")]
async fn the_status_endpoint_reports_state_counts_problems_and_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("page");
    let (config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    let mut terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let (changes, _) = catalog_changes(&store, 40, 2);
    publisher
        .publish_envelopes(changes)
        .await
        .expect("confirmed");
    publisher
        .publish_envelope(Envelope::new(
            "teleport",
            store.as_str(),
            serde_json::json!({}),
        ))
        .await
        .expect("confirmed");
    terminal.wait_settled(40, 1).await;

    let (code, body) = http_get(port, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "live\n"));
    let (code, body) = http_get(port, "/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(status["state"], "live");
    assert_eq!(status["license_key"], store.as_str());
    assert_eq!(status["applied"], 40);
    assert!(
        status["applied_by_type"]["product_update"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{status}"
    );
    assert!(
        status["latest_quarantined"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("unknown message type"),
        "{status}"
    );
    assert!(
        status["plugins"].as_array().is_some_and(|p| p.len() >= 4),
        "{status}"
    );
    let (_, metrics) = http_get(port, "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "possync_live{{license_key=\"{store}\",terminal_id=\"till-1\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("possync_messages_quarantined_total"),
        "{metrics}"
    );
    let (code, page) = http_get(port, "/").await;
    assert_eq!(code, 200);
    assert!(
        page.contains("Live sync")
            && page.contains("unknown message type")
            && page.contains("http-equiv=\"refresh\""),
        "{page}"
    );
    assert_eq!(http_get(port, "/nope").await.0, 404);
    publisher.close().await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_is_off_by_default() {
    let config = possync_core::Config::default();
    assert!(!config.status.enabled);
    assert_eq!(
        config.status.address.to_string(),
        "127.0.0.1",
        "loopback when turned on"
    );
}

#[test]
fn names_the_status_page_answers_for_are_set_in_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("terminal.toml");
    std::fs::write(
        &file,
        "[status]\nenabled = true\nallowed_hosts = [\"till-3.store.lan\"]\n",
    )
    .expect("write config");
    let config = possync_core::Config::load(Some(&file))
        .expect("config")
        .config;
    assert_eq!(config.status.allowed_hosts, ["till-3.store.lan"]);
    assert!(
        possync_core::Config::default()
            .status
            .allowed_hosts
            .is_empty(),
        "none beyond localhost and IP addresses unless configured"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_counts_the_changes_waiting_in_the_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("depth");
    let (mut config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    // One message in flight at a time, so the rest wait in the queue.
    config.terminal.prefetch = 1;
    let mut first_run = config.clone();
    first_run.status.enabled = false;
    RunningTerminal::start(first_run).await.stop().await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let (changes, _) = catalog_changes(&store, 300, 3);
    publisher
        .publish_envelopes(changes)
        .await
        .expect("confirmed");

    // Counted as the terminal goes live, again every few seconds.
    let mut terminal = RunningTerminal::start(config).await;
    assert!(
        terminal
            .wait_for(|s| s.queue_depth.is_some_and(|d| d >= 200))
            .await,
        "{:?}",
        terminal.status.borrow()
    );
    let (_, body) = http_get(port, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        status["queue_depth"].as_u64().is_some_and(|d| d >= 200),
        "{status}"
    );
    let (_, metrics) = http_get(port, "/metrics").await;
    assert!(metrics.contains("possync_queue_depth{"), "{metrics}");
    let (_, page) = http_get(port, "/").await;
    assert!(page.contains("changes waiting in the queue"), "{page}");

    terminal.wait_applied(300).await;
    assert!(
        terminal.wait_for(|s| s.queue_depth == Some(0)).await,
        "{:?}",
        terminal.status.borrow()
    );
    // `possync status` reads the counters from the database: a busy terminal
    // writes them once a second, an idle one when it counts its queue.
    let db = possync_core::Database::open_read_only(&terminal.database).expect("db");
    eventually("the counters in the database", || {
        db.status_record()
            .ok()
            .flatten()
            .is_some_and(|s| s.applied_total == 300)
    })
    .await;
    publisher.close().await;
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_reads_the_page_by_address_but_not_through_a_name_pointed_at_it() {
    // DNS rebinding: a web page on evil.example points its name at
    // 127.0.0.1, and the browser then sends `Host: evil.example` to the
    // terminal. The endpoint must tell it nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("rebind");
    let (config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    let terminal = RunningTerminal::start(config).await;

    let page = tokio::task::spawn_blocking(move || {
        rendered_url(&format!("http://127.0.0.1:{port}/"), &[])
    })
    .await
    .expect("chromium");
    assert!(page.contains("id=\"badge\">Live sync<"), "{page}");

    let rebound = tokio::task::spawn_blocking(move || {
        rendered_url(
            &format!("http://evil.example:{port}/status"),
            &["--host-resolver-rules=MAP evil.example 127.0.0.1"],
        )
    })
    .await
    .expect("chromium");
    assert!(rebound.contains("allowed_hosts"), "{rebound}");
    assert!(!rebound.contains(store.as_str()), "{rebound}");
    terminal.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_a_price_change_within_a_second_without_reloading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("live-page");
    let (config, port) = with_status_page(terminal_config(dir.path(), &store, "till-1"));
    let terminal = RunningTerminal::start(config.clone()).await;
    let publisher = Publisher::connect(&config.broker).await.expect("publisher");
    let url = format!("http://127.0.0.1:{port}/");
    let mut page = tokio::task::spawn_blocking(move || {
        let mut page = LivePage::open(&url);
        let following = page.wait_until(
            "document.getElementById('feed-state').textContent.includes('live')",
            std::time::Duration::from_secs(20),
        );
        assert!(following.is_some(), "the page follows the feed");
        // A reload would forget this.
        page.eval("window.loadedOnce = true");
        page
    })
    .await
    .expect("page");

    let published = std::time::Instant::now();
    publisher
        .publish(
            std::slice::from_ref(&store),
            &possync_catalog::PriceUpdate {
                product_id: "LIVE-42".into(),
                new_price: 4.2,
                product_name: None,
            },
        )
        .await
        .expect("confirmed");
    let (shown, page) = tokio::task::spawn_blocking(move || {
        let shown = page.wait_until(
            "document.getElementById('changes').innerText.includes('LIVE-42')",
            std::time::Duration::from_secs(5),
        );
        (shown, page)
    })
    .await
    .expect("page");
    let mut page = page;
    let since_publish = published.elapsed();
    assert!(shown.is_some(), "the change shows on the page");
    assert!(
        since_publish < std::time::Duration::from_secs(1),
        "shown {since_publish:?} after publishing"
    );
    assert_eq!(
        page.eval("window.loadedOnce === true"),
        serde_json::Value::Bool(true),
        "without a reload"
    );
    drop(page);
    terminal.stop().await;
}
