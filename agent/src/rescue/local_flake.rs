//! `run --flake ./DIR#NAME`: the operator's flake directory, packed into the appended archive
//! as git would commit it (`.gitignore` and `.git/info/exclude` respected, `.git` left out),
//! up to a size the installer's RAM can carry. The installer finds it at
//! [`PACKED_FLAKE_DIR`] and the host flake takes it in as `./configuration`.

use super::cpio::Archive;
use crate::console;
use crate::error::user_error;
use crate::input::flake::{UserFlake, PACKED_FLAKE_DIR};
use crate::installer::storage::MIB;
use anyhow::{Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The archive is unpacked into the installer's RAM, next to the whole bundle: a configuration
/// is text, and anything near this size is a build result or a disk image that slipped past
/// `.gitignore`.
pub const MAX_BYTES: u64 = 32 * MIB;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedFlake {
    pub files: usize,
    pub bytes: u64,
    /// Symlinks, which the installer's copy leaves out.
    pub left_out: Vec<String>,
}

/// Packs `dir`, the directory of `flake`, into `archive` under [`PACKED_FLAKE_DIR`].
pub fn pack(flake: &UserFlake, dir: &Path, archive: &mut Archive) -> Result<PackedFlake> {
    crate::installer::steps::flake::check_flake_directory(flake, dir)?;
    let walk = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .ignore(false)
        .git_global(false)
        .git_ignore(true)
        .git_exclude(true)
        .require_git(false)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(|entry| entry.file_name() != ".git")
        .build();
    let mut files = Vec::new();
    let mut left_out = Vec::new();
    for entry in walk {
        let entry = entry.with_context(|| format!("reading the flake directory {}", dir.display()))?;
        let path = entry.path();
        let relative = path
            .strip_prefix(dir)
            .with_context(|| format!("{} is outside {}", path.display(), dir.display()))?
            .to_string_lossy()
            .into_owned();
        let metadata =
            std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if metadata.is_dir() {
            continue;
        }
        if !metadata.is_file() {
            left_out.push(relative);
            continue;
        }
        files.push((
            relative,
            path.to_path_buf(),
            metadata.len(),
            metadata.permissions().mode(),
        ));
    }
    let bytes: u64 = files.iter().map(|(_, _, size, _)| size).sum();
    if bytes > MAX_BYTES {
        let mut largest: Vec<&(String, std::path::PathBuf, u64, u32)> = files.iter().collect();
        largest.sort_by_key(|(_, _, size, _)| std::cmp::Reverse(*size));
        let named: Vec<String> = largest
            .iter()
            .take(3)
            .map(|(name, _, size, _)| format!("{name} {:.1} MiB", *size as f64 / MIB as f64))
            .collect();
        return Err(user_error(
            format!(
                "The flake directory {} holds {:.1} MiB after .gitignore (largest: {}), over the {} MiB the installer can carry: it travels in the installer's RAM.",
                dir.display(),
                bytes as f64 / MIB as f64,
                named.join(", "),
                MAX_BYTES / MIB
            ),
            "add what the configuration does not need (build results, images) to .gitignore, or push the flake to a repository and pass --flake github:OWNER/REPO#NAME.",
        ));
    }
    for (relative, path, _, mode) in &files {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        // Keys kept next to a configuration (sops, age) are private to their owner: masked.
        let secret = mode & 0o077 == 0;
        archive.file(
            &format!("{PACKED_FLAKE_DIR}/{relative}"),
            mode & 0o7777,
            data,
            secret,
        );
    }
    for name in &left_out {
        console::line(&format!(
            "flake: {name} in {} is no regular file (a symlink?); it is left out",
            dir.display()
        ));
    }
    Ok(PackedFlake {
        files: files.len(),
        bytes,
        left_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn flake() -> UserFlake {
        UserFlake::parse("./cfg#web1").unwrap()
    }

    fn paths(archive: &Archive) -> Vec<String> {
        archive
            .entries()
            .iter()
            .filter(|e| e.mode & 0o100000 != 0)
            .map(|e| e.path.clone())
            .collect()
    }

    #[test]
    fn gitignore_is_respected_and_git_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (name, text) in [
            ("flake.nix", "{ outputs = _: { }; }"),
            ("hosts/web1.nix", "{ }"),
            (".gitignore", "/result-data\n*.qcow2\n!keep.qcow2\n"),
            ("hosts/.gitignore", "local.nix\n"),
            ("hosts/local.nix", "{ }"),
            ("disk.qcow2", "image"),
            ("keep.qcow2", "kept"),
            ("result-data/big", "built"),
            (".git/config", "[core]"),
            (".git/info/exclude", "notes.txt\n"),
            ("notes.txt", "private notes"),
            ("secrets/age.key", "AGE-SECRET-KEY-1"),
        ] {
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
        }
        std::fs::set_permissions(
            root.join("secrets/age.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        symlink("/nix/store/x", root.join("result")).unwrap();
        let mut archive = Archive::default();
        let packed = pack(&flake(), root, &mut archive).unwrap();
        assert_eq!(
            paths(&archive),
            [
                ".gitignore",
                "flake.nix",
                "hosts/.gitignore",
                "hosts/web1.nix",
                "keep.qcow2",
                "secrets/age.key"
            ]
            .map(|p| format!("etc/nixos-kexec/flake/{p}"))
        );
        assert_eq!(packed.files, 6);
        assert_eq!(packed.left_out, ["result"]);
        let key = archive
            .entries()
            .iter()
            .find(|e| e.path.ends_with("age.key"))
            .unwrap();
        assert!(key.secret);
        assert_eq!(key.mode & 0o777, 0o600);
        assert!(!archive.listing().join("\n").contains("AGE-SECRET"));
    }

    #[test]
    fn no_flake_nix_and_too_large_are_refused_with_a_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = pack(&flake(), dir.path(), &mut Archive::default()).unwrap_err();
        let user = crate::error::as_user_error(&err).unwrap();
        assert!(user.problem.contains("has no flake.nix"), "{}", user.problem);
        let err = pack(&flake(), &dir.path().join("missing"), &mut Archive::default()).unwrap_err();
        assert!(crate::error::as_user_error(&err)
            .unwrap()
            .problem
            .contains("is not there"));

        std::fs::write(dir.path().join("flake.nix"), "{ }").unwrap();
        let image = std::fs::File::create(dir.path().join("nixos.img")).unwrap();
        image.set_len(MAX_BYTES + 1).unwrap();
        let mut archive = Archive::default();
        let err = pack(&flake(), dir.path(), &mut archive).unwrap_err();
        let user = crate::error::as_user_error(&err).unwrap();
        assert!(
            user.problem.contains("largest: nixos.img 32.0 MiB"),
            "{}",
            user.problem
        );
        assert!(user.fix.contains(".gitignore"), "{}", user.fix);
        assert!(archive.is_empty(), "nothing is packed when refused");
    }
}
