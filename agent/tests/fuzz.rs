//! Fuzzing in CI-sized form: every parser of outside input (HTTP answers, the kernel command
//! line, runtime info, declarative storage down to the partition layout, netlink replies) gets
//! random bytes and random input of the right shape, and must answer with a value or an error,
//! never a panic. Tests build in debug mode, so an arithmetic overflow is a panic too.
//!
//! `NIXOS_KEXEC_FUZZ_CASES` sets the cases per target (default 3000); `tests/bench` runs a
//! longer round and the README gives its count.

use nixos_kexec::input::cmdline::{Params, COMMAND_LINE_SIZE};
use nixos_kexec::input::config::{parameter_keys, Config};
use nixos_kexec::input::http::parse_response;
use nixos_kexec::input::runtime_info::{self, Source};
use nixos_kexec::installer::layout::{place, PlanIds};
use nixos_kexec::machine::facts::{Disk, Firmware, Transport};
use nixos_kexec::network::netlink::{self, IfAddr, IfInfo, RtMsg};
use proptest::prelude::*;
use serde_json::{json, Value};

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

fn disk(size_bytes: u64, logical_sector: u32) -> Disk {
    Disk {
        name: "vda".into(),
        dev_path: "/dev/vda".into(),
        size_bytes,
        logical_sector,
        physical_sector: logical_sector,
        transport: Transport::Virtio,
        model: None,
        serial: Some("FUZZ".into()),
        wwn: None,
        by_id: vec![],
        by_path: vec![],
        removable: false,
        read_only: false,
        partitions: vec![],
        holders: vec![],
        mounted_at: vec![],
        modules: vec![],
    }
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
        let Ok(placed) = place(&storage, &disk(size, sector), firmware, ram, &PlanIds::random()) else {
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

    #[test]
    fn netlink_random_bytes(datagram in bytes(300)) {
        read_netlink(&datagram);
    }

    #[test]
    fn netlink_shaped(datagram in netlink_datagram()) {
        read_netlink(&datagram);
    }
}
