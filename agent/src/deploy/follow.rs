//! Following the installer over SSH to its result: `nixos-kexec status` there prints the
//! console log and follows it until the run ends. A connection can break (a flaky link, the
//! installer's network step); the next one prints the whole log again, and the lines already
//! shown are skipped by count: the log only grows.

use super::ssh::{PinnedHostKeys, Ssh};
use crate::console;
use crate::installer::status::RunResult;
use crate::machine::runner::{self, Flow, Stream};
use anyhow::Result;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Asks `status` for every line there is: a later session repeats what an earlier one showed.
const WHOLE_LOG: &str = "nixos-kexec status -n 1000000";
/// Between attempts to reach the installer.
const RETRY: Duration = Duration::from_secs(5);
/// How many of the installer's last lines a failure shows again.
pub const LAST_LINES: usize = 25;

/// What has been read of the installer's console log.
#[derive(Debug, Default)]
pub struct Transcript {
    pub lines: Vec<String>,
    pub result: Option<RunResult>,
}

/// One `status` session's place in the [`Transcript`].
struct Session {
    /// Log lines this session has printed so far.
    read: usize,
    /// `status` prints its own status line first, which is not a log line.
    status_line_seen: bool,
}

impl Transcript {
    /// Takes one stdout line of a session; returns it when it is new.
    fn take<'a>(&mut self, session: &mut Session, line: &'a str) -> Option<&'a str> {
        if !session.status_line_seen {
            session.status_line_seen = true;
            return None;
        }
        session.read += 1;
        if session.read <= self.lines.len() {
            return None;
        }
        self.lines.push(line.to_string());
        if let Some(result) = RunResult::parse_line(line) {
            self.result = Some(result);
        }
        Some(line)
    }

    pub fn last_lines(&self, count: usize) -> &[String] {
        &self.lines[self.lines.len().saturating_sub(count)..]
    }
}

/// Why following stopped without a result.
pub struct Lost {
    /// ssh's last complaint (connection refused, host key mismatch, ...).
    pub last_error: String,
    /// Whether the installer was ever reached.
    pub reached: bool,
}

/// Follows the installer until its result line, reconnecting for as long as `patience` after
/// the last contact (the first contact included). Prints each new log line.
pub fn installer(ssh: &Ssh, pin: &PinnedHostKeys, patience: Duration) -> Result<Transcript, Lost> {
    let mut transcript = Transcript::default();
    let mut last_contact = Instant::now();
    let mut reached = false;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let mut session = Session {
            read: 0,
            status_line_seen: false,
        };
        let mut errors = Vec::new();
        let mut heard = false;
        let outcome = runner::follow(
            &mut ssh.command(Some(pin), WHOLE_LOG),
            Stdio::null(),
            &mut |stream, line| {
                match stream {
                    Stream::Stdout => {
                        heard = true;
                        if let Some(new) = transcript.take(&mut session, line) {
                            console::line(&format!("installer: {}", strip(new)));
                        }
                    }
                    Stream::Stderr => errors.push(line.to_string()),
                }
                Flow::Continue
            },
        );
        if heard {
            reached = true;
            last_contact = Instant::now();
        }
        if transcript.result.is_some() {
            return Ok(transcript);
        }
        let last_error = match outcome {
            Ok(status) => {
                let said = errors.join(" | ");
                format!("{said} ({})", status.map_or("stopped".into(), |s| s.to_string()))
            }
            Err(e) => format!("{e:#}"),
        };
        if last_contact.elapsed() >= patience {
            return Err(Lost { last_error, reached });
        }
        // Every twelfth attempt (a minute or more) while waiting, not at every one.
        if attempts % 12 == 1 {
            console::line(&format!(
                "deploy: waiting for the installer's SSH with the pinned host key ({} s so far; last: {})",
                last_contact.elapsed().as_secs(),
                last_error.trim()
            ));
        }
        std::thread::sleep(RETRY);
    }
}

/// A console line without the console's prefix.
pub fn strip(line: &str) -> &str {
    line.strip_prefix(console::PREFIX).unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            read: 0,
            status_line_seen: false,
        }
    }

    /// A second session repeats the log from its start; only what is new is shown, and the
    /// result line is read.
    #[test]
    fn a_reconnection_shows_only_new_lines() {
        let mut transcript = Transcript::default();
        let mut first = session();
        let mut shown = Vec::new();
        for line in [
            "nixos-kexec status: step 2/9: wipe, running for 3 s",
            "nixos-kexec: [1/9] network done in 0.1s",
            "nixos-kexec: [2/9] wipe ...",
        ] {
            shown.extend(transcript.take(&mut first, line).map(str::to_string));
        }
        let mut second = session();
        for line in [
            "nixos-kexec status: step 3/9: partition, running for 1 s",
            "nixos-kexec: [1/9] network done in 0.1s",
            "nixos-kexec: [2/9] wipe ...",
            "nixos-kexec: [2/9] wipe done in 0.2s",
            "nixos-kexec: result: failure: the disk went away",
        ] {
            shown.extend(transcript.take(&mut second, line).map(str::to_string));
        }
        assert_eq!(
            shown,
            [
                "nixos-kexec: [1/9] network done in 0.1s",
                "nixos-kexec: [2/9] wipe ...",
                "nixos-kexec: [2/9] wipe done in 0.2s",
                "nixos-kexec: result: failure: the disk went away",
            ]
        );
        assert_eq!(
            transcript.result,
            Some(RunResult::Failure("the disk went away".into()))
        );
        assert_eq!(transcript.last_lines(2).len(), 2);
        assert_eq!(
            strip(&transcript.last_lines(1)[0]),
            "result: failure: the disk went away"
        );
    }
}
