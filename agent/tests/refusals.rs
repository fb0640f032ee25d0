//! What the installer says when it refuses, checked without a VM: each test hands the kernel
//! command line of a QEMU scenario to the installer's own entry points (parameters -> config ->
//! plan, or the config_url fetch), with the machine that scenario boots, and checks the reason
//! on the `result: failure:` line and that a fix is printed with it.
//!
//! The QEMU suite keeps one VM per refusal class, to prove on a real machine that nothing was
//! written and the machine stayed up: input refused while it is read (`install.rs`
//! `bad_input_touches_no_disk`), a plan this machine cannot take (`layouts.rs`
//! `too_small_disk_is_refused`), no disk named (`netboot.rs`
//! `no_disk_named_writes_nothing_and_says_how_to_confirm`), the reinstall guard
//! (`short_parameters_install_and_a_second_boot_does_not_reinstall`), a config server that
//! cannot be trusted (`config_url_over_https_refuses_an_unknown_ca`), and the network that
//! config_url or the install step needs missing (`config_url_without_a_dhcp_server_says_so`,
//! `without_network_nothing_that_needs_it_starts`).

mod common;

use common::{config_for, plan_for, reason_of};

use base64::Engine;
use nixos_kexec::error::as_user_error;
use nixos_kexec::input::config::Config;
use nixos_kexec::input::fetch::{self, MachineVars};
use nixos_kexec::input::http;
use nixos_kexec::installer::layout::PlanIds;
use nixos_kexec::installer::plan;
use nixos_kexec::installer::storage::{GIB, MIB};
use nixos_kexec::machine::facts::{Disk, ExistingPartition, Facts, Firmware};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY_PARAM: &str = "nixos_kexec.ssh_key=ssh-ed25519+AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD+operator@laptop";

/// A QEMU VM as the harness makes it (1024 MiB, no NIC) with used virtio disks `(name, size,
/// serial)`, each with an old 100 MiB partition: the machine of agent/tests/fixtures/plan/input/
/// facts.json with these changes.
fn machine(firmware: Firmware, disks: &[(&str, u64, &str)]) -> Facts {
    let mut facts = common::facts();
    let virtio = facts.disks[0].clone();
    facts.firmware = firmware;
    facts.ram_bytes = 1024 * MIB;
    facts.nics.clear();
    facts.disks = disks
        .iter()
        .map(|&(name, size, serial)| Disk {
            name: name.into(),
            dev_path: format!("/dev/{name}"),
            size_bytes: size,
            serial: Some(serial.into()),
            by_id: vec![format!("virtio-{serial}")],
            by_path: vec![],
            partitions: vec![ExistingPartition {
                name: format!("{name}1"),
                start_bytes: MIB,
                size_bytes: 100 * MIB,
            }],
            ..virtio.clone()
        })
        .collect();
    facts
}

/// Expects `params` on `facts` to be refused with a reason containing `expected`.
fn refused(name: &str, params: &str, facts: &Facts, expected: &str) {
    let error = match plan_for(params, facts) {
        Ok(plan) => panic!("{name}: planned instead of refusing: {plan:?}"),
        Err(e) => e,
    };
    let reason = reason_of(&error);
    assert!(
        reason.contains(expected),
        "{name}: reason `{reason}` lacks `{expected}`"
    );
}

/// The used 3 GiB disk `bad_input_touches_no_disk` boots with.
fn victim_3g() -> Facts {
    machine(Firmware::Bios, &[("vda", 3 * GIB, "VICTIM01")])
}

#[test]
fn bad_base64_in_info_is_refused() {
    refused(
        "bad_base64",
        "nixos_kexec.info=%%%not-base64%%% nixos_kexec.disk=/dev/vda nixos_kexec.after=poweroff",
        &victim_3g(),
        "not valid base64",
    );
}

#[test]
fn unknown_parameter_is_refused() {
    refused(
        "unknown_key",
        "nixos_kexec.dsik=/dev/vda nixos_kexec.after=poweroff",
        &victim_3g(),
        "Unknown parameter nixos_kexec.dsik",
    );
}

#[test]
fn absent_disk_is_refused() {
    refused(
        "absent_disk",
        "nixos_kexec.disk=serial:NOSUCHDISK nixos_kexec.after=poweroff",
        &victim_3g(),
        "not on this machine",
    );
}

/// The parameters `layouts.rs`'s refused scenarios boot with, before their own.
fn layout_params(extra: &str) -> String {
    format!("nixos_kexec.disk=/dev/vda {KEY_PARAM} nixos_kexec.after=poweroff {extra}")
}

/// The used 2 GiB disk of `layouts.rs`'s refused scenarios.
fn victim_2g(firmware: Firmware) -> Facts {
    machine(firmware, &[("vda", 2 * GIB, "VICTIM01")])
}

#[test]
fn zfs_is_refused() {
    refused(
        "zfs",
        &layout_params("nixos_kexec.layout=zfs"),
        &victim_2g(Firmware::Bios),
        "ZFS",
    );
}

#[test]
fn luks_without_passphrase_is_refused() {
    refused(
        "luks_without_passphrase",
        &layout_params("nixos_kexec.layout=luks-btrfs"),
        &victim_2g(Firmware::Bios),
        "no disk passphrase came with the installer",
    );
}

#[test]
fn too_small_disk_is_refused() {
    refused(
        "too_small",
        &layout_params("nixos_kexec.layout=btrfs nixos_kexec.swap=1G"),
        &victim_2g(Firmware::Bios),
        "too small for this layout",
    );
}

#[test]
fn mbr_on_uefi_is_refused() {
    refused(
        "mbr_on_uefi",
        &layout_params("nixos_kexec.table=mbr"),
        &victim_2g(Firmware::Uefi),
        "booted with UEFI",
    );
}

#[test]
fn overlapping_declarative_partitions_are_refused() {
    let overlapping = serde_json::json!({
        "version": 1,
        "storage": {"partitions": [
            {"size": "1M", "type": "bios-boot"},
            {"size": "1G", "start": "1M", "filesystem": {"type": "ext4", "mountpoint": "/"}}
        ]}
    });
    let info = base64::engine::general_purpose::STANDARD.encode(overlapping.to_string());
    refused(
        "overlap",
        &layout_params(&format!("nixos_kexec.info={info}")),
        &victim_2g(Firmware::Bios),
        "overlap",
    );
}

/// A network boot where nothing names a disk and two could be meant: both are listed, the fix
/// names each by its by-id path, and `auto` cannot choose (so no plan for it is printed).
#[test]
fn no_disk_named_with_two_candidates_lists_both() {
    let facts = machine(
        Firmware::Bios,
        &[("vda", 3 * GIB, "CANDIDATE-A"), ("vdb", 3 * GIB, "CANDIDATE-B")],
    );
    let params = format!("nixos_kexec.hostname=box nixos_kexec.after=poweroff {KEY_PARAM}");
    let error = plan_for(&params, &facts).expect_err("planned without a disk named");
    let reason = reason_of(&error);
    assert!(
        reason.contains("No target disk was chosen")
            && reason.contains("/dev/vda")
            && reason.contains("/dev/vdb"),
        "{reason}"
    );
    let fix = &as_user_error(&error).expect("a user error").fix;
    assert!(
        fix.contains(
            "nixos_kexec.disk=/dev/disk/by-id/virtio-CANDIDATE-A or nixos_kexec.disk=/dev/disk/by-id/virtio-CANDIDATE-B"
        ),
        "how to confirm is not printed: {fix}"
    );
    // `app::prepare` prints the plan `auto` would run only for a single eligible disk.
    assert_eq!(
        plan::eligible_disks(&facts).len(),
        2,
        "auto cannot choose between two disks"
    );
    let auto = Config {
        disk_auto: true,
        ..config_for(&params).expect("the parameters are valid")
    };
    assert!(
        plan::make(&auto, &facts, &PlanIds::random()).is_err(),
        "auto cannot choose between two disks"
    );
}

/// A 404 from the config server is final: one request, and a reason naming the URL (with
/// `${mac}` filled in) and the status.
#[test]
fn config_url_not_found_names_the_url_and_the_status() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    listener.set_nonblocking(true).expect("a non-blocking listener");
    let base = format!("http://{}", listener.local_addr().expect("its address"));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (requests, stop) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                stream.set_nonblocking(false).expect("a blocking stream");
                let mut head = [0u8; 1024];
                let n = stream.read(&mut head).unwrap_or(0);
                let request = String::from_utf8_lossy(&head[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                requests.lock().expect("the request list").push(request);
                let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            }
        })
    };
    let mac = "52:54:00:12:34:05";
    let vars = MachineVars {
        mac: Some(mac.into()),
        ..Default::default()
    };
    let error = fetch::runtime_info(
        &format!("{base}/hosts/${{mac}}.json"),
        &vars,
        &http::Options::default(),
    )
    .expect_err("a 404 gave runtime info");
    let reason = reason_of(&error);
    let url = format!("{base}/hosts/{mac}.json");
    assert!(
        reason.contains(&url) && reason.contains("404 Not Found"),
        "the reason does not name the URL and the status: {reason}"
    );
    // Every attempt was made before the fetch gave up.
    stop.store(true, Ordering::SeqCst);
    server.join().expect("the server thread");
    let requests = requests.lock().expect("the request list");
    assert_eq!(requests.len(), 1, "a 404 was retried: {requests:?}");
}
