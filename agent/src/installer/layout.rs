//! Places a declarative [`Storage`] on a disk: partition offsets in bytes, devices, LUKS
//! containers, filesystems, mounts and swap, with every check that needs no write (sizes,
//! overlaps, roots, what the boot loader can read). Pure: the random values come in [`PlanIds`].

use crate::error::user_error;
use crate::installer::plan::{
    partition_device, Filesystem, FsKind, LuksVolume, Pbkdf, PlanIds, PlannedMount, PlannedPartition,
    SwapArea, GIB, MIB,
};
use crate::installer::storage::{self, FsSpec, Storage, SubvolumeSpec, Table};
use crate::machine::facts::{Disk, Firmware};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Partitions start and end on 1 MiB boundaries, counted in bytes so 4K-sector disks align too.
pub const ALIGNMENT: u64 = MIB;
/// GPT reserves 128 entries of 128 bytes after each header.
const GPT_ENTRIES_BYTES: u64 = 128 * 128;
/// Smallest filesystem we will create for `/` or `/nix`: the Nix store needs room.
pub const MIN_ROOT_SIZE: u64 = GIB;
/// cryptsetup's default LUKS2 header (metadata and keyslots) in front of the data.
pub const LUKS2_HEADER: u64 = 16 * MIB;
/// The MBR can address 2^32 sectors (2 TiB with 512-byte sectors).
const MBR_MAX_SECTORS: u64 = 1 << 32;

pub const TYPE_BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
pub const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const TYPE_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
pub const TYPE_SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";

/// Everything the steps need about the disk, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub table: Table,
    pub partitions: Vec<PlannedPartition>,
    /// In creation order.
    pub luks: Vec<LuksVolume>,
    /// To create, in order (after the LUKS containers they may live in).
    pub filesystems: Vec<Filesystem>,
    /// In mount order: parents first.
    pub mounts: Vec<PlannedMount>,
    pub swaps: Vec<SwapArea>,
    /// Where state survives a tmpfs root (`/persist`), if `/` is a tmpfs.
    pub persist: Option<String>,
}

fn align_up(value: u64) -> u64 {
    value.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn align_down(value: u64) -> u64 {
    value / ALIGNMENT * ALIGNMENT
}

/// The KDF for LUKS keyslots, chosen for the machine's RAM: the installed system's initrd must
/// be able to unlock with the same RAM, next to itself, so argon2id's memory is capped well
/// below it, and a tiny machine gets PBKDF2, which needs none.
pub fn pbkdf_for(ram_bytes: u64) -> Pbkdf {
    const TINY: u64 = 512 * MIB;
    if ram_bytes != 0 && ram_bytes < TINY {
        return Pbkdf {
            algorithm: "pbkdf2".into(),
            memory_kib: None,
        };
    }
    // cryptsetup's own default (and maximum) is 1 GiB; below 2 GiB of RAM use a quarter of it.
    let memory = if ram_bytes == 0 || ram_bytes >= 2 * GIB {
        GIB
    } else {
        align_down(ram_bytes / 4).max(64 * MIB)
    };
    Pbkdf {
        algorithm: "argon2id".into(),
        memory_kib: Some(memory / 1024),
    }
}

/// Hands out the plan's random ids in order.
struct Ids<'a> {
    ids: &'a PlanIds,
    uuid: usize,
    fat: usize,
}

impl Ids<'_> {
    fn uuid(&mut self) -> Result<String> {
        let Some(id) = self.ids.uuids.get(self.uuid) else {
            bail!("the plan ran out of random UUIDs (a bug in nixos-kexec)");
        };
        self.uuid += 1;
        Ok(id.clone())
    }

    fn fat_volume_id(&mut self) -> Result<u32> {
        self.fat += 1;
        if self.fat == 1 {
            return Ok(self.ids.esp_volume_id);
        }
        // Further FAT filesystems take theirs from a UUID's first 8 hex digits.
        let uuid = self.uuid()?;
        let hex: String = uuid.chars().filter(char::is_ascii_hexdigit).take(8).collect();
        Ok(u32::from_str_radix(&hex, 16).unwrap_or(0x4e4b_0001) | 1)
    }
}

enum Size {
    Fixed(u64),
    Rest,
}

fn err_at(at: &str, problem: impl Into<String>, fix: impl Into<String>) -> anyhow::Error {
    user_error(format!("storage: {at}: {}", problem.into()), fix)
}

fn check_name(at: &str, what: &str, text: &str, max: usize, extra: &str) -> Result<()> {
    let ok = !text.is_empty()
        && text.len() <= max
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c) || extra.contains(c));
    if ok {
        Ok(())
    } else {
        Err(err_at(
            at,
            format!("{what} {text:?} is not allowed"),
            format!(
                "use 1 to {max} letters, digits, '_', '.' or '-'{}.",
                if extra.is_empty() {
                    String::new()
                } else {
                    format!(" or {extra:?}")
                }
            ),
        ))
    }
}

fn check_mountpoint(at: &str, path: &str) -> Result<()> {
    let ok = path == "/"
        || (path.starts_with('/')
            && !path.ends_with('/')
            && path[1..].split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-@+".contains(c))
            }));
    if ok {
        Ok(())
    } else {
        Err(err_at(
            at,
            format!("mount point {path:?} is not an absolute path"),
            "write mount points like /, /boot or /var/lib (letters, digits, '_', '.', '-', '@', '+').",
        ))
    }
}

fn check_options(at: &str, options: &[String]) -> Result<()> {
    for option in options {
        let ok = !option.is_empty()
            && option
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_=.:/@+%-".contains(c));
        if !ok {
            return Err(err_at(
                at,
                format!("mount option {option:?} is not allowed"),
                "give each option as its own list item, e.g. [\"noatime\", \"compress=zstd\"], without commas or spaces.",
            ));
        }
        if option.starts_with("subvol=") || option.starts_with("subvolid=") {
            return Err(err_at(
                at,
                format!("mount option {option:?} is set by the installer"),
                "describe btrfs subvolumes in \"subvolumes\"; their subvol= option is added for you.",
            ));
        }
    }
    Ok(())
}

/// Resolves a partition type for the table: GPT type GUID or MBR type byte.
fn partition_type(at: &str, table: Table, asked: &str) -> Result<(String, u8)> {
    let gpt = |guid: &str| Ok((guid.to_string(), 0));
    match (table, asked) {
        (Table::Gpt, "bios-boot") => gpt(TYPE_BIOS_BOOT),
        (Table::Gpt, "esp") => gpt(TYPE_ESP),
        (Table::Gpt, "linux") => gpt(TYPE_LINUX),
        (Table::Gpt, "swap") => gpt(TYPE_SWAP),
        (Table::Gpt, other) => match uuid::Uuid::parse_str(other) {
            Ok(guid) if !guid.is_nil() => Ok((guid.to_string().to_uppercase(), 0)),
            _ => Err(err_at(
                at,
                format!("partition type {other:?} is not known for GPT"),
                "use bios-boot, esp, linux, swap or a GPT type GUID.",
            )),
        },
        (Table::Mbr, "linux") => Ok((String::new(), 0x83)),
        (Table::Mbr, "swap") => Ok((String::new(), 0x82)),
        (Table::Mbr, "esp") => Ok((String::new(), 0xef)),
        (Table::Mbr, other) => {
            let byte = u8::from_str_radix(other.trim_start_matches("0x"), 16).ok();
            match byte {
                // 0 marks an unused entry, the others are extended partitions (not written).
                Some(b) if !matches!(b, 0 | 0x05 | 0x0f | 0x85) => Ok((String::new(), b)),
                _ => Err(err_at(
                    at,
                    format!("partition type {other:?} is not known for MBR (bios-boot is for GPT only)"),
                    "use linux, swap, esp or a type byte such as 0x83.",
                )),
            }
        }
    }
}

/// The smallest size a filesystem of this kind can be created with here.
fn min_size(kind: &str, sector: u64) -> u64 {
    match kind {
        // FAT32 needs 65525 clusters; with one sector per cluster that is ~33 MiB at 512 bytes
        // and ~257 MiB at 4096.
        "vfat" => align_up(65_600 * sector + 2 * MIB),
        // mkfs.btrfs refuses much less than this with separate data and metadata.
        "btrfs" => 256 * MIB,
        "ext4" => 16 * MIB,
        "swap" => MIB,
        _ => MIB,
    }
}

/// Filesystems that must not be squeezed: `/` and `/nix` hold the Nix store.
fn holds_store(fs: &FsSpec) -> bool {
    let mounts = |p: &Option<String>| matches!(p.as_deref(), Some("/") | Some("/nix"));
    mounts(&fs.mountpoint)
        || fs.subvolumes.iter().any(|s| mounts(&s.mountpoint))
        || fs.filesystem.as_deref().is_some_and(holds_store)
}

/// The least a partition holding `fs` may have.
fn min_partition(fs: Option<&FsSpec>, sector: u64) -> u64 {
    let Some(fs) = fs else { return MIB };
    let inner = |fs: &FsSpec| {
        let floor = if holds_store(fs) { MIN_ROOT_SIZE } else { MIB };
        min_size(&fs.kind, sector).max(floor)
    };
    match (fs.kind.as_str(), fs.filesystem.as_deref()) {
        ("luks", Some(content)) => LUKS2_HEADER + inner(content),
        _ => inner(fs),
    }
}

/// Builds what goes on one partition or LUKS container.
struct Builder<'a> {
    ids: Ids<'a>,
    sector: u32,
    ram_bytes: u64,
    luks: Vec<LuksVolume>,
    filesystems: Vec<Filesystem>,
    mounts: Vec<(PlannedMount, Option<usize>)>,
    swaps: Vec<SwapArea>,
}

impl Builder<'_> {
    #[allow(clippy::too_many_arguments)]
    fn content(
        &mut self,
        at: &str,
        fs: &FsSpec,
        device: &str,
        size: u64,
        partition: &PlannedPartition,
        index: usize,
        luks_name: Option<&str>,
    ) -> Result<()> {
        let inside = luks_name.is_some();
        if let Some(label) = &fs.label {
            let max = match fs.kind.as_str() {
                "vfat" => 11,
                "ext4" | "swap" => 16,
                "luks" => 47,
                _ => 255,
            };
            check_name(at, "label", label, max, "")?;
        }
        if fs.kind != "btrfs" && !fs.subvolumes.is_empty() {
            return Err(err_at(
                at,
                "only btrfs has subvolumes",
                "remove \"subvolumes\" or use type btrfs.",
            ));
        }
        if fs.kind != "swap" && fs.random_encryption {
            return Err(err_at(
                at,
                "random_encryption is for swap only",
                "remove it, or use type swap.",
            ));
        }
        if fs.kind != "luks" && (fs.name.is_some() || fs.filesystem.is_some()) {
            return Err(err_at(
                at,
                "\"name\" and \"filesystem\" belong to a luks container",
                "remove them, or use type luks.",
            ));
        }
        if matches!(fs.kind.as_str(), "swap" | "luks")
            && (fs.mountpoint.is_some() || !fs.mount_options.is_empty() || fs.needed_for_boot)
        {
            return Err(err_at(
                at,
                format!("{} is not mounted", fs.kind),
                "remove mountpoint, mount_options and needed_for_boot from it.",
            ));
        }
        // `/` and `/nix` hold the Nix store (a luks container is measured by what it holds).
        let floor = if fs.kind != "luks" && holds_store(fs) {
            MIN_ROOT_SIZE
        } else {
            0
        };
        let min = min_size(&fs.kind, self.sector as u64).max(floor);
        if size < min {
            return Err(err_at(
                at,
                format!(
                    "{} MiB is too small for {} (needs at least {} MiB)",
                    size / MIB,
                    fs.kind,
                    min.div_ceil(MIB)
                ),
                "make the partition larger.",
            ));
        }
        match fs.kind.as_str() {
            "vfat" | "ext4" | "btrfs" => {
                let kind = match fs.kind.as_str() {
                    "vfat" => FsKind::Vfat,
                    "ext4" => FsKind::Ext4,
                    _ => FsKind::Btrfs,
                };
                if kind == FsKind::Vfat && inside {
                    return Err(err_at(
                        at,
                        "vfat inside LUKS could not be read by the firmware",
                        "put the vfat filesystem (the ESP) directly on a partition.",
                    ));
                }
                let (uuid, volume_id) = if kind == FsKind::Vfat {
                    let id = self.ids.fat_volume_id()?;
                    (crate::installer::plan::fat_uuid(id), Some(id))
                } else {
                    (self.ids.uuid()?, None)
                };
                let mut subvolumes = Vec::new();
                let mut names = BTreeSet::new();
                for (i, sub) in fs.subvolumes.iter().enumerate() {
                    let sub_at = format!("{at}.subvolumes[{i}]");
                    check_name(&sub_at, "subvolume name", &sub.name, 255, "@")?;
                    if !names.insert(sub.name.clone()) {
                        return Err(err_at(
                            &sub_at,
                            format!("subvolume {:?} is listed twice", sub.name),
                            "give each subvolume its own name.",
                        ));
                    }
                    subvolumes.push(sub.name.clone());
                }
                self.filesystems.push(Filesystem {
                    device: device.to_string(),
                    kind,
                    label: fs.label.clone(),
                    uuid: uuid.clone(),
                    volume_id,
                    size_bytes: size,
                    subvolumes,
                });
                let fstype = kind.name();
                let nix_device = format!("/dev/disk/by-uuid/{uuid}");
                if let Some(mountpoint) = &fs.mountpoint {
                    check_mountpoint(at, mountpoint)?;
                    check_options(at, &fs.mount_options)?;
                    self.push_mount(
                        PlannedMount {
                            source: device.to_string(),
                            fstype: fstype.into(),
                            mountpoint: mountpoint.clone(),
                            options: fs.mount_options.clone(),
                            nix_device: nix_device.clone(),
                            needed_for_boot: fs.needed_for_boot,
                            subvolume: None,
                        },
                        index,
                    );
                } else if !fs.mount_options.is_empty() || fs.needed_for_boot {
                    return Err(err_at(
                        at,
                        "mount options without a mountpoint",
                        "add a mountpoint or remove the options.",
                    ));
                }
                for (i, sub) in fs.subvolumes.iter().enumerate() {
                    self.subvolume(&format!("{at}.subvolumes[{i}]"), sub, device, &nix_device, index)?;
                }
            }
            "swap" => {
                if fs.random_encryption && inside {
                    return Err(err_at(
                        at,
                        "random_encryption swap inside LUKS would be encrypted twice",
                        "use plain swap inside the container, or random_encryption swap directly on a partition.",
                    ));
                }
                let uuid = self.ids.uuid()?;
                let (device_now, nix_device) = if fs.random_encryption {
                    // A new key at every boot destroys the old contents, so the system must
                    // find the partition by something that is not inside it.
                    (
                        format!("/dev/mapper/nixos-kexec-swap{}", self.swaps.len()),
                        format!("/dev/disk/by-partuuid/{}", partition.partuuid),
                    )
                } else {
                    (device.to_string(), format!("/dev/disk/by-uuid/{uuid}"))
                };
                self.swaps.push(SwapArea {
                    partition: partition.device.clone(),
                    device: device_now,
                    uuid,
                    label: fs.label.clone(),
                    random_encryption: fs.random_encryption,
                    nix_device,
                    sector_size: self.sector,
                });
            }
            "luks" => {
                if inside {
                    return Err(err_at(
                        at,
                        "LUKS inside LUKS is not supported",
                        "put one luks container directly on the partition.",
                    ));
                }
                let name = fs
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("crypt{}", self.luks.len()));
                check_name(at, "LUKS name", &name, 32, "")?;
                if self.luks.iter().any(|l| l.name == name) {
                    return Err(err_at(
                        at,
                        format!("LUKS name {name:?} is used twice"),
                        "give each luks container its own name.",
                    ));
                }
                let Some(inner) = fs.filesystem.as_deref() else {
                    return Err(err_at(
                        at,
                        "a luks container needs a \"filesystem\" inside",
                        "add e.g. \"filesystem\": {\"type\": \"ext4\", \"mountpoint\": \"/\"}.",
                    ));
                };
                let uuid = self.ids.uuid()?;
                let open = format!("/dev/mapper/{name}");
                self.luks.push(LuksVolume {
                    device: device.to_string(),
                    name: name.clone(),
                    uuid: uuid.clone(),
                    label: fs.label.clone(),
                    sector_size: self.sector,
                    pbkdf: pbkdf_for(self.ram_bytes),
                    open_device: open.clone(),
                });
                self.content(
                    &format!("{at}.filesystem"),
                    inner,
                    &open,
                    size.saturating_sub(LUKS2_HEADER),
                    partition,
                    index,
                    Some(&name),
                )?;
            }
            "zfs" | "zpool" => return Err(storage::zfs_refusal(&format!("storage: {at}"))),
            other => {
                return Err(err_at(
                    at,
                    format!("filesystem type {other:?} is not one this installer creates"),
                    "use vfat, ext4, btrfs, swap, or luks containing one of those.",
                ))
            }
        }
        Ok(())
    }

    fn subvolume(
        &mut self,
        at: &str,
        sub: &SubvolumeSpec,
        device: &str,
        nix_device: &str,
        index: usize,
    ) -> Result<()> {
        let Some(mountpoint) = &sub.mountpoint else {
            if !sub.mount_options.is_empty() || sub.needed_for_boot {
                return Err(err_at(
                    at,
                    "mount options without a mountpoint",
                    "add a mountpoint or remove the options.",
                ));
            }
            return Ok(());
        };
        check_mountpoint(at, mountpoint)?;
        check_options(at, &sub.mount_options)?;
        let mut options = vec![format!("subvol={}", sub.name)];
        options.extend(sub.mount_options.iter().cloned());
        self.push_mount(
            PlannedMount {
                source: device.to_string(),
                fstype: "btrfs".into(),
                mountpoint: mountpoint.clone(),
                options,
                nix_device: nix_device.to_string(),
                needed_for_boot: sub.needed_for_boot,
                subvolume: Some(sub.name.clone()),
            },
            index,
        );
        Ok(())
    }

    fn push_mount(&mut self, mount: PlannedMount, index: usize) {
        self.mounts.push((mount, Some(index)));
    }
}

/// Places `storage` on `disk`. `ram_bytes` chooses the LUKS key derivation.
pub fn place(
    storage: &Storage,
    disk: &Disk,
    firmware: Firmware,
    ram_bytes: u64,
    ids: &PlanIds,
) -> Result<Placed> {
    let sector = disk.logical_sector as u64;
    if sector != 512 && sector != 4096 {
        return Err(user_error(
            format!("{} has {sector}-byte logical sectors.", disk.dev_path),
            "use a disk with 512 or 4096-byte sectors.",
        ));
    }
    let table = match &storage.table {
        Some(text) => Table::parse(text)?,
        None => Table::Gpt,
    };
    let usable_end = usable_end(storage, table, disk, firmware, ids)?;
    let extents = extents(storage, disk, usable_end)?;
    let partitions = planned_partitions(storage, table, &extents, disk, ids)?;
    let mut builder = Builder {
        ids: Ids { ids, uuid: 0, fat: 0 },
        sector: disk.logical_sector,
        ram_bytes,
        luks: Vec::new(),
        filesystems: Vec::new(),
        mounts: Vec::new(),
        swaps: Vec::new(),
    };
    for (i, p) in storage.partitions.iter().enumerate() {
        if let Some(fs) = &p.filesystem {
            let part = partitions[i].clone();
            builder.content(
                &format!("partitions[{i}].filesystem"),
                fs,
                &part.device,
                part.size_bytes,
                &part,
                i,
                None,
            )?;
        }
    }
    for (i, t) in storage.tmpfs.iter().enumerate() {
        let at = format!("tmpfs[{i}]");
        check_mountpoint(&at, &t.mountpoint)?;
        check_options(&at, &t.mount_options)?;
        builder.mounts.push((
            PlannedMount {
                source: "tmpfs".into(),
                fstype: "tmpfs".into(),
                mountpoint: t.mountpoint.clone(),
                options: t.mount_options.clone(),
                nix_device: "none".into(),
                needed_for_boot: false,
                subvolume: None,
            },
            None,
        ));
    }
    let Builder {
        luks,
        filesystems,
        mounts,
        swaps,
        ..
    } = builder;
    let mut placed = Placed {
        table,
        partitions,
        luks,
        filesystems,
        mounts: Vec::new(),
        swaps,
        persist: storage.persist.clone(),
    };
    check_mounts(&mut placed, mounts, firmware, &storage.partitions)?;
    Ok(placed)
}

/// Where the partitions must end: before the backup GPT, or within the MBR's reach (after
/// refusing an MBR where it cannot work).
fn usable_end(
    storage: &Storage,
    table: Table,
    disk: &Disk,
    firmware: Firmware,
    ids: &PlanIds,
) -> Result<u64> {
    let sector = disk.logical_sector as u64;
    let count = storage.partitions.len();
    if count == 0 {
        return Err(user_error(
            "storage lists no partitions.",
            "describe at least the partition that holds /.",
        ));
    }
    Ok(match table {
        Table::Mbr => {
            if firmware == Firmware::Uefi {
                return Err(user_error(
                    "table=mbr was asked for, but this machine booted with UEFI, which needs a GPT with an EFI system partition to boot from this disk.",
                    "drop table=mbr (GPT is the default and also boots BIOS machines).",
                ));
            }
            let limit = MBR_MAX_SECTORS * sector;
            if disk.size_bytes > limit {
                return Err(user_error(
                    format!(
                        "{} is {} GiB; an MBR can address only {} GiB of it ({} sectors of {sector} bytes).",
                        disk.dev_path,
                        disk.size_bytes / GIB,
                        limit / GIB,
                        MBR_MAX_SECTORS
                    ),
                    "use table=gpt (the default): it boots BIOS machines too, through the BIOS boot partition.",
                ));
            }
            if count > 4 {
                return Err(user_error(
                    format!("storage lists {count} partitions; an MBR written by this installer holds 4 (primary partitions only)."),
                    "use 4 partitions or fewer with table=mbr, or table=gpt.",
                ));
            }
            align_down(disk.size_bytes)
        }
        Table::Gpt => {
            if count > ids.partition_guids.len() {
                return Err(user_error(
                    format!(
                        "storage lists {count} partitions; this installer writes at most {}.",
                        ids.partition_guids.len()
                    ),
                    "use fewer partitions (btrfs subvolumes need none).",
                ));
            }
            // The backup GPT (entries + header) sits in the disk's last sectors.
            let backup = GPT_ENTRIES_BYTES.div_ceil(sector) * sector + sector;
            align_down(disk.size_bytes.saturating_sub(backup))
        }
    })
}

/// `(start, size)` in bytes of every partition, in the listed order: sizes and starts parsed,
/// `rest` resolved, and refused when they do not fit the disk or overlap.
fn extents(storage: &Storage, disk: &Disk, usable_end: u64) -> Result<Vec<(u64, u64)>> {
    let sector = disk.logical_sector as u64;
    let count = storage.partitions.len();
    let overhead = disk.size_bytes - usable_end;
    let mut sizes = Vec::new();
    let mut starts = Vec::new();
    let mut rest_index = None;
    for (i, p) in storage.partitions.iter().enumerate() {
        let at = format!("partitions[{i}]");
        let size = if p.size.trim() == "rest" {
            if rest_index.replace(i).is_some() {
                return Err(err_at(
                    &at,
                    "a second partition asks for the rest of the disk",
                    "give all but one partition a fixed size.",
                ));
            }
            Size::Rest
        } else {
            let bytes = storage::parse_size(&p.size, &format!("storage: {at}: size"))?;
            if bytes == 0 {
                return Err(err_at(
                    &at,
                    "size 0",
                    "give the partition a size such as 512M, or \"rest\".",
                ));
            }
            Size::Fixed(align_up(bytes))
        };
        let start = match &p.start {
            None => None,
            Some(text) => {
                let bytes = storage::parse_size(text, &format!("storage: {at}: start"))?;
                if bytes % ALIGNMENT != 0 || bytes < ALIGNMENT {
                    return Err(err_at(
                        &at,
                        format!("start {text} is not on a 1 MiB boundary at or after 1 MiB"),
                        "start partitions at whole MiB (the first MiB holds the partition table and boot code).",
                    ));
                }
                Some(bytes)
            }
        };
        sizes.push(size);
        starts.push(start);
    }
    let explicit = starts.iter().any(Option::is_some);
    if let (true, Some(rest)) = (explicit, rest_index) {
        if rest != count - 1 {
            return Err(user_error(
                "storage: with explicit \"start\" offsets, only the last partition may ask for the rest of the disk.",
                "move the \"rest\" partition to the end, or drop the start offsets.",
            ));
        }
    }
    let fixed_total: u64 = sizes
        .iter()
        .map(|s| match s {
            Size::Fixed(b) => *b,
            Size::Rest => 0,
        })
        .sum();
    let rest_min = rest_index.map_or(0, |i| {
        min_partition(storage.partitions[i].filesystem.as_ref(), sector)
    });
    let describe_needs = |needed: u64| {
        user_error(
            format!(
                "{} is {} MiB, too small for this layout: its partitions need at least {} MiB of disk.",
                disk.dev_path,
                disk.size_bytes / MIB,
                align_up(needed) / MIB
            ),
            "choose a larger disk, smaller fixed partitions (e.g. less swap), or another layout.",
        )
    };
    let mut extents = Vec::new();
    let mut cursor = ALIGNMENT;
    for (i, size) in sizes.iter().enumerate() {
        let start = starts[i].unwrap_or(cursor);
        let bytes = match size {
            Size::Fixed(b) => *b,
            Size::Rest if explicit => usable_end.saturating_sub(start),
            Size::Rest => usable_end.saturating_sub(ALIGNMENT + fixed_total),
        };
        if matches!(size, Size::Rest) && bytes < rest_min {
            return Err(describe_needs(ALIGNMENT + fixed_total + rest_min + overhead));
        }
        if start + bytes > usable_end {
            let needed = if explicit {
                start + bytes
            } else {
                ALIGNMENT + fixed_total + rest_min
            };
            return Err(describe_needs(needed + overhead));
        }
        extents.push((start, bytes));
        cursor = start + bytes;
    }
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by_key(|&i| extents[i].0);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if extents[a].0 + extents[a].1 > extents[b].0 {
            return Err(user_error(
                format!(
                    "storage: partitions[{a}] ({} MiB at {} MiB) and partitions[{b}] (at {} MiB) overlap.",
                    extents[a].1 / MIB,
                    extents[a].0 / MIB,
                    extents[b].0 / MIB
                ),
                "fix the start offsets and sizes so the partitions do not overlap.",
            ));
        }
    }
    Ok(extents)
}

/// The partition table entries: types for the table, names, GUIDs or MBR PARTUUIDs, devices.
fn planned_partitions(
    storage: &Storage,
    table: Table,
    extents: &[(u64, u64)],
    disk: &Disk,
    ids: &PlanIds,
) -> Result<Vec<PlannedPartition>> {
    let mut partitions = Vec::new();
    for (i, p) in storage.partitions.iter().enumerate() {
        let at = format!("partitions[{i}]");
        let number = i as u32 + 1;
        let default_type = match p.filesystem.as_ref() {
            Some(fs) if fs.kind == "swap" => "swap",
            Some(fs) if fs.kind == "vfat" && fs.mountpoint.as_deref() == Some("/boot") => "esp",
            _ => "linux",
        };
        let (type_guid, mbr_type) =
            partition_type(&at, table, p.part_type.as_deref().unwrap_or(default_type))?;
        let name = p.name.clone().unwrap_or_else(|| format!("part{number}"));
        if table == Table::Gpt {
            check_name(&at, "partition name", &name, 36, "")?;
        }
        if table == Table::Gpt && p.bootable {
            return Err(err_at(
                &at,
                "the boot flag is an MBR thing",
                "remove \"bootable\", or use table mbr.",
            ));
        }
        let (guid, partuuid) = match table {
            Table::Gpt => {
                let guid = ids.partition_guids[i].to_lowercase();
                (guid.clone(), guid)
            }
            Table::Mbr => (String::new(), format!("{:08x}-{number:02x}", ids.mbr_signature)),
        };
        partitions.push(PlannedPartition {
            number,
            name,
            type_guid,
            mbr_type,
            bootable: p.bootable,
            guid,
            partuuid,
            start_bytes: extents[i].0,
            size_bytes: extents[i].1,
            device: partition_device(&disk.dev_path, number),
        });
    }
    Ok(partitions)
}

/// Checks the set of mounts as a whole (one root, nothing twice, a boot loader can reach
/// /boot) and orders them parents first.
fn check_mounts(
    placed: &mut Placed,
    mut mounts: Vec<(PlannedMount, Option<usize>)>,
    firmware: Firmware,
    specs: &[crate::installer::storage::PartitionSpec],
) -> Result<()> {
    let mut seen = BTreeSet::new();
    for (mount, _) in &mounts {
        if !seen.insert(mount.mountpoint.clone()) {
            return Err(if mount.mountpoint == "/" {
                user_error(
                    "storage describes two root filesystems (two mounts at /).",
                    "mount exactly one filesystem, subvolume or tmpfs at /.",
                )
            } else {
                user_error(
                    format!("storage mounts two filesystems at {}.", mount.mountpoint),
                    "give each filesystem its own mount point.",
                )
            });
        }
    }
    let find = |mounts: &[(PlannedMount, Option<usize>)], path: &str| {
        mounts.iter().position(|(m, _)| m.mountpoint == path)
    };
    let Some(root) = find(&mounts, "/") else {
        return Err(user_error(
            "storage has no root filesystem (nothing is mounted at /).",
            "give one filesystem, btrfs subvolume or tmpfs the mountpoint \"/\".",
        ));
    };
    let root_is_tmpfs = mounts[root].1.is_none();
    match (&placed.persist, root_is_tmpfs) {
        (Some(persist), true) => {
            let Some(index) = mounts
                .iter()
                .position(|(m, home)| &m.mountpoint == persist && home.is_some())
            else {
                return Err(user_error(
                    format!("storage: persist is {persist}, but no disk filesystem is mounted there."),
                    "mount a filesystem or subvolume at the persist path, e.g. a btrfs subvolume at /persist.",
                ));
            };
            // Host keys and machine-id are read from it before stage 2 mounts anything.
            mounts[index].0.needed_for_boot = true;
        }
        (None, true) => {
            return Err(user_error(
                "storage: / is a tmpfs, but no \"persist\" path says where host keys, machine-id and the host flake survive a reboot.",
                "add \"persist\": \"/persist\" and mount a disk filesystem there.",
            ))
        }
        (Some(_), false) => {
            return Err(user_error(
                "storage: \"persist\" is set, but / is on disk, so everything persists anyway.",
                "remove \"persist\", or make / a tmpfs.",
            ))
        }
        (None, false) => {}
    }
    if root_is_tmpfs && find(&mounts, "/nix").is_none_or(|i| mounts[i].1.is_none()) {
        return Err(user_error(
            "storage: / is a tmpfs and /nix is not on disk, so the Nix store would live in RAM and vanish at reboot.",
            "mount a disk filesystem or btrfs subvolume at /nix.",
        ));
    }
    let boot = find(&mounts, "/boot").or(Some(root)).map(|i| &mounts[i]);
    let boot_readable = boot.is_some_and(|(m, home)| home.is_some() && !m.source.starts_with("/dev/mapper/"));
    match (placed.table, firmware) {
        (Table::Gpt, Firmware::Uefi) => {
            let esp = find(&mounts, "/boot").and_then(|i| {
                let (m, home) = &mounts[i];
                let part = &placed.partitions[(*home)?];
                (m.fstype == "vfat" && part.type_guid == TYPE_ESP).then_some(())
            });
            if esp.is_none() {
                return Err(user_error(
                    "storage: this machine boots with UEFI, but no EFI system partition (type esp, vfat) is mounted at /boot.",
                    "add a partition {\"type\": \"esp\", \"size\": \"512M\", \"filesystem\": {\"type\": \"vfat\", \"mountpoint\": \"/boot\"}}.",
                ));
            }
        }
        (Table::Gpt, Firmware::Bios) => {
            if !placed.partitions.iter().any(|p| p.type_guid == TYPE_BIOS_BOOT) {
                return Err(user_error(
                    "storage: this machine boots with BIOS from a GPT disk, but there is no BIOS boot partition for GRUB.",
                    "add {\"type\": \"bios-boot\", \"size\": \"1M\"} as the first partition.",
                ));
            }
            if !boot_readable {
                return Err(user_error(
                    "storage: GRUB could not read /boot: it would be inside LUKS or in RAM.",
                    "give /boot its own unencrypted partition (vfat or ext4).",
                ));
            }
        }
        (Table::Mbr, _) => {
            if !boot_readable {
                return Err(user_error(
                    "storage: GRUB could not read /boot: it would be inside LUKS or in RAM.",
                    "give /boot its own unencrypted ext4 partition.",
                ));
            }
            let flagged: Vec<usize> = specs
                .iter()
                .enumerate()
                .filter(|(_, p)| p.bootable)
                .map(|(i, _)| i)
                .collect();
            match flagged.as_slice() {
                [] => {
                    // Some BIOSes boot only a disk with an active partition: flag /boot's.
                    if let Some((_, Some(home))) = boot {
                        placed.partitions[*home].bootable = true;
                    }
                }
                [_] => {}
                _ => {
                    return Err(user_error(
                        "storage: more than one partition has the boot flag.",
                        "set \"bootable\" on one partition only (the one holding /boot).",
                    ))
                }
            }
        }
    }
    // Parents before children; stable, so the described order breaks ties.
    mounts.sort_by_key(|(m, _)| {
        if m.mountpoint == "/" {
            0
        } else {
            m.mountpoint.matches('/').count()
        }
    });
    placed.mounts = mounts.into_iter().map(|(m, _)| m).collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config::Layout;
    use crate::installer::plan::tests::{disk, ids};
    use crate::installer::presets::storage_for;

    fn preset(
        layout: Layout,
        table: Table,
        swap: u64,
        size: u64,
        sector: u32,
        firmware: Firmware,
    ) -> Result<Placed> {
        let storage = storage_for(layout, table, swap)?;
        place(&storage, &disk("vda", size, sector, "S"), firmware, GIB, &ids())
    }

    fn text(err: anyhow::Error) -> String {
        assert!(
            crate::error::as_user_error(&err).is_some(),
            "not a user error: {err:#}"
        );
        crate::error::one_line(&err)
    }

    fn mounts(placed: &Placed) -> Vec<(String, String, String)> {
        placed
            .mounts
            .iter()
            .map(|m| (m.mountpoint.clone(), m.fstype.clone(), m.options.join(",")))
            .collect()
    }

    fn owned(items: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
        items
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn every_preset_on_both_sector_sizes_and_firmwares() {
        for layout in Layout::PRESETS {
            for sector in [512, 4096] {
                for firmware in [Firmware::Bios, Firmware::Uefi] {
                    for swap in [0, 2 * GIB] {
                        let placed = preset(layout, Table::Gpt, swap, 20 * GIB, sector, firmware)
                            .unwrap_or_else(|e| panic!("{layout:?} {sector} {firmware:?}: {e:#}"));
                        let parts = &placed.partitions;
                        assert_eq!(parts[0].type_guid, TYPE_BIOS_BOOT);
                        assert_eq!((parts[1].start_bytes, parts[1].size_bytes), (2 * MIB, 512 * MIB));
                        let last = parts.last().unwrap();
                        assert_eq!(last.start_bytes + last.size_bytes, 20 * GIB - MIB, "{layout:?}");
                        assert_eq!(placed.swaps.len(), usize::from(swap > 0));
                        if swap > 0 {
                            assert_eq!(parts[2].type_guid, TYPE_SWAP);
                            assert_eq!(parts[2].size_bytes, swap);
                            assert_eq!(placed.swaps[0].random_encryption, layout.encrypts());
                        }
                        assert_eq!(placed.luks.len(), usize::from(layout.encrypts()));
                        for luks in &placed.luks {
                            assert_eq!(luks.sector_size, sector);
                            assert_eq!(luks.name, "cryptroot");
                            assert_eq!(luks.device, last.device);
                        }
                        assert_eq!(placed.mounts[0].mountpoint, "/");
                        assert_eq!(placed.mounts.iter().filter(|m| m.mountpoint == "/").count(), 1);
                    }
                }
            }
        }
    }

    #[test]
    fn btrfs_subvolumes_and_options() {
        let placed = preset(Layout::Btrfs, Table::Gpt, 0, 8 * GIB, 4096, Firmware::Uefi).unwrap();
        assert_eq!(
            mounts(&placed),
            owned(&[
                ("/", "btrfs", "subvol=@,compress=zstd,noatime"),
                ("/boot", "vfat", "fmask=0077,dmask=0077"),
                ("/nix", "btrfs", "subvol=@nix,compress=zstd,noatime"),
                ("/home", "btrfs", "subvol=@home,compress=zstd,noatime"),
                ("/var/log", "btrfs", "subvol=@log,compress=zstd,noatime"),
            ])
        );
        let btrfs = &placed.filesystems[1];
        assert_eq!(btrfs.kind, FsKind::Btrfs);
        assert_eq!(btrfs.subvolumes, ["@", "@nix", "@home", "@log"]);
        // Every subvolume is the same filesystem to NixOS.
        let root = &placed.mounts[0];
        assert!(placed
            .mounts
            .iter()
            .filter(|m| m.fstype == "btrfs")
            .all(|m| m.nix_device == root.nix_device && m.source == "/dev/vda3"));
    }

    #[test]
    fn impermanence_has_tmpfs_root_and_persist_needed_for_boot() {
        let placed = preset(
            Layout::BtrfsImpermanence,
            Table::Gpt,
            0,
            8 * GIB,
            512,
            Firmware::Bios,
        )
        .unwrap();
        assert_eq!(
            mounts(&placed),
            owned(&[
                ("/", "tmpfs", "defaults,size=25%,mode=755"),
                ("/boot", "vfat", "fmask=0077,dmask=0077"),
                ("/nix", "btrfs", "subvol=@nix,compress=zstd,noatime"),
                ("/persist", "btrfs", "subvol=@persist,compress=zstd,noatime"),
            ])
        );
        assert_eq!(placed.persist.as_deref(), Some("/persist"));
        let persist = placed.mounts.iter().find(|m| m.mountpoint == "/persist").unwrap();
        assert!(persist.needed_for_boot);
        assert_eq!(placed.mounts[0].nix_device, "none");
    }

    #[test]
    fn luks_root_with_random_key_swap() {
        let placed = preset(Layout::LuksBtrfs, Table::Gpt, GIB, 8 * GIB, 512, Firmware::Uefi).unwrap();
        let luks = &placed.luks[0];
        assert_eq!(luks.device, "/dev/vda4");
        assert_eq!(luks.open_device, "/dev/mapper/cryptroot");
        assert_eq!(luks.pbkdf.algorithm, "argon2id");
        assert_eq!(placed.filesystems[1].device, "/dev/mapper/cryptroot");
        assert_eq!(
            placed.filesystems[1].size_bytes,
            placed.partitions[3].size_bytes - LUKS2_HEADER
        );
        assert!(placed
            .mounts
            .iter()
            .filter(|m| m.fstype == "btrfs")
            .all(|m| m.source == "/dev/mapper/cryptroot"));
        let swap = &placed.swaps[0];
        assert_eq!(swap.partition, "/dev/vda3");
        assert_eq!(swap.device, "/dev/mapper/nixos-kexec-swap0");
        assert_eq!(
            swap.nix_device,
            format!("/dev/disk/by-partuuid/{}", placed.partitions[2].guid)
        );
        // Every id differs: a LUKS container and the filesystem inside have their own UUIDs.
        let mut uuids: Vec<&str> = placed.filesystems.iter().map(|f| f.uuid.as_str()).collect();
        uuids.push(&luks.uuid);
        uuids.push(&swap.uuid);
        let unique: BTreeSet<&str> = uuids.iter().copied().collect();
        assert_eq!(unique.len(), uuids.len(), "{uuids:?}");
    }

    #[test]
    fn pbkdf_follows_ram() {
        assert_eq!(pbkdf_for(8 * GIB).memory_kib, Some(1 << 20));
        assert_eq!(pbkdf_for(0).memory_kib, Some(1 << 20));
        assert_eq!(pbkdf_for(GIB).memory_kib, Some(256 << 10));
        assert_eq!(pbkdf_for(GIB).algorithm, "argon2id");
        assert_eq!(pbkdf_for(980 * MIB).memory_kib, Some(245 << 10));
        let tiny = pbkdf_for(384 * MIB);
        assert_eq!((tiny.algorithm.as_str(), tiny.memory_kib), ("pbkdf2", None));
    }

    #[test]
    fn mbr_layouts() {
        for sector in [512, 4096] {
            // Plain root: no ESP, no BIOS boot partition; the root carries the boot flag.
            let placed = preset(Layout::Ext4, Table::Mbr, GIB, 8 * GIB, sector, Firmware::Bios).unwrap();
            let summary: Vec<(u8, bool)> = placed
                .partitions
                .iter()
                .map(|p| (p.mbr_type, p.bootable))
                .collect();
            assert_eq!(summary, [(0x82, false), (0x83, true)]);
            assert_eq!(placed.partitions[0].partuuid, "11223344-01");
            assert_eq!(placed.partitions[1].start_bytes, MIB + GIB);
            assert_eq!(
                placed.partitions[1].start_bytes + placed.partitions[1].size_bytes,
                8 * GIB
            );
            // Encrypted or in RAM: /boot on its own flagged ext4 partition.
            for layout in [Layout::LuksExt4, Layout::LuksBtrfs, Layout::BtrfsImpermanence] {
                let placed = preset(layout, Table::Mbr, 0, 8 * GIB, sector, Firmware::Bios).unwrap();
                assert!(placed.partitions[0].bootable);
                assert_eq!(placed.partitions[0].mbr_type, 0x83);
                let boot = placed.mounts.iter().find(|m| m.mountpoint == "/boot").unwrap();
                assert_eq!(
                    (boot.fstype.as_str(), boot.source.as_str()),
                    ("ext4", placed.partitions[0].device.as_str())
                );
                assert_eq!(placed.partitions.iter().filter(|p| p.bootable).count(), 1);
            }
            let placed = preset(Layout::Btrfs, Table::Mbr, 0, 8 * GIB, sector, Firmware::Bios).unwrap();
            assert_eq!(placed.partitions.len(), 1);
            assert!(placed.partitions[0].bootable);
        }
    }

    #[test]
    fn mbr_is_refused_on_uefi_and_beyond_its_reach() {
        let err = preset(Layout::Ext4, Table::Mbr, 0, 8 * GIB, 512, Firmware::Uefi).unwrap_err();
        assert!(text(err).contains("UEFI"));
        let err = preset(Layout::Ext4, Table::Mbr, 0, (2 << 40) + GIB, 512, Firmware::Bios).unwrap_err();
        assert!(text(err).contains("2048 GiB"));
        // 4096-byte sectors reach 16 TiB.
        assert!(preset(Layout::Ext4, Table::Mbr, 0, 3 << 40, 4096, Firmware::Bios).is_ok());
    }

    #[test]
    fn layouts_that_do_not_fit_are_refused_with_what_they_need() {
        for layout in Layout::PRESETS {
            for sector in [512, 4096] {
                let err = preset(layout, Table::Gpt, 0, 1200 * MIB, sector, Firmware::Uefi).unwrap_err();
                let text = text(err);
                assert!(
                    text.contains("too small") && text.contains("at least 15"),
                    "{layout:?}: {text}"
                );
            }
        }
        // Swap counts: 3 GiB of disk holds the root but not 4 GiB of swap besides.
        let err = preset(Layout::Ext4, Table::Gpt, 4 * GIB, 3 * GIB, 512, Firmware::Bios).unwrap_err();
        let text_of = text(err);
        assert!(text_of.contains("at least 5635 MiB"), "{text_of}");
        // LUKS needs room for its header on top of the root's minimum.
        let luks = preset(Layout::LuksExt4, Table::Gpt, 0, 1540 * MIB, 512, Firmware::Bios).unwrap_err();
        assert!(text(luks).contains("too small"));
        assert!(preset(Layout::Ext4, Table::Gpt, 0, 1540 * MIB, 512, Firmware::Bios).is_ok());
    }

    fn custom(json: serde_json::Value, firmware: Firmware) -> Result<Placed> {
        let storage: Storage = serde_json::from_value(json)?;
        place(&storage, &disk("vda", 10 * GIB, 512, "S"), firmware, GIB, &ids())
    }

    fn esp() -> serde_json::Value {
        serde_json::json!({"size": "512M", "type": "esp",
            "filesystem": {"type": "vfat", "mountpoint": "/boot"}})
    }

    #[test]
    fn presets_and_their_declarative_form_plan_alike() {
        let storage = storage_for(Layout::LuksBtrfs, Table::Gpt, GIB).unwrap();
        let json = serde_json::to_value(&storage).unwrap();
        let again: Storage = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(again, storage);
        assert_eq!(json["partitions"][3]["filesystem"]["type"], "luks");
        assert_eq!(
            json["partitions"][3]["filesystem"]["filesystem"]["subvolumes"][1]["name"],
            "@nix"
        );
        let d = disk("vda", 10 * GIB, 512, "S");
        assert_eq!(
            place(&storage, &d, Firmware::Uefi, GIB, &ids()).unwrap(),
            place(&again, &d, Firmware::Uefi, GIB, &ids()).unwrap()
        );
    }

    #[test]
    fn declarative_layout_with_start_offsets_and_data_filesystem() {
        let placed = custom(
            serde_json::json!({"partitions": [
                esp(),
                {"size": "4G", "start": "1G", "filesystem": {"type": "ext4", "label": "root", "mountpoint": "/"}},
                {"size": "rest", "filesystem": {"type": "btrfs", "mountpoint": "/srv",
                    "mount_options": ["noatime"], "subvolumes": [{"name": "data", "mountpoint": "/srv/data"}]}}
            ]}),
            Firmware::Uefi,
        )
        .unwrap();
        let extents: Vec<(u64, u64)> = placed
            .partitions
            .iter()
            .map(|p| (p.start_bytes, p.size_bytes))
            .collect();
        assert_eq!(
            extents,
            [(MIB, 512 * MIB), (GIB, 4 * GIB), (5 * GIB, 5 * GIB - MIB)]
        );
        assert_eq!(
            mounts(&placed),
            owned(&[
                ("/", "ext4", ""),
                ("/boot", "vfat", ""),
                ("/srv", "btrfs", "noatime"),
                ("/srv/data", "btrfs", "subvol=data"),
            ])
        );
        assert_eq!(placed.partitions[0].type_guid, TYPE_ESP);
        assert_eq!(placed.partitions[2].type_guid, TYPE_LINUX);
    }

    #[test]
    fn declarative_errors_name_the_problem() {
        let root = serde_json::json!({"size": "rest", "filesystem": {"type": "ext4", "mountpoint": "/"}});
        let cases = [
            (
                serde_json::json!({"partitions": [esp(), {"size": "2G", "start": "100M",
                "filesystem": {"type": "ext4", "mountpoint": "/"}}]}),
                "overlap",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "20G",
                "filesystem": {"type": "ext4", "mountpoint": "/"}}]}),
                "too small",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest",
                "filesystem": {"type": "xfs", "mountpoint": "/"}}]}),
                "filesystem type \"xfs\"",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest",
                "filesystem": {"type": "zfs", "mountpoint": "/"}}]}),
                "ZFS",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "2G",
                "filesystem": {"type": "ext4", "mountpoint": "/"}}, root.clone()]}),
                "two root",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest",
                "filesystem": {"type": "ext4", "mountpoint": "/home"}}]}),
                "no root",
            ),
            (
                serde_json::json!({"partitions": [{"size": "rest",
                "filesystem": {"type": "ext4", "mountpoint": "/"}}]}),
                "EFI system partition",
            ),
            (
                serde_json::json!({"partitions": [esp(), root.clone(), {"size": "rest",
                "filesystem": {"type": "swap"}}]}),
                "second partition asks for the rest",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest", "filesystem": {"type": "ext4",
                "mountpoint": "/", "mount_options": ["noatime,nodev"]}}]}),
                "mount option",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest", "filesystem": {"type": "luks",
                "filesystem": {"type": "luks", "filesystem": {"type": "ext4", "mountpoint": "/"}}}}]}),
                "LUKS inside LUKS",
            ),
            (
                serde_json::json!({"partitions": [esp(), root.clone()], "tmpfs": [{"mountpoint": "/tmp"}],
                "persist": "/tmp"}),
                "persist",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest", "filesystem": {"type": "btrfs",
                "subvolumes": [{"name": "@persist", "mountpoint": "/persist"}]}}],
                "tmpfs": [{"mountpoint": "/"}], "persist": "/persist"}),
                "Nix store would live in RAM",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "1G", "part_type": "x"}]}),
                "unknown field",
            ),
        ];
        for (json, needle) in cases {
            let result = serde_json::from_value::<Storage>(json.clone())
                .map_err(anyhow::Error::from)
                .and_then(|s| place(&s, &disk("vda", 10 * GIB, 512, "S"), Firmware::Uefi, GIB, &ids()));
            let err = result.expect_err(&json.to_string());
            let text = format!("{err:#}");
            assert!(text.contains(needle), "{json}: {text}");
        }
    }

    #[test]
    fn bios_needs_a_readable_boot_and_a_bios_boot_partition() {
        let root_in_luks = serde_json::json!({"size": "rest", "filesystem": {"type": "luks",
            "filesystem": {"type": "ext4", "mountpoint": "/"}}});
        let err = custom(
            serde_json::json!({"partitions": [{"size": "1M", "type": "bios-boot"}, root_in_luks.clone()]}),
            Firmware::Bios,
        )
        .unwrap_err();
        assert!(text(err).contains("GRUB could not read /boot"));
        let err = custom(
            serde_json::json!({"partitions": [esp(), root_in_luks]}),
            Firmware::Bios,
        )
        .unwrap_err();
        assert!(text(err).contains("BIOS boot partition"));
        let err = custom(
            serde_json::json!({"table": "mbr", "partitions": [
                {"size": "1G", "bootable": true, "filesystem": {"type": "ext4", "mountpoint": "/boot"}},
                {"size": "rest", "bootable": true, "filesystem": {"type": "ext4", "mountpoint": "/"}}]}),
            Firmware::Bios,
        )
        .unwrap_err();
        assert!(text(err).contains("more than one partition has the boot flag"));
        let five: Vec<serde_json::Value> = (0..5).map(|_| serde_json::json!({"size": "1G"})).collect();
        let err = custom(
            serde_json::json!({"table": "mbr", "partitions": five}),
            Firmware::Bios,
        )
        .unwrap_err();
        assert!(text(err).contains("primary partitions only"));
    }
}
