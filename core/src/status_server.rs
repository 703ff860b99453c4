//! The status endpoint of a terminal: `/healthz`, `/status` (JSON),
//! `/metrics` (Prometheus) and `/`, a page a store manager reads at a glance.
//! Off by default; on loopback by default when on.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::registry::PluginInfo;
use crate::status::{State, Status};
use crate::store::{Database, Quarantined};

/// What every response is built from.
#[derive(Debug)]
pub(crate) struct StatusView {
    pub(crate) status: watch::Receiver<Status>,
    pub(crate) license_key: String,
    pub(crate) terminal_id: String,
    pub(crate) database: PathBuf,
    pub(crate) plugins: Vec<PluginInfo>,
}

/// Serves until the listener fails; each connection gets one response.
pub(crate) async fn serve(listener: TcpListener, view: Arc<StatusView>) {
    while let Ok((stream, _)) = listener.accept().await {
        let view = Arc::clone(&view);
        tokio::spawn(async move {
            let _ = respond(stream, &view).await;
        });
    }
}

async fn respond(mut stream: TcpStream, view: &StatusView) -> std::io::Result<()> {
    let mut request = vec![0u8; 4096];
    let mut read = 0;
    while read < request.len() {
        let n = stream.read(&mut request[read..]).await?;
        if n == 0 {
            break;
        }
        read += n;
        if request[..read].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&request[..read]);
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let status = view.status.borrow().clone();
    let (code, content_type, body) = match (method, path) {
        ("GET", "/healthz") if status.is_live() => (200, "text/plain", "live\n".to_owned()),
        ("GET", "/healthz") => (503, "text/plain", "not live\n".to_owned()),
        ("GET", "/status") => (200, "application/json", status_json(view, &status)),
        ("GET", "/metrics") => (200, "text/plain; version=0.0.4", metrics(view, &status)),
        ("GET", "/") => (200, "text/html; charset=utf-8", page(view, &status)),
        ("GET", _) => (
            404,
            "text/plain",
            "not found: try /, /status, /healthz or /metrics\n".to_owned(),
        ),
        _ => (405, "text/plain", "only GET\n".to_owned()),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn rfc3339(time: SystemTime) -> String {
    let nanos = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::try_from(nanos).unwrap_or(0))
        .ok()
        .and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn state_parts(state: &State) -> (&'static str, Option<SystemTime>, Option<&str>) {
    (state.name(), state.since(), state.reason())
}

fn quarantined(view: &StatusView) -> (usize, Vec<Quarantined>) {
    // The terminal writes the database; a read-only look does not disturb it.
    let Ok(database) = Database::open_read_only(&view.database) else {
        return (0, Vec::new());
    };
    let total = database
        .status_record()
        .ok()
        .flatten()
        .map_or(0, |s| usize::try_from(s.quarantine_rows).unwrap_or(0));
    (total, database.quarantined(10).unwrap_or_default())
}

fn status_json(view: &StatusView, status: &Status) -> String {
    let (state, since, reason) = state_parts(&status.state);
    let (quarantine_total, latest) = quarantined(view);
    serde_json::json!({
        "state": state,
        "since": since.map(rfc3339),
        "reason": reason,
        "license_key": view.license_key,
        "terminal_id": view.terminal_id,
        "last_applied_at": status.last_applied_at.map(rfc3339),
        "applied": status.applied,
        "applied_by_type": status.applied_by_type,
        "quarantined": status.quarantined,
        "duplicates": status.duplicates,
        "queue_depth": status.queue_depth,
        "quarantine_table_rows": quarantine_total,
        "latest_quarantined": latest.iter().map(|q| serde_json::json!({
            "routing_key": q.routing_key, "message_type": q.message_type, "reason": q.reason,
        })).collect::<Vec<_>>(),
        "plugins": view.plugins.iter().map(|p| serde_json::json!({
            "name": p.name, "message_types": p.message_types, "enabled": p.enabled,
            "version": p.version, "from": p.origin.to_string(),
        })).collect::<Vec<_>>(),
    })
    .to_string()
}

fn metrics(view: &StatusView, status: &Status) -> String {
    let labels = format!(
        "license_key=\"{}\",terminal_id=\"{}\"",
        view.license_key, view.terminal_id
    );
    let (_, since, _) = state_parts(&status.state);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP possync_live 1 when the terminal is connected and consuming.\n# TYPE possync_live gauge"
    );
    let _ = writeln!(
        out,
        "possync_live{{{labels}}} {}",
        u8::from(status.is_live())
    );
    let _ = writeln!(
        out,
        "# HELP possync_state_since_seconds When the current state began (Unix time).\n# TYPE possync_state_since_seconds gauge"
    );
    let _ = writeln!(
        out,
        "possync_state_since_seconds{{{labels}}} {}",
        since.map_or(0.0, seconds)
    );
    let _ = writeln!(
        out,
        "# HELP possync_messages_applied_total Messages applied since start, by type.\n# TYPE possync_messages_applied_total counter"
    );
    for (message_type, count) in &status.applied_by_type {
        let _ = writeln!(
            out,
            "possync_messages_applied_total{{{labels},type=\"{message_type}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP possync_messages_quarantined_total Messages dead-lettered since start.\n# TYPE possync_messages_quarantined_total counter"
    );
    let _ = writeln!(
        out,
        "possync_messages_quarantined_total{{{labels}}} {}",
        status.quarantined
    );
    let _ = writeln!(
        out,
        "# HELP possync_messages_duplicate_total Redelivered messages skipped since start.\n# TYPE possync_messages_duplicate_total counter"
    );
    let _ = writeln!(
        out,
        "possync_messages_duplicate_total{{{labels}}} {}",
        status.duplicates
    );
    if let Some(depth) = status.queue_depth {
        let _ = writeln!(
            out,
            "# HELP possync_queue_depth Messages waiting in the terminal's queue, not yet delivered.\n# TYPE possync_queue_depth gauge"
        );
        let _ = writeln!(out, "possync_queue_depth{{{labels}}} {depth}");
    }
    let _ = writeln!(
        out,
        "# HELP possync_last_applied_seconds When the last message was applied (Unix time).\n# TYPE possync_last_applied_seconds gauge"
    );
    let _ = writeln!(
        out,
        "possync_last_applied_seconds{{{labels}}} {}",
        status.last_applied_at.map_or(0.0, seconds)
    );
    out
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(view: &StatusView, status: &Status) -> String {
    let (state, since, reason) = state_parts(&status.state);
    let since = since.map(rfc3339).unwrap_or_default();
    let badge = match state {
        "live" => format!(
            r#"<div class="badge live" id="badge">Live sync</div><p class="since">since {since}</p>"#
        ),
        "offline" => format!(
            r#"<div class="badge offline" id="badge">Offline since {since}</div><p class="since">{}</p>"#,
            escape_html(reason.unwrap_or(""))
        ),
        "stalled" => format!(
            r#"<div class="badge offline" id="badge">Stalled since {since}</div><p class="since">{}</p>"#,
            escape_html(reason.unwrap_or(""))
        ),
        other => format!(
            r#"<div class="badge offline" id="badge">{}</div>"#,
            escape_html(&other.to_uppercase())
        ),
    };
    let mut last = status.last_applied_at.map_or_else(
        || "no change applied since start".to_owned(),
        |t| format!("last change applied {}", rfc3339(t)),
    );
    match status.queue_depth {
        Some(0) => last.push_str(" · nothing waiting in the queue"),
        Some(1) => last.push_str(" · 1 change waiting in the queue"),
        Some(depth) => {
            let _ = write!(last, " · {depth} changes waiting in the queue");
        }
        None => {}
    }
    let mut counts = String::new();
    for (message_type, count) in &status.applied_by_type {
        let _ = write!(
            counts,
            "<tr><td>{}</td><td>{count}</td></tr>",
            escape_html(message_type)
        );
    }
    if counts.is_empty() {
        counts.push_str("<tr><td colspan=2>none yet</td></tr>");
    }
    let (total, latest) = quarantined(view);
    let mut problems = String::new();
    for q in &latest {
        let _ = write!(
            problems,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape_html(q.message_type.as_deref().unwrap_or("?")),
            escape_html(&q.reason)
        );
    }
    if problems.is_empty() {
        problems.push_str("<tr><td colspan=2>none</td></tr>");
    }
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>possync: {license} {terminal}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}.badge{{display:inline-block;padding:.6em 1.2em;border-radius:1.5em;font-size:1.6em;font-weight:600;color:#fff}}
.live{{background:#1f9d55}}.offline{{background:#e07b00}}.since{{color:#555}}table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border-bottom:1px solid #ddd;padding:.3em 1em .3em 0;text-align:left}}</style>
</head><body><h1>Store {license} · terminal {terminal}</h1>{badge}<p>{last}</p>
<h2>Changes applied since start</h2><table><tr><th>type</th><th>count</th></tr>{counts}</table>
<h2>Messages that could not apply ({total} kept)</h2><table><tr><th>type</th><th>reason</th></tr>{problems}</table>
<p class="since">This page refreshes every 2 seconds. JSON at <a href="/status">/status</a>, metrics at <a href="/metrics">/metrics</a>.</p></body></html>"#,
        license = escape_html(&view.license_key),
        terminal = escape_html(&view.terminal_id),
    )
}
