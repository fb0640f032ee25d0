//! Property tests: the input parsers never panic, and the partition planner never produces a
//! layout that overlaps, is misaligned or leaves the disk, for any disk size and both sector sizes.

mod common;

use nixos_kexec::input::cmdline::Params;
use nixos_kexec::input::config::Config;
use nixos_kexec::input::config::Layout;
use nixos_kexec::input::runtime_info::{self, Source};
use nixos_kexec::installer::layout::{place, PlanIds, ALIGNMENT};
use nixos_kexec::installer::presets::storage_for;
use nixos_kexec::installer::storage::{Table, MIB};
use nixos_kexec::machine::facts::Firmware;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn cmdline_never_panics(line in ".{0,300}") {
        if let Ok(params) = Params::parse(&line) {
            let _ = Config::assemble(None, &params);
        }
    }

    #[test]
    fn our_parameters_with_arbitrary_values_never_panic(
        key in prop::sample::select(nixos_kexec::input::config::parameter_keys()),
        value in "[ -~]{0,200}",
    ) {
        let line = format!("console=ttyS0 nixos_kexec.{key}=\"{value}\"");
        if let Ok(params) = Params::parse(&line) {
            let _ = Config::assemble(None, &params);
        }
    }

    #[test]
    fn config_url_handling_never_panics(text in ".{0,200}", bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = nixos_kexec::input::http::Url::parse(&text);
        let _ = nixos_kexec::input::http::parse_response(&bytes);
        let vars = nixos_kexec::input::fetch::MachineVars {
            mac: Some("52:54:00:12:34:56".into()),
            serial: Some(text.clone()),
            ..Default::default()
        };
        let _ = nixos_kexec::input::fetch::substitute("config_url", &text, &vars);
        let _ = nixos_kexec::input::report_url::ReportUrl::parse(&text);
    }

    #[test]
    fn runtime_info_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = runtime_info::parse_json(&bytes, Source::File, false);
        let text = String::from_utf8_lossy(&bytes);
        let _ = runtime_info::from_param(&text, Source::Info, true);
        let _ = runtime_info::from_param(&text, Source::InfoDeflate, false);
    }

    #[test]
    fn runtime_info_never_panics_on_json_shaped_input(
        version in any::<u32>(),
        hostname in ".{0,70}",
        mac in "[0-9a-fA-F:]{0,20}",
        address in "[0-9a-f.:/]{0,45}",
        size in any::<u64>(),
    ) {
        let json = serde_json::json!({
            "version": version, "hostname": hostname,
            "disk": {"serial": hostname, "size_bytes": size},
            "network": {"interfaces": [{"mac": mac, "addresses": [address],
                "routes": [{"to": address, "via": address, "onlink": true}]}],
                "nameservers": [address]},
        });
        let _ = runtime_info::parse_json(json.to_string().as_bytes(), Source::File, false);
    }

    #[test]
    fn planner_stays_aligned_inside_and_disjoint(
        size in 0u64..(64u64 << 40),
        big_sector in any::<bool>(),
        layout in prop::sample::select(Layout::PRESETS.to_vec()),
        mbr in any::<bool>(),
        swap_mib in prop::sample::select(vec![0u64, 16, 512, 2048, 65536]),
    ) {
        let sector = if big_sector { 4096 } else { 512 };
        // Real disks are a whole number of sectors.
        let size = size / sector as u64 * sector as u64;
        let table = if mbr { Table::Mbr } else { Table::Gpt };
        let storage = storage_for(layout, table, swap_mib * MIB, false).unwrap();
        let placed = match place(&storage, &common::disk(size, sector), Firmware::Bios, 1 << 30, &PlanIds::random()) {
            Ok(placed) => placed,
            Err(e) => {
                // Refused: must be because it is too small, or too large for an MBR, and said so.
                let text = nixos_kexec::error::one_line(&e);
                prop_assert!(
                    (text.contains("too small") && size < 2700 * MIB + (swap_mib * MIB))
                        || (mbr && size > (sector as u64) << 32),
                    "{}", text
                );
                return Ok(());
            }
        };
        let parts = &placed.partitions;
        let backup = if mbr { 0 } else { 33 * 512u64.max(sector as u64) };
        let mut end = MIB;
        for p in parts {
            prop_assert_eq!(p.start_bytes % ALIGNMENT, 0);
            prop_assert_eq!(p.size_bytes % ALIGNMENT, 0);
            prop_assert!(p.size_bytes > 0);
            prop_assert!(p.start_bytes >= end, "overlap at {}", p.number);
            end = p.start_bytes + p.size_bytes;
        }
        prop_assert!(end + backup.min(20 * 1024) <= size, "layout runs into the backup GPT");
        prop_assert!(size - end < 2 * MIB + backup, "more than 2 MiB wasted at the end");
        prop_assert_eq!(placed.mounts.first().map(|m| m.mountpoint.as_str()), Some("/"));
    }
}
