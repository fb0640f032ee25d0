//! What the installer finds on the machine: disks, firmware, RAM, drivers.
//!
//! Read from sysfs under a root directory so unit tests can give a fake tree.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    Uefi,
    Bios,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Virtio,
    Nvme,
    Ata,
    Scsi,
    Mmc,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Kernel name, e.g. `vda`, `nvme0n1`.
    pub name: String,
    pub dev_path: String,
    pub size_bytes: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub transport: Transport,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    /// The names udev would give under /dev/disk/by-id, derived without udev.
    pub by_id: Vec<String>,
    pub removable: bool,
    pub read_only: bool,
    pub partitions: Vec<ExistingPartition>,
    /// Device-mapper, RAID or similar users of the disk or its partitions.
    pub holders: Vec<String>,
    /// Mount points of the disk or any partition.
    pub mounted_at: Vec<String>,
    /// Kernel modules on the path from the disk to the bus, disk driver first.
    pub modules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExistingPartition {
    pub name: String,
    pub start_bytes: u64,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    pub modules: Vec<String>,
}

/// An earlier nixos-kexec run that finished on a disk: its report on the disk's root
/// filesystem says `success` (also when it stopped before `install` on purpose).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousInstall {
    /// The disk, as in [`Disk::dev_path`].
    pub disk: String,
    /// The partition holding the report.
    pub partition: String,
    pub hostname: Option<String>,
    pub nixos_kexec_version: Option<String>,
    /// Set when that run stopped early on purpose (`nixos_kexec.stop_before`).
    pub stopped_before: Option<String>,
}

impl PreviousInstall {
    pub fn describe(&self) -> String {
        let what = match &self.stopped_before {
            Some(step) => format!("a NixOS prepared (stopped before {step}) by"),
            None => "a NixOS installed by".to_string(),
        };
        let text = format!(
            "{} holds {what} nixos-kexec {} for host {}",
            self.disk,
            self.nixos_kexec_version.as_deref().unwrap_or("(unknown version)"),
            self.hostname.as_deref().unwrap_or("(unknown)")
        );
        text + &format!(
            "; its report is /{}/report.json on {}",
            crate::steps::finish::REPORT_DIR,
            self.partition
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub firmware: Firmware,
    pub ram_bytes: u64,
    pub kernel_release: String,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// Filled by [`find_previous_installs`] in the installer; empty elsewhere.
    #[serde(default)]
    pub previous_installs: Vec<PreviousInstall>,
    /// Architecture, virtualisation and CPU vendor, for the hardware configuration.
    #[serde(default)]
    pub machine: crate::machine::Machine,
}

impl Facts {
    /// Reads the running system's facts.
    pub fn gather() -> Result<Facts> {
        let mut facts = Facts::read_from(Path::new("/"))?;
        facts.ram_bytes = ram_bytes();
        if let Some(arch) = crate::machine::uname_arch() {
            facts.machine.arch = arch;
        }
        Ok(facts)
    }

    /// Reads facts from a root with `sys/` and `proc/` beneath it (`/` on a real system).
    pub fn read_from(root: &Path) -> Result<Facts> {
        let mounts = read_mounts(&root.join("proc/self/mountinfo"));
        let mut disks = Vec::new();
        let block = root.join("sys/block");
        for name in list_dir(&block).with_context(|| format!("listing {}", block.display()))? {
            if let Some(disk) = read_disk(&block.join(&name), &name, &mounts)
                .with_context(|| format!("reading {}", block.join(&name).display()))?
            {
                disks.push(disk);
            }
        }
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        let firmware = if root.join("sys/firmware/efi").exists() {
            Firmware::Uefi
        } else {
            Firmware::Bios
        };
        let kernel_release = read_trimmed(&root.join("proc/sys/kernel/osrelease")).unwrap_or_default();
        Ok(Facts {
            firmware,
            ram_bytes: 0,
            kernel_release,
            disks,
            nics: read_nics(&root.join("sys/class/net")),
            previous_installs: Vec::new(),
            machine: crate::machine::Machine::read_from(root),
        })
    }

    pub fn previous_install(&self, dev_path: &str) -> Option<&PreviousInstall> {
        self.previous_installs.iter().find(|p| p.disk == dev_path)
    }

    /// Kernel modules the installed system's initrd needs for its disks and NICs.
    pub fn initrd_modules(&self, disk: &Disk) -> Vec<String> {
        let mut modules: BTreeSet<String> = disk.modules.iter().cloned().collect();
        for nic in &self.nics {
            modules.extend(nic.modules.iter().cloned());
        }
        modules.into_iter().collect()
    }
}

/// Filesystems a root can be on that we can read without a key.
fn sniff_filesystem(head: &[u8]) -> Option<&'static str> {
    // ext2/3/4: s_magic 0xEF53 at byte 56 of the superblock, which starts at 1024.
    if head.get(1080..1082) == Some(&[0x53, 0xef]) {
        return Some("ext4");
    }
    // btrfs: "_BHRfS_M" at byte 64 of the superblock at 64 KiB.
    if head.get(65600..65608) == Some(b"_BHRfS_M") {
        return Some("btrfs");
    }
    None
}

/// Reads a report.json: `Some` only for a run that ended in success.
pub fn parse_report(json: &[u8], disk: &str, partition: &str) -> Option<PreviousInstall> {
    let report: serde_json::Value = serde_json::from_slice(json).ok()?;
    if report.get("result")?.as_str()? != "success" {
        return None;
    }
    let text = |key: &str| report.get(key).and_then(|v| v.as_str()).map(str::to_string);
    Some(PreviousInstall {
        disk: disk.to_string(),
        partition: partition.to_string(),
        hostname: text("hostname"),
        nixos_kexec_version: text("nixos_kexec_version"),
        stopped_before: text("stopped_before"),
    })
}

/// Looks for our own report on every partition of every disk nothing uses, mounting ext4 and
/// btrfs filesystems read-only (without replaying journals: not one byte changes) under
/// `probe_dir`. What cannot be read (encrypted, damaged, another filesystem) counts as no
/// install. The plan then refuses to install over a finished install unless told to.
pub fn find_previous_installs(facts: &mut Facts, probe_dir: &Path) {
    use std::io::Read;
    let mut found = Vec::new();
    for disk in &facts.disks {
        if !disk.mounted_at.is_empty() || !disk.holders.is_empty() {
            continue;
        }
        for part in &disk.partitions {
            let device = format!("/dev/{}", part.name);
            let mut head = Vec::new();
            if let Err(e) = fs::File::open(&device).and_then(|f| f.take(65608).read_to_end(&mut head)) {
                log::info!("previous install: cannot read {device}: {e}");
                continue;
            }
            let Some(fstype) = sniff_filesystem(&head) else {
                continue;
            };
            let target = probe_dir.join(&part.name);
            let options = if fstype == "ext4" { "noload" } else { "nologreplay" };
            let mount = match crate::blockdev::Mount::read_only(&device, &target, fstype, options) {
                Ok(m) => m,
                Err(e) => {
                    log::info!("previous install: cannot look into {device}: {e:#}");
                    continue;
                }
            };
            let report = target.join(crate::steps::finish::REPORT_DIR).join("report.json");
            let mut bytes = Vec::new();
            let read = fs::File::open(&report).and_then(|f| f.take(1 << 20).read_to_end(&mut bytes));
            if let Err(e) = mount.unmount() {
                log::warn!("previous install: {e:#}");
            }
            let _ = fs::remove_dir(&target);
            if read.is_ok() {
                if let Some(previous) = parse_report(&bytes, &disk.dev_path, &device) {
                    found.push(previous);
                }
            }
        }
    }
    facts.previous_installs = found;
}

fn ram_bytes() -> u64 {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    system.total_memory()
}

fn list_dir(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

pub(crate) fn read_trimmed(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn read_u64(path: &Path) -> Option<u64> {
    read_trimmed(path)?.parse().ok()
}

/// Mount sources by `major:minor` and by device path, from /proc/self/mountinfo.
struct Mounts(Vec<(String, String, String)>);

fn read_mounts(path: &Path) -> Mounts {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut mounts = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if let (Some(devnum), Some(point), Some(source)) =
            (fields.get(2), fields.get(4), fields.get(dash + 2))
        {
            mounts.push((devnum.to_string(), point.to_string(), source.to_string()));
        }
    }
    Mounts(mounts)
}

impl Mounts {
    fn points_of(&self, devnum: &str, name: &str) -> Vec<String> {
        let dev_path = format!("/dev/{name}");
        self.0
            .iter()
            .filter(|(num, _, source)| num == devnum || *source == dev_path)
            .map(|(_, point, _)| point.clone())
            .collect()
    }
}

fn read_disk(dir: &Path, name: &str, mounts: &Mounts) -> Result<Option<Disk>> {
    // Only disks backed by hardware: loop, ram, zram and device-mapper nodes have no `device`.
    let device = dir.join("device");
    if !device.exists() {
        return Ok(None);
    }
    let transport = transport_of(name);
    let size_sectors = read_u64(&dir.join("size")).unwrap_or(0);
    let logical_sector = read_u64(&dir.join("queue/logical_block_size")).unwrap_or(512) as u32;
    let physical_sector =
        read_u64(&dir.join("queue/physical_block_size")).unwrap_or(logical_sector as u64) as u32;
    let model = read_trimmed(&device.join("model"));
    let serial = read_trimmed(&dir.join("serial"))
        .or_else(|| read_trimmed(&device.join("serial")))
        .or_else(|| vpd_serial(&device.join("vpd_pg80")));
    let wwid = read_trimmed(&dir.join("wwid")).or_else(|| read_trimmed(&device.join("wwid")));
    let wwn = wwid
        .as_deref()
        .and_then(|w| w.strip_prefix("naa."))
        .map(|w| format!("0x{}", w.to_lowercase()));
    let eui = read_trimmed(&dir.join("eui")).or_else(|| {
        wwid.as_deref()
            .and_then(|w| w.strip_prefix("eui."))
            .map(str::to_string)
    });

    let mut partitions = Vec::new();
    let mut holders = list_dir(&dir.join("holders")).unwrap_or_default();
    let mut mounted_at = mounts.points_of(&read_trimmed(&dir.join("dev")).unwrap_or_default(), name);
    for entry in list_dir(dir)? {
        let part_dir = dir.join(&entry);
        if !entry.starts_with(name) || !part_dir.join("partition").exists() {
            continue;
        }
        // sysfs counts partition start and size in 512-byte units whatever the sector size.
        partitions.push(ExistingPartition {
            name: entry.clone(),
            start_bytes: read_u64(&part_dir.join("start")).unwrap_or(0) * 512,
            size_bytes: read_u64(&part_dir.join("size")).unwrap_or(0) * 512,
        });
        holders.extend(list_dir(&part_dir.join("holders")).unwrap_or_default());
        mounted_at.extend(mounts.points_of(&read_trimmed(&part_dir.join("dev")).unwrap_or_default(), &entry));
    }

    let by_id = by_id_names(
        transport,
        model.as_deref(),
        serial.as_deref(),
        wwn.as_deref(),
        eui.as_deref(),
    );
    Ok(Some(Disk {
        name: name.to_string(),
        dev_path: format!("/dev/{name}"),
        size_bytes: size_sectors * 512,
        logical_sector,
        physical_sector,
        transport,
        model,
        serial,
        wwn,
        by_id,
        removable: read_u64(&dir.join("removable")) == Some(1),
        read_only: read_u64(&dir.join("ro")) == Some(1),
        partitions,
        holders,
        mounted_at,
        modules: modules_of(&device),
    }))
}

fn transport_of(name: &str) -> Transport {
    if name.starts_with("vd") {
        Transport::Virtio
    } else if name.starts_with("nvme") {
        Transport::Nvme
    } else if name.starts_with("mmcblk") {
        Transport::Mmc
    } else if name.starts_with("sd") {
        Transport::Scsi
    } else {
        Transport::Other
    }
}

/// The unit serial number from SCSI VPD page 0x80 (libata provides it for SATA disks).
fn vpd_serial(path: &Path) -> Option<String> {
    let bytes = fs::read(path).ok()?;
    let len = *bytes.get(3)? as usize;
    let serial = String::from_utf8_lossy(bytes.get(4..4 + len)?).trim().to_string();
    (!serial.is_empty()).then_some(serial)
}

/// udev's character rule for by-id names: runs of whitespace become one `_`, and anything
/// outside a safe set becomes `_`.
fn udev_safe(text: &str) -> String {
    let mut out = String::new();
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push('_');
        }
        out.extend(word.chars().map(|c| {
            if c.is_ascii_alphanumeric() || "#+-.:=@_".contains(c) {
                c
            } else {
                '_'
            }
        }));
    }
    out
}

fn by_id_names(
    transport: Transport,
    model: Option<&str>,
    serial: Option<&str>,
    wwn: Option<&str>,
    eui: Option<&str>,
) -> Vec<String> {
    let mut names = Vec::new();
    match (transport, model, serial) {
        (Transport::Virtio, _, Some(serial)) => names.push(format!("virtio-{}", udev_safe(serial))),
        (Transport::Nvme, Some(model), Some(serial)) => {
            names.push(format!("nvme-{}_{}", udev_safe(model), udev_safe(serial)))
        }
        (Transport::Scsi, Some(model), Some(serial)) => {
            names.push(format!("ata-{}_{}", udev_safe(model), udev_safe(serial)))
        }
        _ => {}
    }
    if let (Transport::Nvme, Some(eui)) = (transport, eui) {
        names.push(format!("nvme-eui.{}", eui.replace(' ', "")));
    }
    if let Some(wwn) = wwn {
        names.push(format!("wwn-{wwn}"));
    }
    names
}

/// Walks from a device up its parents and collects the kernel modules of their drivers
/// (`virtio_blk`, then `virtio_pci`), which the installed system's initrd needs.
fn modules_of(device: &Path) -> Vec<String> {
    let mut modules = Vec::new();
    let Ok(mut current) = fs::canonicalize(device) else {
        return modules;
    };
    loop {
        if let Ok(module) = fs::read_link(current.join("driver/module")) {
            if let Some(name) = module.file_name() {
                let name = name.to_string_lossy().into_owned();
                if !modules.contains(&name) {
                    modules.push(name);
                }
            }
        }
        if !current.pop() || current.file_name().is_none_or(|n| n == "devices") {
            break;
        }
    }
    modules
}

fn read_nics(dir: &Path) -> Vec<Nic> {
    let mut nics = Vec::new();
    for name in list_dir(dir).unwrap_or_default() {
        let path: PathBuf = dir.join(&name);
        if !path.join("device").exists() {
            continue;
        }
        nics.push(Nic {
            mac: read_trimmed(&path.join("address")).unwrap_or_default(),
            modules: modules_of(&path.join("device")),
            name,
        });
    }
    nics
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// A fake sysfs with a virtio disk (one mounted partition) and an NVMe disk.
    fn fake_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let pci = r.join("sys/devices/pci0000:00/0000:00:04.0");
        fs::create_dir_all(pci.join("virtio1")).unwrap();
        let drivers = r.join("sys/bus/drivers");
        for (driver, module) in [
            ("virtio-pci", "virtio_pci"),
            ("virtio_blk", "virtio_blk"),
            ("nvme", "nvme"),
        ] {
            fs::create_dir_all(drivers.join(driver)).unwrap();
            fs::create_dir_all(r.join("sys/module").join(module)).unwrap();
            symlink(
                r.join("sys/module").join(module),
                drivers.join(driver).join("module"),
            )
            .unwrap();
        }
        symlink(drivers.join("virtio-pci"), pci.join("driver")).unwrap();
        symlink(drivers.join("virtio_blk"), pci.join("virtio1/driver")).unwrap();
        let vda = r.join("sys/block/vda");
        write(&vda.join("size"), "4194304\n");
        write(&vda.join("queue/logical_block_size"), "512\n");
        write(&vda.join("queue/physical_block_size"), "512\n");
        write(&vda.join("serial"), "ROOT-DISK\n");
        write(&vda.join("dev"), "254:0\n");
        write(&vda.join("removable"), "0\n");
        write(&vda.join("ro"), "0\n");
        write(&vda.join("vda1/partition"), "1\n");
        write(&vda.join("vda1/start"), "2048\n");
        write(&vda.join("vda1/size"), "4096\n");
        write(&vda.join("vda1/dev"), "254:1\n");
        symlink(pci.join("virtio1"), vda.join("device")).unwrap();
        let ctrl = r.join("sys/devices/pci0000:00/0000:00:05.0/nvme/nvme0");
        write(&ctrl.join("serial"), "NV123   \n");
        write(&ctrl.join("model"), "QEMU NVMe Ctrl      \n");
        symlink(
            drivers.join("nvme"),
            r.join("sys/devices/pci0000:00/0000:00:05.0/driver"),
        )
        .unwrap();
        let nvme = r.join("sys/block/nvme0n1");
        write(&nvme.join("size"), "8388608\n");
        write(&nvme.join("queue/logical_block_size"), "4096\n");
        write(&nvme.join("wwid"), "eui.0011223344556677\n");
        symlink(&ctrl, nvme.join("device")).unwrap();
        fs::create_dir_all(r.join("sys/block/loop0")).unwrap();
        write(
            &r.join("proc/self/mountinfo"),
            "22 1 254:1 / /boot rw,relatime shared:1 - vfat /dev/vda1 rw\n",
        );
        fs::create_dir_all(r.join("sys/firmware/efi")).unwrap();
        root
    }

    #[test]
    fn reads_disks_identities_and_drivers() {
        let root = fake_root();
        let facts = Facts::read_from(root.path()).unwrap();
        assert_eq!(facts.firmware, Firmware::Uefi);
        let names: Vec<_> = facts.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["nvme0n1", "vda"]);
        let vda = &facts.disks[1];
        assert_eq!(vda.size_bytes, 2 << 30);
        assert_eq!(vda.by_id, ["virtio-ROOT-DISK"]);
        assert_eq!(vda.modules, ["virtio_blk", "virtio_pci"]);
        assert_eq!(vda.mounted_at, ["/boot"]);
        assert_eq!(vda.partitions[0].start_bytes, 1 << 20);
        let nvme = &facts.disks[0];
        assert_eq!(nvme.logical_sector, 4096);
        assert_eq!(nvme.serial.as_deref(), Some("NV123"));
        assert_eq!(
            nvme.by_id,
            ["nvme-QEMU_NVMe_Ctrl_NV123", "nvme-eui.0011223344556677"]
        );
        assert_eq!(nvme.modules, ["nvme"]);
    }

    #[test]
    fn filesystems_and_reports_are_recognised() {
        let mut head = vec![0u8; 65608];
        assert_eq!(sniff_filesystem(&head), None);
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(sniff_filesystem(&head), Some("ext4"));
        let mut btrfs = vec![0u8; 65608];
        btrfs[65600..].copy_from_slice(b"_BHRfS_M");
        assert_eq!(sniff_filesystem(&btrfs), Some("btrfs"));
        assert_eq!(sniff_filesystem(&btrfs[..1000]), None);

        let ok = br#"{"result":"success","hostname":"web1","nixos_kexec_version":"0.1.0","stopped_before":"install"}"#;
        let previous = parse_report(ok, "/dev/vda", "/dev/vda3").unwrap();
        assert_eq!(previous.hostname.as_deref(), Some("web1"));
        assert_eq!(previous.stopped_before.as_deref(), Some("install"));
        let text = previous.describe();
        assert!(
            text.contains(
                "/dev/vda holds a NixOS prepared (stopped before install) by nixos-kexec 0.1.0 for host web1"
            ),
            "{text}"
        );
        assert!(
            text.contains("/var/log/nixos-kexec/report.json on /dev/vda3"),
            "{text}"
        );
        assert!(parse_report(br#"{"result":"failure"}"#, "/dev/vda", "/dev/vda3").is_none());
        assert!(parse_report(b"not json", "/dev/vda", "/dev/vda3").is_none());
    }

    #[test]
    fn vpd_page_serial() {
        let dir = tempfile::tempdir().unwrap();
        let page = dir.path().join("vpd_pg80");
        fs::write(&page, b"\x00\x80\x00\x08QM00001 ").unwrap();
        assert_eq!(vpd_serial(&page).as_deref(), Some("QM00001"));
        fs::write(&page, b"\x00\x80\x00\x40short").unwrap();
        assert_eq!(vpd_serial(&page), None);
    }
}
