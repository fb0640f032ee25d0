//! The way back after a failed run: when no disk was written, the installer reboots after a
//! grace period, so a kexec'd machine returns to the system it came from and a network-booted
//! one boots again, instead of sitting in the installer until someone finds a rescue mode. Once
//! a disk may have been written it never reboots on its own: the firmware could boot a
//! half-written disk.

use crate::console;
use crate::error::user_error;
use anyhow::{Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);

/// `nixos_kexec.failure_reboot_after=`: how long an installer whose run failed before writing
/// to any disk waits before it reboots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReboot {
    After(Duration),
    Never,
}

impl Default for FailureReboot {
    /// Long enough to read the console, or log in and look, before the machine goes back.
    fn default() -> Self {
        FailureReboot::After(10 * MINUTE)
    }
}

impl FailureReboot {
    /// `never`, seconds (`600`), or a number with a unit (`90s`, `10m`, `1h`).
    pub fn parse(text: &str) -> Result<FailureReboot> {
        if text == "never" {
            return Ok(FailureReboot::Never);
        }
        crate::input::duration::parse(text)
            .map(FailureReboot::After)
            .ok_or_else(|| {
                user_error(
                    format!("nixos_kexec.failure_reboot_after={text:?} is neither a duration nor never."),
                    "give seconds (600) or a number with s, m or h (90s, 10m, 1h), or never to keep the installer running after a failure.",
                )
            })
    }
}

/// Whether this run may have written to a disk: the one answer the way back depends on.
/// Nothing is written before the wipe step's first write: reading the input, planning (the
/// look for an earlier install mounts read-only without journal replay and reads LUKS headers),
/// the disk passphrase (a file in RAM) and the checks the wipe step makes first only read.
/// Every step that writes (partition, LUKS and filesystem formats, ...) comes after the wipe,
/// which must have succeeded, so it has already set this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskWrites {
    begun_on: Option<String>,
}

impl DiskWrites {
    /// Called right before the first write to `device`; from then on a failed run keeps the
    /// machine where it is.
    pub fn begin(&mut self, device: &str) {
        self.begun_on.get_or_insert_with(|| device.to_string());
    }

    /// The device written first, once anything may have been written.
    pub fn begun_on(&self) -> Option<&str> {
        self.begun_on.as_deref()
    }
}

/// What a failed run does with the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFailure {
    /// No disk was written: reboot when the grace period is over.
    Reboot(Duration),
    /// No disk was written, and the operator asked to keep the installer running.
    StayAsked,
    /// This disk may be half-written; a reboot could boot it.
    StayDiskWritten(String),
}

impl AfterFailure {
    pub fn decide(policy: FailureReboot, writes: &DiskWrites) -> AfterFailure {
        match (writes.begun_on(), policy) {
            (Some(device), _) => AfterFailure::StayDiskWritten(device.to_string()),
            (None, FailureReboot::Never) => AfterFailure::StayAsked,
            (None, FailureReboot::After(grace)) => AfterFailure::Reboot(grace),
        }
    }

    /// The one line that tells the operator what happens to the machine now, and why.
    pub fn announcement(&self) -> String {
        match self {
            AfterFailure::Reboot(grace) => format!(
                "reboot: no disk was written, so this machine reboots in {}: a kexec'd machine goes back to the system it came from, a network-booted one boots again. To keep the installer running after a failure, boot it with nixos_kexec.failure_reboot_after=never",
                human(*grace)
            ),
            AfterFailure::StayAsked => "no reboot: nixos_kexec.failure_reboot_after=never; no disk was written, and the installer stays up".to_string(),
            AfterFailure::StayDiskWritten(device) => format!(
                "no reboot: {device} may be half-written and the firmware could boot it, so the installer stays up; boot the installer again to start over"
            ),
        }
    }
}

/// Where an operator logged in over SSH asks the installer to stay (`nixos-kexec stay`): the
/// count-down looks for it every second.
pub const STAY_FILE: &str = "/run/nixos-kexec/stay";

/// How the grace period ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountDown {
    /// The time is up: reboot.
    Elapsed,
    /// `nixos-kexec stay` asked the installer to stay up.
    StayAsked,
}

/// Waits out `grace`, saying the time left once a minute in whole lines (serial consoles are
/// not terminals), unless `stay_file` appears first. The installer's SSH server keeps running
/// through this wait: it is the operator's window to log in and look before the reboot.
pub fn count_down(grace: Duration, stay_file: &Path) -> CountDown {
    let end = Instant::now() + grace;
    let (wait, mut left_then) = next_reminder(grace);
    let mut reminder = Instant::now() + wait;
    loop {
        if stay_file.exists() {
            return CountDown::StayAsked;
        }
        let now = Instant::now();
        if now >= end {
            return CountDown::Elapsed;
        }
        if now >= reminder && !left_then.is_zero() {
            console::line(&format!("reboot: in {}", human(left_then)));
            let (wait, then) = next_reminder(left_then);
            reminder += wait;
            left_then = then;
        }
        std::thread::sleep(end.saturating_duration_since(now).min(STAY_POLL));
    }
}

const STAY_POLL: Duration = Duration::from_secs(1);

/// `nixos-kexec stay`, in the installer: cancels the way back's reboot.
pub fn ask_to_stay(stay_file: &Path) -> Result<()> {
    if crate::installer::status::StatusFile::installer()
        .read()?
        .is_none()
    {
        return Err(user_error(
            "no installer runs here, so nothing would reboot.",
            "run nixos-kexec stay on the installer, logged in as root over SSH.",
        ));
    }
    if let Some(dir) = stay_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(stay_file, b"").with_context(|| format!("writing {}", stay_file.display()))?;
    console::line(
        "stay: the installer will not reboot after a failure; reboot it yourself when done (reboot -f)",
    );
    Ok(())
}

/// With `left` (not zero) to go, how long to wait for the next reminder and how much is left
/// then: reminders fall on whole minutes before the end (`9 min`, not `9 min 59 s`), the last
/// wait ends with the grace period.
fn next_reminder(left: Duration) -> (Duration, Duration) {
    let whole_minutes = left.as_nanos().saturating_sub(1) / MINUTE.as_nanos();
    // Fewer whole minutes than `left` has seconds, so it fits.
    let left_then = Duration::from_secs(u64::try_from(whole_minutes).unwrap_or(u64::MAX / 60) * 60);
    (left.saturating_sub(left_then), left_then)
}

/// `5 s`, `10 min`, `1 min 30 s`.
fn human(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match (seconds / 60, seconds % 60) {
        (0, s) => format!("{s} s"),
        (m, 0) => format!("{m} min"),
        (m, s) => format!("{m} min {s} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_never_parse_bad_values_are_refused_with_a_fix() {
        for (text, seconds) in [("600", 600), ("90s", 90), ("10m", 600), ("1h", 3600), ("0", 0)] {
            assert_eq!(
                FailureReboot::parse(text).unwrap(),
                FailureReboot::After(Duration::from_secs(seconds)),
                "{text}"
            );
        }
        assert_eq!(FailureReboot::parse("never").unwrap(), FailureReboot::Never);
        assert_eq!(FailureReboot::default(), FailureReboot::After(10 * MINUTE));
        for bad in [
            "",
            "s",
            "10 m",
            "10min",
            "-5",
            "+5",
            "1.5m",
            "Never",
            "10d",
            "99999999999999999999",
            "18446744073709551615h",
        ] {
            let err = FailureReboot::parse(bad).unwrap_err();
            let user = crate::error::as_user_error(&err).unwrap_or_else(|| panic!("{bad:?}: {err}"));
            assert!(user.fix.contains("never"), "{bad:?}: {user}");
        }
    }

    /// A disk counts as written from the first write the wipe step announces, whatever the
    /// operator chose; before it, the operator's choice decides.
    #[test]
    fn only_a_run_that_wrote_nothing_reboots() {
        let grace = FailureReboot::After(Duration::from_secs(5));
        let mut writes = DiskWrites::default();
        assert_eq!(
            AfterFailure::decide(grace, &writes),
            AfterFailure::Reboot(Duration::from_secs(5))
        );
        assert_eq!(
            AfterFailure::decide(FailureReboot::Never, &writes),
            AfterFailure::StayAsked
        );
        writes.begin("/dev/vda");
        writes.begin("/dev/vdb");
        assert_eq!(writes.begun_on(), Some("/dev/vda"), "the first device is kept");
        for policy in [grace, FailureReboot::Never, FailureReboot::default()] {
            assert_eq!(
                AfterFailure::decide(policy, &writes),
                AfterFailure::StayDiskWritten("/dev/vda".into())
            );
        }
    }

    #[test]
    fn announcements_say_why_when_and_how_to_keep_the_machine() {
        let reboot = AfterFailure::Reboot(10 * MINUTE).announcement();
        for needle in ["no disk was written", "in 10 min", "failure_reboot_after=never"] {
            assert!(reboot.contains(needle), "{needle}: {reboot}");
        }
        let written = AfterFailure::StayDiskWritten("/dev/vda".into()).announcement();
        assert!(
            written.starts_with("no reboot: /dev/vda may be half-written"),
            "{written}"
        );
        assert!(!reboot.contains('\n') && !written.contains('\n'));
    }

    /// The lines a countdown prints, on a clock that advances by exactly each wait.
    fn reminders(grace: Duration) -> Vec<(Duration, String)> {
        let mut left = grace;
        let mut lines = Vec::new();
        while !left.is_zero() {
            let (wait, left_then) = next_reminder(left);
            assert!(!wait.is_zero() && wait <= MINUTE, "{wait:?} from {left:?}");
            left -= wait;
            assert_eq!(left, left_then);
            if !left.is_zero() {
                lines.push((grace - left, human(left)));
            }
        }
        lines
    }

    #[test]
    fn a_countdown_says_the_time_left_once_a_minute_on_whole_minutes() {
        let ten = reminders(10 * MINUTE);
        assert_eq!(ten.len(), 9);
        assert_eq!(ten[0], (MINUTE, "9 min".to_string()));
        assert_eq!(ten[8], (9 * MINUTE, "1 min".to_string()));
        assert_eq!(
            reminders(Duration::from_secs(90)),
            [(Duration::from_secs(30), "1 min".to_string())]
        );
        assert!(reminders(Duration::from_secs(5)).is_empty());
        assert!(reminders(MINUTE).is_empty());
        // A grace period of centuries waits a minute at a time.
        let (wait, _) = next_reminder(Duration::from_secs(u64::MAX));
        assert!(wait <= MINUTE);
        assert_eq!(human(Duration::from_secs(90)), "1 min 30 s");
    }

    #[test]
    fn the_count_down_ends_or_is_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let stay = dir.path().join("stay");
        let started = Instant::now();
        assert_eq!(count_down(Duration::from_millis(300), &stay), CountDown::Elapsed);
        assert!(started.elapsed() < Duration::from_secs(2));
        let marker = stay.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            std::fs::write(marker, b"").unwrap();
        });
        let started = Instant::now();
        assert_eq!(count_down(Duration::from_secs(60), &stay), CountDown::StayAsked);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
