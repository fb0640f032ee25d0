//! A prebuilt system from binary caches: the inputs (`system`, `substituters`,
//! `trusted_public_keys`) as parameters and runtime info, the install command they make, and
//! the check before the wipe against caches in directories (`file://`), signed here with
//! Ed25519 keys as `nix store sign` does. The same check against a cache that Debian's real Nix
//! signed, served over HTTP to a QEMU guest, is in tests/tests/prebuilt_system.rs.

mod common;

use base64::Engine;
use common::{config_for, plan_for, reason_of};
use nixos_kexec::input::binary_cache::{Narinfo, StorePath};
use nixos_kexec::input::runtime_info::{self, Source};
use nixos_kexec::installer::plan::Plan;
use nixos_kexec::installer::steps::install::check_caches_before_wiping;
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::path::Path;

const KEY_PARAM: &str = "nixos_kexec.ssh_key=ssh-ed25519+AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD+operator@laptop";
const SYSTEM: &str = "/nix/store/2dz8wm2ahnxv3kmz2d9h2dhpl0dxsdl2-nixos-system-web1-26.05";
const BUSYBOX: &str = "0a1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r-busybox";

fn params(extra: &str) -> String {
    format!("{KEY_PARAM} nixos_kexec.disk=/dev/vda {extra}")
}

/// A signing key as `nix key generate-secret --key-name NAME` makes one, and its public half
/// as the operator passes it.
struct SigningKey {
    name: String,
    pair: Ed25519KeyPair,
}

impl SigningKey {
    fn new(name: &str, seed: u8) -> SigningKey {
        SigningKey {
            name: name.into(),
            pair: Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("a key from a seed"),
        }
    }

    fn public(&self) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(self.pair.public_key().as_ref());
        format!("{}:{encoded}", self.name)
    }
}

/// A binary cache directory as `nix copy --to file://DIR` leaves it, holding `path`'s
/// narinfo signed by `key` (the NAR itself is not needed for the check).
fn cache_with(dir: &Path, path: &str, key: &SigningKey) {
    std::fs::write(
        dir.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n",
    )
    .expect("nix-cache-info");
    let unsigned = format!(
        "StorePath: {path}\nURL: nar/0p1.nar.xz\nCompression: xz\nFileHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\nFileSize: 120\nNarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 4096\nReferences: {BUSYBOX}\n"
    );
    let fingerprint = Narinfo::parse(&unsigned)
        .expect("narinfo")
        .fingerprint()
        .expect("fingerprint");
    let signature = base64::engine::general_purpose::STANDARD.encode(key.pair.sign(fingerprint.as_bytes()));
    let narinfo_file = StorePath::parse(path).expect("a store path").narinfo_file();
    std::fs::write(
        dir.join(narinfo_file),
        format!("{unsigned}Sig: {}:{signature}\n", key.name),
    )
    .expect("narinfo file");
}

fn prebuilt_plan(cache: &Path, key: &SigningKey) -> Plan {
    plan_for(
        &params(&format!(
            "nixos_kexec.system={SYSTEM} nixos_kexec.substituters=file://{} nixos_kexec.trusted_public_keys={}",
            cache.display(),
            key.public()
        )),
        &common::facts(),
    )
    .expect("plans")
}

#[test]
fn a_prebuilt_system_is_installed_with_the_caches_as_nix_options() {
    let key = SigningKey::new("cache.example.com-1", 1);
    let plan = plan_for(
        &params(&format!(
            "nixos_kexec.system={SYSTEM} nixos_kexec.substituters=https://cache.example.com,http://10.0.2.2:8080?priority=10 nixos_kexec.trusted_public_keys={}",
            key.public()
        )),
        &common::facts(),
    )
    .expect("plans");
    assert_eq!(
        plan.install_command,
        [
            "nixos-install",
            "--root",
            "/mnt",
            "--system",
            SYSTEM,
            "--no-root-passwd",
            "--no-channel-copy",
            "--option",
            "extra-substituters",
            "https://cache.example.com http://10.0.2.2:8080?priority=10",
            "--option",
            "extra-trusted-public-keys",
            &key.public(),
        ]
    );
    // The host flake is still written, for later rebuilds.
    assert!(plan.steps.iter().any(|s| s.name() == "flake"));
}

#[test]
fn extra_caches_serve_a_flake_install_too() {
    let plan = plan_for(
        &params("nixos_kexec.substituters=https://cache.example.com"),
        &common::facts(),
    )
    .expect("plans");
    assert_eq!(plan.install_command[3], "--flake");
    assert_eq!(
        plan.install_command[7..],
        ["--option", "extra-substituters", "https://cache.example.com"]
    );
    let plain = plan_for(&params(""), &common::facts()).expect("plans");
    assert_eq!(plain.install_command.len(), 7, "{:?}", plain.install_command);
}

#[test]
fn runtime_info_carries_the_same_fields() {
    let key = SigningKey::new("k-1", 2);
    let json = format!(
        r#"{{"version":1,"system":"{SYSTEM}","substituters":["https://c.example.com"],"trusted_public_keys":["{}"]}}"#,
        key.public()
    );
    let info = runtime_info::parse_json(json.as_bytes(), Source::File, false).expect("parses");
    assert_eq!(info.system.as_ref().map(|s| s.as_str()), Some(SYSTEM));
    assert_eq!(info.substituters[0].as_str(), "https://c.example.com");
    assert_eq!(info.trusted_public_keys[0].to_string(), key.public());
    // Written back as read: the target's runtime-info.json.
    let again = serde_json::to_string(&info).expect("serialises");
    assert_eq!(
        runtime_info::parse_json(again.as_bytes(), Source::File, false).expect("parses"),
        info
    );
    let bad = json.replace(SYSTEM, "/nix/store/not-a-path");
    assert!(runtime_info::parse_json(bad.as_bytes(), Source::File, false).is_err());
}

#[test]
fn bad_inputs_are_refused_with_a_fix() {
    for (extra, expected) in [
        (format!("nixos_kexec.system={SYSTEM}"), "no substituters to download it from"),
        ("nixos_kexec.system=/nix/store/abc-x".to_string(), "is not a Nix store path"),
        (
            format!("nixos_kexec.system={SYSTEM}/bin/switch-to-configuration nixos_kexec.substituters=https://c.example.com"),
            "is not a Nix store path",
        ),
        ("nixos_kexec.substituters=s3://bucket".to_string(), "is not an http://, https:// or file://"),
        ("nixos_kexec.trusted_public_keys=c.example.com-1".to_string(), "is not a Nix signing key"),
        ("nixos_kexec.trusted_public_keys=k:AAAA".to_string(), "not 32 bytes in base64"),
    ] {
        let error = match config_for(&params(&extra)).and_then(|_| plan_for(&params(&extra), &common::facts())) {
            Ok(_) => panic!("{extra}: accepted"),
            Err(e) => e,
        };
        let reason = reason_of(&error);
        assert!(reason.contains(expected), "{extra}: `{reason}` lacks `{expected}`");
    }
}

#[test]
fn the_check_before_the_wipe_accepts_a_signed_path_and_refuses_the_rest() {
    let key = SigningKey::new("cache.example.com-1", 3);
    let cache = tempfile::tempdir().expect("tempdir");
    cache_with(cache.path(), SYSTEM, &key);
    check_caches_before_wiping(&prebuilt_plan(cache.path(), &key)).expect("a signed path passes");

    let refusal = |plan: &Plan| reason_of(&check_caches_before_wiping(plan).expect_err("refused"));
    let common = |reason: &str| {
        assert!(reason.contains(SYSTEM), "names the path: {reason}");
        assert!(
            reason.contains(&format!("file://{}", cache.path().display())),
            "names the cache: {reason}"
        );
        assert!(reason.contains("Nothing was written"), "{reason}");
    };

    // Signed by a key of the same name that is not the trusted one.
    let impostor = SigningKey::new("cache.example.com-1", 4);
    let reason = refusal(&prebuilt_plan(cache.path(), &impostor));
    common(&reason);
    assert!(
        reason.contains("its signature by cache.example.com-1 does not verify"),
        "{reason}"
    );

    // Signed by a key nobody trusts.
    let stranger = SigningKey::new("laptop-1", 5);
    let reason = refusal(&prebuilt_plan(cache.path(), &stranger));
    common(&reason);
    assert!(
        reason.contains("signed only by cache.example.com-1, which is not a trusted public key"),
        "{reason}"
    );

    // The cache does not have the path.
    let other = tempfile::tempdir().expect("tempdir");
    cache_with(other.path(), &SYSTEM.replace("2dz8", "3dz8"), &key);
    let reason =
        reason_of(&check_caches_before_wiping(&prebuilt_plan(other.path(), &key)).expect_err("refused"));
    assert!(reason.contains("it does not have the path"), "{reason}");

    // Not a cache at all.
    let empty = tempfile::tempdir().expect("tempdir");
    let reason =
        reason_of(&check_caches_before_wiping(&prebuilt_plan(empty.path(), &key)).expect_err("refused"));
    assert!(reason.contains("it is not a binary cache"), "{reason}");

    // A cache nobody answers at, then the good one: the first that has it wins.
    let mut plan = prebuilt_plan(cache.path(), &key);
    let dead = nixos_kexec::input::binary_cache::Substituter::parse("http://127.0.0.1:9").expect("url");
    plan.caches.substituters.insert(0, dead);
    check_caches_before_wiping(&plan).expect("the second cache has it");
    plan.caches.substituters.truncate(1);
    let reason = reason_of(&check_caches_before_wiping(&plan).expect_err("refused"));
    assert!(
        reason.contains("http://127.0.0.1:9: unreachable (3 attempts"),
        "{reason}"
    );
}
