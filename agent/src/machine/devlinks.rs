//! The /dev/disk/{by-id,by-uuid,by-partuuid,by-partlabel,by-label,by-path,by-diskseq} links a
//! booted system's udev makes, made without udev.
//!
//! The installer has no udev, yet the generated config names disks by these paths and
//! nixos-install's chroot (which bind-mounts our /dev) runs grub-install on them. The names
//! follow systemd 252's stock `60-persistent-storage.rules`: by-id and by-path come from
//! [`crate::machine::facts`], filesystem UUIDs and labels from the superblocks (what udev's blkid
//! builtin reports), partition UUIDs and names from the partition table.

use crate::console;
use crate::machine::facts::{read_trimmed, Facts};
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::Path;

/// The directories under /dev/disk this module owns.
const DIRS: [&str; 7] = [
    "by-id",
    "by-uuid",
    "by-partuuid",
    "by-partlabel",
    "by-label",
    "by-path",
    "by-diskseq",
];

/// One link: `/dev/disk/<dir>/<name>` -> `../../<device>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Link {
    pub dir: &'static str,
    pub name: String,
    pub device: String,
}

impl Link {
    /// `by-id/virtio-X -> ../../vda`, the form `devlinks --print` shows.
    pub fn describe(&self) -> String {
        format!("{}/{} -> ../../{}", self.dir, self.name, self.device)
    }
}

/// Kernel names 60-persistent-storage.rules handles (its `KERNEL!=` filter); others get no
/// links.
fn handled_by_udev(name: &str) -> bool {
    const PREFIXES: [&str; 15] = [
        "mmcblk", "msblk", "mspblk", "nvme", "sd", "sr", "vd", "xvd", "bcache", "cciss", "dasd", "ubd",
        "scm", "pmem", "nbd",
    ];
    // eMMC boot partitions get only by-path-bootN links in udev; we leave them alone.
    PREFIXES.iter().any(|p| name.starts_with(p)) && !name.contains("boot")
}

/// The links udev would make for the disks in `facts`, reading sysfs and device nodes under
/// `root` (`/` in the installer). Sorted; a name two devices claim goes to the first.
pub fn links(root: &Path, facts: &Facts) -> Vec<Link> {
    let mut out = Vec::new();
    for disk in &facts.disks {
        if !handled_by_udev(&disk.name) {
            continue;
        }
        let sys = root.join("sys/block").join(&disk.name);
        let node = root.join("dev").join(&disk.name);
        let mut add = |dir: &'static str, name: String, device: &str| {
            out.push(Link {
                dir,
                name,
                device: device.to_string(),
            })
        };
        for id in &disk.by_id {
            add("by-id", id.clone(), &disk.name);
        }
        for path in &disk.by_path {
            add("by-path", path.clone(), &disk.name);
        }
        if let Some(seq) = read_trimmed(&sys.join("diskseq")) {
            add("by-diskseq", seq, &disk.name);
        }
        let head = read_head(&node);
        // blkid ignores a filesystem signature on a disk whose partitions cover it; a disk
        // with partitions gets its links through them.
        if disk.partitions.is_empty() {
            if let Some(fs) = probe_filesystem(&head) {
                fs_links(&fs, &disk.name, &mut add);
            }
        }
        let sector = read_trimmed(&sys.join("queue/logical_block_size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(512);
        let table = read_table(&node, sector);
        for part in &disk.partitions {
            let part_sys = sys.join(&part.name);
            // udev skips partitions that span the whole disk.
            if part_sys.join("whole_disk").exists() {
                continue;
            }
            let Some(number) = read_trimmed(&part_sys.join("partition")) else {
                continue;
            };
            for id in &disk.by_id {
                add("by-id", format!("{id}-part{number}"), &part.name);
            }
            for path in &disk.by_path {
                add("by-path", format!("{path}-part{number}"), &part.name);
            }
            if let (Some(table), Ok(n)) = (&table, number.parse::<u32>()) {
                if let Some(uuid) = table.entry_uuid(n) {
                    add("by-partuuid", uuid, &part.name);
                }
                if let Some(label) = table.entry_name(n) {
                    add("by-partlabel", label, &part.name);
                }
            }
            if let Some(fs) = probe_filesystem(&read_head(&root.join("dev").join(&part.name))) {
                fs_links(&fs, &part.name, &mut add);
            }
        }
    }
    // The first claim wins, as when udev's link priorities are equal and the first device
    // keeps the link.
    let mut seen = BTreeSet::new();
    out.retain(|l| seen.insert((l.dir, l.name.clone())));
    out.sort();
    out
}

fn fs_links(fs: &Filesystem, device: &str, add: &mut impl FnMut(&'static str, String, &str)) {
    if let Some(uuid) = &fs.uuid {
        add("by-uuid", blkid_encode(uuid.as_bytes()), device);
    }
    if let Some(label) = &fs.label {
        add("by-label", blkid_encode(label), device);
    }
}

/// Makes `dev_disk` (`/dev/disk`) hold exactly `links`: stale links in our directories go
/// (a wiped partition's UUID must not point at the new one), existing right ones stay.
pub fn apply(dev_disk: &Path, links: &[Link]) -> Result<()> {
    let mut wanted: BTreeMap<&str, BTreeMap<&str, String>> = BTreeMap::new();
    for link in links {
        wanted
            .entry(link.dir)
            .or_default()
            .insert(&link.name, format!("../../{}", link.device));
    }
    for dir in DIRS {
        let path = dev_disk.join(dir);
        let want = wanted.remove(dir).unwrap_or_default();
        if want.is_empty() && !path.exists() {
            continue;
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        for entry in fs::read_dir(&path).with_context(|| format!("listing {}", path.display()))? {
            let entry = entry.with_context(|| format!("listing {}", path.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let current = fs::read_link(entry.path()).ok();
            let keep = match (want.get(name.as_str()), &current) {
                (Some(target), Some(current)) => current == Path::new(target),
                _ => false,
            };
            if !keep && current.is_some() {
                fs::remove_file(entry.path())
                    .with_context(|| format!("removing the stale link {}", entry.path().display()))?;
            }
        }
        for (name, target) in want {
            let link = path.join(name);
            if fs::symlink_metadata(&link).is_ok() {
                continue;
            }
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("linking {} to {target}", link.display()))?;
        }
    }
    Ok(())
}

/// Creates or refreshes /dev/disk from the running system and says so on the console. Leaves
/// /dev/disk alone when udev runs here (it owns the links then).
pub fn refresh() -> Result<usize> {
    if Path::new("/run/udev/control").exists() {
        console::line("devices: udev is running; /dev/disk is its business");
        return Ok(0);
    }
    let facts = Facts::read_from(Path::new("/")).context("reading the disks for /dev/disk")?;
    let links = links(Path::new("/"), &facts);
    apply(Path::new("/dev/disk"), &links)?;
    console::line(&format!("devices: {} links under /dev/disk", links.len()));
    Ok(links.len())
}

/// The links for this system, one `dir/name -> ../../device` per line, sorted.
pub fn print_lines() -> Result<Vec<String>> {
    let facts = Facts::read_from(Path::new("/")).context("reading the disks")?;
    Ok(links(Path::new("/"), &facts).iter().map(Link::describe).collect())
}

/// What udev's blkid builtin reports for a device that holds a filesystem, swap or LUKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Filesystem {
    /// blkid's TYPE: `ext4`, `btrfs`, `vfat`, `swap`, `crypto_LUKS`.
    pub(crate) kind: &'static str,
    uuid: Option<String>,
    label: Option<Vec<u8>>,
}

/// The first 70 000 bytes of a device (the btrfs superblock ends below that), or what there is.
fn read_head(path: &Path) -> Vec<u8> {
    let mut head = Vec::new();
    if let Ok(file) = fs::File::open(path) {
        let _ = file.take(70_000).read_to_end(&mut head);
    }
    head
}

fn uuid_text(bytes: &[u8]) -> Option<String> {
    if bytes.len() != 16 || bytes.iter().all(|&b| b == 0) {
        return None;
    }
    let h = |r: std::ops::Range<usize>| bytes[r].iter().map(|b| format!("{b:02x}")).collect::<String>();
    Some(format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    ))
}

/// A label as blkid sets it: up to the first NUL, trailing whitespace dropped.
fn label_bytes(raw: &[u8]) -> Option<Vec<u8>> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let mut label = raw[..end].to_vec();
    while label.last().is_some_and(|b| b.is_ascii_whitespace()) {
        label.pop();
    }
    (!label.is_empty()).then_some(label)
}

/// Recognises ext2/3/4, btrfs, FAT, swap and LUKS. Two different signatures at once make
/// blkid's safe probe give up (an "ambivalent" result), and then udev makes no link either.
fn probe_filesystem(head: &[u8]) -> Option<Filesystem> {
    let mut found = signatures(head);
    match found.len() {
        1 => found.pop(),
        _ => None,
    }
}

/// Every filesystem signature in the first bytes of a device, ext4 before btrfs.
pub(crate) fn signatures(head: &[u8]) -> Vec<Filesystem> {
    let at = |range: std::ops::Range<usize>| head.get(range);
    let mut found = Vec::new();
    if at(1080..1082) == Some(&[0x53, 0xef]) {
        found.push(Filesystem {
            kind: "ext4",
            uuid: at(1128..1144).and_then(uuid_text),
            label: at(1144..1160).and_then(label_bytes),
        });
    }
    if at(65600..65608) == Some(b"_BHRfS_M") {
        found.push(Filesystem {
            kind: "btrfs",
            uuid: at(65568..65584).and_then(uuid_text),
            label: at(65835..66091).and_then(label_bytes),
        });
    }
    if at(0..6) == Some(b"LUKS\xba\xbe") {
        let version = at(6..8).map(|v| u16::from_be_bytes([v[0], v[1]]));
        let uuid = at(168..208)
            .and_then(label_bytes)
            .map(|u| String::from_utf8_lossy(&u).into_owned());
        found.push(Filesystem {
            kind: "crypto_LUKS",
            uuid,
            label: if version == Some(2) {
                at(24..72).and_then(label_bytes)
            } else {
                None
            },
        });
    }
    if at(4086..4096) == Some(b"SWAPSPACE2") {
        found.push(Filesystem {
            kind: "swap",
            uuid: at(1036..1052).and_then(uuid_text),
            label: at(1052..1068).and_then(label_bytes),
        });
    }
    if let Some(fat) = probe_fat(head) {
        found.push(fat);
    }
    found
}

/// FAT12/16/32: the volume serial as `XXXX-XXXX`, the label from the root directory's volume
/// entry when there is one, else from the boot sector; "NO NAME" counts as none.
fn probe_fat(head: &[u8]) -> Option<Filesystem> {
    if head.get(510..512) != Some(&[0x55, 0xaa]) {
        return None;
    }
    let (serial_at, label_at) = if head.get(82..87) == Some(b"FAT32") {
        (67, 71)
    } else if head.get(54..57) == Some(b"FAT") {
        (39, 43)
    } else {
        return None;
    };
    let serial = head.get(serial_at..serial_at + 4)?;
    let uuid = format!(
        "{:02X}{:02X}-{:02X}{:02X}",
        serial[3], serial[2], serial[1], serial[0]
    );
    let boot_label = head.get(label_at..label_at + 11).map(<[u8]>::to_vec);
    let label = root_dir_label(head)
        .or(boot_label)
        .filter(|l| l.as_slice() != b"NO NAME    ")
        .and_then(|l| label_bytes(&l));
    Some(Filesystem {
        kind: "vfat",
        uuid: Some(uuid),
        label,
    })
}

/// The volume label entry of a FAT root directory, when its first cluster (FAT32) or the
/// fixed root directory (FAT12/16) lies within `head`.
fn root_dir_label(head: &[u8]) -> Option<Vec<u8>> {
    let u16_at = |o: usize| {
        head.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let sector = u16_at(11)?;
    let per_cluster = *head.get(13)? as usize;
    let reserved = u16_at(14)?;
    let fats = *head.get(16)? as usize;
    let root_entries = u16_at(17)?;
    let fat_size = match u16_at(22)? {
        0 => u32_at(36)?,
        n => n,
    };
    let first_data = (reserved + fats * fat_size) * sector;
    let (start, len) = if root_entries == 0 {
        let cluster = u32_at(44)?;
        (
            first_data + cluster.checked_sub(2)? * per_cluster * sector,
            per_cluster * sector,
        )
    } else {
        ((reserved + fats * fat_size) * sector, root_entries * 32)
    };
    let dir = head.get(start..start + len)?;
    for entry in dir.chunks(32) {
        match entry.first() {
            Some(0) | None => return None,
            Some(0xe5) => continue,
            _ => {}
        }
        // Attribute 0x08 alone: the volume label (0x0f would be a long-name part).
        if entry.get(11).is_some_and(|a| a & 0x1f == 0x08) {
            return entry.get(0..11).map(<[u8]>::to_vec);
        }
    }
    None
}

/// libblkid's `blkid_encode_string`, which udev uses for `ID_FS_LABEL_ENC`, `ID_FS_UUID_ENC`
/// and `ID_PART_ENTRY_NAME`: valid multi-byte UTF-8 and `[0-9A-Za-z#+-.:=@_]` stay, every other
/// byte becomes `\xNN`.
fn blkid_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let len = match b {
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            _ => 1,
        };
        if len > 1 {
            if let Some(Ok(text)) = bytes.get(i..i + len).map(std::str::from_utf8) {
                out.push_str(text);
                i += len;
                continue;
            }
        }
        if b.is_ascii_alphanumeric() || b"#+-.:=@_".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
        i += 1;
    }
    out
}

/// The partition table on a disk, as far as udev's links need it.
enum Table {
    /// Entries by partition number: (unique GUID, name).
    Gpt(BTreeMap<u32, (String, String)>),
    /// The disk signature.
    Mbr(u32),
}

impl Table {
    fn entry_uuid(&self, number: u32) -> Option<String> {
        match self {
            Table::Gpt(entries) => entries.get(&number).map(|(uuid, _)| uuid.clone()),
            // blkid: the disk signature and the partition number, `deadbeef-01`.
            Table::Mbr(signature) => Some(format!("{signature:08x}-{number:02x}")),
        }
    }

    fn entry_name(&self, number: u32) -> Option<String> {
        match self {
            Table::Gpt(entries) => entries
                .get(&number)
                .filter(|(_, name)| !name.is_empty())
                .map(|(_, name)| blkid_encode(name.as_bytes())),
            Table::Mbr(_) => None,
        }
    }
}

fn read_table(node: &Path, sector: usize) -> Option<Table> {
    let mut file = fs::File::open(node).ok()?;
    let mut mbr = vec![0u8; 512];
    file.read_exact(&mut mbr).ok()?;
    if mbr[510..512] != [0x55, 0xaa] {
        return None;
    }
    let protective = (0..4).any(|i| mbr[446 + 16 * i + 4] == 0xee);
    if protective {
        return read_gpt(node, sector).map(Table::Gpt);
    }
    let signature = u32::from_le_bytes([mbr[440], mbr[441], mbr[442], mbr[443]]);
    (signature != 0).then_some(Table::Mbr(signature))
}

fn read_gpt(node: &Path, sector: usize) -> Option<BTreeMap<u32, (String, String)>> {
    use std::io::{Seek, SeekFrom};
    let mut file = fs::File::open(node).ok()?;
    let mut header = vec![0u8; 92];
    file.seek(SeekFrom::Start(sector as u64)).ok()?;
    file.read_exact(&mut header).ok()?;
    if &header[0..8] != b"EFI PART" {
        return None;
    }
    let u32_at = |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
    let mut lba = [0u8; 8];
    lba.copy_from_slice(&header[72..80]);
    let entries_lba = u64::from_le_bytes(lba);
    let count = u32_at(80).min(1024) as usize;
    let size = u32_at(84) as usize;
    if size < 128 {
        return None;
    }
    let mut table = vec![0u8; count * size];
    file.seek(SeekFrom::Start(entries_lba * sector as u64)).ok()?;
    file.read_exact(&mut table).ok()?;
    let mut entries = BTreeMap::new();
    for (i, entry) in table.chunks(size).enumerate() {
        if entry[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let g = &entry[16..32];
        let uuid = format!(
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
            g[3],
            g[2],
            g[1],
            g[0],
            g[5],
            g[4],
            g[7],
            g[6],
            g[8],
            g[9],
            g[10..16].iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let units: Vec<u16> = entry[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16_lossy(&units);
        entries.insert(i as u32 + 1, (uuid, name));
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_encoding() {
        assert_eq!(blkid_encode(b"EFI BOOT"), "EFI\\x20BOOT");
        assert_eq!(blkid_encode(b"ro/ot"), "ro\\x2fot");
        assert_eq!(blkid_encode("Dätä".as_bytes()), "Dätä");
        assert_eq!(blkid_encode(b"a\xffb"), "a\\xffb");
    }

    #[test]
    fn superblocks() {
        let mut ext = vec![0u8; 70_000];
        ext[1080..1082].copy_from_slice(&[0x53, 0xef]);
        ext[1128..1144].copy_from_slice(&[0x11; 16]);
        ext[1144..1148].copy_from_slice(b"root");
        let fs = probe_filesystem(&ext).unwrap();
        assert_eq!(fs.kind, "ext4");
        assert_eq!(fs.uuid.as_deref(), Some("11111111-1111-1111-1111-111111111111"));
        assert_eq!(fs.label.as_deref(), Some(&b"root"[..]));
        // A leftover btrfs signature next to the ext4 one: blkid is ambivalent, no links.
        ext[65600..65608].copy_from_slice(b"_BHRfS_M");
        assert_eq!(probe_filesystem(&ext), None);

        let mut luks = vec![0u8; 8192];
        luks[0..6].copy_from_slice(b"LUKS\xba\xbe");
        luks[7] = 2;
        luks[24..33].copy_from_slice(b"cryptroot");
        luks[168..204].copy_from_slice(b"0b5e0c1e-3a4b-4c5d-8e9f-a0b1c2d3e4f5");
        let fs = probe_filesystem(&luks).unwrap();
        assert_eq!(fs.uuid.as_deref(), Some("0b5e0c1e-3a4b-4c5d-8e9f-a0b1c2d3e4f5"));
        assert_eq!(fs.label.as_deref(), Some(&b"cryptroot"[..]));
        luks[7] = 1;
        assert_eq!(probe_filesystem(&luks).unwrap().label, None);

        let swap = crate::installer::steps::swap::header(
            64 << 20,
            "5f4dcc3b-5aa7-4d61-8d32-2b9e8e1d0a01",
            Some("swap"),
        )
        .unwrap();
        let fs = probe_filesystem(&swap).unwrap();
        assert_eq!(fs.uuid.as_deref(), Some("5f4dcc3b-5aa7-4d61-8d32-2b9e8e1d0a01"));
        assert_eq!(fs.label.as_deref(), Some(&b"swap"[..]));
    }

    #[test]
    fn fat_made_by_the_format_step() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("esp");
        fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
        let esp = crate::installer::layout::Filesystem {
            device: image.to_string_lossy().into_owned(),
            kind: crate::installer::layout::FsKind::Vfat,
            label: Some("EFI BOOT".into()),
            uuid: "1234-ABCD".into(),
            volume_id: Some(0x1234abcd),
            size_bytes: 64 << 20,
            subvolumes: vec![],
        };
        crate::installer::steps::format::format_esp(&esp, 512).unwrap();
        let fs = probe_filesystem(&read_head(&image)).unwrap();
        assert_eq!(fs.kind, "vfat");
        assert_eq!(fs.uuid.as_deref(), Some("1234-ABCD"));
        assert_eq!(fs.label.as_deref(), Some(&b"EFI BOOT"[..]));
    }

    #[test]
    fn links_are_replaced_and_stale_ones_removed() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        let link = |d: &'static str, n: &str, dev: &str| Link {
            dir: d,
            name: n.into(),
            device: dev.into(),
        };
        apply(
            &disk,
            &[link("by-uuid", "old", "vda1"), link("by-id", "virtio-A", "vda")],
        )
        .unwrap();
        apply(
            &disk,
            &[link("by-uuid", "new", "vda2"), link("by-id", "virtio-A", "vda")],
        )
        .unwrap();
        assert!(fs::symlink_metadata(disk.join("by-uuid/old")).is_err());
        assert_eq!(
            fs::read_link(disk.join("by-uuid/new")).unwrap(),
            Path::new("../../vda2")
        );
        assert_eq!(
            fs::read_link(disk.join("by-id/virtio-A")).unwrap(),
            Path::new("../../vda")
        );
    }
}
