//! The demo: build the dev bundle, boot a throwaway rescue VM, run `nixos-kexec run` in it,
//! kexec into the installer, prepare a blank virtual disk, and print what it left there.
//!
//! The dev bundle carries no Nix (the real `nixos-install` needs a Nix binary cache), so the
//! installer stops before `install`; everything up to it is real.

use anyhow::Result;
use nixos_kexec_tests::rescue::{rescue_cpio, rescue_vm, TARGET_SERIAL};
use nixos_kexec_tests::*;

fn section(title: &str) {
    println!("\n===== {title} =====");
}

fn main() -> Result<()> {
    section("building the dev bundle (Debian kernel + busybox + e2fsprogs + the musl agent)");
    let bundle = dev_bundle()?;
    let scratch = tempfile::tempdir()?;
    let key_dir = scratch.path().join("key");
    std::fs::create_dir_all(&key_dir)?;
    let key_path = key_dir.join("id_ed25519");
    ssh_keygen_new(&key_path, &["ed25519"], "demo@operator")?;
    let public_key = std::fs::read_to_string(key_path.with_extension("pub"))?;

    let run_args = format!(
        "--disk serial:{TARGET_SERIAL} --hostname demo --param stop_before=install --param after=poweroff"
    );
    let cpio = rescue_cpio(&bundle, scratch.path(), &run_args, public_key.trim(), &[])?;
    section("booting a rescue VM; it runs `nixos-kexec run` and kexecs into the installer");
    println!("rescue system: nixos-kexec run --bundle /bundle {run_args}");
    let out = rescue_vm(&bundle, &cpio)
        .timeout(std::time::Duration::from_secs(600))
        .run()?;
    out.expect_success()?;
    let disk = &out.disks[1];

    section("the target disk, checked from outside");
    println!("{}", sgdisk_verify(disk)?.trim());
    for (number, start, size, entry) in partitions(disk)? {
        println!(
            "partition {number}: {} MiB at {} MiB, name {}",
            size >> 20,
            start >> 20,
            entry["name"].as_str().unwrap_or("-")
        );
    }
    let root = extract_partition(disk, 3)?;
    println!("{}", e2fsck(&root)?.lines().last().unwrap_or("").trim());
    for file in [
        "/var/log/nixos-kexec/report.json",
        "/etc/nixos/flake.nix",
        "/etc/nixos/configuration.nix",
        "/etc/nixos/hardware-configuration.nix",
        "/etc/nixos/network.nix",
    ] {
        section(file);
        print!("{}", String::from_utf8_lossy(&ext4_read_file(&root, file)?));
    }
    section("done");
    println!(
        "The installer prepared the disk and stopped before nixos-install (the dev bundle has no Nix). \
         With the Nix-built bundle (nix build .#kexec-bundle) the same run installs NixOS and reboots."
    );
    Ok(())
}
