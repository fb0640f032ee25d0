//! Disk layouts end to end: the dev bundle boots in QEMU, the agent writes a layout chosen with
//! one word (or described in the runtime info), stops before the Nix install and powers off;
//! the images are then checked with tools we did not write: sgdisk/sfdisk, fsck.fat, e2fsck,
//! btrfs check and dump-tree, cryptsetup luksDump and --test-passphrase, blkid,
//! nix-instantiate --parse. What is inside a LUKS container is read by a second guest that
//! opens it with cryptsetup (the host has no dm-crypt).
//!
//! Run: cargo test -p nixos-kexec-tests --test layouts -- --nocapture

use anyhow::{ensure, Context, Result};
use nixos_kexec_tests::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD operator@laptop";
const PASSPHRASE: &str = "Layout-Test-Passphrase-5519-quartz";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const TYPE_BIOS: &str = "21686148-6449-6E6F-744E-656564454649";
const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const TYPE_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const TYPE_SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";
const NIC_MAC: &str = "52:54:00:4c:55:01";

/// `persist.nix` of a tmpfs-root preset: the host flake, machine-id and host keys under /persist.
const PERSIST_NIX: [&str; 4] = [
    "persist = \"/persist\";",
    "environment.etc.\"machine-id\".source = \"${persist}/etc/machine-id\";",
    "environment.etc.\"nixos\".source = \"${persist}/etc/nixos\";",
    "{ path = \"/persist/etc/ssh/ssh_host_ed25519_key\"; type = \"ed25519\"; }",
];
/// The tmpfs `/` of the impermanence presets in `hardware-configuration.nix`.
const TMPFS_ROOT: &str = "fileSystems.\"/\" = {\n    device = \"none\";\n    fsType = \"tmpfs\";\n    options = [ \"defaults\" \"size=25%\" \"mode=755\" ];";

fn key_param() -> String {
    format!("nixos_kexec.ssh_key={}", KEY.replace(' ', "+"))
}

/// Every preparing scenario: an SSH key, stop before the Nix install, power off after.
fn prepared(vm: Vm) -> Vm {
    vm.param(key_param())
        .param("nixos_kexec.stop_before=install")
        .param("nixos_kexec.after=poweroff")
}

/// The appended archive with the disk passphrase, as `nixos-kexec run --disk-key-file` makes it
/// (here with the trailing newline `echo` leaves, which the agent must drop).
fn secrets_cpio(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("secrets.cpio");
    Cpio::new()
        .file(
            "etc/nixos-kexec/secrets/disk-passphrase",
            0o600,
            format!("{PASSPHRASE}\n"),
        )
        .write_to(&path)?;
    Ok(path)
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

fn info_param(info: &Value) -> String {
    format!("nixos_kexec.info={}", base64(info.to_string().as_bytes()))
}

fn succeeded(out: &RunOutcome) -> Result<()> {
    out.expect_success()?;
    ensure!(out.exited_by_itself, "the VM should have powered off by itself");
    Ok(())
}

/// `(start, size, type)` of each partition, as sfdisk reads the table.
fn table(disk: &Path) -> Result<Vec<(u64, u64, String)>> {
    Ok(partitions(disk)?
        .into_iter()
        .map(|(_, start, size, entry)| {
            let kind = entry["type"].as_str().unwrap_or("").to_uppercase();
            (start, size, kind)
        })
        .collect())
}

fn expect_table(disk: &Path, expected: &[(u64, u64, &str)]) -> Result<()> {
    let found = table(disk)?;
    let expected: Vec<(u64, u64, String)> =
        expected.iter().map(|(s, l, t)| (*s, *l, t.to_string())).collect();
    ensure!(found == expected, "partitions {found:?}, expected {expected:?}");
    Ok(())
}

/// The size the last partition gets on a GPT disk: to the last whole MiB before the backup GPT.
fn gpt_rest(disk_size: u64, start: u64) -> u64 {
    disk_size - MIB - start
}

fn parse_all(files: &[(&str, &str)]) -> Result<()> {
    for (name, text) in files {
        nix_parse_str(text).with_context(|| format!("parsing the generated {name}"))?;
    }
    Ok(())
}

fn read(dir: &Path, path: &str) -> Result<String> {
    let full = dir.join(path.trim_start_matches('/'));
    std::fs::read_to_string(&full).with_context(|| format!("reading {}", full.display()))
}

fn mode(dir: &Path, path: &str) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    let full = dir.join(path.trim_start_matches('/'));
    Ok(std::fs::metadata(&full)
        .with_context(|| format!("stat {}", full.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

fn blkid_of(part: &Path, key: &str) -> Result<String> {
    let id = blkid(part)?;
    id.get(key)
        .cloned()
        .with_context(|| format!("blkid {} has no {key}: {id:?}", part.display()))
}

fn contains_all(what: &str, text: &str, needles: &[&str]) -> Result<()> {
    for needle in needles {
        ensure!(text.contains(needle), "{what} lacks {needle:?}:\n{text}");
    }
    Ok(())
}

/// The passphrase appears neither on the console nor anywhere in plain bytes on the disks.
fn passphrase_nowhere(out: &RunOutcome) -> Result<()> {
    ensure!(
        !out.log.contains(PASSPHRASE),
        "the disk passphrase appeared on the console"
    );
    for disk in &out.disks {
        ensure!(
            count_in_image(disk, PASSPHRASE.as_bytes())? == 0,
            "the disk passphrase is in plain bytes on {}",
            disk.display()
        );
    }
    Ok(())
}

/// The host key's fingerprint was printed and the private key is 0600.
fn host_key_checks(out: &RunOutcome, ssh_dir: &Path) -> Result<()> {
    let key = ssh_dir.join("ssh_host_ed25519_key");
    ensure!(mode(ssh_dir, "ssh_host_ed25519_key")? == 0o600, "host key mode");
    let fingerprint = ssh_keygen_fingerprint(&key)?;
    ensure!(
        out.contains(&format!("host key: {fingerprint}")),
        "fingerprint `{fingerprint}` not printed"
    );
    Ok(())
}

fn report_ok(text: &str) -> Result<Value> {
    let report: Value = serde_json::from_str(text)?;
    ensure!(report["result"] == "success", "report: {report}");
    ensure!(report["stopped_before"] == "install", "report: {report}");
    Ok(report)
}

#[test]
fn btrfs_uefi_nvme_4096() -> Result<()> {
    let bundle = dev_bundle()?;
    let out = prepared(Vm::new(&bundle))
        .firmware(Firmware::Uefi)
        .disk(
            DiskSpec::new(4 * GIB, DiskBus::Nvme)
                .sector(4096)
                .serial("BTRFS4K1"),
        )
        .param("nixos_kexec.disk=serial:BTRFS4K1")
        .param("nixos_kexec.layout=btrfs")
        .run()?;
    succeeded(&out)?;
    let disk = &out.disks[0];
    ensure!(gpt_sector_size(disk)? == Some(4096), "not a 4096-byte-sector GPT");
    sgdisk_verify(disk)?;
    expect_table(
        disk,
        &[
            (MIB, MIB, TYPE_BIOS),
            (2 * MIB, 512 * MIB, TYPE_ESP),
            (514 * MIB, gpt_rest(4 * GIB, 514 * MIB), TYPE_LINUX),
        ],
    )?;
    let esp = extract_partition(disk, 2)?;
    fsck_fat(&esp)?;
    let root = extract_partition(disk, 3)?;
    btrfs_check(&root)?;
    ensure!(blkid_of(&root, "TYPE")? == "btrfs", "root is not btrfs");
    ensure!(blkid_of(&root, "LABEL")? == "nixos", "root label");
    let names: BTreeSet<String> = btrfs_subvolumes(&root)?.into_iter().map(|(_, n)| n).collect();
    let expected: BTreeSet<String> = ["@", "@nix", "@home", "@log"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    ensure!(names == expected, "subvolumes {names:?}");

    let scratch = tempfile::tempdir()?;
    let top = scratch.path().join("at");
    btrfs_restore(&root, "@", &top)?;
    let flake = read(&top, "etc/nixos/flake.nix")?;
    let configuration = read(&top, "etc/nixos/configuration.nix")?;
    let hardware = read(&top, "etc/nixos/hardware-configuration.nix")?;
    parse_all(&[
        ("flake.nix", &flake),
        ("configuration.nix", &configuration),
        ("hardware-configuration.nix", &hardware),
    ])?;
    let uuid = blkid_of(&root, "UUID")?;
    let esp_uuid = blkid_of(&esp, "UUID")?;
    contains_all(
        "hardware-configuration.nix",
        &hardware,
        &[
            &format!("device = \"/dev/disk/by-uuid/{uuid}\""),
            &format!("device = \"/dev/disk/by-uuid/{esp_uuid}\""),
            "fileSystems.\"/\"",
            "options = [ \"subvol=@\" \"compress=zstd\" \"noatime\" ];",
            "options = [ \"subvol=@nix\" \"compress=zstd\" \"noatime\" ];",
            "options = [ \"subvol=@home\" \"compress=zstd\" \"noatime\" ];",
            "fileSystems.\"/var/log\"",
            "fsType = \"btrfs\";",
            "\"nvme\"",
        ],
    )?;
    contains_all("configuration.nix", &configuration, &[KEY])?;
    contains_all("hardware-configuration.nix", &hardware, &["firmware = \"uefi\""])?;
    host_key_checks(&out, &top.join("etc/ssh"))?;
    // /var/log is the @log subvolume, mounted over @: the report went there.
    let logs = scratch.path().join("log");
    btrfs_restore(&root, "@log", &logs)?;
    let report = report_ok(&read(&logs, "nixos-kexec/report.json")?)?;
    ensure!(report["layout"] == "btrfs", "report: {report}");
    ensure!(
        !top.join("var/log/nixos-kexec").exists(),
        "the report landed in @, not in the @log subvolume"
    );
    Ok(())
}

#[test]
fn btrfs_impermanence_bios_512() -> Result<()> {
    let bundle = dev_bundle()?;
    let out = prepared(Vm::new(&bundle))
        .disk(DiskSpec::new(4 * GIB, DiskBus::Virtio).serial("IMPERM01"))
        .param("nixos_kexec.disk=/dev/vda")
        .param("nixos_kexec.hostname=ephemeral")
        .param("nixos_kexec.layout=btrfs-impermanence")
        .run()?;
    succeeded(&out)?;
    let disk = &out.disks[0];
    sgdisk_verify(disk)?;
    expect_table(
        disk,
        &[
            (MIB, MIB, TYPE_BIOS),
            (2 * MIB, 512 * MIB, TYPE_ESP),
            (514 * MIB, gpt_rest(4 * GIB, 514 * MIB), TYPE_LINUX),
        ],
    )?;
    fsck_fat(&extract_partition(disk, 2)?)?;
    let root = extract_partition(disk, 3)?;
    btrfs_check(&root)?;
    let names: BTreeSet<String> = btrfs_subvolumes(&root)?.into_iter().map(|(_, n)| n).collect();
    let expected: BTreeSet<String> = ["@nix", "@persist"].iter().map(|s| s.to_string()).collect();
    ensure!(names == expected, "subvolumes {names:?}");

    let scratch = tempfile::tempdir()?;
    let persist = scratch.path().join("persist");
    btrfs_restore(&root, "@persist", &persist)?;
    let files = [
        "flake.nix",
        "configuration.nix",
        "hardware-configuration.nix",
        "persist.nix",
    ];
    let mut texts = Vec::new();
    for name in files {
        texts.push((name, read(&persist, &format!("etc/nixos/{name}"))?));
    }
    let refs: Vec<(&str, &str)> = texts.iter().map(|(n, t)| (*n, t.as_str())).collect();
    parse_all(&refs)?;
    let hardware = &texts[2].1;
    contains_all(
        "hardware-configuration.nix",
        hardware,
        &[
            TMPFS_ROOT,
            "options = [ \"subvol=@persist\" \"compress=zstd\" \"noatime\" ];\n    neededForBoot = true;",
            "options = [ \"subvol=@nix\" \"compress=zstd\" \"noatime\" ];",
        ],
    )?;
    contains_all("persist.nix", &texts[3].1, &PERSIST_NIX)?;
    contains_all("configuration.nix", &texts[1].1, &["./persist.nix"])?;
    contains_all("hardware-configuration.nix", hardware, &["firmware = \"bios\""])?;
    host_key_checks(&out, &persist.join("etc/ssh"))?;
    let machine_id = read(&persist, "etc/machine-id")?;
    ensure!(
        machine_id.len() == 33 && machine_id.trim().chars().all(|c| c.is_ascii_hexdigit()),
        "machine-id {machine_id:?}"
    );
    report_ok(&read(&persist, "var/log/nixos-kexec/report.json")?)?;
    ensure!(
        out.contains("--flake /mnt/persist/etc/nixos#ephemeral")
            || out.contains("\"/mnt/persist/etc/nixos#ephemeral\""),
        "the install would not use the flake under /persist"
    );
    Ok(())
}

/// What the guest mounts on /m from inside a LUKS container: the tree the installer's state
/// lives in, so the same paths (/m/etc/nixos, /m/etc/ssh, /m/var/log) serve every layout.
#[derive(Clone, Copy)]
enum Inside {
    Ext4,
    /// `@` on /m and `@log` on /m/var/log.
    Btrfs,
    /// `@persist` on /m: with a tmpfs `/` it holds what the others keep under `/`.
    BtrfsPersist,
}

/// Opens the LUKS container on `part` of `disk` in a guest, checks the filesystem inside and
/// prints the generated files; returns the guest's output.
fn inside_luks(disk: &Path, sector: u32, part: u32, inside: Inside) -> Result<String> {
    let dev = format!("/dev/vda{part}");
    let btrfs_check = "btrfs check --readonly /dev/mapper/t";
    let btrfs_uuid = "btrfs filesystem show /dev/mapper/t | sed -n 's/.*uuid: //p'";
    let list_subvolumes = "echo '=== subvolumes ==='; btrfs subvolume list /m; echo '=== end subvolumes ==='";
    let (check, uuid, mount) = match inside {
        Inside::Btrfs => (
            btrfs_check,
            btrfs_uuid,
            format!(
                "mount -o subvol=@ /dev/mapper/t /m && mount -o subvol=@log /dev/mapper/t /m/var/log\n{list_subvolumes}"
            ),
        ),
        Inside::BtrfsPersist => (
            btrfs_check,
            btrfs_uuid,
            format!("mount -o subvol=@persist /dev/mapper/t /m\n{list_subvolumes}"),
        ),
        Inside::Ext4 => (
            "e2fsck -fn /dev/mapper/t",
            "tune2fs -l /dev/mapper/t | sed -n 's/^Filesystem UUID: *//p'",
            "mount /dev/mapper/t /m".to_string(),
        ),
    };
    let script = format!(
        r#"cryptsetup open --key-file /pass {dev} t
echo '=== check ==='; {check}; echo '=== end check ==='
echo '=== uuid ==='; {uuid}; echo '=== end uuid ==='
mkdir -p /m
{mount}
for f in flake.nix configuration.nix hardware-configuration.nix network.nix persist.nix initrd-ssh.nix; do
    if [ -f /m/etc/nixos/$f ]; then echo "=== $f ==="; cat /m/etc/nixos/$f; echo "=== end $f ==="; fi
done
if [ -f /m/etc/machine-id ]; then echo '=== machine-id ==='; cat /m/etc/machine-id; echo '=== end machine-id ==='; fi
echo '=== report ==='; cat /m/var/log/nixos-kexec/report.json; echo '=== end report ==='
echo '=== host-key ==='; cat /m/etc/ssh/ssh_host_ed25519_key.pub; echo '=== end host-key ==='
echo '=== initrd-key ==='; cat /m/etc/secrets/initrd/ssh_host_ed25519_key.pub; echo '=== end initrd-key ==='
echo '=== modes ==='; stat -c '%a %n' /m/etc/secrets/initrd /m/etc/secrets/initrd/ssh_host_ed25519_key /m/etc/ssh/ssh_host_ed25519_key; echo '=== end modes ==='
echo "=== passphrase-hits ==="; (grep -r -a -l -F -f /pass /m || true) | wc -l; echo "=== end passphrase-hits ==="
umount /m/var/log 2>/dev/null || true
umount /m
cryptsetup close t
"#
    );
    guest_shell(
        &[(disk, sector)],
        &[("pass", 0o600, PASSPHRASE.as_bytes())],
        &script,
    )
}

/// The subvolume names the guest listed (`btrfs subvolume list`, which may prefix those
/// outside the mounted one with `<FS_TREE>/`).
fn listed_subvolumes(guest: &str) -> Result<BTreeSet<String>> {
    Ok(section(guest, "subvolumes")?
        .lines()
        .filter_map(|l| l.split(" path ").nth(1))
        .map(|path| path.trim_start_matches("<FS_TREE>/").to_string())
        .collect())
}

/// The fingerprint of the public key the guest printed as `section_name`.
fn guest_key_fingerprint(guest: &str, section_name: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("key.pub");
    std::fs::write(&file, section(guest, section_name)?)?;
    ssh_keygen_fingerprint(&file)
}

/// What a guest read inside a LUKS container holding btrfs.
struct LuksBtrfs {
    guest: String,
    /// The btrfs filesystem's.
    inner_uuid: String,
}

/// What the btrfs-in-LUKS presets share on a 4 GiB disk in a 1 GiB VM: the ESP and BIOS boot
/// partition outside the container (3); LUKS2 with argon2id near a quarter of the RAM; the
/// passphrase opens it and its trailing newline was dropped; a second guest opens it, checks
/// the btrfs and reads `inside`; the generated `files` parse and name the container and the
/// btrfs by UUID; the host key and the initrd host key are 0600 (the initrd's in a 0700
/// directory) and their fingerprints were printed; neither the passphrase nor the generated
/// Nix is anywhere in plain bytes; the report says argon2id.
fn luks_btrfs_checks(out: &RunOutcome, inside: Inside, files: &[&str]) -> Result<LuksBtrfs> {
    succeeded(out)?;
    passphrase_nowhere(out)?;
    let disk = &out.disks[0];
    sgdisk_verify(disk)?;
    expect_table(
        disk,
        &[
            (MIB, MIB, TYPE_BIOS),
            (2 * MIB, 512 * MIB, TYPE_ESP),
            (514 * MIB, gpt_rest(4 * GIB, 514 * MIB), TYPE_LINUX),
        ],
    )?;
    fsck_fat(&extract_partition(disk, 2)?)?;
    let luks = extract_partition(disk, 3)?;
    let dump = luks_dump(&luks)?;
    contains_all(
        "luksDump",
        &dump,
        &[
            "Version:       \t2",
            "PBKDF:      argon2id",
            "sector: 512 [bytes]",
        ],
    )?;
    // 1 GiB of RAM (a little less is visible): argon2id capped near a quarter of it.
    let memory: u64 = dump
        .lines()
        .find_map(|l| l.trim().strip_prefix("Memory:"))
        .and_then(|m| m.trim().parse().ok())
        .context("no argon2 memory in luksDump")?;
    ensure!(
        (32 * 1024..=256 * 1024).contains(&memory),
        "argon2id memory {memory} KiB"
    );
    ensure!(
        luks_test_passphrase(&luks, PASSPHRASE.as_bytes())?,
        "the passphrase does not open it"
    );
    ensure!(
        !luks_test_passphrase(&luks, format!("{PASSPHRASE}\n").as_bytes())?,
        "the trailing newline was kept in the key"
    );
    let luks_uuid = blkid_of(&luks, "UUID")?;

    let guest = inside_luks(disk, 512, 3, inside)?;
    let mut texts = Vec::new();
    for name in files {
        texts.push((*name, section(&guest, name)?));
    }
    parse_all(&texts)?;
    let inner_uuid = section(&guest, "uuid")?.trim().to_string();
    ensure!(
        inner_uuid.len() == 36,
        "no UUID of the btrfs inside LUKS: {inner_uuid:?}"
    );
    let luks_device =
        format!("boot.initrd.luks.devices.\"cryptroot\".device = \"/dev/disk/by-uuid/{luks_uuid}\";");
    contains_all(
        "hardware-configuration.nix",
        section(&guest, "hardware-configuration.nix")?,
        &[
            &luks_device,
            &format!("device = \"/dev/disk/by-uuid/{inner_uuid}\""),
        ],
    )?;
    // What the guest read inside is not readable outside it.
    ensure!(
        count_in_image(disk, luks_device.as_bytes())? == 0,
        "the generated hardware-configuration.nix is in plain bytes on the disk"
    );
    contains_all(
        "modes",
        section(&guest, "modes")?,
        &[
            "700 /m/etc/secrets/initrd\n",
            "600 /m/etc/secrets/initrd/ssh_host_ed25519_key\n",
            "600 /m/etc/ssh/ssh_host_ed25519_key",
        ],
    )?;
    // The keys the operator pins, for port 22 and for unlocking on port 2222, were printed.
    let fingerprint = guest_key_fingerprint(&guest, "host-key")?;
    ensure!(
        out.contains(&format!("host key: {fingerprint}")),
        "host key fingerprint `{fingerprint}` not printed"
    );
    let fingerprint = guest_key_fingerprint(&guest, "initrd-key")?;
    ensure!(
        out.contains(&format!(
            "initrd host key (port 2222, for unlocking the disk): {fingerprint}"
        )),
        "initrd key fingerprint `{fingerprint}` not printed"
    );
    ensure!(
        section(&guest, "passphrase-hits")?.trim() == "0",
        "passphrase in a file inside LUKS"
    );
    let report = report_ok(section(&guest, "report")?)?;
    ensure!(
        report["luks"][0]["pbkdf"]["algorithm"] == "argon2id",
        "report: {report}"
    );
    Ok(LuksBtrfs { guest, inner_uuid })
}

#[test]
fn luks_btrfs_uefi_512_with_passphrase_and_network() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let info = serde_json::json!({
        "version": 1,
        "hostname": "vault",
        "disk": {"serial": "LUKSBTR1"},
        "layout": "luks-btrfs",
        "ssh_authorized_keys": [KEY],
        "network": {
            "interfaces": [{
                "mac": NIC_MAC,
                "addresses": ["10.0.2.15/24"],
                "routes": [{"to": "default", "via": "10.0.2.2"}]
            }],
            "nameservers": ["10.0.2.3"]
        }
    });
    let out = Vm::new(&bundle)
        .firmware(Firmware::Uefi)
        .memory_mib(1024)
        .nic(NIC_MAC)
        .extra_initrd(secrets_cpio(scratch.path())?)
        .disk(DiskSpec::new(4 * GIB, DiskBus::Virtio).serial("LUKSBTR1"))
        .param(info_param(&info))
        .param("nixos_kexec.stop_before=install")
        .param("nixos_kexec.after=poweroff")
        .timeout(std::time::Duration::from_secs(420))
        .run()?;
    let checked = luks_btrfs_checks(
        &out,
        Inside::Btrfs,
        &[
            "flake.nix",
            "configuration.nix",
            "hardware-configuration.nix",
            "network.nix",
            "initrd-ssh.nix",
        ],
    )?;
    let guest = &checked.guest;
    let names = listed_subvolumes(guest)?;
    for name in ["@", "@nix", "@home", "@log"] {
        ensure!(names.contains(name), "subvolume {name} missing:\n{guest}");
    }
    contains_all(
        "hardware-configuration.nix",
        section(guest, "hardware-configuration.nix")?,
        &[
            "options = [ \"subvol=@\" \"compress=zstd\" \"noatime\" ];",
            "\"virtio_net\"",
        ],
    )?;
    contains_all(
        "configuration.nix",
        section(guest, "configuration.nix")?,
        &["./network.nix", "./initrd-ssh.nix"],
    )?;
    contains_all(
        "hardware-configuration.nix",
        section(guest, "hardware-configuration.nix")?,
        &["firmware = \"uefi\""],
    )?;
    contains_all(
        "initrd-ssh.nix",
        section(guest, "initrd-ssh.nix")?,
        &[
            "boot.initrd.systemd.enable = true;",
            "boot.initrd.availableKernelModules = [ \"virtio_net\" \"virtio_pci\" ];",
            "port = lib.toInt \"2222\";",
            "hostKeys = [ \"/etc/secrets/initrd/ssh_host_ed25519_key\" ];",
            "boot.initrd.systemd.network.networks = config.systemd.network.networks;",
            "ssh -p 2222 root@",
        ],
    )?;
    contains_all(
        "network.nix",
        section(guest, "network.nix")?,
        &[&format!("MACAddress = \"{NIC_MAC}\""), "\"10.0.2.15/24\""],
    )?;
    Ok(())
}

/// `luks-btrfs-impermanence` on a BIOS machine: what `luks-btrfs` is checked for, with only
/// `@nix` and `@persist` inside the container, and the host flake, host keys, machine-id,
/// report and initrd host key under `@persist` (a tmpfs `/` keeps nothing).
#[test]
fn luks_btrfs_impermanence_bios_512() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let out = prepared(Vm::new(&bundle))
        .memory_mib(1024)
        .extra_initrd(secrets_cpio(scratch.path())?)
        .disk(DiskSpec::new(4 * GIB, DiskBus::Virtio).serial("LUKSIMP1"))
        .param("nixos_kexec.disk=/dev/vda")
        .param("nixos_kexec.hostname=vault")
        .param("nixos_kexec.layout=luks-btrfs-impermanence")
        .timeout(std::time::Duration::from_secs(420))
        .run()?;
    let checked = luks_btrfs_checks(
        &out,
        Inside::BtrfsPersist,
        &[
            "flake.nix",
            "configuration.nix",
            "hardware-configuration.nix",
            "persist.nix",
            "initrd-ssh.nix",
        ],
    )?;
    let guest = &checked.guest;
    let names = listed_subvolumes(guest)?;
    let expected: BTreeSet<String> = ["@nix", "@persist"].iter().map(|s| s.to_string()).collect();
    ensure!(names == expected, "subvolumes {names:?}:\n{guest}");
    let inner = &checked.inner_uuid;
    contains_all(
        "hardware-configuration.nix",
        section(guest, "hardware-configuration.nix")?,
        &[
            TMPFS_ROOT,
            &format!("fileSystems.\"/nix\" = {{\n    device = \"/dev/disk/by-uuid/{inner}\";\n    fsType = \"btrfs\";\n    options = [ \"subvol=@nix\" \"compress=zstd\" \"noatime\" ];\n  }};"),
            &format!("fileSystems.\"/persist\" = {{\n    device = \"/dev/disk/by-uuid/{inner}\";\n    fsType = \"btrfs\";\n    options = [ \"subvol=@persist\" \"compress=zstd\" \"noatime\" ];\n    neededForBoot = true;"),
        ],
    )?;
    contains_all("persist.nix", section(guest, "persist.nix")?, &PERSIST_NIX)?;
    contains_all(
        "configuration.nix",
        section(guest, "configuration.nix")?,
        &["./persist.nix", "./initrd-ssh.nix"],
    )?;
    contains_all(
        "hardware-configuration.nix",
        section(guest, "hardware-configuration.nix")?,
        &["firmware = \"bios\""],
    )?;
    // The initrd host key outlives the reboot under /persist, so every generation's initrd
    // carries the key the operator pinned; no network described: DHCP on every Ethernet NIC.
    contains_all(
        "initrd-ssh.nix",
        section(guest, "initrd-ssh.nix")?,
        &[
            "boot.initrd.systemd.enable = true;",
            "port = lib.toInt \"2222\";",
            "hostKeys = [ \"/persist/etc/secrets/initrd/ssh_host_ed25519_key\" ];",
            "matchConfig.Name = \"en* eth*\";",
        ],
    )?;
    let machine_id = section(guest, "machine-id")?;
    ensure!(
        machine_id.len() == 32 && machine_id.chars().all(|c| c.is_ascii_hexdigit()),
        "machine-id {machine_id:?}"
    );
    ensure!(
        count_in_image(&out.disks[0], machine_id.as_bytes())? == 0,
        "the machine-id is in plain bytes on the disk"
    );
    ensure!(
        out.contains("--flake /mnt/persist/etc/nixos#vault")
            || out.contains("\"/mnt/persist/etc/nixos#vault\""),
        "the install would not use the flake under /persist"
    );
    Ok(())
}

#[test]
fn luks_ext4_bios_4096_with_swap_in_384_mib() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let out = prepared(Vm::new(&bundle))
        .memory_mib(384)
        .extra_initrd(secrets_cpio(scratch.path())?)
        .disk(
            DiskSpec::new(5 * GIB, DiskBus::Virtio)
                .sector(4096)
                .serial("LUKSEXT4"),
        )
        .param("nixos_kexec.disk=/dev/vda")
        .param("nixos_kexec.layout=luks-ext4")
        .param("nixos_kexec.swap=512M")
        .timeout(std::time::Duration::from_secs(420))
        .run()?;
    succeeded(&out)?;
    passphrase_nowhere(&out)?;
    let disk = &out.disks[0];
    ensure!(gpt_sector_size(disk)? == Some(4096), "not a 4096-byte-sector GPT");
    sgdisk_verify(disk)?;
    expect_table(
        disk,
        &[
            (MIB, MIB, TYPE_BIOS),
            (2 * MIB, 512 * MIB, TYPE_ESP),
            (514 * MIB, 512 * MIB, TYPE_SWAP),
            (1026 * MIB, gpt_rest(5 * GIB, 1026 * MIB), TYPE_LINUX),
        ],
    )?;
    fsck_fat(&extract_partition(disk, 2)?)?;
    // The swap was used through a random key: no signature or plaintext header on the disk.
    let swap = extract_partition(disk, 3)?;
    ensure!(
        count_in_image(&swap, b"SWAPSPACE2")? == 0,
        "swap signature in plaintext on the disk"
    );
    for line in [
        "swap on: /dev/mapper/nixos-kexec-swap0",
        "swap off: /dev/mapper/nixos-kexec-swap0",
    ] {
        ensure!(out.contains(line), "console lacks `{line}`");
    }
    let luks = extract_partition(disk, 4)?;
    let dump = luks_dump(&luks)?;
    // 384 MiB of RAM: PBKDF2, which needs no memory at unlock time.
    contains_all("luksDump", &dump, &["PBKDF:      pbkdf2", "sector: 4096 [bytes]"])?;
    ensure!(
        luks_test_passphrase(&luks, PASSPHRASE.as_bytes())?,
        "the passphrase does not open it"
    );
    let luks_uuid = blkid_of(&luks, "UUID")?;

    // e2fsck -fn failing would have failed the guest script.
    let guest = inside_luks(disk, 4096, 4, Inside::Ext4)?;
    let hardware = section(&guest, "hardware-configuration.nix")?;
    parse_all(&[
        ("flake.nix", section(&guest, "flake.nix")?),
        ("configuration.nix", section(&guest, "configuration.nix")?),
        ("hardware-configuration.nix", hardware),
        ("initrd-ssh.nix", section(&guest, "initrd-ssh.nix")?),
    ])?;
    let partuuid = partitions(disk)?
        .into_iter()
        .find(|(n, ..)| *n == 3)
        .and_then(|(_, _, _, e)| e["uuid"].as_str().map(str::to_lowercase))
        .context("no PARTUUID for the swap partition")?;
    contains_all(
        "hardware-configuration.nix",
        hardware,
        &[
            &format!("boot.initrd.luks.devices.\"cryptroot\".device = \"/dev/disk/by-uuid/{luks_uuid}\";"),
            &format!("{{ device = \"/dev/disk/by-partuuid/{partuuid}\"; randomEncryption.enable = true; }}"),
            "fsType = \"ext4\";",
        ],
    )?;
    // No network in the runtime info: the initrd asks DHCP on every Ethernet NIC.
    contains_all(
        "initrd-ssh.nix",
        section(&guest, "initrd-ssh.nix")?,
        &[
            "matchConfig.Name = \"en* eth*\";",
            "networkConfig.DHCP = \"yes\";",
        ],
    )?;
    ensure!(
        section(&guest, "passphrase-hits")?.trim() == "0",
        "passphrase in a file inside LUKS"
    );
    report_ok(section(&guest, "report")?)?;
    Ok(())
}

#[test]
fn mbr_bios_512_with_swap() -> Result<()> {
    let bundle = dev_bundle()?;
    let out = prepared(Vm::new(&bundle))
        .disk(DiskSpec::new(4 * GIB, DiskBus::Virtio).serial("MBRDISK1"))
        .param("nixos_kexec.disk=/dev/vda")
        .param("nixos_kexec.table=mbr")
        .param("nixos_kexec.swap=1G")
        .run()?;
    succeeded(&out)?;
    let disk = &out.disks[0];
    ensure!(gpt_sector_size(disk)?.is_none(), "an MBR disk must have no GPT");
    let json = sfdisk_json(disk)?;
    let table_json = &json["partitiontable"];
    ensure!(table_json["label"] == "dos", "label: {json}");
    let parts = table_json["partitions"].as_array().context("partitions")?;
    let summary: Vec<(u64, u64, String, bool)> = parts
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap_or(0) * 512,
                p["size"].as_u64().unwrap_or(0) * 512,
                p["type"].as_str().unwrap_or("").to_string(),
                p["bootable"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    // Primary partitions only: swap, then the root with the boot flag up to the disk's end.
    ensure!(
        summary
            == vec![
                (MIB, GIB, "82".to_string(), false),
                (MIB + GIB, 4 * GIB - MIB - GIB, "83".to_string(), true),
            ],
        "partitions {summary:?}"
    );
    let swap = extract_partition(disk, 1)?;
    ensure!(blkid_of(&swap, "TYPE")? == "swap", "no swap signature");
    let root = extract_partition(disk, 2)?;
    e2fsck(&root)?;
    let read = |path: &str| -> Result<String> { Ok(String::from_utf8(ext4_read_file(&root, path)?)?) };
    let hardware = read("/etc/nixos/hardware-configuration.nix")?;
    let configuration = read("/etc/nixos/configuration.nix")?;
    parse_all(&[
        ("flake.nix", &read("/etc/nixos/flake.nix")?),
        ("configuration.nix", &configuration),
        ("hardware-configuration.nix", &hardware),
    ])?;
    contains_all(
        "hardware-configuration.nix",
        &hardware,
        &[
            &format!(
                "{{ device = \"/dev/disk/by-uuid/{}\"; }}",
                blkid_of(&swap, "UUID")?
            ),
            &format!("device = \"/dev/disk/by-uuid/{}\"", blkid_of(&root, "UUID")?),
        ],
    )?;
    ensure!(!hardware.contains("vfat"), "no ESP on an MBR disk:\n{hardware}");
    contains_all(
        "hardware-configuration.nix",
        &hardware,
        &[
            "firmware = \"bios\"",
            "bootDisk = \"/dev/disk/by-id/virtio-MBRDISK1\"",
        ],
    )?;
    let report: Value = serde_json::from_slice(&ext4_read_file(&root, "/var/log/nixos-kexec/report.json")?)?;
    ensure!(report["table"] == "mbr", "report: {report}");
    Ok(())
}

/// 256 MiB of RAM and a swap partition: swap is on while nixos-install (the stand-in, which
/// shows /proc/swaps) runs, and off again at the end; the whole install, boot loader and
/// verification included, fits.
#[test]
fn ext4_swap_used_during_install_in_256_mib() -> Result<()> {
    let bundle = dev_bundle_with_nix()?;
    // TEST DOUBLE for nixos-install (tests/stand-in/nixos-install, from build-dev --with-nix):
    // the real Nix builds a stand-in system in its sandbox and sets the profile, Debian's
    // grub-install installs the boot loader; it prints its TMPDIR and /proc/swaps.
    let stand_in = bundle.stand_in()?;
    let out = Vm::new(&bundle)
        .memory_mib(256)
        // A planned install step needs a network (QEMU's user-mode DHCP gives one).
        .nic("52:54:00:12:34:91")
        .extra_initrd(&stand_in)
        .disk(DiskSpec::new(3 * GIB, DiskBus::Virtio).serial("SWAPRAM1"))
        // The kernel unpacks the initrd into a tmpfs limited to half the RAM unless told
        // otherwise; with Debian's Nix and the stand-in it is ~125 MB.
        .param("nixos_kexec.disk=/dev/vda")
        .param("nixos_kexec.swap=256M")
        .param(key_param())
        .param("nixos_kexec.after=poweroff")
        .run()?;
    succeeded(&out)?;
    ensure!(
        out.lines_containing("install: swaps: /dev/vda3").next().is_some(),
        "swap was not on during the install:\n{}",
        out.tail(40)
    );
    ensure!(out.contains("TMPDIR=/mnt/tmp"), "TMPDIR not on the target disk");
    let install_line = out.log.find("install: swaps:").context("no swaps line")?;
    let off_line = out
        .log
        .find("swap off: /dev/vda3")
        .context("swap was not switched off")?;
    ensure!(off_line > install_line, "swap went off before the install");
    let disk = &out.disks[0];
    sgdisk_verify(disk)?;
    expect_table(
        disk,
        &[
            (MIB, MIB, TYPE_BIOS),
            (2 * MIB, 512 * MIB, TYPE_ESP),
            (514 * MIB, 256 * MIB, TYPE_SWAP),
            (770 * MIB, gpt_rest(3 * GIB, 770 * MIB), TYPE_LINUX),
        ],
    )?;
    let swap = extract_partition(disk, 3)?;
    ensure!(blkid_of(&swap, "TYPE")? == "swap", "no swap signature");
    ensure!(blkid_of(&swap, "LABEL")? == "swap", "swap label");
    let root = extract_partition(disk, 4)?;
    e2fsck(&root)?;
    let hardware = String::from_utf8(ext4_read_file(&root, "/etc/nixos/hardware-configuration.nix")?)?;
    nix_parse_str(&hardware)?;
    ensure!(
        hardware.contains(&format!(
            "{{ device = \"/dev/disk/by-uuid/{}\"; }}",
            blkid_of(&swap, "UUID")?
        )),
        "{hardware}"
    );
    Ok(())
}

/// The declarative form: partitions and filesystems in the runtime info, no preset.
#[test]
fn declarative_storage_bios_512() -> Result<()> {
    let bundle = dev_bundle()?;
    let info = serde_json::json!({
        "version": 1,
        "disk": {"serial": "DECLARE1"},
        "ssh_authorized_keys": [KEY],
        "storage": {
            "partitions": [
                {"name": "bios", "size": "1M", "type": "bios-boot"},
                {"name": "boot", "size": "256M", "type": "esp",
                 "filesystem": {"type": "vfat", "label": "BOOT", "mountpoint": "/boot",
                                "mount_options": ["umask=0077"]}},
                {"name": "root", "size": "2G",
                 "filesystem": {"type": "ext4", "label": "root", "mountpoint": "/"}},
                {"name": "swap", "size": "128M",
                 "filesystem": {"type": "swap", "random_encryption": true}},
                {"name": "data", "size": "rest",
                 "filesystem": {"type": "btrfs", "label": "data",
                                "subvolumes": [{"name": "srv", "mountpoint": "/srv",
                                                "mount_options": ["compress=zstd"]}]}}
            ]
        }
    });
    let out = Vm::new(&bundle)
        .disk(DiskSpec::new(4 * GIB, DiskBus::Virtio).serial("DECLARE1"))
        .param(info_param(&info))
        .param("nixos_kexec.stop_before=install")
        .param("nixos_kexec.after=poweroff")
        .run()?;
    succeeded(&out)?;
    let disk = &out.disks[0];
    sgdisk_verify(disk)?;
    expect_table(
        disk,
        &[
            (MIB, MIB, TYPE_BIOS),
            (2 * MIB, 256 * MIB, TYPE_ESP),
            (258 * MIB, 2 * GIB, TYPE_LINUX),
            (2306 * MIB, 128 * MIB, TYPE_SWAP),
            (2434 * MIB, gpt_rest(4 * GIB, 2434 * MIB), TYPE_LINUX),
        ],
    )?;
    let names: Vec<String> = partitions(disk)?
        .iter()
        .map(|(_, _, _, e)| e["name"].as_str().unwrap_or("").to_string())
        .collect();
    ensure!(
        names == ["bios", "boot", "root", "swap", "data"],
        "names {names:?}"
    );
    let esp = extract_partition(disk, 2)?;
    fsck_fat(&esp)?;
    ensure!(blkid_of(&esp, "LABEL")? == "BOOT", "ESP label");
    let root = extract_partition(disk, 3)?;
    e2fsck(&root)?;
    let data = extract_partition(disk, 5)?;
    btrfs_check(&data)?;
    let subvolumes: Vec<String> = btrfs_subvolumes(&data)?.into_iter().map(|(_, n)| n).collect();
    ensure!(subvolumes == ["srv"], "subvolumes {subvolumes:?}");
    let hardware = String::from_utf8(ext4_read_file(&root, "/etc/nixos/hardware-configuration.nix")?)?;
    nix_parse_str(&hardware)?;
    contains_all(
        "hardware-configuration.nix",
        &hardware,
        &[
            "fileSystems.\"/srv\"",
            "options = [ \"subvol=srv\" \"compress=zstd\" ];",
            "options = [ \"umask=0077\" ];",
            "randomEncryption.enable = true;",
        ],
    )?;
    let runtime: Value = serde_json::from_slice(&ext4_read_file(&root, "/etc/nixos/runtime-info.json")?)?;
    ensure!(
        runtime["storage"]["partitions"][4]["name"] == "data",
        "runtime-info.json lost the storage description: {runtime}"
    );
    Ok(())
}

/// A plan this machine cannot take (here: the 2 GiB disk is too small for btrfs with 1 GiB of
/// swap) is refused after the facts are gathered and earlier installs looked for: one clear
/// error with a fix, no power-off, and not one byte of the used disk changed. One VM for the
/// class; what each refused plan says (ZFS, LUKS without a passphrase, too small, MBR under
/// UEFI, overlapping partitions) is checked in agent/tests/refusals.rs.
#[test]
fn too_small_disk_is_refused() -> Result<()> {
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let disk = scratch.path().join("disk.img");
    std::fs::File::create(&disk)?.set_len(2 * GIB)?;
    tool(
        "sgdisk",
        [
            "-n",
            "1:2048:+100M",
            "-c",
            "1:old-data",
            disk.to_str().context("path")?,
        ],
    )?;
    let before = nonzero_blocks(&disk)?;
    let out = Vm::new(&bundle)
        .name("too_small")
        .disk_image(&disk, DiskBus::Virtio, 512, "VICTIM01")
        .param("nixos_kexec.disk=/dev/vda")
        .param(key_param())
        .param("nixos_kexec.after=poweroff")
        .param("nixos_kexec.layout=btrfs")
        .param("nixos_kexec.swap=1G")
        .grace(std::time::Duration::from_secs(3))
        .run()?;
    let reason = out.expect_failure()?;
    ensure!(
        reason.contains("too small for this layout"),
        "reason `{reason}` lacks `too small for this layout`"
    );
    ensure!(out.contains("nixos-kexec: fix: "), "no fix was printed");
    ensure!(!out.exited_by_itself, "a failed run must not power off");
    ensure!(nonzero_blocks(&disk)? == before, "the disk changed");
    Ok(())
}
