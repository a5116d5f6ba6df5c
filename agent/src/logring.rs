//! The agent's own log lines, kept in a small ring and sent with the next
//! heartbeat, so an operator can read what an agent said (hints included)
//! from the coordinator without logging into the machine.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Lines kept while the coordinator cannot be reached.
const KEEP: usize = 500;
/// Longest line kept, in bytes.
const LINE_MAX: usize = 1000;

static RING: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

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
            let mut line = format!("{} {}", record.level(), record.args());
            if line.len() > LINE_MAX {
                let mut end = LINE_MAX;
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                line.truncate(end);
            }
            let mut ring = RING.lock().unwrap_or_else(|e| e.into_inner());
            if ring.len() == KEEP {
                ring.pop_front();
            }
            ring.push_back(line);
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
pub fn take(n: usize) -> Vec<String> {
    let mut ring = RING.lock().unwrap_or_else(|e| e.into_inner());
    let n = n.min(ring.len());
    ring.drain(..n).collect()
}

/// Puts lines back at the front (their heartbeat did not go through).
pub fn put_back(lines: Vec<String>) {
    let mut ring = RING.lock().unwrap_or_else(|e| e.into_inner());
    for line in lines.into_iter().rev() {
        if ring.len() == KEEP {
            break;
        }
        ring.push_front(line);
    }
}
