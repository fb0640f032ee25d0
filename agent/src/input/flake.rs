//! The user's own NixOS configuration, as the input names it: `FLAKEREF#NAME`, where NAME is
//! an attribute of the flake's `nixosConfigurations` (what `nixos-rebuild --flake` and
//! nixos-anywhere take). Parsed once here; the host flake builds it with the modules only the
//! installer can write ([`GeneratedPart`]).

use crate::error::user_error;
use crate::input::binary_cache::serde_as_text;
use anyhow::Result;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where `run` puts a local flake directory in the appended archive, and so where the
/// installer finds it.
pub const PACKED_FLAKE_DIR: &str = "/etc/nixos-kexec/flake";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFlake {
    pub source: FlakeSource,
    /// The attribute of `nixosConfigurations`.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlakeSource {
    /// Fetched by Nix during the install, as written (`github:me/dotfiles`, `git+https://…`).
    Remote(String),
    /// A directory holding `flake.nix`: on the rescue side the operator's, which `run` packs;
    /// in the installer, where the packed copy was unpacked.
    Directory(PathBuf),
}

/// The schemes of flake references Nix fetches over the network.
const REMOTE_SCHEMES: &[&str] = &[
    "github:",
    "gitlab:",
    "sourcehut:",
    "git+https://",
    "git+http://",
    "git+ssh://",
    "https://",
    "http://",
    "tarball+https://",
    "tarball+http://",
    "file+https://",
    "file+http://",
];

const EXAMPLES: &str =
    "e.g. github:me/dotfiles#web1, git+https://git.example.com/infra.git#web1 or ./cfg#web1";

impl UserFlake {
    pub fn parse(text: &str) -> Result<UserFlake> {
        let bad = |why: &str, fix: &str| user_error(format!("flake {text:?} {why}."), fix.to_string());
        // The name is checked on its own below, once a quoted one is unquoted.
        let reference = text.split_once('#').map_or(text, |(reference, _)| reference);
        if reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"\\$`".contains(c))
        {
            return Err(bad(
                "holds a space, a quote, a backslash, `$` or a control character",
                &format!("write the flake reference as Nix takes it, {EXAMPLES}."),
            ));
        }
        let Some((reference, name)) = text.split_once('#') else {
            return Err(bad(
                "names no configuration",
                &format!(
                    "add #NAME, the attribute of the flake's nixosConfigurations to install, {EXAMPLES}."
                ),
            ));
        };
        // As nixos-rebuild and nixos-anywhere accept it: `.#"web1"`.
        let name = name
            .strip_prefix('"')
            .and_then(|n| n.strip_suffix('"'))
            .unwrap_or(name);
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(bad(
                &format!("names the configuration {name:?}, which is not an attribute name"),
                "use the attribute of nixosConfigurations as written in the flake: letters, digits, '-', '_' and '.'.",
            ));
        }
        let source = if let Some(path) = reference.strip_prefix("path:") {
            FlakeSource::Directory(PathBuf::from(path.split('?').next().unwrap_or(path)))
        } else if reference.starts_with('/') || reference.starts_with('.') {
            FlakeSource::Directory(PathBuf::from(reference))
        } else if REMOTE_SCHEMES.iter().any(|s| reference.starts_with(s)) {
            let rest = REMOTE_SCHEMES
                .iter()
                .find_map(|s| reference.strip_prefix(s))
                .unwrap_or_default();
            let repository = rest.split(['?', '/']).take(2).filter(|p| !p.is_empty()).count();
            if rest.is_empty() {
                return Err(bad("names no location after its scheme", &format!("{EXAMPLES}.")));
            }
            if ["github:", "gitlab:", "sourcehut:"]
                .iter()
                .any(|s| reference.starts_with(s))
                && repository < 2
            {
                return Err(bad(
                    "names no repository",
                    "write OWNER/REPO after the scheme, e.g. github:me/dotfiles#web1.",
                ));
            }
            FlakeSource::Remote(reference.to_string())
        } else if reference.starts_with("git+file:") || reference.starts_with("file:") {
            return Err(bad(
                "is a file URL, which would name a path on the installer",
                "give the directory itself (./cfg#web1): `run` packs it and sends it along.",
            ));
        } else {
            return Err(bad(
                "is not a flake reference the installer can fetch (a registry name such as `nixpkgs` means nothing there)",
                &format!("name it by its location, {EXAMPLES}."),
            ));
        };
        Ok(UserFlake {
            source,
            name: name.to_string(),
        })
    }

    /// This flake, with `dir` as its source (where `run` packed the directory).
    pub fn moved_to(&self, dir: &Path) -> UserFlake {
        UserFlake {
            source: FlakeSource::Directory(dir.to_path_buf()),
            name: self.name.clone(),
        }
    }

    /// The reference without `#NAME`.
    pub fn reference(&self) -> String {
        match &self.source {
            FlakeSource::Remote(reference) => reference.clone(),
            FlakeSource::Directory(dir) => dir.display().to_string(),
        }
    }
}

impl fmt::Display for UserFlake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.reference(), self.name)
    }
}

/// A module of the host flake that only the installer can write, which the user can leave to
/// their own configuration (a disko user declares the filesystems).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GeneratedPart {
    /// `hardware-configuration.nix`: filesystems by UUID, LUKS, swap, initrd modules,
    /// platform, boot loader and serial console.
    Hardware,
    /// `network.nix`: the network as the rescue system had it, by MAC.
    Network,
    /// `persist.nix`, when `/` is a tmpfs: host keys, machine-id and /etc/nixos under the
    /// persist path.
    Persist,
    /// `initrd-ssh.nix`, on an encrypted disk: SSH in the initrd to unlock it.
    InitrdSsh,
}

impl GeneratedPart {
    pub const ALL: [GeneratedPart; 4] = [
        GeneratedPart::Hardware,
        GeneratedPart::Network,
        GeneratedPart::Persist,
        GeneratedPart::InitrdSsh,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GeneratedPart::Hardware => "hardware",
            GeneratedPart::Network => "network",
            GeneratedPart::Persist => "persist",
            GeneratedPart::InitrdSsh => "initrd-ssh",
        }
    }

    pub fn file(self) -> &'static str {
        match self {
            GeneratedPart::Hardware => "hardware-configuration.nix",
            GeneratedPart::Network => "network.nix",
            GeneratedPart::Persist => "persist.nix",
            GeneratedPart::InitrdSsh => "initrd-ssh.nix",
        }
    }

    pub fn parse(text: &str) -> Result<GeneratedPart> {
        GeneratedPart::ALL
            .into_iter()
            .find(|p| p.name() == text)
            .ok_or_else(|| {
                user_error(
                    format!("generated part {text:?} is not one the installer writes."),
                    "name some of hardware, network, persist, initrd-ssh (comma-separated as a parameter), or none.",
                )
            })
    }
}

serde_as_text!(UserFlake, to_string);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_users_write() {
        for (text, source, name) in [
            (
                "github:me/dotfiles#web1",
                FlakeSource::Remote("github:me/dotfiles".into()),
                "web1",
            ),
            (
                "github:me/dotfiles/main?dir=hosts#web1",
                FlakeSource::Remote("github:me/dotfiles/main?dir=hosts".into()),
                "web1",
            ),
            (
                "git+https://git.example.com/infra.git?ref=prod#db.example.com",
                FlakeSource::Remote("git+https://git.example.com/infra.git?ref=prod".into()),
                "db.example.com",
            ),
            (
                "git+ssh://git@github.com/me/private#web1",
                FlakeSource::Remote("git+ssh://git@github.com/me/private".into()),
                "web1",
            ),
            ("./cfg#web1", FlakeSource::Directory("./cfg".into()), "web1"),
            (".#\"web1\"", FlakeSource::Directory(".".into()), "web1"),
            (
                "/root/cfg#web_1",
                FlakeSource::Directory("/root/cfg".into()),
                "web_1",
            ),
            (
                "path:/root/cfg#web1",
                FlakeSource::Directory("/root/cfg".into()),
                "web1",
            ),
        ] {
            let flake = UserFlake::parse(text).unwrap_or_else(|e| panic!("{text}: {e:#}"));
            assert_eq!(flake.source, source, "{text}");
            assert_eq!(flake.name, name, "{text}");
            assert_eq!(UserFlake::parse(&flake.to_string()).unwrap(), flake, "{text}");
        }
    }

    #[test]
    fn bad_references_name_the_problem_and_the_fix() {
        for (text, says) in [
            ("github:me/dotfiles", "names no configuration"),
            ("github:me/dotfiles#", "not an attribute name"),
            ("github:me/dotfiles#a b", "not an attribute name"),
            ("github:me/dot files#web1", "a space"),
            ("github:me#web1", "names no repository"),
            ("github:#web1", "no location"),
            ("nixpkgs#web1", "registry name"),
            ("git+file:///root/cfg#web1", "file URL"),
            ("github:me/dotfiles#web1\"; x", "not an attribute name"),
            ("github:me/dot\"files#web1", "a quote"),
            ("github:me/${x}#web1", "`$`"),
            ("github:me/d#we/b1", "not an attribute name"),
            ("", "names no configuration"),
        ] {
            let err = UserFlake::parse(text).unwrap_err();
            let user = crate::error::as_user_error(&err).unwrap_or_else(|| panic!("{text}: {err:#}"));
            assert!(user.problem.contains(says), "{text}: {}", user.problem);
            assert!(!user.fix.is_empty());
        }
    }

    #[test]
    fn parts_by_name() {
        for part in GeneratedPart::ALL {
            assert_eq!(GeneratedPart::parse(part.name()).unwrap(), part);
            assert_eq!(
                serde_json::to_string(&part).unwrap(),
                format!("\"{}\"", part.name())
            );
        }
        assert!(GeneratedPart::parse("filesystems").is_err());
    }
}
