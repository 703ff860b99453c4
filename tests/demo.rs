//! `possync demo`, the README's first command, through the broker. With the
//! broker stopped it runs in-process: see `faults.rs`, which may stop it.

mod common;

use common::*;

#[test]
fn the_demo_syncs_each_store_s_terminals_through_the_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = possync_command(&["demo", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run the demo");
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(stdout.contains("possync demo: broker amqp://"), "{stdout}");
    assert!(stdout.contains("confirmed by the broker"), "{stdout}");
    assert!(!stdout.contains("in-process"), "{stdout}");
    assert_demo_databases(dir.path());
}
