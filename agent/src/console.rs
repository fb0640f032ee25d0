//! Console output: whole lines prefixed `nixos-kexec:` (serial consoles are not terminals),
//! each also kept in memory so the install log on the target has everything.
//!
//! There is one path: `log` records, formatted by env_logger and written to stderr (the
//! console) and the in-memory log at once. [`line`] is a `log::info!` that no level filter
//! hides.

use std::io::Write;
use std::sync::Mutex;

static LOG: Mutex<String> = Mutex::new(String::new());

/// The target of [`line`]'s records, let through at every `NIXOS_KEXEC_LOG` level: that
/// variable tunes the diagnostics, not what the operator is told.
const CONSOLE: &str = "nixos_kexec::console";

/// Sets up `log` to print whole lines to stderr (the console) and keep them for install.log.
pub fn init_logging() {
    let level = std::env::var("NIXOS_KEXEC_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let _ = env_logger::Builder::new()
        .filter_level(level)
        .filter_module(CONSOLE, log::LevelFilter::Info)
        .format(|out, record| writeln!(out, "nixos-kexec: {}", record.args()))
        .target(env_logger::Target::Pipe(Box::new(Tee::default())))
        .try_init();
}

/// Prints one line to the console and keeps it for the log.
pub fn line(text: &str) {
    log::info!(target: CONSOLE, "{text}");
}

/// Ends a partial line the kernel may have left on the console (BIOS: "Probing EDD ... ok"),
/// so that the next line is whole. Not a line of ours, so not kept for the log.
pub fn end_partial_line() {
    let _ = std::io::stderr().write_all(b"\n");
}

/// Everything printed so far.
pub fn log_text() -> String {
    LOG.lock().map(|l| l.clone()).unwrap_or_default()
}

/// The logger's output: complete lines go to stderr and into [`LOG`], so the console never
/// shows half a line (env_logger writes each record whole, then flushes).
#[derive(Default)]
struct Tee {
    partial: Vec<u8>,
}

impl Write for Tee {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(bytes);
        if let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') {
            let lines: Vec<u8> = self.partial.drain(..=end).collect();
            let mut err = std::io::stderr().lock();
            // A console that went away must not stop the run; the log keeps the line.
            let _ = err.write_all(&lines).and_then(|()| err.flush());
            if let Ok(mut log) = LOG.lock() {
                log.push_str(&String::from_utf8_lossy(&lines));
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_log_records_reach_the_log_whole_and_prefixed() {
        init_logging();
        line("console test: a line");
        log::warn!("console test: a warning");
        let log = log_text();
        assert!(log.contains("nixos-kexec: console test: a line\n"), "{log}");
        assert!(log.contains("nixos-kexec: console test: a warning\n"), "{log}");
    }

    #[test]
    fn the_tee_passes_on_complete_lines_only() {
        let mut tee = Tee::default();
        tee.write_all(b"nixos-kexec: tee test: first half, ").unwrap();
        assert!(!log_text().contains("tee test"));
        tee.write_all(b"second half\nnixos-kexec: tee test: next")
            .unwrap();
        let log = log_text();
        assert!(
            log.contains("nixos-kexec: tee test: first half, second half\n"),
            "{log}"
        );
        assert!(!log.contains("tee test: next"), "{log}");
    }
}
