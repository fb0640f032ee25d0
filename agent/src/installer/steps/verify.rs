//! After `nixos-install` returns 0: checks that the disk can boot before the run says success.
//!
//! nixos-install can return 0 with a boot loader that never reached the disk (another tool
//! reports a failed GRUB install as success). So each thing the firmware and the first boot
//! will need is looked at on the disk itself, every check is listed in the report, and any
//! failed check fails the run, which then does not reboot.

use super::Execution;
use crate::installer::layout::{PlannedPartition, TYPE_BIOS_BOOT, TYPE_ESP};
use crate::installer::plan::Plan;
use crate::installer::report::Check;
use crate::installer::storage::Table;
use crate::machine::facts::Firmware;
use anyhow::{Context, Result};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where efivarfs shows the firmware's variables (mounted by the installer as PID 1).
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
const EFI_GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    let root = execution
        .target_root()
        .context("the target root is not mounted")?
        .to_path_buf();
    let checks = checks(plan, &root, Path::new(EFIVARS));
    for check in &checks {
        crate::console::line(&format!(
            "verify: {} {}: {}",
            if check.ok { "ok" } else { "FAILED" },
            check.name,
            check.detail
        ));
    }
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{} ({})", c.name, c.detail))
        .collect();
    execution.verification = checks;
    if !failed.is_empty() {
        anyhow::bail!(
            "nixos-install returned success, but the disk would not boot: {}",
            failed.join("; ")
        );
    }
    Ok(())
}

/// Every check for this plan, against the target mounted at `root`.
pub fn checks(plan: &Plan, root: &Path, efivars: &Path) -> Vec<Check> {
    let mut checks = vec![
        Check::new("system profile", system_profile(root)),
        Check::new("host keys", host_keys(plan, root)),
        Check::new("host flake", host_flake(plan, root)),
    ];
    match (plan.firmware, plan.table) {
        (Firmware::Bios, table) => {
            // The MBR is read once; both checks judge what boot.img says.
            let kernel_sector = grub_kernel_sector(plan);
            checks.push(Check::new(
                "GRUB boot code in the MBR",
                grub_boot_code(plan, &kernel_sector),
            ));
            checks.push(match table {
                Table::Gpt => Check::new(
                    "GRUB core.img in the BIOS boot partition",
                    grub_core_in_bios_boot_partition(plan, &kernel_sector),
                ),
                Table::Mbr => Check::new(
                    "GRUB core.img after the MBR",
                    grub_core_after_mbr(plan, &kernel_sector),
                ),
            });
        }
        (Firmware::Uefi, _) => {
            checks.push(Check::new(
                "EFI boot entry for a loader on the ESP",
                efi_boot_entry(plan, root, efivars),
            ));
        }
    }
    checks
}

/// `/nix/var/nix/profiles/system` (what nixos-install sets and the boot loader entries name)
/// must lead, through its generation links, into the target's own store.
fn system_profile(root: &Path) -> std::result::Result<String, String> {
    let profile = "/nix/var/nix/profiles/system";
    let resolved = resolve_in_root(root, Path::new(profile))?;
    if !resolved.starts_with("/nix/store/") {
        return Err(format!(
            "{profile} leads to {}, outside /nix/store",
            resolved.display()
        ));
    }
    let on_target = root.join(resolved.strip_prefix("/").unwrap_or(&resolved));
    if !on_target.is_dir() {
        return Err(format!(
            "{profile} leads to {}, which is not in the target's store",
            resolved.display()
        ));
    }
    if !on_target.join("bin/switch-to-configuration").exists() {
        return Err(format!(
            "{} has no bin/switch-to-configuration: not a NixOS system",
            resolved.display()
        ));
    }
    Ok(format!("{profile} -> {}", resolved.display()))
}

/// Follows symbolic links as the installed system will see them: absolute targets are taken
/// inside `root`, not in the installer.
fn resolve_in_root(root: &Path, path: &Path) -> std::result::Result<PathBuf, String> {
    let mut current = path.to_path_buf();
    for _ in 0..40 {
        let on_target = root.join(current.strip_prefix("/").unwrap_or(&current));
        match std::fs::symlink_metadata(&on_target) {
            Err(e) => return Err(format!("{} is missing on the target: {e}", current.display())),
            Ok(meta) if !meta.file_type().is_symlink() => return Ok(current),
            Ok(_) => {}
        }
        let target = std::fs::read_link(&on_target)
            .map_err(|e| format!("reading the link {}: {e}", current.display()))?;
        current = if target.is_absolute() {
            target
        } else {
            current.parent().unwrap_or(Path::new("/")).join(target)
        };
    }
    Err(format!("{} is a loop of symbolic links", path.display()))
}

fn host_keys(plan: &Plan, root: &Path) -> std::result::Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let key = plan.state_path("etc/ssh/ssh_host_ed25519_key");
    let keys: Vec<String> = if plan.provided_host_keys.is_empty() {
        vec![key]
    } else {
        plan.provided_host_keys
            .iter()
            .filter_map(|p| Path::new(p).file_name())
            .map(|name| plan.state_path(&format!("etc/ssh/{}", name.to_string_lossy())))
            .collect()
    };
    for key in &keys {
        let path = root.join(key.trim_start_matches('/'));
        let meta = std::fs::metadata(&path).map_err(|e| format!("{key}: {e}"))?;
        if meta.len() == 0 {
            return Err(format!("{key} is empty"));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{key} has mode {mode:o}; sshd refuses a private key others can read"
            ));
        }
        if !root
            .join(format!("{}.pub", key.trim_start_matches('/')))
            .is_file()
        {
            return Err(format!("{key}.pub is missing"));
        }
    }
    Ok(keys.join(", "))
}

fn host_flake(plan: &Plan, root: &Path) -> std::result::Result<String, String> {
    let dir = plan.state_path("etc/nixos");
    for file in crate::installer::steps::flake::files(plan) {
        let path = root.join(dir.trim_start_matches('/')).join(&file);
        if !path.is_file() {
            return Err(format!("{dir}/{file} is missing"));
        }
    }
    Ok(format!("{dir}/flake.nix"))
}

/// GRUB's boot.img keeps the sector of core.img's first sector at this offset of the MBR.
const GRUB_KERNEL_SECTOR_OFFSET: usize = 0x5c;

fn read_disk(plan: &Plan, offset: u64, len: usize) -> std::result::Result<Vec<u8>, String> {
    let file = std::fs::File::open(&plan.disk.dev_path)
        .map_err(|e| format!("opening {}: {e}", plan.disk.dev_path))?;
    let mut buffer = vec![0u8; len];
    file.read_exact_at(&mut buffer, offset)
        .map_err(|e| format!("reading {} at byte {offset}: {e}", plan.disk.dev_path))?;
    Ok(buffer)
}

/// The sector boot.img loads core.img from, in the disk's logical sectors; errors when the
/// MBR holds no GRUB boot code.
fn grub_kernel_sector(plan: &Plan) -> KernelSector {
    let mbr = read_disk(plan, 0, 512)?;
    if mbr[..440].iter().all(|b| *b == 0) {
        return Err(format!("the MBR of {} holds no boot code", plan.disk.dev_path));
    }
    if !mbr[..440].windows(4).any(|w| w == b"GRUB") {
        return Err(format!(
            "the MBR of {} holds boot code, but not GRUB's",
            plan.disk.dev_path
        ));
    }
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&mbr[GRUB_KERNEL_SECTOR_OFFSET..GRUB_KERNEL_SECTOR_OFFSET + 8]);
    Ok(u64::from_le_bytes(sector))
}

type KernelSector = std::result::Result<u64, String>;

fn grub_boot_code(plan: &Plan, kernel_sector: &KernelSector) -> std::result::Result<String, String> {
    let sector = kernel_sector.clone()?;
    Ok(format!(
        "{}: GRUB boot.img loads core.img from sector {sector}",
        plan.disk.dev_path
    ))
}

fn grub_core_in_bios_boot_partition(
    plan: &Plan,
    kernel_sector: &KernelSector,
) -> std::result::Result<String, String> {
    let partition = plan
        .partitions
        .iter()
        .find(|p| p.type_guid == TYPE_BIOS_BOOT)
        .ok_or("the plan has no BIOS boot partition")?;
    let sector = kernel_sector.clone()?;
    let sector_bytes = u64::from(plan.disk.logical_sector);
    if sector.checked_mul(sector_bytes) != Some(partition.start_bytes) {
        return Err(format!(
            "boot.img loads core.img from sector {sector}, but the BIOS boot partition {} starts at sector {}",
            partition.device,
            partition.start_bytes / sector_bytes
        ));
    }
    core_img_at(plan, partition.start_bytes, &partition.device)
}

fn grub_core_after_mbr(plan: &Plan, kernel_sector: &KernelSector) -> std::result::Result<String, String> {
    let sector = kernel_sector.clone()?;
    let sector_bytes = u64::from(plan.disk.logical_sector);
    let first_partition = plan
        .partitions
        .iter()
        .map(|p: &PlannedPartition| p.start_bytes)
        .min();
    let offset = sector.saturating_mul(sector_bytes);
    if sector == 0 || first_partition.is_some_and(|start| offset >= start) {
        return Err(format!(
            "boot.img loads core.img from sector {sector}, which is not in the gap before the first partition"
        ));
    }
    core_img_at(plan, offset, "the gap after the MBR")
}

/// core.img starts with diskboot.img, whose last bytes are the first block list entry: a
/// non-empty sector, not zeros.
fn core_img_at(plan: &Plan, offset: u64, place: &str) -> std::result::Result<String, String> {
    let first = read_disk(plan, offset, 512)?;
    if first.iter().all(|b| *b == 0) {
        return Err(format!("{place} is empty: core.img was not written"));
    }
    Ok(format!("core.img at byte {offset} ({place})"))
}

/// The ESP's partition and where it is mounted under the target root.
fn esp(plan: &Plan) -> Option<(&PlannedPartition, String)> {
    let partition = plan
        .partitions
        .iter()
        .find(|p| p.type_guid == TYPE_ESP || p.mbr_type == 0xef)?;
    let mount = plan.mounts.iter().find(|m| m.source == partition.device)?;
    Some((partition, mount.mountpoint.clone()))
}

/// The firmware boots what `BootOrder` names; bootctl and grub-install add their entry there.
/// One `Boot####` entry must name the ESP (by its partition GUID) and a file on it that is
/// a PE executable.
fn efi_boot_entry(plan: &Plan, root: &Path, efivars: &Path) -> std::result::Result<String, String> {
    let (partition, mountpoint) = esp(plan).ok_or("the plan mounts no ESP")?;
    let order = std::fs::read(efivars.join(format!("BootOrder-{EFI_GLOBAL_GUID}")))
        .map_err(|e| format!("reading BootOrder from {}: {e}", efivars.display()))?;
    // efivarfs files start with the variable's 4 attribute bytes.
    let numbers: Vec<u16> = order
        .get(4..)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
        .collect();
    let mut seen = Vec::new();
    for number in numbers {
        let name = format!("Boot{number:04X}");
        let Ok(bytes) = std::fs::read(efivars.join(format!("{name}-{EFI_GLOBAL_GUID}"))) else {
            continue;
        };
        let Some(option) = LoadOption::parse(bytes.get(4..).unwrap_or_default()) else {
            continue;
        };
        let on_esp = option
            .partition_guid
            .as_deref()
            .is_some_and(|guid| guid.eq_ignore_ascii_case(&partition.guid));
        let (true, Some(file)) = (on_esp, option.file.as_deref()) else {
            seen.push(format!("{name} {:?}", option.description));
            continue;
        };
        let relative = file.trim_start_matches('\\').replace('\\', "/");
        let path = root.join(mountpoint.trim_start_matches('/')).join(&relative);
        let head = std::fs::read(&path).map_err(|e| {
            format!(
                "{name} ({:?}) names {file} on the ESP, which cannot be read: {e}",
                option.description
            )
        })?;
        if !head.starts_with(b"MZ") {
            return Err(format!("{name} names {file}, which is not an EFI executable"));
        }
        return Ok(format!(
            "{name} {:?} -> {file} on {} (PARTUUID {})",
            option.description, partition.device, partition.guid
        ));
    }
    Err(format!(
        "no entry in BootOrder names a loader on the ESP {} (PARTUUID {}); entries: {}",
        partition.device,
        partition.guid,
        if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(", ")
        }
    ))
}

/// The parts of an `EFI_LOAD_OPTION` (UEFI spec 3.1.3) the check needs.
#[derive(Debug, PartialEq, Eq)]
struct LoadOption {
    description: String,
    /// The hard-drive media node's GPT partition GUID, upper case.
    partition_guid: Option<String>,
    /// The file path media node, `\EFI\...`.
    file: Option<String>,
}

impl LoadOption {
    fn parse(data: &[u8]) -> Option<LoadOption> {
        let path_len = u16::from_le_bytes([*data.get(4)?, *data.get(5)?]) as usize;
        let mut at = 6;
        let mut description = Vec::new();
        loop {
            let unit = u16::from_le_bytes([*data.get(at)?, *data.get(at + 1)?]);
            at += 2;
            if unit == 0 {
                break;
            }
            description.push(unit);
        }
        let mut nodes = data.get(at..at.checked_add(path_len)?)?;
        let mut option = LoadOption {
            description: String::from_utf16_lossy(&description),
            partition_guid: None,
            file: None,
        };
        while nodes.len() >= 4 {
            let (kind, subtype) = (nodes[0], nodes[1]);
            let len = u16::from_le_bytes([nodes[2], nodes[3]]) as usize;
            if len < 4 || len > nodes.len() || kind == 0x7f {
                break;
            }
            let body = &nodes[4..len];
            match (kind, subtype) {
                // Media / hard drive: number u32, start u64, size u64, signature [16],
                // format u8 (2 = GPT), signature type u8 (2 = GUID).
                (4, 1) if body.len() >= 38 && body[36] == 2 && body[37] == 2 => {
                    option.partition_guid = Some(guid_text(&body[20..36]));
                }
                // Media / file path: UCS-2, NUL-terminated.
                (4, 4) => {
                    let units: Vec<u16> = body
                        .chunks_exact(2)
                        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
                        .take_while(|unit| *unit != 0)
                        .collect();
                    option.file = Some(String::from_utf16_lossy(&units));
                }
                _ => {}
            }
            nodes = &nodes[len..];
        }
        Some(option)
    }
}

/// A GUID in its mixed-endian on-disk form as the usual text.
fn guid_text(bytes: &[u8]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{}",
        bytes[3],
        bytes[2],
        bytes[1],
        bytes[0],
        bytes[5],
        bytes[4],
        bytes[7],
        bytes[6],
        bytes[8],
        bytes[9],
        bytes[10..16]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ucs2(text: &str) -> Vec<u8> {
        text.encode_utf16()
            .chain([0])
            .flat_map(|unit| unit.to_le_bytes())
            .collect()
    }

    /// An EFI_LOAD_OPTION as bootctl writes it: HD(GPT, guid) then File(path) then End.
    fn load_option(description: &str, guid_bytes: [u8; 16], file: &str) -> Vec<u8> {
        let mut hd = vec![4u8, 1, 42, 0];
        hd.extend(2u32.to_le_bytes());
        hd.extend(4096u64.to_le_bytes());
        hd.extend(1_048_576u64.to_le_bytes());
        hd.extend(guid_bytes);
        hd.extend([2, 2]);
        let path = ucs2(file);
        let mut fp = vec![4u8, 4];
        fp.extend(((4 + path.len()) as u16).to_le_bytes());
        fp.extend(path);
        let mut nodes = hd;
        nodes.extend(fp);
        nodes.extend([0x7f, 0xff, 4, 0]);
        let mut data = 1u32.to_le_bytes().to_vec();
        data.extend((nodes.len() as u16).to_le_bytes());
        data.extend(ucs2(description));
        data.extend(nodes);
        data
    }

    const GUID_BYTES: [u8; 16] = [
        0x78, 0x56, 0x34, 0x12, 0xbc, 0x9a, 0xf0, 0xde, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef,
    ];
    const GUID_TEXT: &str = "12345678-9ABC-DEF0-0123-456789ABCDEF";

    #[test]
    fn load_options_parse_as_the_spec_lays_them_out() {
        let option = LoadOption::parse(&load_option(
            "Linux Boot Manager",
            GUID_BYTES,
            "\\EFI\\systemd\\systemd-bootx64.efi",
        ))
        .unwrap();
        assert_eq!(option.description, "Linux Boot Manager");
        assert_eq!(option.partition_guid.as_deref(), Some(GUID_TEXT));
        assert_eq!(
            option.file.as_deref(),
            Some("\\EFI\\systemd\\systemd-bootx64.efi")
        );
        // Cut short anywhere: no panic, at most a partial answer.
        let whole = load_option("x", GUID_BYTES, "\\a.efi");
        for len in 0..whole.len() {
            let _ = LoadOption::parse(&whole[..len]);
        }
    }

    #[test]
    fn profiles_resolve_inside_the_target_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let system = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web1";
        std::fs::create_dir_all(r.join(&system[1..]).join("bin")).unwrap();
        std::fs::create_dir_all(r.join("nix/var/nix/profiles")).unwrap();
        std::os::unix::fs::symlink(system, r.join("nix/var/nix/profiles/system-1-link")).unwrap();
        std::os::unix::fs::symlink("system-1-link", r.join("nix/var/nix/profiles/system")).unwrap();
        let err = system_profile(r).unwrap_err();
        assert!(err.contains("no bin/switch-to-configuration"), "{err}");
        std::fs::write(r.join(&system[1..]).join("bin/switch-to-configuration"), "").unwrap();
        assert_eq!(
            system_profile(r).unwrap(),
            format!("/nix/var/nix/profiles/system -> {system}")
        );
        // A link that leaves the store, and a loop.
        std::fs::remove_file(r.join("nix/var/nix/profiles/system-1-link")).unwrap();
        std::os::unix::fs::symlink("/etc", r.join("nix/var/nix/profiles/system-1-link")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        assert!(system_profile(r).unwrap_err().contains("outside /nix/store"));
        std::fs::remove_file(r.join("nix/var/nix/profiles/system-1-link")).unwrap();
        std::os::unix::fs::symlink("system", r.join("nix/var/nix/profiles/system-1-link")).unwrap();
        assert!(system_profile(r).unwrap_err().contains("loop"));
        let empty = tempfile::tempdir().unwrap();
        assert!(system_profile(empty.path())
            .unwrap_err()
            .contains("missing on the target"));
    }

    #[test]
    fn efi_entries_must_name_a_loader_on_this_esp() {
        use crate::input::config::Config;
        use crate::installer::plan::tests::{disk, facts, ids};
        let root = tempfile::tempdir().unwrap();
        let efivars = tempfile::tempdir().unwrap();
        let mut facts = facts(vec![disk("vda", 10 << 30, 512, "S")]);
        facts.firmware = Firmware::Uefi;
        let mut config = Config::default();
        config.runtime_info.disk = Some(crate::input::runtime_info::DiskSelector {
            path: Some("/dev/vda".into()),
            ..Default::default()
        });
        let mut plan = crate::installer::plan::make(&config, &facts, &ids()).unwrap();
        let esp = plan
            .partitions
            .iter_mut()
            .find(|p| p.type_guid == TYPE_ESP)
            .unwrap();
        esp.guid = GUID_TEXT.into();
        assert!(plan.mounts.iter().any(|m| m.mountpoint == "/boot"));
        let var = |name: &str, data: &[u8]| {
            let mut bytes = 7u32.to_le_bytes().to_vec();
            bytes.extend(data);
            std::fs::write(efivars.path().join(format!("{name}-{EFI_GLOBAL_GUID}")), bytes).unwrap();
        };
        let err = efi_boot_entry(&plan, root.path(), efivars.path()).unwrap_err();
        assert!(err.contains("reading BootOrder"), "{err}");
        var("BootOrder", &[1, 0, 0, 0]);
        var(
            "Boot0000",
            &load_option("UEFI QEMU HARDDISK", [0; 16], "\\EFI\\BOOT\\BOOTX64.EFI"),
        );
        let err = efi_boot_entry(&plan, root.path(), efivars.path()).unwrap_err();
        assert!(err.contains("no entry in BootOrder"), "{err}");
        var(
            "Boot0001",
            &load_option(
                "Linux Boot Manager",
                GUID_BYTES,
                "\\EFI\\systemd\\systemd-bootx64.efi",
            ),
        );
        let err = efi_boot_entry(&plan, root.path(), efivars.path()).unwrap_err();
        assert!(err.contains("cannot be read"), "{err}");
        let loader = root.path().join("boot/EFI/systemd");
        std::fs::create_dir_all(&loader).unwrap();
        std::fs::write(loader.join("systemd-bootx64.efi"), b"MZ\x90\x00").unwrap();
        let ok = efi_boot_entry(&plan, root.path(), efivars.path()).unwrap();
        assert!(ok.starts_with("Boot0001 \"Linux Boot Manager\""), "{ok}");
    }
}
