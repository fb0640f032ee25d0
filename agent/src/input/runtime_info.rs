//! Runtime info, version 1: what a rescue system (or a PXE config server) tells the installer.
//!
//! Extra fields are accepted so that newer rescue-side tools keep working with this installer;
//! the fields below must keep their meaning.

use crate::error::user_error;
use crate::input::binary_cache::{PublicKey, StorePath, Substituter};
use crate::input::flake::{GeneratedPart, UserFlake};
use crate::input::report_url::ReportUrl;
use crate::network::types::{self, Destination, MacAddr, Prefix};
use anyhow::Result;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nixpkgs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_version: Option<String>,
    /// Swap partition size for a preset layout (`2G`, `512M`; `0` for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<String>,
    /// Partition table for a preset layout: `gpt` (default) or `mbr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// A declarative disk layout, instead of a preset `layout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::installer::storage::Storage>,
    /// A system built elsewhere (`nix build ….config.system.build.toplevel`): installed by
    /// downloading it from `substituters`, with nothing evaluated or built on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<StorePath>,
    /// Binary caches the install downloads from, besides the bundle's own (cache.nixos.org).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub substituters: Vec<Substituter>,
    /// Keys whose signatures make a cache's paths trusted, besides the bundle's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_public_keys: Vec<PublicKey>,
    /// The user's own configuration, `FLAKEREF#NAME`: the host flake builds it together with
    /// the modules the installer generates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flake: Option<UserFlake>,
    /// Which generated modules the host flake adds to `flake` (default: every one that
    /// applies); the others are left to the user's configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated: Option<Vec<GeneratedPart>>,
    /// Where the installer POSTs its progress events and final report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_url: Option<ReportUrl>,
}

impl RuntimeInfo {
    /// Lays `upper` over this runtime info, field by field: what `upper` names wins, what it
    /// leaves out stays. `version` is no setting and stays as it is.
    pub fn overlay(&mut self, upper: RuntimeInfo) {
        // Destructured whole, so that a new field cannot be forgotten here.
        let RuntimeInfo {
            version: _,
            hostname,
            disk,
            layout,
            ssh_authorized_keys,
            network,
            nixpkgs,
            state_version,
            swap,
            table,
            storage,
            system,
            substituters,
            trusted_public_keys,
            flake,
            generated,
            report_url,
        } = upper;
        self.hostname = hostname.or(self.hostname.take());
        self.disk = disk.or(self.disk.take());
        self.layout = layout.or(self.layout.take());
        if !ssh_authorized_keys.is_empty() {
            self.ssh_authorized_keys = ssh_authorized_keys;
        }
        self.network = network.or(self.network.take());
        self.nixpkgs = nixpkgs.or(self.nixpkgs.take());
        self.state_version = state_version.or(self.state_version.take());
        self.swap = swap.or(self.swap.take());
        self.table = table.or(self.table.take());
        self.storage = storage.or(self.storage.take());
        self.system = system.or(self.system.take());
        if !substituters.is_empty() {
            self.substituters = substituters;
        }
        if !trusted_public_keys.is_empty() {
            self.trusted_public_keys = trusted_public_keys;
        }
        self.flake = flake.or(self.flake.take());
        self.generated = generated.or(self.generated.take());
        self.report_url = report_url.or(self.report_url.take());
    }
}

/// The target disk; every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The disk's WWN or NVMe namespace id, as [`crate::machine::facts::Disk::wwn`] has it:
    /// what `nixos-kexec run` names the disk by when its serial is shared (NVMe namespaces,
    /// multipath, some cloud volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Network {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default, deserialize_with = "types::deserialize_ips")]
    pub nameservers: Vec<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub mac: MacAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub addresses: Vec<Prefix>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dhcp: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub to: Destination,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "types::deserialize_optional_ip"
    )]
    pub via: Option<IpAddr>,
    #[serde(default)]
    pub onlink: bool,
}

/// Where a piece of runtime info came from, for error messages.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Info,
    InfoDeflate,
    File,
    /// The bundle's defaults (nixosModules.installer's defaultNixpkgs, defaultLayout).
    Defaults,
    /// Fetched from `nixos_kexec.config_url=`.
    ConfigUrl,
}

impl Source {
    fn describe(self) -> &'static str {
        match self {
            Source::Info => "nixos_kexec.info",
            Source::InfoDeflate => "nixos_kexec.info_deflate",
            Source::File => "/etc/nixos-kexec/runtime-info.json",
            Source::Defaults => "/etc/nixos-kexec/defaults.json",
            Source::ConfigUrl => "The answer to nixos_kexec.config_url",
        }
    }
}

/// Base64 as rescue-side tools write it: standard or URL-safe alphabet, padding optional.
pub fn decode_base64(text: &str, source: Source, truncated: bool) -> Result<Vec<u8>> {
    let cleaned: String = text
        .trim()
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(cleaned.as_bytes())
        .map_err(|e| {
            user_error(
                format!(
                    "{} is not valid base64 ({e}).{}",
                    source.describe(),
                    truncation_hint(truncated)
                ),
                "encode the runtime info JSON with `base64 -w0` (standard or URL-safe alphabet).",
            )
        })
}

fn truncation_hint(truncated: bool) -> &'static str {
    if truncated {
        " The kernel command line is at its 2047-byte limit, so the value was probably cut off."
    } else {
        ""
    }
}

const TOO_LONG_FIX: &str = "send large runtime info as /etc/nixos-kexec/runtime-info.json in an initrd cpio appended at kexec time (nixos-kexec run does this by itself), or use nixos_kexec.info_deflate";

/// Decodes `nixos_kexec.info=` / `nixos_kexec.info_deflate=`.
pub fn from_param(value: &str, source: Source, truncated: bool) -> Result<RuntimeInfo> {
    let raw = decode_base64(value, source, truncated)?;
    let json = match source {
        Source::InfoDeflate => {
            miniz_oxide::inflate::decompress_to_vec_with_limit(&raw, 1 << 20).map_err(|e| {
                user_error(
                    format!(
                        "nixos_kexec.info_deflate does not inflate ({:?}).{}",
                        e.status,
                        truncation_hint(truncated)
                    ),
                    "compress the JSON with raw deflate (no zlib or gzip header) before base64.",
                )
            })?
        }
        _ => raw,
    };
    parse_json(&json, source, truncated)
}

pub fn parse_json(json: &[u8], source: Source, truncated: bool) -> Result<RuntimeInfo> {
    let info: RuntimeInfo = serde_json::from_slice(json).map_err(|e| {
        // A network value that does not parse reads as it always did: value, problem, fix.
        if let Some(refused) = types::refused_value(&e) {
            return anyhow::Error::new(refused);
        }
        let fix = if truncated || e.is_eof() {
            TOO_LONG_FIX.to_string()
        } else {
            "check it against the runtime-info format in the README (version 1).".to_string()
        };
        user_error(
            format!(
                "{} is not valid runtime-info JSON: {e}.{}",
                source.describe(),
                truncation_hint(truncated)
            ),
            fix,
        )
    })?;
    info.validate(source)?;
    Ok(info)
}

impl RuntimeInfo {
    /// Every check that needs no disk, so that bad input stops the run before anything is written.
    pub fn validate(&self, source: Source) -> Result<()> {
        let from = source.describe();
        if self.version != VERSION {
            return Err(user_error(
                format!(
                    "{from} has version {}; this installer reads version {VERSION}.",
                    self.version
                ),
                "set \"version\": 1, or use an installer bundle as new as the tool that wrote it.",
            ));
        }
        if let Some(hostname) = &self.hostname {
            validate_hostname(hostname)?;
        }
        if let Some(disk) = &self.disk {
            if disk.path.is_none() && disk.serial.is_none() && disk.wwn.is_none() {
                return Err(user_error(
                    format!("{from}: \"disk\" names neither \"path\" nor \"serial\"."),
                    "give the target disk as {\"path\": \"/dev/disk/by-id/...\"} or {\"serial\": \"...\"}.",
                ));
            }
        }
        for key in &self.ssh_authorized_keys {
            validate_ssh_key(key)?;
        }
        if let Some(nixpkgs) = &self.nixpkgs {
            validate_flake_ref(nixpkgs)?;
        }
        if let Some(version) = &self.state_version {
            validate_state_version(version)?;
        }
        if let Some(swap) = &self.swap {
            crate::installer::storage::parse_swap(swap)?;
        }
        if let Some(table) = &self.table {
            crate::installer::storage::Table::parse(table)?;
        }
        Ok(())
    }
}

pub fn validate_hostname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(user_error(
            format!("Hostname {name:?} is not a valid host name."),
            "use 1 to 63 letters, digits and dashes, not starting or ending with a dash.",
        ))
    }
}

/// An authorized_keys line: a public key, with options if it has them.
pub fn validate_ssh_key(key: &str) -> Result<()> {
    crate::input::authorized_keys::AuthorizedKey::parse(key).map(|_| ())
}

pub fn validate_flake_ref(text: &str) -> Result<()> {
    let ok = !text.is_empty()
        && !text
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\' || c == '$');
    if ok {
        Ok(())
    } else {
        Err(user_error(
            format!("{text:?} is not a flake reference."),
            "use a flake reference such as github:NixOS/nixpkgs/nixos-25.05.",
        ))
    }
}

pub fn validate_state_version(text: &str) -> Result<()> {
    let ok = text.split_once('.').is_some_and(|(y, m)| {
        y.len() == 2 && m.len() == 2 && y.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit())
    });
    if ok {
        Ok(())
    } else {
        Err(user_error(
            format!("state_version {text:?} is not a NixOS release like \"25.05\"."),
            "set it to the NixOS release the machine is first installed with, e.g. \"25.05\".",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD me@host";

    /// `wwn` is new and optional: a selector without it is written as before, and one with it
    /// alone names a disk.
    #[test]
    fn disk_by_wwn_alone_names_a_disk() {
        let info = parse_json(
            br#"{"version":1,"disk":{"wwn":"eui.0011223344556601","size_bytes":4294967296}}"#,
            Source::File,
            false,
        )
        .unwrap();
        assert_eq!(
            info.disk.and_then(|d| d.wwn).as_deref(),
            Some("eui.0011223344556601")
        );
        let old = DiskSelector {
            serial: Some("S1".into()),
            size_bytes: Some(1024),
            ..DiskSelector::default()
        };
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"serial":"S1","size_bytes":1024}"#
        );
        assert!(parse_json(br#"{"version":1,"disk":{"size_bytes":1}}"#, Source::File, false).is_err());
    }

    fn example() -> String {
        format!(
            r#"{{"version":1,"hostname":"web1","disk":{{"serial":"S1","size_bytes":1024}},
            "ssh_authorized_keys":["{KEY}"],
            "network":{{"interfaces":[{{"mac":"52:54:00:12:34:56","name":"eth0",
              "addresses":["192.0.2.10/32","2001:db8::2/64"],
              "routes":[{{"to":"default","via":"172.31.1.1","onlink":true}},{{"to":"default","via":"fe80::1"}}],
              "dhcp":false}}],"nameservers":["185.12.64.1"]}},
            "nixpkgs":"github:NixOS/nixpkgs/nixos-25.05","state_version":"25.05","future_field":1}}"#
        )
    }

    #[test]
    fn parses_version_1_with_extra_fields() {
        let info = parse_json(example().as_bytes(), Source::File, false).unwrap();
        assert_eq!(info.hostname.as_deref(), Some("web1"));
        assert!(info.network.unwrap().interfaces[0].routes[0].onlink);
    }

    #[test]
    fn base64_variants_and_deflate_agree() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let json = example();
        let a = from_param(&STANDARD.encode(&json), Source::Info, false).unwrap();
        let b = from_param(&URL_SAFE_NO_PAD.encode(&json), Source::Info, false).unwrap();
        let deflated = miniz_oxide::deflate::compress_to_vec(json.as_bytes(), 9);
        let c = from_param(&URL_SAFE_NO_PAD.encode(deflated), Source::InfoDeflate, false).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn truncated_value_mentions_the_limit() {
        use base64::engine::general_purpose::STANDARD;
        let encoded = STANDARD.encode(example());
        let err = from_param(&encoded[..encoded.len() / 2], Source::Info, true).unwrap_err();
        let text = crate::error::one_line(&err);
        assert!(text.contains("2047-byte limit"), "{text}");
        assert!(text.contains("runtime-info.json"), "{text}");
    }

    #[test]
    fn rejects_bad_fields_with_the_value() {
        for (bad, needle) in [
            (example().replace("52:54:00:12:34:56", "52:54:00:12:34"), "MAC"),
            (example().replace("192.0.2.10/32", "192.0.2.10/33"), "prefix"),
            (example().replace("\"web1\"", "\"-web\""), "Hostname"),
            (example().replace("\"version\":1", "\"version\":2"), "version 2"),
            (
                example().replace("ssh-ed25519 AAAA", "ssh-ed25519 BBBB"),
                "SSH authorized key",
            ),
        ] {
            let err = parse_json(bad.as_bytes(), Source::File, false).unwrap_err();
            assert!(crate::error::one_line(&err).contains(needle), "{err}");
        }
    }

    /// Network values are refused while the JSON is read, each with its own problem and fix,
    /// worded as when they were checked after reading.
    #[test]
    fn bad_network_values_name_the_value_and_the_fix() {
        for (bad, message) in [
            (
                example().replace("52:54:00:12:34:56", "52:54:00:12:34"),
                "\"52:54:00:12:34\" is not a MAC address. Fix: write MAC addresses as six hex pairs, e.g. 52:54:00:12:34:56.",
            ),
            (
                example().replace("192.0.2.10/32", "192.0.2.10/33"),
                "\"192.0.2.10/33\" is not an address with prefix length. Fix: write addresses as CIDR, e.g. 192.0.2.10/32 or 2001:db8::1/64.",
            ),
            (
                example().replace("\"to\":\"default\",\"via\":\"fe80::1\"", "\"to\":\"10.0.0.0\""),
                "\"10.0.0.0\" is not an address with prefix length. Fix: write addresses as CIDR, e.g. 192.0.2.10/32 or 2001:db8::1/64.",
            ),
            (
                example().replace("172.31.1.1", "172.31.1"),
                "\"172.31.1\" is not an IP address. Fix: write addresses like 192.0.2.10 or 2001:db8::1.",
            ),
            (
                example().replace("185.12.64.1", "dns.example"),
                "\"dns.example\" is not an IP address. Fix: write addresses like 192.0.2.10 or 2001:db8::1.",
            ),
        ] {
            let err = parse_json(bad.as_bytes(), Source::File, false).unwrap_err();
            assert!(crate::error::as_user_error(&err).is_some(), "{err:#}");
            assert_eq!(crate::error::one_line(&err), message);
        }
    }

    #[test]
    fn network_reads_and_writes_the_same_text() {
        let json = r#"{"version":1,"network":{"interfaces":[{"mac":"96:00:02:1a:2b:3c","name":"eth0","addresses":["203.0.113.10/32","2001:db8:c0de:1::1/64"],"routes":[{"to":"default","via":"172.31.1.1","onlink":true},{"to":"default","via":"fe80::1","onlink":false},{"to":"0.0.0.0/0","via":"fe80::1","onlink":false},{"to":"::/0","onlink":false},{"to":"10.7.0.0/16","onlink":false}],"dhcp":false},{"mac":"52:54:00:12:34:57","addresses":[],"routes":[],"dhcp":true}],"nameservers":["185.12.64.1","2a01:4ff:ff00::add:1"]}}"#;
        let info = parse_json(json.as_bytes(), Source::File, false).unwrap();
        assert_eq!(serde_json::to_string(&info).unwrap(), json);
        let route = &info.network.unwrap().interfaces[0].routes[2];
        assert_eq!(route.to, "0.0.0.0/0".parse().unwrap());
        assert_eq!(route.via, Some("fe80::1".parse().unwrap()));

        // MAC addresses compare, and are written, in lower case.
        let upper = example().replace("52:54:00:12:34:56", "52:54:00:AB:CD:EF");
        let info = parse_json(upper.as_bytes(), Source::File, false).unwrap();
        let interface = &info.network.as_ref().unwrap().interfaces[0];
        assert_eq!(interface.mac, "52:54:00:ab:cd:ef".parse().unwrap());
        assert!(serde_json::to_string(&info)
            .unwrap()
            .contains("\"mac\":\"52:54:00:ab:cd:ef\""));
    }
}
