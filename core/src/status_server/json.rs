//! `/status`: the status as JSON, for tools.

use super::StatusView;
use super::snapshot::{Snapshot, ms_rfc3339, rfc3339};

pub(super) fn render(view: &StatusView, snapshot: &Snapshot) -> String {
    let status = &snapshot.status;
    serde_json::json!({
        "state": status.state.name(),
        "since": status.state.since().map(rfc3339),
        "reason": status.state.reason(),
        "license_key": view.license_key,
        "terminal_id": view.terminal_id,
        "last_applied_at": status.last_applied_at.map(rfc3339),
        "applied": status.applied,
        "applied_by_type": status.applied_by_type,
        "stale_by_type": status.stale_by_type,
        "quarantined": status.quarantined,
        "duplicates": status.duplicates,
        "collapsed": status.collapsed,
        "sync": {
            "synced_up_to": status.sync.synced_up_to,
            "highest_applied": status.sync.highest_applied,
            "last_change_at": status.sync.last_change_ms.map(ms_rfc3339),
            "head": status.sync.head,
            "catalog": status.sync.catalog,
            "gap": status.sync.gap.map(|gap| serde_json::json!({
                "cause": gap.cause.name(),
                "since": ms_rfc3339(gap.since_ms),
                "detail": gap.cause.to_string(),
            })),
            "verified": status.sync.verified.map(|verified| serde_json::json!({
                "seq": verified.seq,
                "at": ms_rfc3339(verified.at_ms),
            })),
        },
        "queue_depth": status.queue_depth,
        "quarantine_table_rows": snapshot.quarantine_total,
        "latest_quarantined": snapshot.latest.iter().map(|q| serde_json::json!({
            "routing_key": q.routing_key, "message_type": q.message_type, "reason": q.reason,
        })).collect::<Vec<_>>(),
        "plugins": view.plugins.iter().map(|p| serde_json::json!({
            "name": p.name, "message_types": p.message_types, "enabled": p.enabled,
            "version": p.version, "from": p.origin.to_string(),
        })).collect::<Vec<_>>(),
    })
    .to_string()
}
