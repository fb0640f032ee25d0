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
    /// The World Wide Name of an ATA or SCSI disk (`0x5000c500...`), or the namespace id of an
    /// NVMe one (the kernel's `wwid`: `eui.<EUI-64 or NGUID>`, `uuid.<UUID>`, or
    /// `nvme.<vendor>-<serial>-<model>-<nsid>`), which tells namespaces and controllers that
    /// share a serial apart.
    pub wwn: Option<String>,
    /// The names udev (systemd 252, stock `60-persistent-storage.rules`) gives the disk under
    /// /dev/disk/by-id, derived without udev; the one to name the disk by comes first.
    pub by_id: Vec<String>,
    /// The disk's names under /dev/disk/by-path (udev's `path_id`): `ID_PATH` first, then the
    /// compatibility names udev adds (`ata-N`, `virtio-pci-...`).
    #[serde(default)]
    pub by_path: Vec<String>,
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

/// An earlier nixos-kexec run that finished on a disk: its report says `success` (also when it
/// stopped before `install` on purpose), or, on an encrypted disk, its LUKS2 header says so.
/// The installer finds and describes it, as it alone knows where and how it leaves them.
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
    /// How the guard knows, unless by report.json under /var/log/nixos-kexec of the
    /// partition's filesystem (absent then, so such plans serialise as they always have).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

/// Where an earlier install was seen, other than at the report's usual place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Evidence {
    /// report.json at `path` from the top level of the partition's btrfs (in a subvolume).
    Report { path: String },
    /// The finished run's marker in the partition's LUKS2 header, from `date` (UTC,
    /// YYYY-MM-DD); the report itself is inside, encrypted.
    LuksHeader { date: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub firmware: Firmware,
    pub ram_bytes: u64,
    pub kernel_release: String,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// Filled by the installer before it plans; empty elsewhere.
    #[serde(default)]
    pub previous_installs: Vec<PreviousInstall>,
    /// Architecture, virtualisation and CPU vendor, for the hardware configuration.
    #[serde(default)]
    pub machine: crate::machine::platform::Machine,
}

impl Disk {
    /// The path the installed system's config names this disk by (GRUB's device): the first
    /// by-id name, else the by-path name. Both exist in the installer (`devlinks` makes them)
    /// and on the installed system (its udev does). Without a by-id name, by-path beats
    /// `/dev/vdX` or `/dev/sdX`: kernel names follow probe order, which changes when a disk is
    /// added (a cloud volume attached at boot) or SCSI hosts probe in another order, and then
    /// `nixos-rebuild` would put GRUB on the wrong disk; by-path changes only when the disk
    /// moves to another slot or controller, which a rebuild should not survive silently anyway.
    pub fn stable_link(&self) -> Option<String> {
        match (self.by_id.first(), self.by_path.first()) {
            (Some(id), _) => Some(format!("/dev/disk/by-id/{id}")),
            (None, Some(path)) => Some(format!("/dev/disk/by-path/{path}")),
            (None, None) => None,
        }
    }
}

impl Facts {
    /// Reads the running system's facts: what [`Facts::read_from`] finds under `/`, and the
    /// running kernel's own numbers from sysinfo (/proc/meminfo and uname(2), which an initrd
    /// has as any system does).
    pub fn gather() -> Result<Facts> {
        let mut facts = Facts::read_from(Path::new("/"))?;
        let mut system = sysinfo::System::new();
        system.refresh_memory();
        facts.ram_bytes = system.total_memory();
        facts.kernel_release = sysinfo::System::kernel_version().unwrap_or_default();
        if let Some(arch) = sysinfo::System::cpu_arch() {
            facts.machine.arch = arch;
        }
        Ok(facts)
    }

    /// Reads facts from a root with `sys/` and `proc/` beneath it (`/` on a real system); RAM
    /// and the kernel release are left for [`Facts::gather`].
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
        prefer_unique_nvme_names(&mut disks);
        let firmware = if root.join("sys/firmware/efi").exists() {
            Firmware::Uefi
        } else {
            Firmware::Bios
        };
        Ok(Facts {
            firmware,
            ram_bytes: 0,
            kernel_release: String::new(),
            disks,
            nics: read_nics(&root.join("sys/class/net")),
            previous_installs: Vec::new(),
            machine: crate::machine::platform::Machine::read_from(root),
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
    let transport = transport_of(name, &device);
    let size_sectors = read_u64(&dir.join("size")).unwrap_or(0);
    let logical_sector = read_u64(&dir.join("queue/logical_block_size")).unwrap_or(512) as u32;
    let physical_sector =
        read_u64(&dir.join("queue/physical_block_size")).unwrap_or(logical_sector as u64) as u32;
    let identity = identity_of(dir, &device, transport);
    let serial = read_trimmed(&dir.join("serial"))
        .or_else(|| read_trimmed(&device.join("serial")))
        .or_else(|| vpd_serial(&device.join("vpd_pg80")));

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

    let by_path = path_id(dir).map(PathId::names).unwrap_or_default();
    Ok(Some(Disk {
        name: name.to_string(),
        dev_path: format!("/dev/{name}"),
        size_bytes: size_sectors * 512,
        logical_sector,
        physical_sector,
        transport,
        model: identity.model,
        serial,
        wwn: identity.wwn,
        by_id: identity.by_id,
        by_path,
        removable: read_u64(&dir.join("removable")) == Some(1),
        read_only: read_u64(&dir.join("ro")) == Some(1),
        partitions,
        holders,
        mounted_at,
        modules: modules_of(&device),
    }))
}

fn transport_of(name: &str, device: &Path) -> Transport {
    if name.starts_with("vd") {
        Transport::Virtio
    } else if name.starts_with("nvme") {
        Transport::Nvme
    } else if name.starts_with("mmcblk") {
        Transport::Mmc
    } else if name.starts_with("sd") {
        // udev's rule: SCSI vendor "ATA" means libata, and ata_id names the disk.
        match read_trimmed(&device.join("vendor")).as_deref() {
            Some("ATA") => Transport::Ata,
            _ => Transport::Scsi,
        }
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

/// What udev's rules, `ata_id` and `scsi_id` find out about a disk.
#[derive(Debug, Default, PartialEq, Eq)]
struct Identity {
    model: Option<String>,
    wwn: Option<String>,
    by_id: Vec<String>,
}

/// The by-id names and model of a disk, as systemd 252's `60-persistent-storage.rules` make
/// them, from sysfs alone (the VPD pages the kernel caches stand in for the SG_IO inquiries
/// of `ata_id` and `scsi_id`).
fn identity_of(dir: &Path, device: &Path, transport: Transport) -> Identity {
    match transport {
        Transport::Virtio => {
            let by_id = attr(dir, "serial")
                .map(|serial| vec![format!("virtio-{}", link_part(&serial))])
                .unwrap_or_default();
            Identity {
                model: None,
                wwn: None,
                by_id,
            }
        }
        Transport::Nvme => nvme_identity(dir, device),
        Transport::Ata => match fs::read(device.join("vpd_pg89")) {
            Ok(page) => ata_identity(&page),
            // Without IDENTIFY data ata_id gives up and scsi_id names the disk.
            Err(_) => scsi_identity(device),
        },
        Transport::Scsi => scsi_identity(device),
        Transport::Mmc => {
            let name = attr(device, "name");
            let serial = attr(device, "serial");
            let by_id = match (&name, serial) {
                (Some(name), Some(serial)) => {
                    vec![format!("mmc-{}_{}", link_part(name), link_part(&serial))]
                }
                _ => Vec::new(),
            };
            Identity {
                model: name,
                wwn: None,
                by_id,
            }
        }
        Transport::Other => Identity::default(),
    }
}

/// A sysfs attribute as udev's `$attr{}` reads it: trailing whitespace dropped, characters
/// outside its set replaced. `None` when missing or empty (udev's `=="?*"` fails then).
fn attr(dir: &Path, name: &str) -> Option<String> {
    let bytes = fs::read(dir.join(name)).ok()?;
    let text = replace_chars(&bytes, " $%?,/");
    let text = text.trim_end();
    (!text.is_empty()).then(|| text.to_string())
}

/// udev's `udev_replace_chars`: keeps ASCII letters and digits, `#+-.:=@_`, `\x` escapes,
/// valid multi-byte UTF-8 and the characters in `allow`; whitespace becomes a space when
/// space is allowed; anything else becomes `_`.
fn replace_chars(bytes: &[u8], allow: &str) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_alphanumeric()
            || b"#+-.:=@_".contains(&b)
            || (b.is_ascii() && allow.contains(b as char))
        {
            out.push(b as char);
            i += 1;
            continue;
        }
        if b == b'\\' && bytes.get(i + 1) == Some(&b'x') {
            out.push_str("\\x");
            i += 2;
            continue;
        }
        if let Some(len) = utf8_sequence_len(&bytes[i..]) {
            out.push_str(&String::from_utf8_lossy(&bytes[i..i + len]));
            i += len;
            continue;
        }
        if b.is_ascii_whitespace() && allow.contains(' ') {
            out.push(' ');
        } else {
            out.push('_');
        }
        i += 1;
    }
    out
}

/// The length of the valid multi-byte UTF-8 sequence at the start of `bytes`, if there is one.
fn utf8_sequence_len(bytes: &[u8]) -> Option<usize> {
    let len = match bytes.first()? {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return None,
    };
    std::str::from_utf8(bytes.get(..len)?).ok().map(|_| len)
}

/// udev's `udev_replace_whitespace`: leading and trailing whitespace dropped, every run of
/// whitespace inside becomes one `_`.
fn replace_whitespace(text: &str) -> String {
    text.split(|c: char| c.is_ascii_whitespace())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join("_")
}

/// A value as it ends up inside a SYMLINK name: whitespace runs as `_`, odd characters as `_`.
fn link_part(text: &str) -> String {
    replace_chars(replace_whitespace(text).as_bytes(), "")
}

/// NVMe: `nvme-<wwid>`, then `nvme-<model>_<serial>` and `nvme-<model>_<serial>_<nsid>`, the
/// model and serial from the controller (or, with native multipath, the subsystem).
fn nvme_identity(dir: &Path, device: &Path) -> Identity {
    let model = attr(device, "model");
    let serial = attr(device, "serial");
    let nsid = attr(dir, "nsid");
    let wwid = attr(dir, "wwid");
    let mut by_id = Vec::new();
    if let (Some(model), Some(serial)) = (&model, &serial) {
        let id_serial = format!("{model}_{serial}");
        // The name without the namespace comes first: it is what people type. When two
        // namespaces of one controller share it, `prefer_unique_nvme_names` swaps the order.
        by_id.push(format!("nvme-{}", link_part(&id_serial)));
        if let Some(nsid) = &nsid {
            by_id.push(format!("nvme-{}", link_part(&format!("{id_serial}_{nsid}"))));
        }
    }
    if let Some(wwid) = &wwid {
        by_id.push(format!("nvme-{}", link_part(wwid)));
    }
    Identity {
        model,
        wwn: wwid,
        by_id,
    }
}

/// The obsolete `nvme-<model>_<serial>` link belongs to whichever namespace udev saw last when
/// a controller has several; then the plan must name the disk by its namespace-specific link.
fn prefer_unique_nvme_names(disks: &mut [Disk]) {
    let firsts: Vec<Option<String>> = disks
        .iter()
        .map(|d| {
            (d.transport == Transport::Nvme)
                .then(|| d.by_id.first().cloned())
                .flatten()
        })
        .collect();
    for (i, disk) in disks.iter_mut().enumerate() {
        let Some(Some(first)) = firsts.get(i) else {
            continue;
        };
        let shared = firsts.iter().filter(|f| f.as_ref() == Some(first)).count() > 1;
        if shared && disk.by_id.len() > 1 && disk.by_id[1].starts_with(first.as_str()) {
            disk.by_id.swap(0, 1);
        }
    }
}

/// SATA behind libata: ata_id's names from the ATA IDENTIFY data, which libata's SCSI
/// translation exposes as VPD page 0x89 (the 512 bytes start at offset 60 of the page).
fn ata_identity(page: &[u8]) -> Identity {
    let Some(identify) = page.get(60..60 + 512) else {
        return Identity::default();
    };
    let model = ata_string(identify, 27, 40);
    let serial = ata_string(identify, 10, 20);
    let id_serial = if serial.is_empty() {
        model.clone()
    } else {
        format!("{model}_{serial}")
    };
    let word = |n: usize| u16::from_le_bytes([identify[2 * n], identify[2 * n + 1]]) as u64;
    // Words 108-111: the WWN, valid when its NAA nibble says IEEE registered (5).
    let wwn = ((word(108) & 0xf000) == 0x5000).then(|| {
        format!(
            "0x{:x}",
            word(108) << 48 | word(109) << 32 | word(110) << 16 | word(111)
        )
    });
    let mut by_id = Vec::new();
    if !id_serial.is_empty() {
        by_id.push(format!("ata-{id_serial}"));
    }
    if let Some(wwn) = &wwn {
        by_id.push(format!("wwn-{wwn}"));
    }
    Identity {
        model: (!model.is_empty()).then_some(model),
        wwn,
        by_id,
    }
}

/// An ATA IDENTIFY string: `words` 16-bit words from `start`, each with its two bytes swapped,
/// cleaned as ata_id does.
fn ata_string(identify: &[u8], start: usize, len: usize) -> String {
    let mut bytes = Vec::with_capacity(len);
    for pair in identify[2 * start..2 * start + len].chunks(2) {
        bytes.extend([pair[1], pair[0]]);
    }
    let text: String = bytes.iter().map(|&b| b as char).collect();
    // ata_id stops at a NUL like C strings do.
    let text = text.split('\0').next().unwrap_or_default();
    replace_chars(replace_whitespace(text).as_bytes(), "")
}

/// SCSI (SAS, virtio-scsi, USB-less): scsi_id's `ID_SERIAL` from VPD page 0x83 designators in
/// its order of preference, else page 0x80; plus the NAA designator as WWN.
fn scsi_identity(device: &Path) -> Identity {
    let model = attr(device, "model");
    // scsi_id prepends the inquiry's vendor (8 bytes) and product (16 bytes) as they are.
    let raw = |name: &str, len: usize| -> Option<Vec<u8>> {
        let mut bytes = fs::read(device.join(name)).ok()?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        (bytes.len() == len).then_some(bytes)
    };
    let vendor_product = match (raw("vendor", 8), raw("model", 16)) {
        (Some(mut vendor), Some(product)) => {
            vendor.extend(product);
            Some(vendor)
        }
        _ => None,
    };
    let supported = fs::read(device.join("vpd_pg0")).unwrap_or_default();
    let lists = |page: u8| {
        let len = supported.get(3).copied().unwrap_or(0) as usize;
        supported
            .get(4..4 + len)
            .is_some_and(|pages| pages.contains(&page))
    };
    let mut found = None;
    if lists(0x83) {
        if let Ok(page) = fs::read(device.join("vpd_pg83")) {
            found = scsi_page83(&page, vendor_product.as_deref());
        }
    }
    if found.is_none() && lists(0x80) {
        if let (Ok(page), Some(vp)) = (fs::read(device.join("vpd_pg80")), &vendor_product) {
            if let Some(len) = page.get(3).map(|&l| l as usize) {
                if page.get(1) == Some(&0x80) {
                    if let Some(serial) = page.get(4..4 + len) {
                        let mut id = vec![b'S'];
                        id.extend(vp);
                        id.extend(serial);
                        found = Some((id, None));
                    }
                }
            }
        }
    }
    let mut by_id = Vec::new();
    let mut wwn = None;
    if let Some((id, naa)) = found {
        let id_serial = replace_chars(replace_whitespace(&String::from_utf8_lossy(&id)).as_bytes(), "");
        if !id_serial.is_empty() {
            by_id.push(format!("scsi-{id_serial}"));
        }
        if let Some(naa) = naa {
            by_id.push(format!("wwn-0x{naa}"));
            wwn = Some(format!("0x{}", &naa[..naa.len().min(16)]));
        }
    }
    Identity { model, wwn, by_id }
}

/// scsi_id's choice among the designators of VPD page 0x83: (the raw `ID_SERIAL`, the NAA
/// identifier in hex when that is what was chosen).
fn scsi_page83(page: &[u8], vendor_product: Option<&[u8]>) -> Option<(Vec<u8>, Option<String>)> {
    if page.get(1) != Some(&0x83) {
        return None;
    }
    // A SCSI-2 style page (EMC Symmetrix): a bare NAA after the header.
    if page.get(6).is_some_and(|&b| b != 0) {
        let len = *page.get(3)? as usize;
        let mut id = b"3".to_vec();
        id.extend(hex(page.get(4..4 + len)?).bytes());
        return Some((id, None));
    }
    const BINARY: u8 = 1;
    const ASCII: u8 = 2;
    const T10: u8 = 1;
    const EUI64: u8 = 2;
    const NAA: u8 = 3;
    const VENDOR: u8 = 0;
    const ANY: Option<u8> = None;
    // (designator type, NAA kind, code set) in scsi_id's order of preference.
    let preference: [(u8, Option<u8>, u8); 12] = [
        (NAA, Some(6), BINARY),
        (NAA, Some(6), ASCII),
        (NAA, Some(5), BINARY),
        (NAA, Some(5), ASCII),
        (NAA, ANY, BINARY),
        (NAA, ANY, ASCII),
        (EUI64, ANY, BINARY),
        (EUI64, ANY, ASCII),
        (T10, ANY, BINARY),
        (T10, ANY, ASCII),
        (VENDOR, ANY, BINARY),
        (VENDOR, ANY, ASCII),
    ];
    let total = 4 + ((*page.get(2)? as usize) << 8 | *page.get(3)? as usize);
    let mut descriptors = Vec::new();
    let mut at = 4;
    while at + 4 <= total.min(page.len()) {
        let len = page[at + 3] as usize;
        let Some(descriptor) = page.get(at..at + 4 + len) else {
            break;
        };
        descriptors.push(descriptor);
        at += 4 + len;
    }
    for (kind, naa_kind, code_set) in preference {
        for d in &descriptors {
            // Only designators of the logical unit itself.
            if d[1] & 0x30 != 0 || d[1] & 0x0f != kind || d[0] & 0x0f != code_set {
                continue;
            }
            let body = &d[4..];
            if naa_kind.is_some_and(|n| body.first().map(|b| b >> 4) != Some(n)) {
                continue;
            }
            let mut id = vec![b"0123456789abcdef"[kind as usize]];
            if kind == VENDOR {
                match vendor_product {
                    Some(vp) => id.extend(vp),
                    None => continue,
                }
            }
            let value = if code_set == ASCII {
                body.to_vec()
            } else {
                hex(body).into_bytes()
            };
            id.extend(&value);
            let naa =
                (kind == NAA).then(|| String::from_utf8_lossy(&value[..value.len().min(32)]).into_owned());
            return Some((id, naa));
        }
    }
    None
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// udev's `path_id` result for a block device: `ID_PATH` and `ID_PATH_ATA_COMPAT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathId {
    pub path: String,
    pub ata_compat: Option<String>,
    pub virtio: bool,
}

impl PathId {
    /// The by-path names as the rules make them from the builtin's result.
    fn names(self) -> Vec<String> {
        let mut names = vec![self.path.clone()];
        names.extend(self.ata_compat);
        // The deprecated virtio-blk names the rules still add.
        if self.virtio && self.path.starts_with("pci-") {
            names.push(format!("virtio-{}", self.path));
        }
        names
    }
}

/// The subsystem of a sysfs device directory (the name its `subsystem` link points to).
fn subsystem(dir: &Path) -> Option<String> {
    let link = fs::read_link(dir.join("subsystem")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

fn devtype(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join("uevent")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("DEVTYPE="))
        .map(str::to_string)
}

/// udev's `path_id` builtin for the buses a server has: PCI, virtio, NVMe (also behind native
/// multipath), SCSI (ATA ports and plain hosts), platform and ACPI. Others (USB, SAS, FC,
/// iSCSI, Hyper-V) give `None`: no by-path name rather than a wrong one.
pub fn path_id(block_dir: &Path) -> Option<PathId> {
    let block_dir = fs::canonicalize(block_dir).ok()?;
    let name = block_dir.file_name()?.to_string_lossy().into_owned();
    // The directory holding `devices/` and `class/` (`/sys`, or a test's fake tree).
    let sys_root = block_dir
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "devices"))?
        .parent()?
        .to_path_buf();
    let mut parts: Vec<String> = Vec::new();
    let mut compat: Option<Vec<String>> = None;
    let mut supported_transport = false;
    let mut supported_parent = false;
    let mut virtio = false;
    let mut current = Some(block_dir.clone());
    while let Some(dir) = current.take() {
        let sysname = dir.file_name()?.to_string_lossy().into_owned();
        let mut next = dir.clone();
        match subsystem(&dir).as_deref() {
            Some("scsi") if devtype(&dir).as_deref() == Some("scsi_device") => {
                supported_transport = true;
                let numbers: Vec<u32> = sysname.split(':').filter_map(|n| n.parse().ok()).collect();
                let [host, bus, target, lun] = numbers[..] else {
                    return None;
                };
                let text = dir.to_string_lossy();
                if ["/rport-", "/end_device-", "/session", "/vmbus_", "/VMBUS"]
                    .iter()
                    .any(|t| text.contains(t))
                {
                    return None;
                }
                if text.contains("/ata") {
                    // The ATA port: the parent of the SCSI host, e.g. `ata1`.
                    let host_dir = dir.ancestors().find(|a| {
                        a.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("host"))
                    })?;
                    let port = host_dir.parent()?.file_name()?.to_string_lossy().into_owned();
                    let port_no = read_trimmed(&sys_root.join("class/ata_port").join(&port).join("port_no"))?;
                    if bus != 0 {
                        parts.push(format!("ata-{port_no}.{bus}.0"));
                    } else {
                        parts.push(format!("ata-{port_no}.{target}"));
                    }
                    compat = Some(vec![format!("ata-{port_no}")]);
                } else {
                    // Hosts are numbered globally; udev rebases on the lowest host number
                    // under the same parent.
                    let host_dir = dir.ancestors().find(|a| {
                        a.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("host"))
                    })?;
                    let parent = host_dir.parent()?;
                    let base = list_dir(parent)
                        .ok()?
                        .iter()
                        .filter_map(|n| n.strip_prefix("host")?.parse::<u32>().ok())
                        .min()?;
                    parts.push(format!("scsi-{}:{bus}:{target}:{lun}", host - base));
                    next = host_dir.to_path_buf();
                }
            }
            Some("virtio") => {
                supported_transport = true;
                virtio = name.starts_with("vd");
                next = skip_subsystem(&dir, "virtio");
            }
            Some("pci") => {
                parts.push(format!("pci-{sysname}"));
                if let Some(c) = compat.as_mut() {
                    c.push(format!("pci-{sysname}"));
                }
                supported_parent = true;
                next = skip_subsystem(&dir, "pci");
            }
            Some(bus @ ("platform" | "acpi" | "xen")) => {
                parts.push(format!("{bus}-{sysname}"));
                if let Some(c) = compat.as_mut() {
                    c.push(format!("{bus}-{sysname}"));
                }
                supported_parent = true;
                supported_transport |= bus == "platform";
                next = skip_subsystem(&dir, bus);
            }
            Some(sub @ ("nvme" | "nvme-subsystem")) => {
                if let Some(nsid) = read_trimmed(&block_dir.join("nsid")) {
                    parts.push(format!("nvme-{nsid}"));
                    if let Some(c) = compat.as_mut() {
                        c.push(format!("nvme-{nsid}"));
                    }
                    let mut ctrl = dir.clone();
                    if sub == "nvme-subsystem" {
                        // Native multipath: the namespace hangs off the subsystem; the path is
                        // that of the controller with the same number (`nvme0n1` -> `nvme0`).
                        let digits: String = name[4..].chars().take_while(char::is_ascii_digit).collect();
                        let real =
                            fs::canonicalize(sys_root.join("class/nvme").join(format!("nvme{digits}")))
                                .ok()?;
                        if real.to_string_lossy().contains("/devices/virtual/") {
                            return None;
                        }
                        ctrl = real;
                    }
                    next = skip_subsystem(&ctrl, "nvme");
                    supported_parent = true;
                    supported_transport = true;
                }
            }
            Some(
                "usb" | "cciss" | "bcma" | "serio" | "amba" | "scm" | "ccw" | "ccwgroup" | "ap" | "iucv"
                | "spi",
            ) => {
                return None;
            }
            _ => {}
        }
        let parent = next.parent()?;
        if parent.file_name().is_none_or(|n| n == "devices") || parent.parent().is_none() {
            break;
        }
        current = Some(parent.to_path_buf());
    }
    if parts.is_empty() || !supported_parent || !supported_transport {
        return None;
    }
    let join = |mut p: Vec<String>| {
        p.reverse();
        p.join("-")
    };
    Some(PathId {
        path: join(parts.clone()),
        ata_compat: compat.map(|c| {
            // The compat path shares everything above the ATA port with ID_PATH.
            join(c)
        }),
        virtio,
    })
}

/// udev's `skip_subsystem`: the topmost of the consecutive ancestors in `subsystem`.
fn skip_subsystem(dir: &Path, wanted: &str) -> PathBuf {
    let mut last = dir.to_path_buf();
    let mut current = dir.parent();
    while let Some(parent) = current {
        if subsystem(parent).as_deref() != Some(wanted) {
            break;
        }
        last = parent.to_path_buf();
        current = parent.parent();
    }
    last
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
        assert_eq!(nvme.wwn.as_deref(), Some("eui.0011223344556677"));
        assert_eq!(nvme.modules, ["nvme"]);
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

    fn unhex(text: &str) -> Vec<u8> {
        let text = text.trim();
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A SCSI disk's device directory with the VPD pages QEMU gave a real VM.
    fn qemu_scsi_device(root: &Path, name: &str, vendor: &str) -> PathBuf {
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qemu-7.2-vpd");
        for page in ["0", "80", "83", "89"] {
            if let Ok(text) = fs::read_to_string(fixtures.join(format!("{name}.pg{page}.hex"))) {
                fs::write(dir.join(format!("vpd_pg{page}")), unhex(&text)).unwrap();
            }
        }
        fs::write(dir.join("vendor"), format!("{vendor}\n")).unwrap();
        fs::write(dir.join("model"), "QEMU HARDDISK   \n").unwrap();
        dir
    }

    #[test]
    fn by_id_from_qemu_vpd_pages_as_udev_252_names_them() {
        let root = tempfile::tempdir().unwrap();
        let names = |name: &str, vendor: &str, transport: Transport| {
            let device = qemu_scsi_device(root.path(), name, vendor);
            identity_of(&device, &device, transport)
        };
        let sda = names("sda", "QEMU    ", Transport::Scsi);
        assert_eq!(sda.by_id, ["scsi-0QEMU_QEMU_HARDDISK_SCSI-SER3"]);
        assert_eq!(sda.wwn, None);
        let sdb = names("sdb", "QEMU    ", Transport::Scsi);
        assert_eq!(sdb.by_id, ["scsi-0QEMU_QEMU_HARDDISK_f"]);
        let sdc = names("sdc", "QEMU    ", Transport::Scsi);
        assert_eq!(sdc.by_id, ["scsi-35000c50015ea71ac", "wwn-0x5000c50015ea71ac"]);
        assert_eq!(sdc.wwn.as_deref(), Some("0x5000c50015ea71ac"));
        let sdd = names("sdd", "ATA     ", Transport::Ata);
        assert_eq!(sdd.by_id, ["ata-QEMU_HARDDISK_SATA-SER2"]);
        assert_eq!(sdd.model.as_deref(), Some("QEMU_HARDDISK"));
        let sde = names("sde", "ATA     ", Transport::Ata);
        assert_eq!(sde.by_id, ["ata-QEMU_HARDDISK_QM00015", "wwn-0x5000c500a1b2c3d4"]);
        // Without page 0x89 ata_id has nothing; scsi_id then names the disk from libata's
        // T10 vendor designator.
        fs::remove_file(root.path().join("sdd/vpd_pg89")).unwrap();
        let fallback = identity_of(&root.path().join("sdd"), &root.path().join("sdd"), Transport::Ata);
        assert_eq!(fallback.by_id, ["scsi-1ATA_QEMU_HARDDISK_SATA-SER2"]);
        // Page 0x80 alone: "S" + vendor + product + serial.
        let only80 = qemu_scsi_device(root.path(), "sda", "QEMU    ");
        fs::write(only80.join("vpd_pg0"), [0, 0, 0, 1, 0x80]).unwrap();
        assert_eq!(
            identity_of(&only80, &only80, Transport::Scsi).by_id,
            ["scsi-SQEMU_QEMU_HARDDISK_SCSI-SER3"]
        );
    }

    #[test]
    fn scsi_designator_preference() {
        // EUI-64 beats T10, NAA beats EUI-64, NAA 6 (with its extension) beats NAA 5.
        let eui = [0x01, 0x02, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8];
        let t10 = [0x02, 0x01, 0x00, 0x04, b'A', b'B', b' ', b'C'];
        let naa5 = [0x01, 0x03, 0x00, 0x08, 0x50, 0, 0, 0, 0, 0, 0, 1];
        let mut naa6 = vec![0x01, 0x03, 0x00, 0x10, 0x60];
        naa6.extend([0xab; 15]);
        let page = |descriptors: &[&[u8]]| {
            let body: Vec<u8> = descriptors.concat();
            let mut page = vec![0, 0x83, 0, body.len() as u8];
            page.extend(body);
            page
        };
        let id = |p: Vec<u8>| {
            let (id, naa) = scsi_page83(&p, Some(b"VENDOR  PRODUCT         ")).unwrap();
            (String::from_utf8(id).unwrap(), naa)
        };
        assert_eq!(id(page(&[&t10, &eui])).0, "20102030405060708");
        assert_eq!(id(page(&[&t10])).0, "1AB C");
        let (naa, wwn) = id(page(&[&eui, &naa5, &naa6]));
        assert_eq!(naa, format!("360{}", "ab".repeat(15)));
        assert_eq!(wwn.unwrap().len(), 32);
        assert_eq!(id(page(&[&eui, &naa5])).1.as_deref(), Some("5000000000000001"));
    }

    #[test]
    fn udev_character_rules() {
        assert_eq!(link_part("  QEMU NVMe   Ctrl  "), "QEMU_NVMe_Ctrl");
        assert_eq!(link_part("a/b*c"), "a_b_c");
        assert_eq!(link_part("Dätä"), "Dätä");
        assert_eq!(replace_chars(b"x\xffy", ""), "x_y");
    }

    #[test]
    fn path_id_for_pci_virtio_scsi_ata_and_nvme() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let dev = |path: &str, subsystem: Option<&str>, devtype: Option<&str>| {
            let dir = r.join("sys/devices").join(path);
            fs::create_dir_all(&dir).unwrap();
            if let Some(s) = subsystem {
                let class = r.join("sys/bus").join(s);
                fs::create_dir_all(&class).unwrap();
                symlink(&class, dir.join("subsystem")).unwrap();
            }
            if let Some(t) = devtype {
                fs::write(dir.join("uevent"), format!("DEVTYPE={t}\n")).unwrap();
            }
            dir
        };
        dev("pci0000:00", None, None);
        dev("pci0000:00/0000:00:04.0", Some("pci"), None);
        dev("pci0000:00/0000:00:04.0/virtio1", Some("virtio"), None);
        let vda = dev(
            "pci0000:00/0000:00:04.0/virtio1/block/vda",
            Some("block"),
            Some("disk"),
        );
        let id = path_id(&vda).unwrap();
        assert_eq!(
            id.clone().names(),
            ["pci-0000:00:04.0", "virtio-pci-0000:00:04.0"]
        );

        let scsi = "pci0000:00/0000:00:03.0/virtio0/host2/target2:0:1/2:0:1:0";
        dev("pci0000:00/0000:00:03.0", Some("pci"), None);
        dev("pci0000:00/0000:00:03.0/virtio0", Some("virtio"), None);
        dev(
            "pci0000:00/0000:00:03.0/virtio0/host2",
            Some("scsi"),
            Some("scsi_host"),
        );
        dev(
            "pci0000:00/0000:00:03.0/virtio0/host3",
            Some("scsi"),
            Some("scsi_host"),
        );
        dev(scsi, Some("scsi"), Some("scsi_device"));
        let sda = dev(&format!("{scsi}/block/sda"), Some("block"), Some("disk"));
        assert_eq!(path_id(&sda).unwrap().names(), ["pci-0000:00:03.0-scsi-0:0:1:0"]);

        let ata = "pci0000:00/0000:00:02.0/ata3/host4/target4:0:0/4:0:0:0";
        dev("pci0000:00/0000:00:02.0", Some("pci"), None);
        dev("pci0000:00/0000:00:02.0/ata3", None, None);
        dev(
            "pci0000:00/0000:00:02.0/ata3/host4",
            Some("scsi"),
            Some("scsi_host"),
        );
        dev(ata, Some("scsi"), Some("scsi_device"));
        write(&r.join("sys/class/ata_port/ata3/port_no"), "3\n");
        let sdb = dev(&format!("{ata}/block/sdb"), Some("block"), Some("disk"));
        assert_eq!(
            path_id(&sdb).unwrap().names(),
            ["pci-0000:00:02.0-ata-3.0", "pci-0000:00:02.0-ata-3"]
        );

        dev("pci0000:00/0000:00:06.0", Some("pci"), None);
        dev("pci0000:00/0000:00:06.0/nvme/nvme0", Some("nvme"), None);
        let nvme = dev(
            "pci0000:00/0000:00:06.0/nvme/nvme0/nvme0n1",
            Some("block"),
            Some("disk"),
        );
        write(&nvme.join("nsid"), "1\n");
        assert_eq!(path_id(&nvme).unwrap().names(), ["pci-0000:00:06.0-nvme-1"]);

        // Native multipath: the namespace sits under the subsystem; the path is the controller's.
        dev(
            "virtual/nvme-subsystem/nvme-subsys1",
            Some("nvme-subsystem"),
            None,
        );
        let head = dev(
            "virtual/nvme-subsystem/nvme-subsys1/nvme1n1",
            Some("block"),
            Some("disk"),
        );
        write(&head.join("nsid"), "2\n");
        dev("pci0000:00/0000:00:07.0", Some("pci"), None);
        let ctrl = dev("pci0000:00/0000:00:07.0/nvme/nvme1", Some("nvme"), None);
        fs::create_dir_all(r.join("sys/class/nvme")).unwrap();
        symlink(&ctrl, r.join("sys/class/nvme/nvme1")).unwrap();
        assert_eq!(path_id(&head).unwrap().names(), ["pci-0000:00:07.0-nvme-2"]);

        // A device-mapper or loop device has no transport: no by-path name.
        let loop0 = dev("virtual/block/loop0", Some("block"), Some("disk"));
        assert_eq!(path_id(&loop0), None);
    }
}
