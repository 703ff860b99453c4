//! `possync publish bulk`: a whole catalog to many stores; bad lines are
//! reported by number and the rest arrives.

mod common;

use std::fmt::Write as _;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_lines_with_a_few_bad_ones_arrive_and_the_bad_ones_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, second) = (unique_license("bulk-a"), unique_license("bulk-b"));
    let mut one = RunningTerminal::start(terminal_config(dir.path(), &first, "till-1")).await;
    let mut two = RunningTerminal::start(terminal_config(dir.path(), &second, "till-1")).await;
    let bad_lines = [17usize, 5000, 9999];
    let mut catalog = String::new();
    for line in 1..=10_000usize {
        match line {
            17 => catalog.push_str("{this is not json\n"),
            5000 => catalog.push_str("{\"type\":\"price_update\"}\n"),
            9999 => catalog.push_str("{\"type\":\"price_update\",\"payload\":[1,2]}\n"),
            _ => {
                let _ = writeln!(
                    catalog,
                    r#"{{"type":"price_update","payload":{{"product_id":"P{line:05}","new_price":{}.5}}}}"#,
                    line % 50
                );
            }
        }
    }
    let file = dir.path().join("catalog.jsonl");
    std::fs::write(&file, catalog).expect("write catalog");

    let output = possync(&[
        "publish",
        "bulk",
        "--file",
        file.to_str().expect("utf-8"),
        "--license",
        first.as_str(),
        "--license",
        second.as_str(),
    ]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(
        output.status.code(),
        Some(1),
        "bad lines make the exit code non-zero: {stderr}"
    );
    for line in bad_lines {
        assert!(
            stderr.contains(&format!("catalog.jsonl:{line}: ")),
            "line {line} is reported: {stderr}"
        );
    }
    assert!(
        stdout.contains("published 19994 change(s) to 2 store(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("3 bad line(s) skipped"), "{stdout}");
    assert!(
        stderr.contains("progress: 19994/19994 confirmed"),
        "plain progress lines off a terminal: {stderr}"
    );

    one.wait_applied(9997).await;
    two.wait_applied(9997).await;
    for terminal in [&one, &two] {
        let db = terminal.db();
        assert_eq!(count(&db, "SELECT count(*) FROM products"), 9997);
        assert_eq!(product(&db, "P00017"), None);
        assert_eq!(product(&db, "P00018").map(|p| p.1), Some(18.5));
    }
    one.stop().await;
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_csv_catalog_keeps_ids_as_text_and_prices_as_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = unique_license("csv");
    let mut terminal = RunningTerminal::start(terminal_config(dir.path(), &store, "till-1")).await;
    let file = dir.path().join("catalog.csv");
    std::fs::write(
        &file,
        "type,category_id,category_name,product_id,product_name,price\n\
         category_update,007,\"Coffee, hot\",,,\n\
         product_update,007,,0042,Espresso,2.20\n\
         product_update,007,,0043,Broken,cheap\n",
    )
    .expect("write");
    let output = possync(&[
        "publish",
        "bulk",
        "--file",
        file.to_str().expect("utf-8"),
        "--license",
        store.as_str(),
    ]);
    assert!(
        text(&output.stderr).contains("catalog.csv:4: price \"cheap\" is not a number"),
        "{}",
        text(&output.stderr)
    );
    terminal.wait_applied(2).await;
    let db = terminal.db();
    assert_eq!(
        product(&db, "0042"),
        Some(("Espresso".into(), 2.2, Some("007".into()), None))
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM categories WHERE id = '007' AND name = 'Coffee, hot'"
        ),
        1
    );

    let output = possync(&[
        "publish",
        "bulk",
        "--stop-on-error",
        "--file",
        file.to_str().expect("utf-8"),
        "--license",
        store.as_str(),
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("nothing was published"),
        "{}",
        text(&output.stderr)
    );
    terminal.stop().await;
}
