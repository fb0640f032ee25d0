//! The partition and format code on image files, checked with sgdisk, sfdisk and fsck.fat;
//! and the reinstall guard on what each preset's finished run leaves, on loop devices.
//! (The kernel side of it, re-reading and mounting, is covered by the QEMU scenarios in tests/.)

mod common;

use nixos_kexec::input::config::{Config, Layout};
use nixos_kexec::installer::layout::{self, PlanIds};
use nixos_kexec::installer::plan;
use nixos_kexec::installer::steps::{format, partition};
use nixos_kexec::installer::storage::{Table, GIB};
use nixos_kexec::machine::facts::{Evidence, Facts, Firmware, PreviousInstall};
use std::process::Command;

fn facts(size: u64, sector: u32) -> Facts {
    let mut facts = common::facts_with(Firmware::Uefi, size, sector);
    // The key derivation's memory follows RAM; loop-device tests want it small.
    facts.ram_bytes = GIB;
    facts.nics.clear();
    facts
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

impl Loop {
    /// A writable loop device, for making filesystems on the image.
    fn writable(image: &std::path::Path) -> Loop {
        let out = tool("losetup", &["--find", "--show", image.to_str().unwrap()]);
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

// ------------------------------------------------------------------------- reinstall guard

/// The format step mounts every new btrfs on the same directory to make its subvolumes, so the
/// preset tests take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One image and loop device for each device the plan names: its partitions, and the opened
/// LUKS mapping (this host may have no device-mapper, so what the mapping holds is an image of
/// its own).
struct Devices {
    _dir: tempfile::TempDir,
    loops: std::collections::BTreeMap<String, Loop>,
}

impl Devices {
    fn for_plan(plan: &plan::Plan) -> Devices {
        let dir = tempfile::tempdir().unwrap();
        let mut loops = std::collections::BTreeMap::new();
        let names = plan
            .filesystems
            .iter()
            .map(|fs| fs.device.clone())
            .chain(plan.luks.iter().map(|volume| volume.device.clone()));
        for (index, name) in names.enumerate() {
            let image = dir.path().join(format!("{index}.img"));
            std::fs::File::create(&image).unwrap().set_len(512 << 20).unwrap();
            loops.insert(name, Loop::writable(&image));
        }
        Devices { _dir: dir, loops }
    }

    /// The loop device standing for the planned `device`.
    fn of(&self, device: &str) -> String {
        self.loops[device].device.clone()
    }
}

/// What `plan::make` plans for `layout` on a 8 GiB UEFI disk, with its devices swapped for loop
/// devices and its mount root in `mount_root`.
fn guarded_plan(layout: Layout, mount_root: &std::path::Path) -> (plan::Plan, Devices) {
    let config = Config {
        disk_auto: true,
        runtime_info: nixos_kexec::input::runtime_info::RuntimeInfo {
            hostname: Some("guarded".into()),
            ..Default::default()
        },
        layout,
        disk_passphrase_given: layout.encrypts(),
        ..Config::default()
    };
    let mut plan = plan::make(&config, &facts(8 * GIB, 512), &PlanIds::random()).unwrap();
    let devices = Devices::for_plan(&plan);
    for fs in &mut plan.filesystems {
        fs.device = devices.of(&fs.device);
    }
    for volume in &mut plan.luks {
        volume.open_device = devices.of(&volume.open_device);
        volume.device = devices.of(&volume.device);
    }
    // The ESP is no place the guard looks, and the host kernel may have no vfat.
    plan.mounts.retain(|m| m.fstype != "vfat");
    for m in &mut plan.mounts {
        if m.source != "tmpfs" {
            m.source = devices.of(&m.source);
        }
    }
    plan.mount_root = mount_root.to_string_lossy().into_owned();
    // No block device: the format step makes no /dev/disk links on this host.
    plan.disk.dev_path = mount_root.join("no-disk").to_string_lossy().into_owned();
    (plan, devices)
}

/// Runs the real format, mount and finish code of `plan` as far as it can on this host
/// (LUKS containers are made with a test passphrase and not opened, see [`Devices`]): a
/// finished run, or with `failure` the report of a failed one.
fn run_to_the_end(plan: &mut plan::Plan, failure: Option<&str>) {
    use nixos_kexec::installer::steps::{finish, mount, Execution};
    let volumes = std::mem::take(&mut plan.luks);
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), "guard-test-passphrase").unwrap();
    for volume in &volumes {
        tool(
            "cryptsetup",
            &[
                "luksFormat",
                "--batch-mode",
                "--type",
                "luks2",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
                key.path().to_str().unwrap(),
                &volume.device,
            ],
        );
    }
    let mut execution = Execution::default();
    format::run(plan, &mut execution).unwrap();
    plan.luks = volumes;
    mount::run(plan, &mut execution).unwrap();
    match failure {
        None => finish::run(plan, &mut execution).unwrap(),
        Some(reason) => {
            finish::write_report(plan, &mut execution, Some(reason)).unwrap();
        }
    }
    finish::unmount_all(&mut execution).unwrap();
}

/// The guard's probe on a disk `/dev/vda` whose partitions are the plan's ESP and root, the
/// way the installer sees them (the opened mapping is not a partition).
fn probe(plan: &plan::Plan) -> Facts {
    let mut facts = facts(8 * GIB, 512);
    let partitions = plan
        .filesystems
        .iter()
        .filter(|fs| fs.kind == layout::FsKind::Vfat)
        .map(|fs| fs.device.clone())
        .chain(plan.luks.iter().map(|volume| volume.device.clone()))
        .chain(
            plan.filesystems
                .iter()
                .filter(|fs| fs.kind != layout::FsKind::Vfat)
                .filter(|fs| !plan.luks.iter().any(|v| v.open_device == fs.device))
                .map(|fs| fs.device.clone()),
        );
    facts.disks[0].partitions = partitions
        .map(|device| nixos_kexec::machine::facts::ExistingPartition {
            name: device.trim_start_matches("/dev/").to_string(),
            start_bytes: 0,
            size_bytes: 512 << 20,
        })
        .collect();
    let probe_dir = tempfile::tempdir().unwrap();
    nixos_kexec::installer::previous::find_on_disks(&mut facts, probe_dir.path());
    facts
}

/// What finish leaves for `layout` is found by the guard's probe, where the preset puts it;
/// what a failed run leaves is not.
fn guard_sees_the_finished_run(layout: Layout, evidence: Option<Evidence>) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mount_root = tempfile::tempdir().unwrap();

    let (mut plan, _devices) = guarded_plan(layout, mount_root.path());
    run_to_the_end(
        &mut plan,
        Some("step install: nixos-install exited with exit status: 1"),
    );
    let facts = probe(&plan);
    assert_eq!(facts.previous_installs, vec![], "{}: a failed run", layout.name());

    let (mut plan, _devices) = guarded_plan(layout, mount_root.path());
    run_to_the_end(&mut plan, None);
    let facts = probe(&plan);
    let root = plan
        .luks
        .first()
        .map(|volume| volume.device.clone())
        .unwrap_or_else(|| {
            plan.mounts
                .iter()
                .find(|m| m.source != "tmpfs")
                .unwrap()
                .source
                .clone()
        });
    let expected = PreviousInstall {
        disk: "/dev/vda".into(),
        partition: root,
        hostname: Some("guarded".into()),
        nixos_kexec_version: Some(env!("CARGO_PKG_VERSION").into()),
        stopped_before: None,
        evidence,
    };
    assert_eq!(facts.previous_installs, vec![expected], "{}", layout.name());

    // The plan for that disk refuses it, and takes it with nixos_kexec.reinstall.
    let mut config = Config {
        disk_auto: true,
        ..Config::default()
    };
    let err = plan::make(&config, &facts, &PlanIds::random()).unwrap_err();
    let user = nixos_kexec::error::as_user_error(&err).unwrap();
    assert!(
        user.problem.contains("Refusing to install over /dev/vda")
            && user.problem.contains("for host guarded"),
        "{user}"
    );
    config.reinstall = true;
    assert!(plan::make(&config, &facts, &PlanIds::random())
        .unwrap()
        .replaces
        .is_some());
}

fn in_report(path: &str) -> Option<Evidence> {
    Some(Evidence::Report { path: path.into() })
}

/// The date the marker carries: today, in UTC.
fn today() -> Option<Evidence> {
    let now = nixos_kexec::input::tls::utc_text(std::time::SystemTime::now());
    Some(Evidence::LuksHeader {
        date: now[..10].to_string(),
    })
}

#[test]
fn guard_sees_a_finished_ext4_install() {
    guard_sees_the_finished_run(Layout::Ext4, None);
}

#[test]
fn guard_sees_a_finished_btrfs_install_in_its_log_subvolume() {
    guard_sees_the_finished_run(Layout::Btrfs, in_report("@log/nixos-kexec/report.json"));
}

#[test]
fn guard_sees_a_finished_impermanence_install_in_its_persist_subvolume() {
    guard_sees_the_finished_run(
        Layout::BtrfsImpermanence,
        in_report("@persist/var/log/nixos-kexec/report.json"),
    );
}

#[test]
fn guard_sees_a_finished_luks_btrfs_install_by_its_header() {
    guard_sees_the_finished_run(Layout::LuksBtrfs, today());
}

#[test]
fn guard_sees_a_finished_luks_ext4_install_by_its_header() {
    guard_sees_the_finished_run(Layout::LuksExt4, today());
}

/// The report is under `@persist` as with `btrfs-impermanence`, but inside the container: the
/// header is what the guard can read.
#[test]
fn guard_sees_a_finished_luks_impermanence_install_by_its_header() {
    guard_sees_the_finished_run(Layout::LuksBtrfsImpermanence, today());
}

// ------------------------------------------------------------------------- temporary swap file

/// Whether the kernel lists `path` as swap in /proc/swaps (a file, not a partition).
fn swapping_on(path: &std::path::Path) -> bool {
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap();
    swaps.lines().any(|line| {
        let mut fields = line.split_whitespace();
        fields.next() == path.to_str() && fields.next() == Some("file")
    })
}

/// The install step's swap file as the plan decides it for 512 MiB of RAM and `preset` (no
/// swap in it), on a real filesystem of that kind on a loop device, mounted as the plan mounts
/// /nix (btrfs: the `@nix` subvolume, zstd-compressed): the kernel swaps on it during the
/// install, and it is off and gone afterwards whether the install succeeded, failed or
/// panicked; the filesystem checks clean.
fn swap_file_during_the_install(preset: Layout) {
    use nixos_kexec::installer::layout::FsKind;
    use nixos_kexec::installer::steps::swap_file::{self, TemporarySwap};
    use nixos_kexec::machine::blockdev::Mount;
    use std::os::unix::fs::PermissionsExt;

    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut facts = facts(8 * GIB, 512);
    facts.ram_bytes = 512 << 20;
    let config = Config {
        disk_auto: true,
        layout: preset,
        ..Config::default()
    };
    let mut plan = plan::make(&config, &facts, &PlanIds::random()).unwrap();
    let TemporarySwap::File {
        path,
        size_bytes,
        filesystem,
        ..
    } = &mut plan.temporary_swap
    else {
        panic!(
            "{}: no swap file planned: {:?}",
            preset.name(),
            plan.temporary_swap
        );
    };
    let (size_bytes, kind) = (*size_bytes, *filesystem);
    let store = plan
        .mounts
        .iter()
        .rfind(|m| m.mountpoint == "/" || m.mountpoint == "/nix")
        .unwrap()
        .clone();

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("store.img");
    std::fs::File::create(&image).unwrap().set_len(4 * GIB).unwrap();
    let looped = Loop::writable(&image);
    let mount_root = dir.path().join("mnt");
    match kind {
        FsKind::Ext4 => {
            tool("mkfs.ext4", &["-q", "-F", &looped.device]);
        }
        FsKind::Btrfs => {
            tool("mkfs.btrfs", &["-q", "-f", &looped.device]);
            let top = Mount::new(&looped.device, &dir.path().join("top"), "btrfs", &[]).unwrap();
            let subvolume = store.subvolume.as_deref().unwrap();
            nixos_kexec::machine::btrfs::create_subvolume(top.target(), subvolume).unwrap();
            top.unmount().unwrap();
        }
        FsKind::Vfat => unreachable!(),
    }
    assert!(
        store
            .options
            .iter()
            .all(|o| kind != FsKind::Btrfs || o != "nodatacow"),
        "the test wants btrfs as the presets mount it"
    );
    let mounted = Mount::new(&looped.device, &mount_root, kind.name(), &store.options).unwrap();
    let file = mount_root.join(swap_file::FILE_NAME);
    *path = file.to_string_lossy().into_owned();

    // Succeeds: swap on while installing, then off and deleted.
    swap_file::while_installing(&plan, || {
        assert!(swapping_on(&file), "{} is not in /proc/swaps", file.display());
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), size_bytes);
        if kind == FsKind::Btrfs {
            let attributes = tool("lsattr", &[file.to_str().unwrap()]);
            let flags = attributes.split_whitespace().next().unwrap();
            assert!(flags.contains('C'), "not NOCOW: {attributes}");
        }
        Ok(())
    })
    .unwrap();
    assert!(!swapping_on(&file) && !file.exists(), "left after a good install");

    // Fails: the install's error comes back, and the file goes all the same.
    let err = swap_file::while_installing(&plan, || {
        assert!(swapping_on(&file));
        anyhow::bail!("nixos-install exited with exit status: 1")
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "nixos-install exited with exit status: 1");
    assert!(
        !swapping_on(&file) && !file.exists(),
        "left after a failed install"
    );

    // Panics: the guard cleans up as the stack unwinds.
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        swap_file::while_installing(&plan, || {
            assert!(swapping_on(&file));
            panic!("a bug in the install step")
        })
    }));
    assert!(unwound.is_err());
    assert!(!swapping_on(&file) && !file.exists(), "left after a panic");

    mounted.unmount().unwrap();
    match kind {
        FsKind::Ext4 => tool("e2fsck", &["-fn", &looped.device]),
        _ => tool("btrfs", &["check", &looped.device]),
    };
}

#[test]
fn swap_file_on_ext4() {
    swap_file_during_the_install(Layout::Ext4);
}

#[test]
fn swap_file_on_btrfs_in_the_nix_subvolume() {
    swap_file_during_the_install(Layout::Btrfs);
}
