//! Console output: whole lines prefixed `nixos-kexec:` (serial consoles are not terminals),
//! each also kept in memory so the install log on the target has everything.
//!
//! There is one path: `log` records, formatted by env_logger and written to stderr (the
//! console) and the in-memory log at once. [`line`] is a `log::info!` that no level filter
//! hides. The installer also appends them to [`LOG_FILE`], which `nixos-kexec status` follows.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

static LOG: Mutex<String> = Mutex::new(String::new());

/// Where the installer keeps its console lines while it runs (RAM, gone at reboot), for an
/// operator logged in over SSH.
pub const LOG_FILE: &str = "/run/nixos-kexec/console.log";

static FILE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// The target of [`line`]'s records, let through at every `NIXOS_KEXEC_LOG` level: that
/// variable tunes the diagnostics, not what the operator is told.
const CONSOLE: &str = "nixos_kexec::console";

/// Sets up `log` to print whole lines to stderr (the console) and keep them for install.log.
pub fn init_logging() {
    init_logging_at(log::LevelFilter::Info);
}

/// [`init_logging`] with diagnostics at `level` unless `NIXOS_KEXEC_LOG` says otherwise:
/// `deploy` runs ssh every few seconds while it waits, and its terminal is for the install.
pub fn init_logging_at(level: log::LevelFilter) {
    let level = std::env::var("NIXOS_KEXEC_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(level);
    let _ = env_logger::Builder::new()
        .filter_level(level)
        .filter_module(CONSOLE, log::LevelFilter::Info)
        .format(|out, record| writeln!(out, "{PREFIX}{}", record.args()))
        .target(env_logger::Target::Pipe(Box::new(Tee::default())))
        .try_init();
}

/// What starts each of our console lines, so a reader (`deploy`, following the installer)
/// tells them from other output.
pub const PREFIX: &str = "nixos-kexec: ";

/// Prints one line to the console and keeps it for the log.
pub fn line(text: &str) {
    log::info!(target: CONSOLE, "{text}");
}

/// Ends a partial line the kernel may have left on the console (BIOS: "Probing EDD ... ok"),
/// so that the next line is whole. Not a line of ours, so not kept for the log.
pub fn end_partial_line() {
    let _ = std::io::stderr().write_all(b"\n");
}

/// From now on every line also goes to `path` (root-only), which gets the lines printed so far
/// first. Appended, so the processes that share it (init and the agent it forks) both write.
pub fn keep_in_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // Held through the copy, so no line is written twice or skipped.
    let mut sink = FILE
        .lock()
        .map_err(|_| anyhow::anyhow!("the console log is poisoned"))?;
    file.write_all(log_text().as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    *sink = Some(file);
    Ok(())
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
            // The file first and held until the memory has the line too: [`keep_in_file`] copies
            // the memory under the same lock, so the file gets each line once.
            let mut file = FILE.lock();
            if let Ok(Some(file)) = file.as_mut().map(|f| f.as_mut()) {
                // Like the console, the file must not stop the run.
                let _ = file.write_all(&lines);
            }
            if let Ok(mut log) = LOG.lock() {
                log.push_str(&String::from_utf8_lossy(&lines));
            }
            drop(file);
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

    /// The file gets the lines printed before it was named, then each new one, once.
    #[test]
    fn the_log_file_has_every_line_once() {
        init_logging();
        line("file test: before");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/console.log");
        keep_in_file(&path).unwrap();
        line("file test: after");
        let text = std::fs::read_to_string(&path).unwrap();
        for wanted in [
            "nixos-kexec: file test: before\n",
            "nixos-kexec: file test: after\n",
        ] {
            assert_eq!(text.matches(wanted).count(), 1, "{text}");
        }
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
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
