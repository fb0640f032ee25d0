//! The install report, `report.json` on the target: what was planned, what each step did and
//! how the run ended. The finish step writes it (also after a failure); the reinstall guard
//! reads it back from disks where an earlier run may have installed NixOS.

use crate::input::config::{Layout, Step};
use crate::installer::layout::{Filesystem, LuksVolume, PlannedMount, PlannedPartition, SwapArea};
use crate::installer::plan::{Plan, TargetDisk};
use crate::installer::storage::Table;
use crate::machine::facts::Firmware;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;

/// Where the report and the install log live, under the target's state directory.
pub const REPORT_DIR: &str = "var/log/nixos-kexec";
pub const FILE_NAME: &str = "report.json";
/// A report is a few KiB; a bigger file is not one of ours and is not read into the
/// installer's RAM.
const MAX_BYTES: u64 = 1 << 20;

/// The whole document: one flat JSON object. `summary` and `run` group fields for the code
/// only; their fields stand beside the others in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    #[serde(flatten)]
    pub summary: Summary,
    pub firmware: Firmware,
    pub layout: Layout,
    pub disk: TargetDisk,
    pub table: Table,
    pub partitions: Vec<PlannedPartition>,
    pub luks: Vec<LuksVolume>,
    pub filesystems: Vec<Filesystem>,
    pub mounts: Vec<PlannedMount>,
    pub swaps: Vec<SwapArea>,
    #[serde(flatten)]
    pub run: Run,
}

/// How the run ended and what it installed: the part of the report the reinstall guard reads.
/// Other versions of nixos-kexec read it too (an older installer booted on a newer install),
/// so it holds plain strings that any of them can take, and every field but `result` may be
/// missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub result: Outcome,
    /// Why the run failed, in one line.
    pub failure: Option<String>,
    pub nixos_kexec_version: Option<String>,
    pub hostname: Option<String>,
    /// The step the run stopped before on purpose (`nixos_kexec.stop_before`).
    pub stopped_before: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
}

/// What the run did, as far as it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub host_key_fingerprints: Vec<String>,
    pub steps: Vec<StepRecord>,
    /// The post-install checks; empty when the run did not get to verify.
    pub verification: Vec<Check>,
    /// The agent's own peak resident memory (children such as mkfs are not counted).
    pub agent_peak_rss_kib: Option<i64>,
}

/// One step: how long it took and whether it ended well.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    pub seconds: f64,
    pub ok: bool,
}

/// One verification, as the console and the report show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    /// A check that passed (`Ok`) or failed (`Err`), with what it found.
    pub fn new(name: &str, outcome: std::result::Result<String, String>) -> Check {
        let (ok, detail) = match outcome {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        Check {
            name: name.to_string(),
            ok,
            detail,
        }
    }
}

impl Report {
    /// The report of `plan`'s run; `failure` is why it stopped, if it did.
    pub fn new(plan: &Plan, run: Run, failure: Option<&str>) -> Report {
        Report {
            summary: Summary::new(plan, failure),
            firmware: plan.firmware,
            layout: plan.layout,
            disk: plan.disk.clone(),
            table: plan.table,
            partitions: plan.partitions.clone(),
            luks: plan.luks.clone(),
            filesystems: plan.filesystems.clone(),
            mounts: plan.mounts.clone(),
            swaps: plan.swaps.clone(),
            run,
        }
    }

    /// The document as written: pretty JSON with a final newline. Keys are sorted at every
    /// level, as they have been since the first report: it goes through `Value`, whose maps
    /// sort (serde_json without `preserve_order`), so reports of different versions compare
    /// line by line.
    pub fn to_json(&self) -> Result<String> {
        let value = serde_json::to_value(self).context("serialising the report")?;
        Ok(serde_json::to_string_pretty(&value).context("serialising the report")? + "\n")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Report> {
        serde_json::from_slice(bytes).context("parsing an install report")
    }

    /// Writes report.json into `dir`, the report directory of the target.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(FILE_NAME);
        // Only root reads it: it names disks, addresses and the installed system's keys.
        crate::installer::steps::keys::write_file(&path, self.to_json()?.as_bytes(), 0o600)
    }
}

impl Summary {
    /// How the run of `plan` ended; `failure` is why it stopped, if it did.
    pub fn new(plan: &Plan, failure: Option<&str>) -> Summary {
        Summary {
            result: if failure.is_some() {
                Outcome::Failure
            } else {
                Outcome::Success
            },
            failure: failure.map(str::to_string),
            nixos_kexec_version: Some(env!("CARGO_PKG_VERSION").to_string()),
            hostname: Some(plan.hostname.clone()),
            stopped_before: plan.stop_before.map(|step| step.name().to_string()),
        }
    }

    pub fn from_json(bytes: &[u8]) -> Result<Summary> {
        serde_json::from_slice(bytes).context("parsing an install report")
    }

    /// Reads the summary of report.json in `dir`: [`REPORT_DIR`] under a filesystem that
    /// holds the installed system's `/` or state directory, or wherever else a layout puts it.
    pub fn read(dir: &Path) -> Result<Summary> {
        let path = dir.join(FILE_NAME);
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|file| file.take(MAX_BYTES).read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
        Summary::from_json(&bytes).with_context(|| format!("reading {}", path.display()))
    }
}

/// The first word of every marker.
const MARKER_WORD: &str = "nixos-kexec";

/// The short form of a finished run's summary that the reinstall guard reads where the report
/// is out of its reach: in the subsystem field of the LUKS2 header of an encrypted root (see
/// `steps::finish`). One line of words, at most [`Marker::MAX_BYTES`], such as
/// `nixos-kexec 2025-06-01 web1 version=0.1.0`: the word `nixos-kexec`, the UTC date the run
/// finished, the hostname, then `key=value` words: `before=STEP` when the run stopped early on
/// purpose (always kept: it tells a prepared disk from an installed one), and `version=` when
/// it fits. A hostname too long for the rest is cut and ends in `~`, which no hostname
/// contains. Readers ignore words they do not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// Always a success: only a finished run has a marker.
    pub summary: Summary,
    pub date: String,
}

impl Marker {
    /// The LUKS2 header's subsystem field is 48 bytes, the last one NUL; cryptsetup cuts longer
    /// text without a word.
    pub const MAX_BYTES: usize = 47;

    /// The marker of a run that ended as `summary` says at `now`; none for a failed run.
    pub fn finished(summary: &Summary, now: std::time::SystemTime) -> Option<Marker> {
        (summary.result == Outcome::Success && summary.hostname.is_some()).then(|| Marker {
            summary: summary.clone(),
            date: crate::input::tls::utc_text(now)[..10].to_string(),
        })
    }

    pub fn to_text(&self) -> String {
        let head = format!("{MARKER_WORD} {}", self.date);
        let stopped = self
            .summary
            .stopped_before
            .as_ref()
            .map(|step| format!(" before={step}"))
            .unwrap_or_default();
        let room = Marker::MAX_BYTES.saturating_sub(head.len() + 1 + stopped.len());
        let hostname = self.summary.hostname.as_deref().unwrap_or_default();
        let hostname = if hostname.len() <= room {
            hostname.to_string()
        } else {
            let mut cut: String = hostname.chars().take(room.saturating_sub(1)).collect();
            while cut.len() >= room {
                cut.pop();
            }
            cut + "~"
        };
        let mut text = format!("{head} {hostname}{stopped}");
        if let Some(version) = &self.summary.nixos_kexec_version {
            let word = format!(" version={version}");
            if text.len() + word.len() <= Marker::MAX_BYTES {
                text += &word;
            }
        }
        text
    }

    /// The marker in `text`; none for anything else, including an empty field.
    pub fn from_text(text: &str) -> Option<Marker> {
        let mut words = text.split(' ');
        if words.next()? != MARKER_WORD {
            return None;
        }
        let date = words.next().filter(|date| is_date(date))?.to_string();
        let hostname = words.next().filter(|name| !name.is_empty())?.to_string();
        let mut summary = Summary {
            result: Outcome::Success,
            failure: None,
            nixos_kexec_version: None,
            hostname: Some(hostname),
            stopped_before: None,
        };
        for word in words {
            match word.split_once('=') {
                Some(("before", step)) => summary.stopped_before = Some(step.to_string()),
                Some(("version", version)) => summary.nixos_kexec_version = Some(version.to_string()),
                _ => {}
            }
        }
        Some(Marker { summary, date })
    }
}

/// `YYYY-MM-DD`.
fn is_date(text: &str) -> bool {
    text.len() == 10
        && text.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::input::config::Config;
    use crate::installer::plan;
    use crate::installer::plan::tests::{disk, facts, ids};
    use crate::installer::steps::{finish, Execution};
    use crate::installer::storage::GIB;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    /// The version the fixtures say they were written by, so they do not change with every
    /// release.
    const FIXTURE_VERSION: &str = "0.1.0";

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/report")
    }

    /// The plan the installer makes for `layout` on one 20 GiB virtio disk: ext4 on BIOS (as in
    /// the bios_virtio boot test), the other presets on UEFI.
    fn plan_for(layout: Layout) -> Plan {
        let mut facts = facts(vec![disk("vda", 20 * GIB, 512, "ROOT")]);
        if layout != Layout::Ext4 {
            facts.firmware = Firmware::Uefi;
        }
        let mut config = Config {
            disk_auto: true,
            layout,
            disk_passphrase_given: layout.encrypts(),
            ..Config::default()
        };
        config.runtime_info.hostname = Some("web1".into());
        plan::make(&config, &facts, &ids()).unwrap()
    }

    /// Fixed times for the steps, roughly as a QEMU run takes them.
    fn seconds(step: Step) -> f64 {
        match step {
            Step::Format => 1.5,
            Step::Keys => 0.25,
            Step::Install => 187.75,
            _ => 0.125,
        }
    }

    /// What the verify step finds on a disk that boots.
    fn good_checks(plan: &Plan) -> Vec<Check> {
        let ok = |name: &str, detail: String| Check::new(name, Ok(detail));
        let system = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web1-26.05";
        let mut checks = vec![
            ok(
                "system profile",
                format!("/nix/var/nix/profiles/system -> {system}"),
            ),
            ok("host keys", plan.state_path("etc/ssh/ssh_host_ed25519_key")),
            ok("host flake", plan.state_path("etc/nixos/flake.nix")),
        ];
        let partition = |name: &str| plan.partitions.iter().find(|p| p.name == name).unwrap();
        match plan.firmware {
            Firmware::Bios => {
                let bios_boot = partition("bios-boot");
                checks.push(ok(
                    "GRUB boot code in the MBR",
                    format!(
                        "{}: GRUB boot.img loads core.img from sector {}",
                        plan.disk.dev_path,
                        bios_boot.start_bytes / u64::from(plan.disk.logical_sector)
                    ),
                ));
                checks.push(ok(
                    "GRUB core.img in the BIOS boot partition",
                    format!(
                        "core.img at byte {} ({})",
                        bios_boot.start_bytes, bios_boot.device
                    ),
                ));
            }
            Firmware::Uefi => {
                let esp = partition("ESP");
                checks.push(ok(
                    "EFI boot entry for a loader on the ESP",
                    format!(
                        "Boot0001 \"Linux Boot Manager\" -> \\EFI\\systemd\\systemd-bootx64.efi on {} (PARTUUID {})",
                        esp.device, esp.guid
                    ),
                ));
            }
        }
        checks
    }

    /// A run of `plan` that got to `finish` (running for a quarter of a second), or, with
    /// `failure`, one whose install step failed.
    fn report_for(layout: Layout, failure: Option<&str>) -> Report {
        let plan = plan_for(layout);
        let mut execution = Execution::default();
        let start = Instant::now();
        let mut now = start;
        for step in plan.steps.iter().copied().filter(|s| *s != Step::Finish) {
            let ok = failure.is_none() || step != Step::Install;
            execution.records.push(StepRecord {
                step,
                seconds: seconds(step),
                ok,
            });
            now += Duration::from_secs_f64(seconds(step));
            if !ok {
                break;
            }
        }
        execution.host_key_fingerprints =
            vec!["256 SHA256:qUZFJmvlZ/KPAD1e8kjqkzE9XodGkYgnlVuUh/TMUO8 root@web1 (ED25519)".into()];
        if plan.initrd_ssh.is_some() {
            execution.host_key_fingerprints.push(
                "initrd: 256 SHA256:3mF0PqVZL1mKxj8vT2Yb6cWnRgH4sUe9dAoLiNzQwXk initrd@web1 (ED25519)".into(),
            );
        }
        if failure.is_none() {
            execution.verification = good_checks(&plan);
            execution.current = Some((Step::Finish, now));
            now += Duration::from_millis(250);
        }
        let mut report = finish::report(&plan, &execution, failure, now, Some(23456));
        report.summary.nixos_kexec_version = Some(FIXTURE_VERSION.into());
        report
    }

    /// Every fixture: one per preset, and a failed run.
    pub(crate) fn fixtures() -> Vec<(String, Report)> {
        let mut fixtures: Vec<(String, Report)> = Layout::PRESETS
            .into_iter()
            .map(|layout| (layout.name().to_string(), report_for(layout, None)))
            .collect();
        fixtures.push((
            "ext4-failed".into(),
            report_for(
                Layout::Ext4,
                Some("step install: nixos-install exited with exit status: 1"),
            ),
        ));
        fixtures
    }

    /// The fixtures are what the writer writes today; `UPDATE_FIXTURES=1` rewrites them after a
    /// deliberate change of the report.
    #[test]
    fn fixtures_are_what_the_writer_writes() {
        let update = std::env::var_os("UPDATE_FIXTURES").is_some_and(|v| v == "1");
        let written = tempfile::tempdir().unwrap();
        for (name, report) in fixtures() {
            report.write(written.path()).unwrap();
            let text = std::fs::read_to_string(written.path().join(FILE_NAME)).unwrap();
            let fixture = fixture_dir().join(format!("{name}.json"));
            if update {
                std::fs::create_dir_all(fixture_dir()).unwrap();
                std::fs::write(&fixture, &text).unwrap();
                continue;
            }
            let expected = std::fs::read_to_string(&fixture).unwrap_or_default();
            assert!(
                text == expected,
                "{} differs from what the writer writes now; if the change is meant, run UPDATE_FIXTURES=1 cargo test -p nixos-kexec fixtures_are_what_the_writer_writes\n{text}",
                fixture.display()
            );
        }
    }

    #[test]
    fn fixtures_read_back_into_the_same_report() {
        for (name, report) in fixtures() {
            let bytes = std::fs::read(fixture_dir().join(format!("{name}.json"))).unwrap();
            assert_eq!(Report::from_json(&bytes).unwrap(), report, "{name}");
            assert_eq!(Summary::from_json(&bytes).unwrap(), report.summary, "{name}");
        }
    }

    #[test]
    fn the_guard_sees_a_finished_install_and_not_a_failed_one() {
        for (name, report) in fixtures() {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join(REPORT_DIR);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(fixture_dir().join(format!("{name}.json")), dir.join(FILE_NAME)).unwrap();
            let previous = crate::installer::previous::read(root.path(), false, "/dev/vda", "/dev/vda3");
            match report.summary.result {
                Outcome::Failure => assert_eq!(previous, None, "{name}"),
                Outcome::Success => {
                    let previous = previous.unwrap_or_else(|| panic!("{name}: no install seen"));
                    assert_eq!(previous.hostname.as_deref(), Some("web1"));
                    assert_eq!(previous.nixos_kexec_version.as_deref(), Some(FIXTURE_VERSION));
                    assert_eq!(previous.stopped_before, None);
                }
            }
        }
    }

    #[test]
    fn a_run_stopped_on_purpose_names_the_step() {
        let mut plan = plan_for(Layout::Ext4);
        plan.stop_before = Some(Step::Install);
        let report = Report::new(
            &plan,
            Run {
                host_key_fingerprints: vec![],
                steps: vec![],
                verification: vec![],
                agent_peak_rss_kib: None,
            },
            None,
        );
        let text = report.to_json().unwrap();
        assert!(text.contains("\"stopped_before\": \"install\""), "{text}");
        assert_eq!(
            Summary::from_json(text.as_bytes())
                .unwrap()
                .stopped_before
                .as_deref(),
            Some("install")
        );
    }

    /// Noon on 2025-06-01, UTC.
    fn june_first() -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(1_748_779_200)
    }

    #[test]
    fn a_finished_run_has_a_marker_that_reads_back_and_a_failed_one_has_none() {
        let (_, report) = fixtures().remove(0);
        let marker = Marker::finished(&report.summary, june_first()).unwrap();
        let text = marker.to_text();
        assert_eq!(text, "nixos-kexec 2025-06-01 web1 version=0.1.0");
        assert_eq!(Marker::from_text(&text), Some(marker));
        let (_, failed) = fixtures().pop().unwrap();
        assert_eq!(failed.summary.result, Outcome::Failure);
        assert_eq!(Marker::finished(&failed.summary, june_first()), None);
    }

    #[test]
    fn a_marker_fits_the_header_field_and_keeps_what_matters_most() {
        let mut summary = fixtures().remove(0).1.summary;
        summary.stopped_before = Some("install".into());
        let text = Marker::finished(&summary, june_first()).unwrap().to_text();
        // No room for the version beside `before=`.
        assert_eq!(text, "nixos-kexec 2025-06-01 web1 before=install");
        let long = "a".repeat(30) + &"b".repeat(33);
        for stopped in [None, Some("install")] {
            summary.hostname = Some(long.clone());
            summary.stopped_before = stopped.map(str::to_string);
            let text = Marker::finished(&summary, june_first()).unwrap().to_text();
            assert!(text.len() <= Marker::MAX_BYTES, "{text}");
            let read = Marker::from_text(&text).unwrap().summary;
            let hostname = read.hostname.unwrap();
            assert!(hostname.ends_with('~') && long.starts_with(hostname.trim_end_matches('~')));
            assert_eq!(read.stopped_before.as_deref(), stopped);
            assert_eq!(read.nixos_kexec_version, None);
        }
        let read = Marker::from_text("nixos-kexec 2025-06-01 web1 colour=blue version=9").unwrap();
        assert_eq!(read.summary.nixos_kexec_version.as_deref(), Some("9"));
        assert_eq!(read.date, "2025-06-01");
        for other in [
            "",
            "nixos-kexec",
            "nixos-kexec 2025-06-01",
            "cryptsetup 2025-06-01 web1",
        ] {
            assert_eq!(Marker::from_text(other), None, "{other:?}");
        }
    }

    #[test]
    fn only_root_reads_the_written_report() {
        let dir = tempfile::tempdir().unwrap();
        let (_, report) = fixtures().remove(0);
        report.write(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        assert_eq!(Summary::read(dir.path()).unwrap(), report.summary);
    }
}
