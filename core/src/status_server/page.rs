//! `/`: the page a store manager reads at a glance. It follows the change
//! feed (`/events?status=1`) and redraws itself when a change commits or
//! the status changes; without script, it reloads every 2 seconds.

use std::fmt::Write as _;

use super::StatusView;
use super::snapshot::{Snapshot, ms_rfc3339, rfc3339};
use crate::status::State;

pub(super) fn render(view: &StatusView, snapshot: &Snapshot) -> String {
    let status = &snapshot.status;
    let state = &status.state;
    let since = state.since().map(rfc3339).unwrap_or_default();
    let reason = escape_html(state.reason().unwrap_or(""));
    let badge = match state {
        State::Live { .. } => format!(
            r#"<div class="badge live" id="badge">Live sync</div><p class="since">since {since}</p>"#
        ),
        State::Offline { .. } => format!(
            r#"<div class="badge offline" id="badge">Offline since {since}</div><p class="since">{reason}</p>"#
        ),
        State::Stalled { .. } => format!(
            r#"<div class="badge stalled" id="badge">Stalled since {since}</div><p class="since">{reason}</p>"#
        ),
        State::Connecting | State::Stopped => format!(
            r#"<div class="badge offline" id="badge">{}</div>"#,
            state.name().to_uppercase()
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
    let sync = &status.sync;
    let mut synced = if sync.highest_applied == 0 {
        "No sequenced change yet".to_owned()
    } else {
        format!("Synced up to seq {}", sync.synced_up_to)
    };
    match sync.head {
        Some(head) => {
            let _ = write!(synced, " of at least {head}");
        }
        None if sync.highest_applied > 0 => synced.push_str(" (backend head unknown)"),
        None => {}
    }
    if sync.highest_applied > sync.synced_up_to {
        let _ = write!(
            synced,
            " · change {} never arrived or could not apply (highest applied {})",
            sync.synced_up_to + 1,
            sync.highest_applied
        );
    }
    if let Some(ms) = sync.last_change_ms {
        let _ = write!(synced, " · last change {}", ms_rfc3339(ms));
    }
    if let Some(gap) = &sync.gap {
        let _ = write!(
            synced,
            " · gap since {}: {}",
            ms_rfc3339(gap.since_ms),
            gap.cause
        );
    }
    if let Some(verified) = &sync.verified {
        let _ = write!(
            synced,
            " · verified at seq {} ({})",
            verified.seq,
            ms_rfc3339(verified.at_ms)
        );
    }
    if status.collapsed > 0 {
        let _ = write!(
            synced,
            " · {} changes collapsed (overwritten within a batch)",
            status.collapsed
        );
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
    let mut problems = String::new();
    for q in &snapshot.latest {
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
    let mut notices = String::new();
    for notice in &snapshot.notices {
        let severity = match notice.severity.as_str() {
            "critical" => "critical",
            "warning" => "warning",
            _ => "info",
        };
        let (expires, until) = match &notice.expires_at {
            Some(at) => (
                format!(r#" data-expires="{}""#, escape_html(at)),
                format!(r#" <span class="since">until {}</span>"#, escape_html(at)),
            ),
            None => (String::new(), String::new()),
        };
        let _ = write!(
            notices,
            r#"<p class="notice {severity}"{expires}><b>{severity}</b> {}{until}</p>"#,
            escape_html(&notice.text),
        );
    }
    let mut changes = String::new();
    for (id, change) in snapshot.recent.iter().rev() {
        let _ = write!(
            changes,
            "<tr><td>{id}</td><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td></tr>",
            escape_html(&change.message_type),
            escape_html(change.entity.as_deref().unwrap_or("")),
            escape_html(change.id.as_deref().unwrap_or("")),
            match change.op {
                crate::feed::ChangeOp::Upsert => "upsert",
                crate::feed::ChangeOp::Delete => "delete",
                crate::feed::ChangeOp::Change => "change",
            },
            change.seq.map(|seq| seq.to_string()).unwrap_or_default(),
        );
    }
    if changes.is_empty() {
        changes.push_str("<tr><td colspan=5>none yet</td></tr>");
    }
    // Without the feed (or without script) the page reloads itself instead.
    let (refresh, follow, about) = if view.feed_on {
        (
            r#"<noscript><meta http-equiv="refresh" content="2"></noscript>"#,
            format!("<script>{FOLLOW}</script>"),
            r#"This page follows the terminal as changes commit (the change feed at <a href="/events">/events</a>)."#,
        )
    } else {
        (
            r#"<meta http-equiv="refresh" content="2">"#,
            String::new(),
            "The change feed is off (terminal.feed_keep = 0).",
        )
    };
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8">{refresh}
<title>possync: {license} {terminal}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}.badge{{display:inline-block;padding:.6em 1.2em;border-radius:1.5em;font-size:1.6em;font-weight:600;color:#fff}}
.notice{{padding:.5em 1em;border-left:.4em solid #2b6cb0;background:#ebf4ff}}.notice.warning{{border-color:#e07b00;background:#fff4e5}}.notice.critical{{border-color:#c0392b;background:#fdecea}}
.live{{background:#1f9d55}}.offline{{background:#e07b00}}.stalled{{background:#c0392b}}.since{{color:#555}}table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border-bottom:1px solid #ddd;padding:.3em 1em .3em 0;text-align:left}}</style>
</head><body><div id="live"><h1>Store {license} · terminal {terminal}</h1>{badge}<div id="notices">{notices}</div><p>{last}</p><p id="synced">{synced}</p>
<h2>Latest changes</h2><table id="changes"><tr><th>#</th><th>type</th><th>entity</th><th>op</th><th>seq</th></tr>{changes}</table>
<h2>Changes applied since start</h2><table><tr><th>type</th><th>count</th></tr>{counts}</table>
<h2>Messages that could not apply ({total} kept)</h2><table><tr><th>type</th><th>reason</th></tr>{problems}</table></div>
<p class="since" id="feed-state">This page reloads every 2 seconds.</p>
<p class="since">{about} JSON at <a href="/status">/status</a>, metrics at <a href="/metrics">/metrics</a>.</p>
{follow}</body></html>"#,
        license = escape_html(&view.license_key),
        terminal = escape_html(&view.terminal_id),
        total = snapshot.quarantine_total,
    )
}

/// Redraws the page's live part whenever the feed says something changed:
/// one fetch at a time, and one more if something changed meanwhile.
const FOLLOW: &str = r#"(function () {
  var busy = false, again = false;
  function redraw() {
    if (busy) { again = true; return; }
    busy = true;
    fetch("/", { cache: "no-store" })
      .then(function (response) { return response.text(); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        if (fresh) { document.getElementById("live").innerHTML = fresh.innerHTML; }
      })
      .catch(function () {})
      .then(function () { busy = false; expire(); if (again) { again = false; redraw(); } });
  }
  // A notice leaves the page when it expires, though nothing commits then.
  var expiry = null;
  function expire() {
    clearTimeout(expiry);
    var next = Infinity;
    document.querySelectorAll("[data-expires]").forEach(function (notice) {
      var at = Date.parse(notice.getAttribute("data-expires"));
      if (isFinite(at)) { next = Math.min(next, at); }
    });
    if (next === Infinity) { return; }
    // Past already by this browser's clock, though the terminal still shows
    // it (its clock decides): look again in half a minute, not at once.
    // (A timer longer than 24 days fires at once: an hour at most.)
    var wait = next - Date.now();
    expiry = setTimeout(redraw, wait > 0 ? Math.min(wait + 500, 3600000) : 30000);
  }
  expire();
  var feed = new EventSource("/events?status=1"), state = document.getElementById("feed-state");
  feed.onopen = function () { state.textContent = "Following changes live."; };
  feed.onerror = function () {
    if (feed.readyState === EventSource.CLOSED) {
      // Refused (too many clients, the feed switched off): reload instead.
      state.textContent = "The change feed is not available: this page reloads every 2 seconds.";
      setInterval(redraw, 2000);
    } else {
      state.textContent = "The terminal does not answer; trying again...";
    }
  };
  feed.onmessage = redraw;
  feed.addEventListener("status", redraw);
  feed.addEventListener("reload", redraw);
})();"#;

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
