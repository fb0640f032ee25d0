//! Where the installer is, for an operator logged in over SSH: a small JSON file that the
//! installer rewrites at each stage (the one writer), and `nixos-kexec status`, which prints
//! it and follows the console log ([`crate::console::LOG_FILE`]) until the run ends.

use crate::error::user_error;
use crate::input::config::Step;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// In RAM, beside the console log; gone at reboot.
pub const STATUS_FILE: &str = "/run/nixos-kexec/status.json";

/// The stage the installer is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Status {
    /// Reading the input, bringing the network up, planning.
    Preparing,
    /// Running step `number` (from 1) of `total`.
    Step { step: Step, number: usize, total: usize },
    /// The run ended with this result line (`success`, `failure: <reason>`).
    Finished { result: String },
}

/// How a run ended. Its line, `result: success` or `result: failure: REASON`, is the last
/// console line of every run; the status file holds its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    Success,
    Failure(String),
}

impl RunResult {
    pub fn of<T>(result: &Result<T>) -> RunResult {
        match result {
            Ok(_) => RunResult::Success,
            Err(e) => RunResult::Failure(crate::error::one_line(e)),
        }
    }

    /// What follows `result: `.
    pub fn text(&self) -> String {
        match self {
            RunResult::Success => "success".into(),
            RunResult::Failure(reason) => format!("failure: {reason}"),
        }
    }

    /// The console line (without the console's prefix).
    pub fn line(&self) -> String {
        format!("result: {}", self.text())
    }

    /// A console line as a reader sees it, with or without [`crate::console::PREFIX`].
    pub fn parse_line(line: &str) -> Option<RunResult> {
        let line = line.strip_prefix(crate::console::PREFIX).unwrap_or(line);
        let text = line.strip_prefix("result: ")?;
        if text == "success" {
            return Some(RunResult::Success);
        }
        text.strip_prefix("failure: ")
            .map(|reason| RunResult::Failure(reason.to_string()))
    }
}

/// What the file holds: the status and since when (seconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    pub status: Status,
    pub since: u64,
}

impl Record {
    /// One line for the operator, e.g. `step 3/9: partition, running for 12 s`.
    pub fn describe(&self, now: SystemTime) -> String {
        let seconds = unix_seconds(now).saturating_sub(self.since);
        match &self.status {
            Status::Preparing => {
                format!("preparing (input, network, plan), for {seconds} s")
            }
            Status::Step { step, number, total } => {
                format!("step {number}/{total}: {}, running for {seconds} s", step.name())
            }
            Status::Finished { result } => {
                format!("finished {seconds} s ago, result: {result}")
            }
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.status, Status::Finished { .. })
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The status file at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusFile {
    path: PathBuf,
}

impl StatusFile {
    pub fn at(path: &Path) -> StatusFile {
        StatusFile {
            path: path.to_path_buf(),
        }
    }

    /// The installer's, [`STATUS_FILE`].
    pub fn installer() -> StatusFile {
        StatusFile::at(Path::new(STATUS_FILE))
    }

    /// Replaces the file whole (a reader never sees half of it).
    pub fn write(&self, status: &Status, now: SystemTime) -> Result<()> {
        let record = Record {
            status: status.clone(),
            since: unix_seconds(now),
        };
        let text = serde_json::to_string(&record).context("serialising the status")?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let partial = self.path.with_extension("json.partial");
        std::fs::write(&partial, format!("{text}\n"))
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &self.path)
            .with_context(|| format!("renaming {} to {}", partial.display(), self.path.display()))
    }

    /// `None` when there is no file: nothing installs here.
    pub fn read(&self) -> Result<Option<Record>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("reading {}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }
}

static INSTALLER: OnceLock<StatusFile> = OnceLock::new();

/// Makes this process (and the agent it forks) the writer of `file`: only the installer that
/// is the machine's init has a status; `nixos-kexec install` on a running system writes none.
pub fn enable(file: StatusFile) {
    let _ = INSTALLER.set(file);
}

/// Records where the installer is now. The status is a convenience: failing to write it is
/// logged and never stops the run.
pub fn record(status: Status) {
    if let Some(file) = INSTALLER.get() {
        if let Err(e) = file.write(&status, SystemTime::now()) {
            log::warn!("status: {e:#}");
        }
    }
}

/// How often `status` looks for new console lines.
const POLL: Duration = Duration::from_millis(250);

/// `nixos-kexec status`: the installer's status, then the last `lines` console lines and every
/// new one as it comes, until the run has ended (or Ctrl-C).
pub fn show(lines: usize) -> Result<()> {
    let out = std::io::stdout();
    let result = follow(
        &StatusFile::installer(),
        Path::new(crate::console::LOG_FILE),
        lines,
        &mut out.lock(),
        POLL,
    );
    match result {
        // `nixos-kexec status | head`: the reader has seen enough.
        Err(e)
            if e.root_cause()
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// [`show`] for any status file and log, writing to `out`, looking every `poll`.
pub fn follow(
    status: &StatusFile,
    log: &Path,
    lines: usize,
    out: &mut impl Write,
    poll: Duration,
) -> Result<()> {
    let Some(record) = status.read()? else {
        return Err(user_error(
            format!(
                "no installer runs here: {} does not exist.",
                status.path.display()
            ),
            "run nixos-kexec status on the installer, logged in as root over SSH (ssh root@MACHINE).",
        ));
    };
    let say = |out: &mut dyn Write, text: &str| writeln!(out, "{text}").context("writing to stdout");
    say(
        out,
        &format!("nixos-kexec status: {}", record.describe(SystemTime::now())),
    )?;
    let mut file = match std::fs::File::open(log) {
        Ok(file) => file,
        Err(e) => {
            return say(
                out,
                &format!("nixos-kexec status: no console log at {}: {e}", log.display()),
            )
        }
    };
    let mut seen = String::new();
    file.read_to_string(&mut seen)
        .with_context(|| format!("reading {}", log.display()))?;
    let whole = seen.rfind('\n').map_or(0, |end| end + 1);
    let earlier: Vec<&str> = seen[..whole].lines().collect();
    for line in &earlier[earlier.len().saturating_sub(lines)..] {
        say(out, line)?;
    }
    let mut offset = u64::try_from(whole).unwrap_or(u64::MAX);
    loop {
        // Read before the log: every line written before the run finished is printed.
        let finished = status.read()?.is_some_and(|r| r.is_finished());
        let mut new = Vec::new();
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_to_end(&mut new))
            .with_context(|| format!("reading {}", log.display()))?;
        let whole = new.iter().rposition(|&b| b == b'\n').map_or(0, |end| end + 1);
        out.write_all(&new[..whole]).context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
        offset += u64::try_from(whole).unwrap_or(0);
        if finished {
            return Ok(());
        }
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_holds_the_status_and_since_when() {
        let dir = tempfile::tempdir().unwrap();
        let file = StatusFile::at(&dir.path().join("run/status.json"));
        assert_eq!(file.read().unwrap(), None);
        let at = UNIX_EPOCH + Duration::from_secs(1_000);
        let step = Status::Step {
            step: Step::Partition,
            number: 3,
            total: 9,
        };
        file.write(&step, at).unwrap();
        let text = std::fs::read_to_string(dir.path().join("run/status.json")).unwrap();
        assert_eq!(
            text,
            "{\"state\":\"step\",\"step\":\"partition\",\"number\":3,\"total\":9,\"since\":1000}\n"
        );
        let record = file.read().unwrap().unwrap();
        assert_eq!(record.status, step);
        assert_eq!(
            record.describe(at + Duration::from_secs(12)),
            "step 3/9: partition, running for 12 s"
        );
        assert!(!record.is_finished());
        let done = Status::Finished {
            result: "failure: no disk".into(),
        };
        file.write(&done, at).unwrap();
        let record = file.read().unwrap().unwrap();
        assert!(record.is_finished());
        assert_eq!(
            record.describe(at + Duration::from_secs(5)),
            "finished 5 s ago, result: failure: no disk"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("run")).unwrap().count(),
            1,
            "no partial file left"
        );
    }

    /// A run in progress: the last lines first, then each new one, and the end once the run
    /// has finished, with the lines written before that.
    #[test]
    fn status_follows_the_log_until_the_run_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let file = StatusFile::at(&dir.path().join("status.json"));
        let log = dir.path().join("console.log");
        let earlier: String = (1..=30).map(|i| format!("nixos-kexec: line {i}\n")).collect();
        std::fs::write(&log, earlier).unwrap();
        file.write(
            &Status::Step {
                step: Step::Wipe,
                number: 2,
                total: 9,
            },
            SystemTime::now(),
        )
        .unwrap();
        let (file2, log2) = (file.clone(), log.clone());
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut append = std::fs::OpenOptions::new().append(true).open(&log2).unwrap();
            append.write_all(b"nixos-kexec: [3/9] partition ...\n").unwrap();
            std::thread::sleep(Duration::from_millis(100));
            append.write_all(b"nixos-kexec: result: failure: test\n").unwrap();
            file2
                .write(
                    &Status::Finished {
                        result: "failure: test".into(),
                    },
                    SystemTime::now(),
                )
                .unwrap();
        });
        let mut out = Vec::new();
        follow(&file, &log, 5, &mut out, Duration::from_millis(20)).unwrap();
        writer.join().unwrap();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("nixos-kexec status: step 2/9: wipe, running for "),
            "{out}"
        );
        assert_eq!(
            lines[1..],
            [
                "nixos-kexec: line 26",
                "nixos-kexec: line 27",
                "nixos-kexec: line 28",
                "nixos-kexec: line 29",
                "nixos-kexec: line 30",
                "nixos-kexec: [3/9] partition ...",
                "nixos-kexec: result: failure: test",
            ]
        );
    }

    #[test]
    fn the_result_line_reads_back() {
        for result in [RunResult::Success, RunResult::Failure("no disk: pass one".into())] {
            let printed = format!("{}{}", crate::console::PREFIX, result.line());
            assert_eq!(RunResult::parse_line(&printed), Some(result.clone()));
            assert_eq!(RunResult::parse_line(&result.line()), Some(result));
        }
        assert_eq!(
            RunResult::parse_line("nixos-kexec: [3/9] partition done in 1.0s"),
            None
        );
        assert_eq!(RunResult::parse_line("nixos-kexec: result: maybe"), None);
    }

    #[test]
    fn status_without_an_installer_says_where_to_run_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = follow(
            &StatusFile::at(&dir.path().join("status.json")),
            &dir.path().join("console.log"),
            5,
            &mut Vec::new(),
            Duration::from_millis(1),
        )
        .unwrap_err();
        let user = crate::error::as_user_error(&err).unwrap();
        assert!(user.fix.contains("ssh root@"), "{user}");
    }
}
