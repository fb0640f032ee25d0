//! Fuzzing in CI-sized form: every parser of outside input (HTTP answers, the kernel command
//! line, runtime info, declarative storage down to the partition layout, netlink replies, the
//! archive `deploy` uploads) gets
//! random bytes and random input of the right shape, and must answer with a value or an error,
//! never a panic. Tests build in debug mode, so an arithmetic overflow is a panic too.
//!
//! One property spans them: input the planner accepts is input the steps up to `install`
//! accept (`planned_input_passes_the_steps_up_to_install`), so a bad one fails before `wipe`.
//!
//! `NIXOS_KEXEC_FUZZ_CASES` sets the cases per target (default 3000); `tests/bench` runs a
//! longer round and the README gives its count.

mod common;

use nixos_kexec::input::cmdline::{Params, COMMAND_LINE_SIZE};
use nixos_kexec::input::config::{parameter_keys, Config, Layout, HOST_KEY_TYPES, SECRETS_DIR};
use nixos_kexec::input::http::parse_response;
use nixos_kexec::input::runtime_info::{self, Source};
use nixos_kexec::installer::layout::{place, FsKind, PlanIds};
use nixos_kexec::installer::plan::{self, Plan};
use nixos_kexec::installer::steps::{flake, format, keys, partition};
use nixos_kexec::installer::storage::{Table, GIB};
use nixos_kexec::machine::facts::{Facts, Firmware};
use nixos_kexec::network::netlink::{self, IfAddr, IfInfo, RtMsg};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::OnceLock;

fn cases() -> u32 {
    std::env::var("NIXOS_KEXEC_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3000)
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// Numbers as outside input writes them: small, at type limits, and past them.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..5000).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_string()),
        Just("17592186044415".to_string()),
        "[0-9]{1,30}",
        Just(String::new()),
        Just("-1".to_string()),
    ]
}

fn hex_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-fA-F]{1,20}",
        Just("ffffffffffffffff".to_string()),
        Just("10000000000000000".to_string()),
        Just("0".to_string()),
        "[0-9a-f]{1,4};[a-z=]{0,10}",
        ".{0,8}",
    ]
}

fn http_answer() -> impl Strategy<Value = Vec<u8>> {
    let status = prop_oneof![
        Just("HTTP/1.1 200 OK".to_string()),
        Just("HTTP/1.0 301 Moved".to_string()),
        "HTTP/1\\.[01] [0-9]{0,5} [ -~]{0,10}",
        "[ -~]{0,30}",
    ];
    let header = prop_oneof![
        number_text().prop_map(|n| format!("Content-Length: {n}")),
        Just("Transfer-Encoding: chunked".to_string()),
        Just("Location: /next".to_string()),
        "[ -~]{0,40}",
    ];
    let chunk = (hex_text(), bytes(40)).prop_map(|(size, data)| {
        let mut out = format!("{size}\r\n").into_bytes();
        out.extend(data);
        out.extend(b"\r\n");
        out
    });
    (
        status,
        prop::collection::vec(header, 0..5),
        prop::collection::vec(chunk, 0..4),
        bytes(60),
    )
        .prop_map(|(status, headers, chunks, tail)| {
            let mut out = format!("{status}\r\n{}\r\n\r\n", headers.join("\r\n")).into_bytes();
            out.extend(chunks.concat());
            out.extend(tail);
            out
        })
}

fn size_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            number_text(),
            prop::sample::select(vec!["", "K", "M", "G", "T", "P", "E", "Z", "%", "MiB"])
        )
            .prop_map(|(n, unit)| format!("{n}{unit}")),
        Just("rest".to_string()),
        Just("17592186044415M".to_string()),
        "[ -~]{0,12}",
    ]
}

fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z@]{1,10}",
        Just(".".to_string()),
        Just("..".to_string()),
        Just("-x".to_string()),
        Just("a/b".to_string()),
        "[ -~]{0,40}",
    ]
}

fn filesystem(depth: u32) -> BoxedStrategy<Value> {
    let subvolume = (name_text(), prop::option::of("/[a-z]{0,8}"))
        .prop_map(|(name, mountpoint)| json!({"name": name, "mountpoint": mountpoint}));
    let leaf = (
        prop::sample::select(vec!["vfat", "ext4", "btrfs", "swap", "xfs", "luks", "", "zfs"]),
        prop::option::of(prop_oneof![
            Just("/".to_string()),
            Just("/boot".to_string()),
            "/[ -~]{0,12}"
        ]),
        prop::option::of(name_text()),
        prop::collection::vec(subvolume, 0..3),
        any::<bool>(),
    )
        .prop_map(|(kind, mountpoint, label, subvolumes, flag)| {
            let mut fs = json!({"type": kind, "mountpoint": mountpoint, "label": label});
            if !subvolumes.is_empty() {
                fs["subvolumes"] = Value::Array(subvolumes);
            }
            if flag {
                fs["random_encryption"] = json!(true);
            }
            fs
        });
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        3 => leaf,
        1 => (name_text(), filesystem(depth - 1))
            .prop_map(|(name, inner)| json!({"type": "luks", "name": name, "filesystem": inner})),
    ]
    .boxed()
}

fn storage() -> impl Strategy<Value = Value> {
    let partition = (
        prop::option::of(name_text()),
        size_text(),
        prop::option::of(number_text()),
        prop::option::of(prop::sample::select(vec![
            "bios-boot",
            "esp",
            "linux",
            "swap",
            "0x83",
            "zz",
        ])),
        prop::option::of(filesystem(2)),
    )
        .prop_map(|(name, size, start, kind, fs)| {
            json!({"name": name, "size": size, "start": start.and_then(|s| s.parse::<u64>().ok()),
                   "type": kind, "filesystem": fs})
        });
    (
        prop::sample::select(vec!["gpt", "mbr", "dos"]),
        prop::collection::vec(partition, 0..6),
    )
        .prop_map(|(table, partitions)| json!({"table": table, "partitions": partitions}))
}

/// Host keys as an operator might hand them over, made once with ssh-keygen: each type it
/// makes, one behind a passphrase, and one cut short.
fn host_key_samples() -> &'static [Vec<u8>] {
    static SAMPLES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut samples = Vec::new();
        for (i, args) in [
            &["-t", "ed25519", "-N", ""][..],
            &["-t", "ecdsa", "-b", "384", "-N", ""],
            &["-t", "rsa", "-b", "1024", "-N", ""],
            &["-t", "ed25519", "-N", "a passphrase"],
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("key{i}"));
            let made = std::process::Command::new("ssh-keygen")
                .arg("-q")
                .args(args)
                .arg("-f")
                .arg(&path)
                .status()
                .expect("ssh-keygen is needed for this test (Debian: openssh-client)");
            assert!(made.success());
            samples.push(std::fs::read(&path).unwrap());
        }
        let cut = samples[0][..samples[0].len() / 2].to_vec();
        samples.push(cut);
        samples
    })
}

/// A provided host key file's contents: one of [`host_key_samples`], or bytes of any kind.
fn host_key_file() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => (0..host_key_samples().len()).prop_map(|i| host_key_samples()[i].clone()),
        1 => bytes(200),
        1 => Just(b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n".to_vec()),
    ]
}

/// A comment on an authorized key: printable text, and what looks like the host flake's
/// template placeholders or Nix syntax.
fn key_comment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,30}",
        Just("deploy@word@".to_string()),
        Just("/*@authorized_keys@*/ @hostname@".to_string()),
        Just("${builtins.abort \"x\"} '' \\".to_string()),
        Just("me@host".to_string()),
    ]
}

/// Declarative storage shaped like what people write (boot partitions, then `/` in ext4,
/// btrfs subvolumes or LUKS), with names of any kind where the installer hands names on.
fn plausible_storage() -> impl Strategy<Value = Value> {
    let subvolume = (
        name_text(),
        prop::option::of(prop::sample::select(vec!["/home", "/nix", "/var/log"])),
    )
        .prop_map(|(name, mountpoint)| json!({"name": name, "mountpoint": mountpoint}));
    let root = prop_oneof![
        Just(json!({"type": "ext4", "mountpoint": "/"})),
        (name_text(), prop::collection::vec(subvolume, 0..3)).prop_map(|(name, mut subvolumes)| {
            subvolumes.insert(0, json!({"name": name, "mountpoint": "/"}));
            json!({"type": "btrfs", "subvolumes": subvolumes})
        }),
    ];
    let root = (root, prop::option::of(name_text()), any::<bool>()).prop_map(|(fs, name, luks)| {
        if luks {
            json!({"type": "luks", "name": name, "filesystem": fs})
        } else {
            fs
        }
    });
    (
        prop::sample::select(vec!["gpt", "mbr"]),
        any::<bool>(),
        prop::sample::select(vec!["100M", "512M", "1G", "rest"]),
        prop::option::of(prop::sample::select(vec!["512M", "2G"])),
        root,
    )
        .prop_map(|(table, bios_boot, esp, swap, root)| {
            let mut partitions = Vec::new();
            if table == "gpt" {
                if bios_boot {
                    partitions.push(json!({"size": "1M", "type": "bios-boot"}));
                }
                partitions.push(json!({"size": esp, "type": "esp",
                    "filesystem": {"type": "vfat", "mountpoint": "/boot"}}));
            }
            if let Some(swap) = swap {
                partitions.push(json!({"size": swap, "filesystem": {"type": "swap"}}));
            }
            partitions.push(json!({"size": "rest", "filesystem": root}));
            json!({"table": table, "partitions": partitions})
        })
}

/// Runtime info as JSON: a preset or declarative storage, a hostname and keys of any shape.
fn install_input() -> impl Strategy<Value = Value> {
    let layout = prop_oneof![
        1 => storage().prop_map(|storage| json!({"storage": storage})),
        2 => plausible_storage().prop_map(|storage| json!({"storage": storage})),
        2 => (
            prop::sample::select(
                Layout::PRESETS
                    .iter()
                    .map(|layout| layout.name())
                    .chain(["zfs"])
                    .collect::<Vec<_>>()
            ),
            prop::sample::select(vec!["0", "512M", "2G", "64G"]),
            prop::sample::select(vec!["gpt", "mbr"]),
        )
            .prop_map(|(layout, swap, table)| json!({"layout": layout, "swap": swap, "table": table})),
    ];
    let hostname = prop_oneof![
        4 => "[a-z0-9]{1,12}(-[a-z0-9]{1,8})?",
        1 => "[ -~]{0,20}",
    ];
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD";
    let keys = prop::collection::vec(
        (key_comment(), any::<bool>()).prop_map(move |(comment, restricted)| {
            let options = if restricted {
                "restrict,command=\"uptime\" "
            } else {
                ""
            };
            format!("{options}{key} {comment}")
        }),
        0..3,
    );
    (layout, hostname, keys).prop_map(|(mut info, hostname, keys)| {
        info["version"] = json!(1);
        info["hostname"] = json!(hostname);
        info["ssh_authorized_keys"] = json!(keys);
        info
    })
}

/// A scratch directory in RAM where there is one: the property writes disk images.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

/// What the steps up to `install` do with the input, as far as it runs without a disk or
/// root: the flake step's files, the keys step's provided keys, the partition step's table
/// on an image of the disk's size, the format step's FAT32 (up to 2 GiB, on an image) and
/// its subvolume names. `Err` carries the step and its error.
fn run_steps_without_a_disk(plan: &Plan, config: &Config, dir: &Path) -> Result<(), String> {
    let fail = |step: &'static str| move |e: anyhow::Error| format!("{step}: {e:#}");
    flake::write_all(&dir.join("etc/nixos"), plan, &config.runtime_info, None).map_err(fail("flake"))?;
    let ssh = dir.join("etc/ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    keys::install_provided(&plan.provided_host_keys, &ssh).map_err(fail("keys"))?;
    let image = |name: &str, size: u64| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .unwrap();
        file.set_len(size).unwrap();
        file
    };
    let disk = image("disk.img", plan.disk.size_bytes);
    match plan.table {
        Table::Gpt => partition::write_gpt(disk, plan).map(drop),
        Table::Mbr => partition::write_mbr(disk, plan).map(drop),
    }
    .map_err(fail("partition"))?;
    std::fs::remove_file(dir.join("disk.img")).unwrap();
    for fs in &plan.filesystems {
        match fs.kind {
            FsKind::Vfat if fs.size_bytes <= 2 * GIB => {
                drop(image("esp.img", fs.size_bytes));
                let on_image = nixos_kexec::installer::layout::Filesystem {
                    device: dir.join("esp.img").to_string_lossy().into_owned(),
                    ..fs.clone()
                };
                format::format_esp(&on_image, plan.disk.logical_sector).map_err(fail("format"))?;
                std::fs::remove_file(dir.join("esp.img")).unwrap();
            }
            FsKind::Btrfs => {
                for name in &fs.subvolumes {
                    nixos_kexec::machine::btrfs::check_subvolume_name(name).map_err(fail("format"))?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn netlink_datagram() -> impl Strategy<Value = Vec<u8>> {
    let attr = (any::<u16>(), bytes(24)).prop_map(|(kind, payload)| (kind, payload));
    let message = (
        prop::sample::select(vec![2u16, 3, 16, 20, 24, 0, 0xffff]),
        bytes(20),
        prop::collection::vec(attr, 0..5),
        any::<bool>(),
    )
        .prop_map(|(kind, fixed, attrs, lie_about_length)| {
            let mut builder = netlink::Builder::new(kind, 0).fixed(&fixed);
            for (kind, payload) in &attrs {
                builder = builder.attr(*kind, payload);
            }
            let mut out = builder.finish(1);
            if lie_about_length && out.len() >= 4 {
                out[0] = out[0].wrapping_add(0x40);
            }
            out
        });
    prop::collection::vec(message, 1..4).prop_map(|m| m.concat())
}

fn read_netlink(datagram: &[u8]) {
    let Ok(messages) = netlink::split_messages(datagram) else {
        return;
    };
    for message in &messages {
        let _ = netlink::parse_error(message);
        for fixed in [16usize, 8, 12] {
            let rest = message.payload.get(fixed..).unwrap_or_default();
            for (_, payload) in netlink::attrs(rest) {
                let _ = netlink::parse_ip(payload);
                let _ = netlink::parse_via(payload);
                let _ = netlink::u32_of(payload);
                let _ = netlink::str_of(payload);
                let _ = netlink::attrs(payload).count();
            }
        }
        let _ = IfInfo::parse(&message.payload);
        let _ = IfAddr::parse(&message.payload);
        let _ = RtMsg::parse(&message.payload);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn http_answers_random_bytes(answer in bytes(600)) {
        let _ = parse_response(&answer);
    }

    #[test]
    fn http_answers_shaped(answer in http_answer()) {
        let _ = parse_response(&answer);
    }

    #[test]
    fn cmdline_random_bytes(line in bytes(400)) {
        let line = String::from_utf8_lossy(&line);
        if let Ok(params) = Params::parse(&line) {
            let _ = Config::assemble(None, &params);
        }
    }

    #[test]
    fn cmdline_our_parameters_at_any_length(
        words in prop::collection::vec((prop::sample::select(parameter_keys()), "[ -~]{0,60}", any::<bool>()), 0..8),
        fill in 0usize..COMMAND_LINE_SIZE,
    ) {
        let mut line = format!("x={}", "p".repeat(fill));
        for (key, value, quoted) in words {
            line += &if quoted { format!(" nixos_kexec.{key}=\"{value}\"") } else { format!(" nixos-kexec.{key}={value}") };
        }
        // As the kernel keeps it.
        let mut end = line.len().min(COMMAND_LINE_SIZE - 1);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        if let Ok(params) = Params::parse(&line[..end]) {
            let _ = Config::assemble(None, &params);
        }
    }

    #[test]
    fn runtime_info_random_bytes(raw in bytes(600)) {
        let _ = runtime_info::parse_json(&raw, Source::File, false);
        let text = String::from_utf8_lossy(&raw);
        let _ = runtime_info::from_param(&text, Source::Info, true);
        let _ = runtime_info::from_param(&text, Source::InfoDeflate, false);
    }

    #[test]
    fn declarative_storage_down_to_the_layout(
        storage in storage(),
        size in prop_oneof![0u64..(1 << 45), Just(u64::MAX), Just(u64::MAX - 511)],
        big_sector in any::<bool>(),
        uefi in any::<bool>(),
        ram in prop_oneof![Just(0u64), Just(1u64 << 30), Just(u64::MAX)],
    ) {
        let info = json!({"version": 1, "storage": storage});
        let Ok(info) = runtime_info::parse_json(info.to_string().as_bytes(), Source::File, false) else {
            return Ok(());
        };
        let Some(storage) = info.storage else {
            return Ok(());
        };
        let sector = if big_sector { 4096 } else { 512 };
        let firmware = if uefi { Firmware::Uefi } else { Firmware::Bios };
        let size = size / sector as u64 * sector as u64;
        let Ok(placed) = place(&storage, &common::disk(size, sector), firmware, ram, &PlanIds::random()) else {
            return Ok(());
        };
        // Whatever is accepted is a layout that fits: aligned, inside the disk, disjoint.
        let mut extents: Vec<(u64, u64)> = placed.partitions.iter().map(|p| (p.start_bytes, p.size_bytes)).collect();
        extents.sort();
        let mut end = 0u64;
        for (start, bytes) in extents {
            prop_assert!(bytes > 0 && start % (1 << 20) == 0 && bytes % (1 << 20) == 0);
            prop_assert!(start >= end.max(1 << 20), "overlap at {start}");
            end = start.checked_add(bytes).expect("an extent past u64");
            prop_assert!(end <= size, "{end} beyond the disk's {size} bytes");
        }
    }

    /// Whatever planning accepts, the steps up to `install` accept too, so a run that would
    /// fail for its input fails before `wipe`. Input: runtime info with a preset or generated
    /// declarative storage, hostnames and authorized keys with odd comments (template
    /// placeholders, Nix syntax), provided host keys of every type ssh-keygen makes, encrypted,
    /// cut short or garbage, on disks of any size with either sector size and firmware.
    /// Covered, when `plan::make` succeeds: rendering and writing the host flake (flake step),
    /// reading and installing the provided host keys (keys step), writing the partition table
    /// on an image of the disk's size (partition step), formatting each FAT32 of up to 2 GiB on
    /// an image and the kernel's rules for subvolume names (format step). Not covered here:
    /// what needs root or the disk (mkfs.*, cryptsetup, mounting; the QEMU scenarios run
    /// those) and the network check before the wipe.
    #[test]
    fn planned_input_passes_the_steps_up_to_install(
        info in install_input(),
        host_keys in prop::collection::vec((0..HOST_KEY_TYPES.len(), host_key_file()), 0..3),
        size in prop_oneof![(1u64 << 30)..(64u64 << 30), 0u64..(15u64 << 40)],
        big_sector in any::<bool>(),
        uefi in any::<bool>(),
    ) {
        let Ok(info) = runtime_info::parse_json(info.to_string().as_bytes(), Source::File, false) else {
            return Ok(());
        };
        let Ok(mut config) = Config::assemble(Some(info), &Params::parse("").unwrap()) else {
            return Ok(());
        };
        let dir = scratch();
        let secrets = dir.path().join("initrd").join(SECRETS_DIR.trim_start_matches('/'));
        std::fs::create_dir_all(&secrets).unwrap();
        for (kind, data) in &host_keys {
            std::fs::write(secrets.join(format!("ssh_host_{}_key", HOST_KEY_TYPES[*kind])), data).unwrap();
        }
        std::fs::write(secrets.join("disk-passphrase"), "a passphrase\n").unwrap();
        config.find_secrets(&dir.path().join("initrd"));
        config.disk_auto = true;
        let sector = if big_sector { 4096 } else { 512 };
        let facts = Facts {
            firmware: if uefi { Firmware::Uefi } else { Firmware::Bios },
            ram_bytes: 2 * GIB,
            kernel_release: "6.1.0".into(),
            disks: vec![common::disk(size / sector as u64 * sector as u64, sector)],
            nics: vec![],
            previous_installs: vec![],
            machine: nixos_kexec::machine::platform::Machine {
                arch: "x86_64".into(),
                ..Default::default()
            },
        };
        let Ok(plan) = plan::make(&config, &facts, &PlanIds::random()) else {
            return Ok(());
        };
        let target = dir.path().join("target");
        if let Err(e) = run_steps_without_a_disk(&plan, &config, &target) {
            prop_assert!(false, "planned, then failed in {}\n{}", e, serde_json::to_string(&plan.runtime_info).unwrap());
        }
    }

    #[test]
    fn netlink_random_bytes(datagram in bytes(300)) {
        read_netlink(&datagram);
    }

    #[test]
    fn netlink_shaped(datagram in netlink_datagram()) {
        read_netlink(&datagram);
    }

    /// A real upload with bytes overwritten: unpacked or refused, never a panic, and nothing
    /// written outside the directory.
    #[test]
    fn deploy_upload_damaged(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8)) {
        let mut bytes = upload_sample().to_vec();
        for (at, byte) in edits {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
        let dir = scratch();
        let inside = dir.path().join("inside");
        std::fs::create_dir(&inside).unwrap();
        let _ = nixos_kexec::rescue::cpio::unpack(&bytes[..], &inside);
        let beside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        prop_assert_eq!(beside.len(), 1);
    }
}

/// An archive as `deploy` uploads it: a directory, files, a secret and a link.
fn upload_sample() -> &'static [u8] {
    static SAMPLE: OnceLock<Vec<u8>> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let mut archive = nixos_kexec::rescue::cpio::Archive::default();
        archive.file("ssh-keys/0.pub", 0o644, b"ssh-ed25519 AAAA me".to_vec(), false);
        archive.file("host-keys/ssh_host_ed25519_key", 0o600, b"KEY".to_vec(), true);
        let source = tempfile::tempdir().unwrap();
        std::fs::create_dir(source.path().join("etc")).unwrap();
        std::fs::write(source.path().join("etc/motd"), b"hi").unwrap();
        std::os::unix::fs::symlink("motd", source.path().join("etc/issue")).unwrap();
        let tree = nixos_kexec::input::tree::Tree::walk(
            source.path(),
            &nixos_kexec::input::tree::Walk {
                name: "sample",
                max_bytes: 1 << 20,
                why_limited: "",
                too_large_fix: None,
                skip: None,
            },
        )
        .unwrap();
        archive.tree(&tree, "extra-files").unwrap();
        archive.to_bytes().as_bytes().to_vec()
    })
}
