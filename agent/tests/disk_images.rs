//! The partition and format code on image files, checked with sgdisk, sfdisk and fsck.fat.
//! (The kernel side of it, re-reading and mounting, is covered by the QEMU scenarios in tests/.)

use nixos_kexec::input::config::{Config, Layout};
use nixos_kexec::installer::layout::{self, PlanIds};
use nixos_kexec::installer::plan;
use nixos_kexec::installer::steps::{format, partition};
use nixos_kexec::installer::storage::{Table, GIB};
use nixos_kexec::machine::facts::{Disk, Facts, Firmware, Transport};
use std::process::Command;

fn facts(size: u64, sector: u32) -> Facts {
    Facts {
        firmware: Firmware::Uefi,
        ram_bytes: GIB,
        kernel_release: "test".into(),
        disks: vec![Disk {
            name: "vda".into(),
            dev_path: "/dev/vda".into(),
            size_bytes: size,
            logical_sector: sector,
            physical_sector: sector,
            transport: Transport::Virtio,
            model: None,
            serial: Some("IMG".into()),
            wwn: None,
            by_id: vec!["virtio-IMG".into()],
            by_path: vec![],
            removable: false,
            read_only: false,
            partitions: vec![],
            holders: vec![],
            mounted_at: vec![],
            modules: vec![],
        }],
        nics: vec![],
        previous_installs: vec![],
        machine: nixos_kexec::machine::platform::Machine {
            arch: "x86_64".into(),
            ..Default::default()
        },
    }
}

/// A read-only loop device, detached on drop.
struct Loop {
    device: String,
}

impl Loop {
    fn attach(image: &std::path::Path, sector: u32) -> Loop {
        let out = tool(
            "losetup",
            &[
                "--read-only",
                "--sector-size",
                &sector.to_string(),
                "--find",
                "--show",
                image.to_str().unwrap(),
            ],
        );
        Loop {
            device: out.trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed for this test: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed: {text}");
    text
}

#[test]
fn gpt_on_512_and_4096_byte_sectors_verifies() {
    for sector in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let size = 3 * GIB + 12345 * 4096;
        std::fs::File::create(&image).unwrap().set_len(size).unwrap();
        let config = Config {
            disk_auto: true,
            ..Config::default()
        };
        let mut plan = plan::make(&config, &facts(size, sector), &PlanIds::random()).unwrap();
        plan.disk.dev_path = image.to_string_lossy().into_owned();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        partition::write_gpt(file, &plan).unwrap();

        // Image files look like 512-byte-sector disks to every tool; a read-only loop device
        // with the sector size lets sgdisk and sfdisk read the table as the kernel would.
        let looped = Loop::attach(&image, sector);
        let verify = tool("sgdisk", &["-v", &looped.device]);
        assert!(verify.contains("No problems found"), "{verify}");
        let json: serde_json::Value =
            serde_json::from_str(&tool("sfdisk", &["--json", &looped.device])).unwrap();
        let table = &json["partitiontable"];
        assert_eq!(table["label"], "gpt");
        assert_eq!(
            table["id"].as_str().unwrap().to_lowercase(),
            plan.disk_guid.to_lowercase()
        );
        let parts = table["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 3);
        for (found, planned) in parts.iter().zip(&plan.partitions) {
            let start = found["start"].as_u64().unwrap() * sector as u64;
            let size = found["size"].as_u64().unwrap() * sector as u64;
            assert_eq!((start, size), (planned.start_bytes, planned.size_bytes));
            assert_eq!(start % (1 << 20), 0);
            assert_eq!(found["type"].as_str().unwrap().to_uppercase(), planned.type_guid);
            assert_eq!(found["uuid"].as_str().unwrap().to_lowercase(), planned.guid);
        }
        // The protective MBR: one 0xEE entry from LBA 1.
        let bytes = std::fs::read(&image).unwrap_or_default();
        assert_eq!(bytes[450], 0xee);
        assert_eq!(&bytes[510..512], &[0x55, 0xaa]);
    }
}

#[test]
fn esp_formats_as_fat32_that_fsck_accepts() {
    for sector in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("esp.img");
        let size = 512u64 << 20;
        std::fs::File::create(&image).unwrap().set_len(size).unwrap();
        let fs = layout::Filesystem {
            device: image.to_string_lossy().into_owned(),
            kind: layout::FsKind::Vfat,
            label: Some("ESP".into()),
            uuid: layout::fat_uuid(0x1234abcd),
            volume_id: Some(0x1234abcd),
            size_bytes: size,
            subvolumes: vec![],
        };
        format::format_esp(&fs, sector).unwrap();
        tool("fsck.fat", &["-n", image.to_str().unwrap()]);
        let info = tool("file", &["-s", image.to_str().unwrap()]);
        assert!(info.contains("FAT (32 bit)"), "{info}");
        assert!(info.to_lowercase().contains("serial number 0x1234abcd"), "{info}");
    }
}

#[test]
fn mbr_has_primary_partitions_and_one_boot_flag() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let size = 5 * GIB;
    std::fs::File::create(&image).unwrap().set_len(size).unwrap();
    let mut facts = facts(size, 512);
    facts.firmware = nixos_kexec::machine::facts::Firmware::Bios;
    let config = Config {
        disk_auto: true,
        layout: Layout::LuksExt4,
        table: Table::Mbr,
        swap_bytes: GIB,
        disk_passphrase_given: true,
        ..Config::default()
    };
    let mut plan = plan::make(&config, &facts, &PlanIds::random()).unwrap();
    plan.disk.dev_path = image.to_string_lossy().into_owned();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    partition::write_mbr(file, &plan).unwrap();

    let json: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["--json", image.to_str().unwrap()])).unwrap();
    let table = &json["partitiontable"];
    assert_eq!(table["label"], "dos");
    assert_eq!(
        u32::from_str_radix(table["id"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap(),
        plan.mbr_signature
    );
    let parts = table["partitions"].as_array().unwrap();
    let summary: Vec<(u64, u64, String, bool)> = parts
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
                p["type"].as_str().unwrap().to_string(),
                p["bootable"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    // /boot (ext4, flagged: GRUB cannot read LUKS2), swap, LUKS root on the rest.
    assert_eq!(
        summary,
        vec![
            (1 << 20, GIB, "83".to_string(), true),
            ((1 << 20) + GIB, GIB, "82".to_string(), false),
            (
                (1 << 20) + 2 * GIB,
                size - (1 << 20) - 2 * GIB,
                "83".to_string(),
                false
            ),
        ]
    );
    // Nothing past the 4 primary entries: no extended partition, no EBR.
    let dump = tool("sfdisk", &["--dump", image.to_str().unwrap()]);
    assert_eq!(
        dump.lines().filter(|l| l.contains(" : start=")).count(),
        3,
        "{dump}"
    );
}
