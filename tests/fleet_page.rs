//! The fleet page (`GET /fleet` of `possync backend`): what the back office
//! sees of its stores' terminals, drawn in a real browser from the
//! terminals' receipts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::backend::Backend;
use common::browser::LivePage;
use common::*;
use nix::sys::signal::Signal;
use possync_core::LicenseKey;
use serde_json::{Value, json};

/// `[upstream] offline_after_secs` by default: a terminal silent this long
/// is offline.
const OFFLINE_AFTER: Duration = Duration::from_secs(7);

/// The page asks for the fleet again every 2 s.
const PAGE_REFRESH: Duration = Duration::from_secs(2);

/// What the page shows of one terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    terminal: String,
    state: String,
    lag: i64,
}

/// The rows of `store`'s table, top to bottom.
fn rows(page: &mut LivePage, store: &LicenseKey) -> Vec<Row> {
    let found = page.eval(&format!(
        "[...document.querySelectorAll('section.store[data-store=\"{store}\"] tr[data-terminal]')]
           .map(r => [r.dataset.terminal, r.dataset.state, Number(r.dataset.lag)])"
    ));
    found
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| Row {
            terminal: row[0].as_str().unwrap_or_default().to_owned(),
            state: row[1].as_str().unwrap_or_default().to_owned(),
            lag: row[2].as_i64().unwrap_or(-1),
        })
        .collect()
}

/// Looks at the page until `store`'s rows satisfy `done`; the time it took
/// and the rows last seen. Blocks: the page is driven synchronously.
fn watch_rows(
    page: &mut LivePage,
    store: &LicenseKey,
    within: Duration,
    done: impl Fn(&[Row]) -> bool,
) -> (Option<Duration>, Vec<Row>) {
    let start = Instant::now();
    loop {
        let seen = rows(page, store);
        if done(&seen) {
            return (Some(start.elapsed()), seen);
        }
        if start.elapsed() > within {
            return (None, seen);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Clicks the sort button `sort` and returns `store`'s terminals in the
/// order drawn twice since (a refresh under way at the click may draw the
/// old order once).
fn sort_by(page: &mut LivePage, store: &LicenseKey, sort: &str) -> Vec<String> {
    page.eval(&format!(
        "document.querySelector('button.sort[data-sort={sort}]').click()"
    ));
    for _ in 0..2 {
        page.eval("document.querySelectorAll('section.store').forEach(s => s.dataset.old = '1')");
        assert!(
            page.wait_until("!document.querySelector('section.store[data-old]')", WAIT)
                .is_some(),
            "the page draws the fleet again"
        );
    }
    rows(page, store)
        .into_iter()
        .map(|row| row.terminal)
        .collect()
}

fn row<'a>(rows: &'a [Row], terminal: &str) -> Option<&'a Row> {
    rows.iter().find(|row| row.terminal == terminal)
}

fn shows(rows: &[Row], terminal: &str, state: &str, lag: i64) -> bool {
    row(rows, terminal).is_some_and(|row| row.state == state && row.lag == lag)
}

/// Runs `work` on this worker thread, letting the runtime's other tasks
/// (the in-process terminals) move on meanwhile.
fn blocking<R>(work: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(work)
}

/// A backend consuming the receipts of `stores`' terminals, started and
/// listening.
async fn fleet_backend(label: &str, stores: &[&LicenseKey], settings: &str) -> Backend {
    let mut backend = Backend::with_upstream_for(label, stores);
    // Appended to `[upstream]`, the config's last section.
    backend.configure(settings);
    backend.start_upstream().await;
    backend
}

/// Submits `count` price changes to `store` through the API.
async fn submit_prices(backend: &Backend, store: &LicenseKey, count: usize, base: f64) {
    let changes: Vec<Value> = (0..count)
        .map(|i| {
            json!({"store": store.as_str(), "type": "price_update",
                   "payload": {"product_id": format!("P{i}"), "new_price": base + i as f64}})
        })
        .collect();
    let (status, answer) = backend
        .api
        .call("POST", "/v1/changes", Some(json!({ "changes": changes })))
        .await;
    assert_eq!(status, 200, "{answer}");
}

/// `possync terminal --config FILE` as a child process, which a test can
/// SIGKILL: it then sends no last receipt.
async fn terminal_process(dir: &Path, store: &LicenseKey, terminal: &str) -> ChildLog {
    let file = dir.join(format!("{terminal}.toml"));
    std::fs::write(
        &file,
        format!(
            "[terminal]\nlicense_key = \"{store}\"\nterminal_id = \"{terminal}\"\ndatabase = {:?}\nqueue_expiry_days = 1\n",
            dir.join(format!("{store}-{terminal}.db"))
                .display()
                .to_string()
        ),
    )
    .expect("write the terminal's config");
    let mut child = ChildLog::spawn(&mut possync_command(&[
        "terminal",
        "--config",
        file.to_str().expect("a UTF-8 path"),
    ]));
    // Its queue bound (or it would miss the changes published next) and
    // its receipts going up, in either order.
    let (mut live, mut uplink) = (false, false);
    while !(live && uplink) {
        let line = child
            .wait_for_line_where("its queue bound and its uplink connected", |line| {
                line.contains("Live: receiving") || line.contains("uplink_live")
            })
            .await;
        live |= line.contains("Live: receiving");
        uplink |= line.contains("uplink_live");
    }
    child
}

/// The fleet as `/v1/fleet` lists it for the office's token: one terminal.
async fn fleet_record(backend: &Backend, store: &LicenseKey, terminal: &str) -> (Value, i64) {
    let (status, fleet) = backend.api.call("GET", "/v1/fleet?sort=name", None).await;
    assert_eq!(status, 200, "{fleet}");
    let record = fleet["stores"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["store"] == store.as_str())
        .flat_map(|s| s["terminals"].as_array().cloned().unwrap_or_default())
        .find(|t| t["terminal"] == terminal)
        .unwrap_or_else(|| panic!("{store}/{terminal} is not in the fleet: {fleet}"));
    (record, fleet["now_ms"].as_i64().expect("now_ms"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_page_shows_a_killed_terminal_offline_once_silent_for_ten_seconds_and_counts_what_it_misses()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("fleet");
    let mut backend = fleet_backend("fleet", &[&store], "").await;
    let token = backend.api.token.clone();
    let mut till_1 = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    // A process of its own, to be killed without a last word.
    let till_2 = terminal_process(dir.path(), &store, "till-2").await;

    submit_prices(&backend, &store, 3, 1.0).await;
    backend.wait_published(&store, 3).await;
    till_1.wait_applied(3).await;

    let url = format!("http://127.0.0.1:{}/fleet#token={token}", backend.api.port);
    let mut page = blocking(|| LivePage::open(&url));
    let (both_live, seen) = blocking(|| {
        watch_rows(&mut page, &store, WAIT, |rows| {
            rows.len() == 2 && shows(rows, "till-1", "live", 0) && shows(rows, "till-2", "live", 0)
        })
    });
    assert!(
        both_live.is_some(),
        "both terminals show live and caught up: {seen:?}"
    );
    // The token stays in the tab, out of the address (history, bookmarks,
    // a shared screen) and out of the page.
    let address = page.eval("location.href");
    assert_eq!(
        address,
        json!(format!("http://127.0.0.1:{}/fleet", backend.api.port)),
        "the token is taken out of the address"
    );
    assert_eq!(
        page.eval(&format!(
            "[location.href.includes({token:?}), document.documentElement.outerHTML.includes({token:?}), sessionStorage.getItem('possync-fleet-token') === {token:?}]"
        )),
        json!([false, false, true])
    );
    assert_eq!(
        page.eval("document.querySelectorAll('section.store').length"),
        json!(1)
    );

    // SIGKILL: no receipt says it stops; only its silence tells. Killed
    // just after a receipt arrived, the longest it can take, while the page
    // shows it live (another test may cut the broker off for a while).
    let (mut last, _) = fleet_record(&backend, &store, "till-2").await;
    let deadline = Instant::now() + WAIT;
    let (record, now_ms) = loop {
        let (record, now_ms) = fleet_record(&backend, &store, "till-2").await;
        if record["last_seen_ms"] != last["last_seen_ms"] {
            if record["state"] == "live"
                && row(&rows(&mut page, &store), "till-2").is_some_and(|r| r.state == "live")
            {
                break (record, now_ms);
            }
            last = record;
        }
        assert!(Instant::now() < deadline, "till-2 is not live: {last}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let silent_at_kill = Duration::from_millis(
        u64::try_from(now_ms - record["last_seen_ms"].as_i64().expect("last_seen_ms")).unwrap_or(0),
    );
    till_2.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let (_, log) = till_2.exit().await;
    let (offline, seen) = blocking(|| {
        watch_rows(&mut page, &store, OFFLINE_AFTER + WAIT, |rows| {
            row(rows, "till-2").is_some_and(|row| row.state == "offline")
        })
    });
    let to_offline = killed.elapsed();
    println!(
        "till-2 silent for {silent_at_kill:?} at the kill, shown offline {to_offline:?} after it"
    );
    assert!(
        offline.is_some(),
        "the killed terminal shows offline: {seen:?}\n{log}"
    );
    // Offline once silent for longer than `offline_after_secs`, never
    // sooner; on the page by its next refresh.
    assert!(
        to_offline + silent_at_kill + Duration::from_millis(250) > OFFLINE_AFTER,
        "shown offline {to_offline:?} after the kill, silent for {silent_at_kill:?} then: too soon\n{log}"
    );
    assert!(
        to_offline + silent_at_kill < OFFLINE_AFTER + PAGE_REFRESH + Duration::from_secs(1),
        "shown offline {to_offline:?} after the kill, silent for {silent_at_kill:?} then: too late\n{log}"
    );
    assert!(
        to_offline < Duration::from_secs(10),
        "a stopped terminal shows offline within 10 s: {to_offline:?}\n{log}"
    );
    assert!(
        shows(&seen, "till-1", "live", 0),
        "the other terminal stays live: {seen:?}"
    );

    // What it misses is counted against it; the running terminal keeps up.
    submit_prices(&backend, &store, 4, 10.0).await;
    backend.wait_published(&store, 7).await;
    till_1.wait_applied(7).await;
    let (counted, seen) = blocking(|| {
        watch_rows(&mut page, &store, WAIT, |rows| {
            shows(rows, "till-2", "offline", 4) && shows(rows, "till-1", "live", 0)
        })
    });
    assert!(
        counted.is_some(),
        "till-2 is 4 changes behind, till-1 none: {seen:?}"
    );

    // By name, then by lag: the one behind comes first.
    let by_name = blocking(|| sort_by(&mut page, &store, "name"));
    assert_eq!(by_name, ["till-1", "till-2"], "sorted by name");
    let by_lag = blocking(|| sort_by(&mut page, &store, "lag"));
    assert_eq!(by_lag, ["till-2", "till-1"], "sorted by lag");
    assert_eq!(
        page.eval("document.querySelector('button.sort[aria-pressed=true]').dataset.sort"),
        json!("lag")
    );

    // A terminal stopped cleanly says so: offline at the next refresh.
    till_1.stop().await;
    let stopped = Instant::now();
    let (offline, seen) = blocking(|| {
        watch_rows(&mut page, &store, WAIT, |rows| {
            shows(rows, "till-1", "offline", 0)
        })
    });
    let to_offline = stopped.elapsed();
    println!("till-1 stopped cleanly, shown offline {to_offline:?} after");
    assert!(
        offline.is_some(),
        "the stopped terminal shows offline: {seen:?}"
    );
    assert!(
        to_offline < PAGE_REFRESH + Duration::from_secs(1),
        "shown offline {to_offline:?} after stopping"
    );
    assert_eq!(
        page.eval("location.href.includes('token=')"),
        Value::Bool(false)
    );
    drop(page);
    backend.stop().await;
}

/// A store key that reads like one, unique to this run.
fn store_key(name: &str) -> LicenseKey {
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    LicenseKey::new(format!("{name}-{}", &suffix[26..])).expect("a valid license key")
}

/// Set `POSSYNC_WRITE_SCREENSHOTS=1` to write `docs/fleet-page.png` from
/// this test's page (the README shows it).
#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_page_lists_every_store_with_its_terminals_the_furthest_behind_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let north = store_key("CAFE-NORTH");
    let station = store_key("CAFE-STATION");
    let bakery = store_key("BAKERY");
    // Stalled after 3 s without progress: the picture need not wait a minute.
    let mut backend = fleet_backend(
        "fleet-stores",
        &[&north, &station, &bakery],
        "stalled_after_secs = 3\n",
    )
    .await;
    let token = backend.api.token.clone();
    let mut tills: Vec<(LicenseKey, String, RunningTerminal)> = Vec::new();
    for (store, count) in [(&north, 3), (&station, 4), (&bakery, 2)] {
        for i in 1..=count {
            let id = format!("till-{i}");
            let terminal = RunningTerminal::start(terminal_config(dir.path(), store, &id)).await;
            tills.push((store.clone(), id, terminal));
        }
    }
    for (store, count) in [(&north, 12), (&station, 5), (&bakery, 4)] {
        submit_prices(&backend, store, count, 1.0).await;
        backend.wait_published(store, count as i64).await;
    }
    for (store, _, terminal) in &mut tills {
        let head = if *store == north {
            12
        } else if *store == station {
            5
        } else {
            4
        };
        terminal.wait_applied(head).await;
    }

    // Station's till-4 is switched off; at the bakery the POS app holds a
    // write lock on till-2's database, which then applies nothing.
    let position =
        |tills: &[(LicenseKey, String, RunningTerminal)], store: &LicenseKey, id: &str| {
            tills
                .iter()
                .position(|(s, t, _)| s == store && t == id)
                .expect("a till")
        };
    let (_, _, off) = tills.remove(position(&tills, &station, "till-4"));
    off.stop().await;
    let stuck = &tills[position(&tills, &bakery, "till-2")].2;
    let lock = stuck.db();
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    submit_prices(&backend, &north, 2, 20.0).await;
    submit_prices(&backend, &station, 3, 20.0).await;
    submit_prices(&backend, &bakery, 6, 20.0).await;

    let url = format!("http://127.0.0.1:{}/fleet#token={token}", backend.api.port);
    let mut page = blocking(|| LivePage::open(&url));
    let expected = [
        (
            &north,
            vec![
                ("till-1", "live", 0),
                ("till-2", "live", 0),
                ("till-3", "live", 0),
            ],
        ),
        (
            &station,
            vec![
                ("till-4", "offline", 3),
                ("till-1", "live", 0),
                ("till-2", "live", 0),
                ("till-3", "live", 0),
            ],
        ),
        (
            &bakery,
            vec![("till-2", "stalled", 6), ("till-1", "live", 0)],
        ),
    ];
    for (store, rows_expected) in &expected {
        let (drawn, seen) = blocking(|| {
            watch_rows(&mut page, store, WAIT, |rows| {
                rows.iter()
                    .map(|r| (r.terminal.as_str(), r.state.as_str(), r.lag))
                    .eq(rows_expected.iter().copied())
            })
        });
        assert!(
            drawn.is_some(),
            "{store}: expected {rows_expected:?}, the page shows {seen:?}"
        );
    }
    assert_eq!(
        page.eval("[...document.querySelectorAll('section.store')].map(s => s.dataset.store)"),
        json!([bakery.as_str(), station.as_str(), north.as_str()]),
        "the store furthest behind first"
    );
    let summary = page.eval("document.getElementById('summary').textContent");
    assert!(
        summary
            .as_str()
            .is_some_and(|s| s.starts_with("3 stores · 7 live · 1 stalled · 1 offline")),
        "{summary}"
    );

    if std::env::var("POSSYNC_WRITE_SCREENSHOTS").as_deref() == Ok("1") {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/fleet-page.png");
        blocking(|| {
            page.set_viewport(1100, 700);
            // Drawn again at the new size before the picture.
            std::thread::sleep(PAGE_REFRESH);
            page.screenshot(&path);
        });
        println!("wrote {}", path.display());
    }
    drop(page);
    lock.execute_batch("ROLLBACK").expect("release the lock");
    drop(lock);
    for (_, _, terminal) in tills {
        terminal.stop().await;
    }
    backend.stop().await;
}
