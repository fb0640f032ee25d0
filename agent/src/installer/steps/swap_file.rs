//! A temporary swap file for the install step, on a machine with less than 2 GiB of RAM whose
//! layout has no swap: decided while planning ([`decide`], so `nixos-kexec plan` shows it),
//! made when the install step starts and removed when it ends, whether it succeeded or not
//! ([`while_installing`]). It lives on the filesystem that will hold /nix, where nixos-install
//! writes the store; the installed system never sees it (the hardware configuration lists the
//! layout's swap only, and the file is gone before the verify step).

use super::swap::{self, SwapOn};
use crate::console;
use crate::input::config::Step;
use crate::installer::layout::{FsKind, Placed};
use crate::installer::plan::Plan;
use crate::installer::storage::{GIB, MIB};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// At the top of the filesystem holding /nix; a name no NixOS file has.
pub const FILE_NAME: &str = ".nixos-kexec-swap";
/// Below this much RAM the install gets swap: RAM and swap together are brought up to it
/// (issue #11: a 1 GB machine often runs out halfway through evaluating nixpkgs, and
/// nixos-anywhere's kexec image is tested with 1.5-2 GiB).
pub const RAM_AND_SWAP: u64 = 2 * GIB;
/// Less swap than this is not worth the disk it takes; a filesystem that cannot spare it
/// gets none.
pub const SMALLEST: u64 = 256 * MIB;
/// The store needs the rest: a swap file takes at most this share (1/4) of its filesystem.
const SHARE_OF_FILESYSTEM: u64 = 4;
/// `FS_NOCOW_FL` of include/uapi/linux/fs.h (the `C` of chattr); libc does not name it.
const NOCOW_FLAG: libc::c_int = 0x0080_0000;

// The kernel reads and writes an int, whatever the request number's size says.
nix::ioctl_read_bad!(get_inode_flags, libc::FS_IOC_GETFLAGS, libc::c_int);
nix::ioctl_write_ptr_bad!(set_inode_flags, libc::FS_IOC_SETFLAGS, libc::c_int);

/// Whether the install step gets a swap file, and why: part of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum TemporarySwap {
    /// A swap file of `size_bytes` at `path` (in the installer, under the mount root) on a
    /// `filesystem`, for the install step only.
    File {
        path: String,
        size_bytes: u64,
        filesystem: FsKind,
        why: String,
    },
    /// Enough RAM, swap in the layout, or no install step.
    NotNeeded { why: String },
    /// Little RAM, but nowhere to put a swap file: the console says so when the install starts.
    NoRoom { why: String },
}

/// The swap file the install step gets on a machine with `ram_bytes` of RAM (0: unknown) and
/// the layout `placed`, with the target mounted under `mount_root`.
pub fn decide(ram_bytes: u64, steps: &[Step], placed: &Placed, mount_root: &str) -> TemporarySwap {
    let not_needed = |why: String| TemporarySwap::NotNeeded { why };
    if !steps.contains(&Step::Install) {
        return not_needed("the install step is not planned".into());
    }
    if let Some(area) = placed.swaps.first() {
        return not_needed(format!("the layout has swap on {}", area.partition));
    }
    if ram_bytes == 0 {
        return not_needed("the RAM size is unknown".into());
    }
    let ram_mib = ram_bytes / MIB;
    if ram_bytes >= RAM_AND_SWAP {
        return not_needed(format!("{ram_mib} MiB of RAM is enough (2 GiB or more)"));
    }
    let little_ram = format!("{ram_mib} MiB of RAM and no swap in the layout");
    let Some(store) = placed
        .mounts
        .iter()
        .filter(|m| holds("/nix", &m.mountpoint))
        .max_by_key(|m| m.mountpoint.len())
    else {
        return TemporarySwap::NoRoom {
            why: format!("{little_ram}, but nothing is mounted on / or /nix"),
        };
    };
    let filesystem = placed
        .filesystems
        .iter()
        .find(|fs| fs.device == store.source && matches!(fs.kind, FsKind::Ext4 | FsKind::Btrfs));
    let Some(filesystem) = filesystem else {
        return TemporarySwap::NoRoom {
            why: format!(
                "{little_ram}, but /nix is on {} {}, which cannot hold a swap file",
                store.fstype, store.source
            ),
        };
    };
    let wanted = round_up_to_mib(RAM_AND_SWAP - ram_bytes).max(SMALLEST);
    let room = filesystem.size_bytes / SHARE_OF_FILESYSTEM / MIB * MIB;
    let fs_mib = filesystem.size_bytes / MIB;
    if room < SMALLEST {
        return TemporarySwap::NoRoom {
            why: format!(
                "{little_ram}, but a quarter of the {fs_mib} MiB filesystem holding /nix is less than {} MiB",
                SMALLEST / MIB
            ),
        };
    }
    let size_bytes = wanted.min(room);
    let sized = if size_bytes < wanted {
        format!("its size is a quarter of the {fs_mib} MiB filesystem, the most the store can spare")
    } else if wanted == SMALLEST {
        "its size is the smallest worth making".to_string()
    } else {
        "its size brings RAM and swap to 2 GiB".to_string()
    };
    let dir = Path::new(mount_root).join(store.mountpoint.trim_start_matches('/'));
    TemporarySwap::File {
        path: dir.join(FILE_NAME).to_string_lossy().into_owned(),
        size_bytes,
        filesystem: filesystem.kind,
        why: format!("{little_ram}; {sized}"),
    }
}

/// Whether `path` is on the mount at `mountpoint` (or below it).
fn holds(path: &str, mountpoint: &str) -> bool {
    mountpoint == "/" || path == mountpoint || path.starts_with(&format!("{mountpoint}/"))
}

fn round_up_to_mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB) * MIB
}

/// Runs `install` with the plan's swap file on, and removes the file afterwards, also when
/// `install` failed. A swap file that cannot be made is said on the console and the install
/// goes on without it (a prebuilt system may well fit in the RAM); one that cannot be removed
/// fails the step, since it would hold the target's unmount.
pub fn while_installing(plan: &Plan, install: impl FnOnce() -> Result<()>) -> Result<()> {
    let swap = match &plan.temporary_swap {
        TemporarySwap::File {
            path,
            size_bytes,
            filesystem,
            why,
        } => match SwapFile::create(Path::new(path), *size_bytes, *filesystem) {
            Ok(file) => {
                console::line(&format!(
                    "swap file on: {} MiB at {path} ({}) for the install, removed when it ends: {why}",
                    size_bytes / MIB,
                    filesystem.name()
                ));
                Some(file)
            }
            Err(e) => {
                console::line(&format!(
                    "swap file: could not make {path} ({e:#}); installing without it"
                ));
                None
            }
        },
        TemporarySwap::NoRoom { why } => {
            console::line(&format!("swap file: none for the install: {why}"));
            None
        }
        TemporarySwap::NotNeeded { why } => {
            log::info!("swap file: none for the install: {why}");
            None
        }
    };
    let installed = install();
    let Some(swap) = swap else {
        return installed;
    };
    let path = swap.path().display().to_string();
    match (installed, swap.remove()) {
        (installed, Ok(())) => {
            console::line(&format!("swap file off and removed: {path}"));
            installed
        }
        (Ok(()), Err(e)) => Err(e),
        (Err(e), Err(removing)) => {
            console::line(&format!("swap file: {removing:#}"));
            Err(e)
        }
    }
}

/// A swap file that exists: switched off and deleted when dropped (after a failure or a panic),
/// before the target is unmounted.
#[derive(Debug)]
pub struct SwapFile {
    path: PathBuf,
    on: Option<SwapOn>,
    exists: bool,
}

impl SwapFile {
    /// Makes a swap file of `size_bytes` at `path` on a `filesystem` and switches it on. The
    /// file is new (an existing one is an error, not overwritten), mode 0600, and preallocated
    /// so the kernel can map its blocks once: on btrfs it is NOCOW (set on the empty file:
    /// btrfs ignores it once data is written), so neither copied on write nor compressed,
    /// which swap needs. btrfs also refuses a swap file on a filesystem of several devices or
    /// in a subvolume with snapshots; the plan's btrfs is one partition and has neither.
    pub fn create(path: &Path, size_bytes: u64, filesystem: FsKind) -> Result<SwapFile> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut made = SwapFile {
            path: path.to_path_buf(),
            on: None,
            exists: true,
        };
        if filesystem == FsKind::Btrfs {
            set_nocow(&file).with_context(|| format!("making {} NOCOW", path.display()))?;
        }
        let length = libc::off_t::try_from(size_bytes).context("swap file size")?;
        nix::fcntl::fallocate(file.as_raw_fd(), nix::fcntl::FallocateFlags::empty(), 0, length)
            .with_context(|| format!("allocating {} MiB for {}", size_bytes / MIB, path.display()))?;
        let uuid = uuid::Uuid::new_v4().to_string();
        swap::write_header(&mut file, size_bytes, &uuid, None)
            .with_context(|| format!("writing the swap header to {}", path.display()))?;
        drop(file);
        let device = path.to_str().context("swap file path is not UTF-8")?;
        let on = SwapOn::on(device).with_context(|| match filesystem {
            FsKind::Btrfs => "btrfs takes a swap file only if it is NOCOW, uncompressed, on a single-device filesystem and in a subvolume without snapshots",
            _ => "the filesystem refused the swap file",
        })?;
        made.on = Some(on);
        Ok(made)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Switches the swap off and deletes the file.
    pub fn remove(mut self) -> Result<()> {
        if let Some(on) = self.on.take() {
            on.off()?;
        }
        self.exists = false;
        std::fs::remove_file(&self.path).with_context(|| format!("removing {}", self.path.display()))
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        // Off first: the kernel does not let go of an active swap file's blocks.
        self.on.take();
        if self.exists {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("removing the swap file {}: {e}", self.path.display());
            }
        }
    }
}

/// Sets the NOCOW attribute of the (still empty) `file`, and checks that it took.
fn set_nocow(file: &std::fs::File) -> Result<()> {
    let fd = file.as_raw_fd();
    let mut flags: libc::c_int = 0;
    // SAFETY: the ioctls read or write one int, which lives through each call.
    unsafe { get_inode_flags(fd, &mut flags) }.context("FS_IOC_GETFLAGS")?;
    flags |= NOCOW_FLAG;
    unsafe { set_inode_flags(fd, &flags) }.context("FS_IOC_SETFLAGS")?;
    unsafe { get_inode_flags(fd, &mut flags) }.context("FS_IOC_GETFLAGS")?;
    if flags & NOCOW_FLAG == 0 {
        bail!("the NOCOW attribute did not stay set");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config::{Config, Layout};
    use crate::installer::plan::tests::{disk, facts, ids};

    fn plan_with(config: &Config, ram_bytes: u64, disk_bytes: u64) -> Plan {
        let mut f = facts(vec![disk("vda", disk_bytes, 512, "A")]);
        f.ram_bytes = ram_bytes;
        crate::installer::plan::make(config, &f, &ids()).unwrap()
    }

    fn layout(layout: Layout) -> Config {
        Config {
            disk_auto: true,
            layout,
            disk_passphrase_given: true,
            ..Config::default()
        }
    }

    fn file_of(plan: &Plan) -> (&str, u64, FsKind) {
        match &plan.temporary_swap {
            TemporarySwap::File {
                path,
                size_bytes,
                filesystem,
                ..
            } => (path, *size_bytes, *filesystem),
            other => panic!("expected a swap file: {other:?}"),
        }
    }

    fn root_size(plan: &Plan) -> u64 {
        let root = &plan
            .mounts
            .iter()
            .find(|m| holds("/nix", &m.mountpoint))
            .unwrap()
            .source;
        plan.filesystems
            .iter()
            .find(|fs| &fs.device == root)
            .unwrap()
            .size_bytes
    }

    #[test]
    fn small_ram_without_swap_gets_a_file_up_to_2_gib() {
        let plan = plan_with(&layout(Layout::Ext4), 512 * MIB, 20 * GIB);
        assert_eq!(
            file_of(&plan),
            ("/mnt/.nixos-kexec-swap", 1536 * MIB, FsKind::Ext4)
        );
        let TemporarySwap::File { why, .. } = &plan.temporary_swap else {
            unreachable!()
        };
        assert_eq!(
            why,
            "512 MiB of RAM and no swap in the layout; its size brings RAM and swap to 2 GiB"
        );
        // Not a whole MiB short of 2 GiB: rounded up, and never below the floor.
        let plan = plan_with(&layout(Layout::Ext4), 1000 * MIB + 5, 20 * GIB);
        assert_eq!(file_of(&plan).1, 1048 * MIB);
        let plan = plan_with(&layout(Layout::Ext4), 2 * GIB - 1, 20 * GIB);
        assert_eq!(file_of(&plan).1, SMALLEST);
    }

    #[test]
    fn at_most_a_quarter_of_the_filesystem() {
        let plan = plan_with(&layout(Layout::Ext4), 256 * MIB, 3 * GIB);
        let quarter = root_size(&plan) / 4 / MIB * MIB;
        assert!(quarter < 1792 * MIB);
        assert_eq!(file_of(&plan).1, quarter);
        let TemporarySwap::File { why, .. } = &plan.temporary_swap else {
            unreachable!()
        };
        assert!(why.contains("a quarter of the"), "{why}");
    }

    #[test]
    fn enough_ram_swap_in_the_layout_or_no_install_step_get_none() {
        for ram in [2 * GIB, 4 * GIB, 0] {
            let plan = plan_with(&layout(Layout::Ext4), ram, 20 * GIB);
            assert!(
                matches!(plan.temporary_swap, TemporarySwap::NotNeeded { .. }),
                "{ram}: {:?}",
                plan.temporary_swap
            );
        }
        // A swap partition, and a random-key one behind LUKS.
        for preset in [Layout::Ext4, Layout::LuksBtrfs] {
            let config = Config {
                swap_bytes: GIB,
                ..layout(preset)
            };
            let plan = plan_with(&config, 512 * MIB, 20 * GIB);
            assert_eq!(
                plan.temporary_swap,
                TemporarySwap::NotNeeded {
                    why: format!("the layout has swap on {}", plan.swaps[0].partition)
                }
            );
        }
        let stop = Config {
            stop_before: Some(Step::Install),
            ..layout(Layout::Ext4)
        };
        assert_eq!(
            plan_with(&stop, 512 * MIB, 20 * GIB).temporary_swap,
            TemporarySwap::NotNeeded {
                why: "the install step is not planned".into()
            }
        );
    }

    #[test]
    fn a_luks_swap_in_a_declarative_layout_counts_as_swap() {
        let mut config = layout(Layout::Custom);
        config.runtime_info.storage = Some(
            serde_json::from_value(serde_json::json!({"partitions": [
                {"size": "1M", "type": "bios-boot"},
                {"size": "1G", "filesystem": {"type": "luks", "filesystem": {"type": "swap"}}},
                {"size": "rest", "filesystem": {"type": "ext4", "mountpoint": "/"}}
            ]}))
            .unwrap(),
        );
        let plan = plan_with(&config, 512 * MIB, 20 * GIB);
        assert!(
            matches!(plan.temporary_swap, TemporarySwap::NotNeeded { .. }),
            "{:?}",
            plan.temporary_swap
        );
    }

    /// The file goes where the store goes: the `@nix` subvolume of the btrfs presets, under
    /// /nix when `/` is a tmpfs.
    #[test]
    fn on_the_filesystem_that_holds_nix() {
        for preset in [Layout::Btrfs, Layout::BtrfsImpermanence, Layout::LuksBtrfs] {
            let plan = plan_with(&layout(preset), GIB, 20 * GIB);
            assert_eq!(
                file_of(&plan),
                ("/mnt/nix/.nixos-kexec-swap", GIB, FsKind::Btrfs),
                "{}",
                preset.name()
            );
        }
        let plan = plan_with(&layout(Layout::LuksExt4), GIB, 20 * GIB);
        assert_eq!(file_of(&plan).0, "/mnt/.nixos-kexec-swap");
    }

    #[test]
    fn no_room_on_a_small_filesystem_or_a_tmpfs() {
        let plan = plan_with(&layout(Layout::Ext4), 512 * MIB, 20 * GIB);
        let mut placed = Placed {
            table: plan.table,
            partitions: plan.partitions.clone(),
            luks: plan.luks.clone(),
            filesystems: plan.filesystems.clone(),
            mounts: plan.mounts.clone(),
            swaps: vec![],
            persist: None,
        };
        let root = placed
            .filesystems
            .iter_mut()
            .find(|fs| fs.kind == FsKind::Ext4)
            .unwrap();
        root.size_bytes = 1023 * MIB;
        let TemporarySwap::NoRoom { why } = decide(512 * MIB, &plan.steps, &placed, "/mnt") else {
            panic!("a 1023 MiB filesystem cannot spare 256 MiB");
        };
        assert!(why.contains("a quarter of the 1023 MiB filesystem"), "{why}");
        placed.mounts[0].source = "tmpfs".into();
        placed.mounts[0].fstype = "tmpfs".into();
        let TemporarySwap::NoRoom { why } = decide(512 * MIB, &plan.steps, &placed, "/mnt") else {
            panic!("a tmpfs holds no swap file");
        };
        assert!(why.contains("/nix is on tmpfs tmpfs"), "{why}");
    }

    /// The installed system never uses the file: its configuration names the layout's swap
    /// only, and none here.
    #[test]
    fn the_hardware_configuration_does_not_name_the_file() {
        let plan = plan_with(&layout(Layout::Ext4), 512 * MIB, 20 * GIB);
        file_of(&plan);
        let flake = crate::installer::steps::flake::render(&plan, None).unwrap();
        for text in [flake.configuration.as_ref().unwrap(), &flake.hardware] {
            assert!(!text.contains(FILE_NAME), "{text}");
        }
        let devices = flake
            .hardware
            .split_once("swapDevices = [")
            .and_then(|(_, rest)| rest.split_once("];"))
            .map(|(inside, _)| inside.trim());
        assert_eq!(devices, Some(""), "{}", flake.hardware);
    }

    #[test]
    fn the_decision_is_in_the_plan_json() {
        let plan = plan_with(&layout(Layout::Ext4), 512 * MIB, 20 * GIB);
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["temporary_swap"]["decision"], "file");
        assert_eq!(json["temporary_swap"]["path"], "/mnt/.nixos-kexec-swap");
        assert_eq!(json["temporary_swap"]["size_bytes"], 1536 * MIB);
        assert_eq!(json["temporary_swap"]["filesystem"], "ext4");
    }
}
