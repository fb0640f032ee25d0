//! The machine the integration tests plan for: `fixtures/plan/input/facts.json`, one virtio
//! disk `vda` (serial PLAN) and one NIC in a KVM guest. Each test changes what it is about.

// Each test file uses only some of these.
#![allow(dead_code)]

use nixos_kexec::machine::facts::{Disk, Facts, Firmware};

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
