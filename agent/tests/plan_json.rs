//! The plan JSON (`nixos-kexec plan`) of every preset and of declarative layouts, against fixed
//! facts and fixed random ids, compared with agent/tests/fixtures/plan/*.json: a change to the
//! planner that moves a byte of any plan shows up here.
//!
//! To accept an intended change, run with NIXOS_KEXEC_WRITE_FIXTURES=1 and review the diff.

mod common;

use nixos_kexec::input::cmdline::Params;
use nixos_kexec::input::config::{Config, Layout};
use nixos_kexec::input::runtime_info::{self, Source};
use nixos_kexec::installer::layout::PlanIds;
use nixos_kexec::installer::plan;
use nixos_kexec::machine::facts::{Facts, Firmware};
use std::path::PathBuf;

const GIB: u64 = 1 << 30;

fn fixture(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/plan")
        .join(relative)
}

fn read<T: serde::de::DeserializeOwned>(relative: &str) -> T {
    let path = fixture(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The plan JSON exactly as `nixos-kexec plan` prints it, from a runtime-info file.
fn plan_json(runtime_info: serde_json::Value, facts: &Facts) -> String {
    let info = runtime_info::parse_json(runtime_info.to_string().as_bytes(), Source::File, false)
        .unwrap_or_else(|e| panic!("{runtime_info}: {e:#}"));
    let params = Params::parse("console=ttyS0,115200").unwrap();
    let mut config = Config::assemble(Some(info), &params).unwrap();
    config.disk_passphrase_given = true;
    let plan =
        plan::make(&config, facts, &read::<PlanIds>("input/ids.json")).unwrap_or_else(|e| panic!("{e:#}"));
    serde_json::to_string_pretty(&plan).unwrap() + "\n"
}

fn base(extra: serde_json::Value) -> serde_json::Value {
    let mut info = serde_json::json!({
        "version": 1,
        "hostname": "web1",
        "disk": {"path": "/dev/disk/by-id/virtio-PLAN"},
        "ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD me@host"],
    });
    for (key, value) in extra.as_object().unwrap() {
        info[key] = value.clone();
    }
    info
}

fn cases() -> Vec<(String, String)> {
    let mut cases = Vec::new();
    for layout in Layout::PRESETS {
        let name = layout.name();
        let gpt = base(serde_json::json!({"layout": name, "swap": "2G"}));
        cases.push((
            format!("{name}-gpt-uefi"),
            plan_json(gpt, &common::facts_with(Firmware::Uefi, 20 * GIB, 512)),
        ));
        let mbr = base(serde_json::json!({"layout": name, "table": "mbr"}));
        cases.push((
            format!("{name}-mbr-bios"),
            plan_json(mbr, &common::facts_with(Firmware::Bios, 20 * GIB, 4096)),
        ));
    }
    // The README's example.
    let readme = base(serde_json::json!({"storage": {
        "table": "gpt",
        "partitions": [
            {"name": "bios", "size": "1M", "type": "bios-boot"},
            {"name": "ESP", "size": "512M", "type": "esp",
             "filesystem": {"type": "vfat", "label": "ESP", "mountpoint": "/boot",
                            "mount_options": ["fmask=0077", "dmask=0077"]}},
            {"name": "swap", "size": "4G", "filesystem": {"type": "swap", "random_encryption": true}},
            {"name": "system", "size": "40G",
             "filesystem": {"type": "luks", "name": "cryptroot",
                            "filesystem": {"type": "btrfs", "label": "nixos",
                                           "subvolumes": [
                                             {"name": "@", "mountpoint": "/", "mount_options": ["compress=zstd"]},
                                             {"name": "@nix", "mountpoint": "/nix", "mount_options": ["compress=zstd", "noatime"]}]}}},
            {"name": "data", "size": "rest",
             "filesystem": {"type": "ext4", "label": "data", "mountpoint": "/srv"}}
        ]
    }}));
    cases.push((
        "declarative-readme".into(),
        plan_json(readme, &common::facts_with(Firmware::Uefi, 100 * GIB, 512)),
    ));
    // MBR, a tmpfs root, explicit starts, type bytes, an unmounted btrfs top level with
    // subvolumes, plain swap with a label, a second FAT filesystem and a LUKS data volume.
    let tmpfs = base(serde_json::json!({"storage": {
        "table": "mbr",
        "partitions": [
            {"size": "1G", "start": "1M", "type": "0x83",
             "filesystem": {"type": "ext4", "label": "boot", "mountpoint": "/boot",
                            "mount_options": ["noatime"]}},
            {"size": "1G", "start": "2G",
             "filesystem": {"type": "swap", "label": "swap"}},
            {"size": "512M", "filesystem": {"type": "vfat", "label": "DATA", "mountpoint": "/srv/fat"}},
            {"size": "rest", "bootable": false,
             "filesystem": {"type": "btrfs", "label": "nixos",
                            "subvolumes": [
                              {"name": "@nix", "mountpoint": "/nix", "mount_options": ["noatime"]},
                              {"name": "@persist", "mountpoint": "/persist", "needed_for_boot": true},
                              {"name": "@snapshots"}]}}
        ],
        "tmpfs": [{"mountpoint": "/", "mount_options": ["defaults", "size=2G", "mode=755"]},
                  {"mountpoint": "/tmp"}],
        "persist": "/persist"
    }}));
    cases.push((
        "declarative-tmpfs-mbr".into(),
        plan_json(tmpfs, &common::facts_with(Firmware::Bios, 16 * GIB, 512)),
    ));
    let luks_data = base(serde_json::json!({"storage": {
        "partitions": [
            {"size": "1M", "type": "bios-boot"},
            {"size": "512M", "filesystem": {"type": "vfat", "mountpoint": "/boot"}},
            {"size": "2G", "filesystem": {"type": "luks", "label": "cryptswap",
                                          "filesystem": {"type": "swap"}}},
            {"size": "6G", "filesystem": {"type": "ext4", "mountpoint": "/", "needed_for_boot": true}},
            {"size": "rest", "type": "linux", "filesystem": {"type": "luks", "name": "data",
                "filesystem": {"type": "btrfs", "mountpoint": "/srv", "mount_options": ["compress=zstd"],
                               "subvolumes": [{"name": "www", "mountpoint": "/srv/www"}]}}}
        ]
    }}));
    cases.push((
        "declarative-luks-data".into(),
        plan_json(luks_data, &common::facts_with(Firmware::Bios, 12 * GIB, 4096)),
    ));
    cases
}

#[test]
fn plan_json_matches_the_fixtures() {
    let write = std::env::var_os("NIXOS_KEXEC_WRITE_FIXTURES").is_some();
    let mut differ = Vec::new();
    for (name, json) in cases() {
        let path = fixture(&format!("{name}.json"));
        if write {
            std::fs::write(&path, &json).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (NIXOS_KEXEC_WRITE_FIXTURES=1 writes it)", path.display()));
        if expected != json {
            differ.push(name);
        }
    }
    assert!(
        differ.is_empty(),
        "the plan JSON differs from tests/fixtures/plan for {differ:?}"
    );
}

/// `luks-btrfs-impermanence` said in the declarative form, as the README's storage table
/// allows, plans the same machine as the preset: every partition, LUKS container, filesystem,
/// mount, the persist path and the initrd SSH key under it. Only the layout's name and the
/// runtime info it came from differ.
#[test]
fn the_declarative_form_says_luks_btrfs_impermanence() {
    let subvolume = |name: &str, mountpoint: &str, needed_for_boot: bool| {
        serde_json::json!({"name": name, "mountpoint": mountpoint,
                           "mount_options": ["compress=zstd", "noatime"],
                           "needed_for_boot": needed_for_boot})
    };
    let declarative = base(serde_json::json!({"storage": {
        "table": "gpt",
        "partitions": [
            {"name": "bios-boot", "size": "1M", "type": "bios-boot"},
            {"name": "ESP", "size": "512M", "type": "esp",
             "filesystem": {"type": "vfat", "label": "ESP", "mountpoint": "/boot",
                            "mount_options": ["fmask=0077", "dmask=0077"]}},
            {"name": "swap", "size": "2G", "type": "swap",
             "filesystem": {"type": "swap", "random_encryption": true}},
            {"name": "nixos", "size": "rest",
             "filesystem": {"type": "luks", "name": "cryptroot",
                            "filesystem": {"type": "btrfs", "label": "nixos", "subvolumes": [
                                subvolume("@nix", "/nix", false),
                                subvolume("@persist", "/persist", true)]}}}
        ],
        "tmpfs": [{"mountpoint": "/", "mount_options": ["defaults", "size=25%", "mode=755"]}],
        "persist": "/persist"
    }}));
    let preset = base(serde_json::json!({"layout": "luks-btrfs-impermanence", "swap": "2G"}));
    let facts = common::facts_with(Firmware::Uefi, 20 * GIB, 512);
    let without_origin = |json: String| {
        let mut plan: serde_json::Value = serde_json::from_str(&json).unwrap();
        let object = plan.as_object_mut().unwrap();
        assert!(object.remove("layout").is_some() && object.remove("runtime_info").is_some());
        plan
    };
    let from_storage = without_origin(plan_json(declarative, &facts));
    let from_preset = without_origin(plan_json(preset, &facts));
    assert_eq!(from_storage, from_preset);
    assert_eq!(
        from_preset["initrd_ssh"]["host_key"],
        "/persist/etc/secrets/initrd/ssh_host_ed25519_key"
    );
    assert_eq!(from_preset["state_dir"], "/persist");
}
