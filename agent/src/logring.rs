//! The agent's own log lines, kept in a small ring and sent within a
//! second (`supervisor::telemetry_loop`), so an operator can follow what an
//! agent says (hints included) from the coordinator without logging into
//! the machine.

use drover_proto::LogLine;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Lines kept while the coordinator cannot be reached.
const KEEP: usize = 500;
/// Longest line kept, in bytes.
const LINE_MAX: usize = 1000;

static RING: Mutex<VecDeque<LogLine>> = Mutex::new(VecDeque::new());

/// Woken when a line is kept.
pub static NEW_LINE: Notify = Notify::const_new();

/// Writes to the terminal/journal through env_logger and keeps a copy.
pub struct Tee(pub env_logger::Logger);

impl log::Log for Tee {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if !self.0.matches(record) {
            return;
        }
        self.0.log(record);
        // Only the agent's own lines, at info and above.
        if record.level() <= log::Level::Info && record.target().starts_with("agent") {
            let mut message = record.args().to_string();
            if message.len() > LINE_MAX {
                let mut end = LINE_MAX;
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                message.truncate(end);
            }
            let line = LogLine {
                at_ms: crate::now_ms(),
                level: record.level().as_str().to_ascii_lowercase(),
                target: record.target().to_string(),
                message,
            };
            {
                let mut ring = RING.lock().unwrap_or_else(|e| e.into_inner());
                if ring.len() == KEEP {
                    ring.pop_front();
                }
                ring.push_back(line);
            }
            NEW_LINE.notify_one();
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Installs the logger (RUST_LOG, default info).
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let level = inner.filter();
    if log::set_boxed_logger(Box::new(Tee(inner))).is_ok() {
        log::set_max_level(level);
    }
}

/// Takes up to `n` of the oldest unsent lines.
pub fn take(n: usize) -> Vec<LogLine> {
    let mut ring = RING.lock().unwrap_or_else(|e| e.into_inner());
    let n = n.min(ring.len());
    ring.drain(..n).collect()
}

/// Puts lines back at the front (their request did not go through).
pub fn put_back(lines: Vec<LogLine>) {
    let mut ring = RING.lock().unwrap_or_else(|e| e.into_inner());
    for line in lines.into_iter().rev() {
        if ring.len() == KEEP {
            break;
        }
        ring.push_front(line);
    }
}
