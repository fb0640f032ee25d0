//! The machine the integration tests plan for: `fixtures/plan/input/facts.json`, one virtio
//! disk `vda` (serial PLAN) and one NIC in a KVM guest. Each test changes what it is about.

// Each test file uses only some of these.
#![allow(dead_code)]

use anyhow::Result;
use nixos_kexec::app::Input;
use nixos_kexec::error::{as_user_error, one_line};
use nixos_kexec::input::config::{Config, Layers};
use nixos_kexec::installer::layout::PlanIds;
use nixos_kexec::installer::plan::{self, Plan};
use nixos_kexec::machine::facts::{Disk, Facts, Firmware};

/// What the QEMU harness puts before every scenario's parameters (`BASE_CMDLINE` there).
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 loglevel=4 rootfstype=ramfs";

/// What the installer makes of `params` alone, as `app::prepare` does with local input: no
/// runtime-info file and no secrets in the initrd.
pub fn config_for(params: &str) -> Result<Config> {
    let root = tempfile::tempdir()?;
    let input = Input {
        cmdline: format!("{BASE_CMDLINE} {params}"),
        extra_params: Vec::new(),
        root: root.path().to_path_buf(),
    };
    let mut config = Layers::read(&input.root, &input.params()?)?.config(None)?;
    config.find_secrets(&input.root);
    Ok(config)
}

/// The plan the installer would make from `params` on `facts`.
pub fn plan_for(params: &str, facts: &Facts) -> Result<Plan> {
    plan::make(&config_for(params)?, facts, &PlanIds::random())
}

/// The reason the result line would give, after checking the error is one the operator can
/// fix (those, and only those, get their `nixos-kexec: fix: ` line).
pub fn reason_of(error: &anyhow::Error) -> String {
    let user =
        as_user_error(error).unwrap_or_else(|| panic!("not a user error, no fix is printed: {error:#}"));
    assert!(!user.fix.trim().is_empty(), "an empty fix: {user}");
    one_line(error)
}

pub fn facts() -> Facts {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/plan/input/facts.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The fixture with the firmware and its disk's size and sector size asked for.
pub fn facts_with(firmware: Firmware, size: u64, sector: u32) -> Facts {
    let mut facts = facts();
    facts.firmware = firmware;
    facts.disks[0].size_bytes = size;
    facts.disks[0].logical_sector = sector;
    facts.disks[0].physical_sector = sector;
    facts
}

/// The fixture's disk, `size` bytes of `sector`-byte sectors.
pub fn disk(size: u64, sector: u32) -> Disk {
    facts_with(Firmware::Uefi, size, sector).disks.remove(0)
}
