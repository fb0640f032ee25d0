//! Console output: whole lines prefixed `nixos-kexec:` (serial consoles are not terminals),
//! each also kept in memory so the install log on the target has everything.

use std::io::Write;
use std::sync::Mutex;

static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Sets up `log` to print whole lines to stderr (the console) and keep them for install.log.
pub fn init_logging() {
    let level = std::env::var("NIXOS_KEXEC_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let _ = env_logger::Builder::new()
        .filter_level(level)
        .format(|_, record| {
            line(&record.args().to_string());
            Ok(())
        })
        .target(env_logger::Target::Pipe(Box::new(std::io::sink())))
        .try_init();
}

/// Prints one line to the console and keeps it for the log.
pub fn line(text: &str) {
    let text = format!("nixos-kexec: {text}\n");
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
    if let Ok(mut log) = LOG.lock() {
        log.push(text);
    }
}

/// Keeps a line for the log without printing it (long command output).
pub fn keep(text: &str) {
    if let Ok(mut log) = LOG.lock() {
        log.push(format!("{text}\n"));
    }
}

/// Everything printed or kept so far.
pub fn log_text() -> String {
    LOG.lock().map(|l| l.concat()).unwrap_or_default()
}
