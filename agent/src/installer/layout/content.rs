//! What each filesystem type puts in its partition or LUKS container: the filesystem to create
//! and its mounts, a swap area, or a LUKS container and what it holds; one function per type,
//! after the checks every type shares (label, size).

use super::checks::{check_component, check_mountpoint, check_name, check_options, err_at};
use super::extents::{align_down, align_up};
use super::mounts::MountOn;
use super::{
    fat_uuid, Filesystem, FsKind, LuksVolume, Pbkdf, PlanIds, PlannedMount, PlannedPartition, SwapArea,
    LUKS2_HEADER, MIN_ROOT_SIZE,
};
use crate::installer::storage::{FsSpec, FsType, MountSpec, SubvolumeSpec, GIB, MIB};
use anyhow::{bail, Result};
use std::collections::BTreeSet;

/// The KDF for LUKS keyslots, chosen for the machine's RAM: the installed system's initrd must
/// be able to unlock with the same RAM, next to itself, so argon2id's memory is capped well
/// below it, and a tiny machine gets PBKDF2, which needs none.
fn pbkdf_for(ram_bytes: u64) -> Pbkdf {
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

/// The smallest size a filesystem of this type can be created with here.
pub(super) fn min_size(kind: &FsType, sector: u64) -> u64 {
    match kind {
        // FAT32 needs 65525 clusters; with one sector per cluster that is ~33 MiB at 512 bytes
        // and ~257 MiB at 4096.
        FsType::Vfat(_) => align_up(65_600 * sector + 2 * MIB),
        // mkfs.btrfs refuses much less than this with separate data and metadata.
        FsType::Btrfs { .. } => 256 * MIB,
        FsType::Ext4(_) => 16 * MIB,
        FsType::Swap { .. } | FsType::Luks { .. } => MIB,
    }
}

/// The largest size a filesystem of this type can be created with here, where there is one:
/// FAT32 as the format step writes it counts sectors in 32 bits and has at most 0x0FFFFFF4
/// clusters of at most 32 KiB (2 TiB with 512-byte sectors, 8 TiB with 4096).
pub(super) fn max_size(kind: &FsType, sector: u64) -> Option<u64> {
    match kind {
        FsType::Vfat(_) => Some(align_down(
            (u32::MAX as u64 * sector).min(0x0FFF_FFF4 * 32 * 1024),
        )),
        _ => None,
    }
}

/// Filesystems that must not be squeezed: `/` and `/nix` hold the Nix store.
pub(super) fn holds_store(fs: &FsSpec) -> bool {
    let store = |mount: &MountSpec| matches!(mount.mountpoint.as_deref(), Some("/") | Some("/nix"));
    match &fs.kind {
        FsType::Vfat(mount) | FsType::Ext4(mount) => store(mount),
        FsType::Btrfs { mount, subvolumes } => store(mount) || subvolumes.iter().any(|s| store(&s.mount)),
        FsType::Swap { .. } => false,
        FsType::Luks { content, .. } => holds_store(content),
    }
}

/// Where one filesystem, swap area or LUKS container goes.
pub(super) struct Slot<'a> {
    /// Where `storage` describes it, for messages: `partitions[3].filesystem`.
    pub at: String,
    /// The partition, or the opened LUKS container on it.
    pub device: &'a str,
    pub size: u64,
    pub partition: &'a PlannedPartition,
    /// The partition's index in `storage.partitions`.
    pub index: usize,
    pub in_luks: bool,
}

impl Slot<'_> {
    /// A filesystem of `kind` filling this slot.
    fn filesystem(&self, kind: FsKind, label: &Option<String>, uuid: String) -> Filesystem {
        Filesystem {
            device: self.device.to_string(),
            kind,
            label: label.clone(),
            uuid,
            volume_id: None,
            size_bytes: self.size,
            subvolumes: Vec::new(),
        }
    }
}

/// A filesystem being created, as its mounts name it.
struct Created<'a> {
    slot: &'a Slot<'a>,
    kind: FsKind,
    /// How the installed system finds it.
    nix_device: String,
}

/// What goes on the partitions and in the LUKS containers, in the order it is described.
pub(super) struct Contents<'a> {
    ids: Ids<'a>,
    sector: u32,
    ram_bytes: u64,
    pub luks: Vec<LuksVolume>,
    pub filesystems: Vec<Filesystem>,
    pub mounts: Vec<MountOn>,
    pub swaps: Vec<SwapArea>,
}

impl<'a> Contents<'a> {
    pub fn new(ids: &'a PlanIds, sector: u32, ram_bytes: u64) -> Contents<'a> {
        Contents {
            ids: Ids { ids, uuid: 0, fat: 0 },
            sector,
            ram_bytes,
            luks: Vec::new(),
            filesystems: Vec::new(),
            mounts: Vec::new(),
            swaps: Vec::new(),
        }
    }

    /// Adds what `fs` puts in `slot`.
    pub fn add(&mut self, fs: &FsSpec, slot: &Slot) -> Result<()> {
        if let Some(label) = &fs.label {
            let max = match fs.kind {
                FsType::Vfat(_) => 11,
                FsType::Ext4(_) | FsType::Swap { .. } => 16,
                FsType::Luks { .. } => 47,
                FsType::Btrfs { .. } => 255,
            };
            check_name(&slot.at, "label", label, max, "")?;
        }
        // `/` and `/nix` hold the Nix store (a luks container is measured by what it holds).
        let floor = if !matches!(fs.kind, FsType::Luks { .. }) && holds_store(fs) {
            MIN_ROOT_SIZE
        } else {
            0
        };
        let min = min_size(&fs.kind, self.sector as u64).max(floor);
        if slot.size < min {
            return Err(err_at(
                &slot.at,
                format!(
                    "{} MiB is too small for {} (needs at least {} MiB)",
                    slot.size / MIB,
                    fs.kind.name(),
                    min.div_ceil(MIB)
                ),
                "make the partition larger.",
            ));
        }
        if let Some(max) = max_size(&fs.kind, self.sector as u64).filter(|max| slot.size > *max) {
            return Err(err_at(
                &slot.at,
                format!(
                    "{} GiB is too large for {} (at most {} GiB with {}-byte sectors)",
                    slot.size / GIB,
                    fs.kind.name(),
                    max / GIB,
                    self.sector
                ),
                "give the partition a size; an ESP needs no more than a few GiB.",
            ));
        }
        match &fs.kind {
            FsType::Vfat(mount) => self.vfat(&fs.label, mount, slot),
            FsType::Ext4(mount) => self.ext4(&fs.label, mount, slot),
            FsType::Btrfs { mount, subvolumes } => self.btrfs(&fs.label, mount, subvolumes, slot),
            FsType::Swap { random_encryption } => self.swap(&fs.label, *random_encryption, slot),
            FsType::Luks { name, content } => self.luks(&fs.label, name, content, slot),
        }
    }

    fn vfat(&mut self, label: &Option<String>, mount: &MountSpec, slot: &Slot) -> Result<()> {
        if slot.in_luks {
            return Err(err_at(
                &slot.at,
                "vfat inside LUKS could not be read by the firmware",
                "put the vfat filesystem (the ESP) directly on a partition.",
            ));
        }
        let volume_id = self.ids.fat_volume_id()?;
        let fs = Filesystem {
            volume_id: Some(volume_id),
            ..slot.filesystem(FsKind::Vfat, label, fat_uuid(volume_id))
        };
        self.create(fs, mount, slot)?;
        Ok(())
    }

    fn ext4(&mut self, label: &Option<String>, mount: &MountSpec, slot: &Slot) -> Result<()> {
        let uuid = self.ids.uuid()?;
        self.create(slot.filesystem(FsKind::Ext4, label, uuid), mount, slot)?;
        Ok(())
    }

    fn btrfs(
        &mut self,
        label: &Option<String>,
        mount: &MountSpec,
        subvolumes: &[SubvolumeSpec],
        slot: &Slot,
    ) -> Result<()> {
        let uuid = self.ids.uuid()?;
        let mut names = BTreeSet::new();
        for (i, sub) in subvolumes.iter().enumerate() {
            let sub_at = format!("{}.subvolumes[{i}]", slot.at);
            check_component(&sub_at, "subvolume name", &sub.name, 255, "@")?;
            if !names.insert(sub.name.clone()) {
                return Err(err_at(
                    &sub_at,
                    format!("subvolume {:?} is listed twice", sub.name),
                    "give each subvolume its own name.",
                ));
            }
        }
        let fs = Filesystem {
            subvolumes: subvolumes.iter().map(|sub| sub.name.clone()).collect(),
            ..slot.filesystem(FsKind::Btrfs, label, uuid)
        };
        let created = self.create(fs, mount, slot)?;
        for (i, sub) in subvolumes.iter().enumerate() {
            let sub_at = format!("{}.subvolumes[{i}]", slot.at);
            self.mount(&sub_at, &sub.mount, &created, Some(&sub.name))?;
        }
        Ok(())
    }

    fn swap(&mut self, label: &Option<String>, random_encryption: bool, slot: &Slot) -> Result<()> {
        if random_encryption && slot.in_luks {
            return Err(err_at(
                &slot.at,
                "random_encryption swap inside LUKS would be encrypted twice",
                "use plain swap inside the container, or random_encryption swap directly on a partition.",
            ));
        }
        let uuid = self.ids.uuid()?;
        let (device_now, nix_device) = if random_encryption {
            // A new key at every boot destroys the old contents, so the system must
            // find the partition by something that is not inside it.
            (
                format!("/dev/mapper/nixos-kexec-swap{}", self.swaps.len()),
                format!("/dev/disk/by-partuuid/{}", slot.partition.partuuid),
            )
        } else {
            (slot.device.to_string(), format!("/dev/disk/by-uuid/{uuid}"))
        };
        self.swaps.push(SwapArea {
            partition: slot.partition.device.clone(),
            device: device_now,
            uuid,
            label: label.clone(),
            random_encryption,
            nix_device,
            sector_size: self.sector,
        });
        Ok(())
    }

    fn luks(
        &mut self,
        label: &Option<String>,
        name: &Option<String>,
        content: &FsSpec,
        slot: &Slot,
    ) -> Result<()> {
        if slot.in_luks {
            return Err(err_at(
                &slot.at,
                "LUKS inside LUKS is not supported",
                "put one luks container directly on the partition.",
            ));
        }
        let name = name
            .clone()
            .unwrap_or_else(|| format!("crypt{}", self.luks.len()));
        check_component(&slot.at, "LUKS name", &name, 32, "")?;
        if self.luks.iter().any(|l| l.name == name) {
            return Err(err_at(
                &slot.at,
                format!("LUKS name {name:?} is used twice"),
                "give each luks container its own name.",
            ));
        }
        let uuid = self.ids.uuid()?;
        let open = format!("/dev/mapper/{name}");
        self.luks.push(LuksVolume {
            device: slot.device.to_string(),
            name,
            uuid,
            label: label.clone(),
            sector_size: self.sector,
            pbkdf: pbkdf_for(self.ram_bytes),
            open_device: open.clone(),
        });
        let inside = Slot {
            at: format!("{}.filesystem", slot.at),
            device: &open,
            size: slot.size.saturating_sub(LUKS2_HEADER),
            partition: slot.partition,
            index: slot.index,
            in_luks: true,
        };
        self.add(content, &inside)
    }

    /// Records `fs` to be created, and mounts its top level where `mount` says.
    fn create<'s>(&mut self, fs: Filesystem, mount: &MountSpec, slot: &'s Slot) -> Result<Created<'s>> {
        let created = Created {
            slot,
            kind: fs.kind,
            nix_device: format!("/dev/disk/by-uuid/{}", fs.uuid),
        };
        self.filesystems.push(fs);
        self.mount(&slot.at, mount, &created, None)?;
        Ok(created)
    }

    /// Mounts `fs` (or one of its btrfs subvolumes) where `mount` says, if anywhere.
    fn mount(&mut self, at: &str, mount: &MountSpec, fs: &Created, subvolume: Option<&str>) -> Result<()> {
        let Some(mountpoint) = &mount.mountpoint else {
            if !mount.mount_options.is_empty() || mount.needed_for_boot {
                return Err(err_at(
                    at,
                    "mount options without a mountpoint",
                    "add a mountpoint or remove the options.",
                ));
            }
            return Ok(());
        };
        check_mountpoint(at, mountpoint)?;
        check_options(at, &mount.mount_options)?;
        let options = subvolume
            .map(|name| format!("subvol={name}"))
            .into_iter()
            .chain(mount.mount_options.iter().cloned())
            .collect();
        self.mounts.push(MountOn {
            mount: PlannedMount {
                source: fs.slot.device.to_string(),
                fstype: fs.kind.name().into(),
                mountpoint: mountpoint.clone(),
                options,
                nix_device: fs.nix_device.clone(),
                needed_for_boot: mount.needed_for_boot,
                subvolume: subvolume.map(String::from),
            },
            partition: Some(fs.slot.index),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config::Layout;
    use crate::installer::layout::tests::{assert_refusals, esp, mounts, owned, preset};
    use crate::installer::storage::Table;
    use crate::machine::facts::Firmware;

    /// The format step cannot make a FAT32 beyond 2^32 sectors: refused while planning.
    #[test]
    fn fat32_has_a_largest_size() {
        let storage: crate::installer::storage::Storage = serde_json::from_value(serde_json::json!({
            "partitions": [
                {"size": "3T", "type": "esp", "filesystem": {"type": "vfat", "mountpoint": "/boot"}},
                {"size": "rest", "filesystem": {"type": "ext4", "mountpoint": "/"}}]}))
        .unwrap();
        let place = |sector| {
            super::super::place(
                &storage,
                &crate::installer::plan::tests::disk("vda", 4 << 40, sector, "S"),
                crate::machine::facts::Firmware::Uefi,
                GIB,
                &crate::installer::plan::tests::ids(),
            )
        };
        let err = place(512).unwrap_err();
        assert!(
            format!("{err:#}").contains("partitions[0].filesystem: 3072 GiB is too large for vfat (at most 2047 GiB with 512-byte sectors)"),
            "{err:#}"
        );
        assert!(place(4096).is_ok(), "4096-byte sectors reach 8 TiB");
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
    fn declarative_errors_name_the_problem() {
        let in_luks = |inner: serde_json::Value| {
            serde_json::json!({"partitions": [esp(),
                {"size": "4G", "filesystem": {"type": "ext4", "mountpoint": "/"}},
                {"size": "rest", "filesystem": {"type": "luks", "filesystem": inner}}]})
        };
        let cases = [
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest", "filesystem": {"type": "luks",
                "filesystem": {"type": "luks", "filesystem": {"type": "ext4", "mountpoint": "/"}}}}]}),
                "LUKS inside LUKS",
            ),
            (
                in_luks(serde_json::json!({"type": "vfat", "mountpoint": "/srv"})),
                "partitions[2].filesystem.filesystem: vfat inside LUKS",
            ),
            (
                in_luks(serde_json::json!({"type": "swap", "random_encryption": true})),
                "encrypted twice",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest", "filesystem": {"type": "btrfs",
                "subvolumes": [{"name": "@", "mountpoint": "/"}, {"name": "@"}]}}]}),
                "partitions[1].filesystem.subvolumes[1]: subvolume \"@\" is listed twice",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest", "filesystem": {"type": "btrfs",
                "subvolumes": [{"name": "@", "mount_options": ["noatime"]}]}}]}),
                "mount options without a mountpoint",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "200M", "filesystem": {"type": "btrfs",
                "mountpoint": "/srv"}}, {"size": "rest", "filesystem": {"type": "ext4", "mountpoint": "/"}}]}),
                "200 MiB is too small for btrfs (needs at least 256 MiB)",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest", "filesystem": {"type": "ext4",
                "label": "much-too-long-label", "mountpoint": "/"}}]}),
                "label \"much-too-long-label\" is not allowed",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest", "filesystem": {"type": "btrfs",
                "subvolumes": [{"name": "@", "mountpoint": "/"}, {"name": ".."}]}}]}),
                "partitions[1].filesystem.subvolumes[1]: subvolume name \"..\" is not allowed",
            ),
            (
                serde_json::json!({"partitions": [esp(), {"size": "rest", "filesystem": {"type": "luks",
                "name": "-cryptroot", "filesystem": {"type": "ext4", "mountpoint": "/"}}}]}),
                "partitions[1].filesystem: LUKS name \"-cryptroot\" is not allowed",
            ),
        ];
        assert_refusals(&cases);
    }
}
