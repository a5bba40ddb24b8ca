//! Our own log lines about failures, rate-limited: one line per distinct
//! failure per [`LOG_INTERVAL`], with the count of lines held back.
//!
//! lapin writes its own lines through `tracing` from its I/O thread; the
//! library cannot rate-limit them. Applications install
//! [`LAPIN_LOG_DIRECTIVE`] in their filter: our lines report every failure
//! lapin sees (rate-limited), and lapin's TRACE frame log, which prints the
//! login (user and password, as a list of bytes) and message payloads,
//! never reaches the output.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// At most one log line of a kind this often.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The `tracing` filter directive that keeps lapin's own log lines out
/// (targets `lapin::*`; amq-protocol writes none with credentials). Add it
/// to the application's filter, for example
/// `EnvFilter::new(format!("info,{}", broker_rabbitmq::LAPIN_LOG_DIRECTIVE))`
/// or `RUST_LOG=info,lapin=off`. At TRACE, lapin logs every frame it sends
/// (`lapin::io_loop`, "will write to buffer"), the login frame with the
/// password as a byte list included, and the frames it receives
/// (`lapin::channels`), message bodies included; its ERROR lines repeat on
/// every failed attempt.
pub const LAPIN_LOG_DIRECTIVE: &str = "lapin=off";

/// Most kinds remembered; older ones are forgotten first.
const KINDS: usize = 1024;

fn seen() -> &'static Mutex<HashMap<String, (Instant, u64)>> {
    static SEEN: OnceLock<Mutex<HashMap<String, (Instant, u64)>>> = OnceLock::new();
    SEEN.get_or_init(Default::default)
}

/// Whether a line of `kind` may be written now: `Some(lines held back
/// since the last one)`, or `None` (counted) within [`LOG_INTERVAL`] of the
/// last line of the same kind.
pub(crate) fn allow(kind: &str) -> Option<u64> {
    let mut seen = seen().lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if let Some((last, held)) = seen.get_mut(kind) {
        if now.duration_since(*last) < LOG_INTERVAL {
            *held += 1;
            return None;
        }
        let held_back = std::mem::take(held);
        *last = now;
        return Some(held_back);
    }
    if seen.len() >= KINDS {
        seen.retain(|_, (last, _)| now.duration_since(*last) < LOG_INTERVAL);
        if seen.len() >= KINDS {
            seen.clear();
        }
    }
    seen.insert(kind.to_owned(), (now, 0));
    Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval() {
        assert_eq!(allow("test kind a"), Some(0));
        assert_eq!(allow("test kind a"), None);
        assert_eq!(allow("test kind a"), None);
        assert_eq!(allow("test kind b"), Some(0));
    }
}
