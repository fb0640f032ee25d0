//! `run --flake ./DIR#NAME`: the operator's flake directory, packed into the appended archive
//! as git would commit it (`.gitignore` files and `.git/info/exclude` respected, `.git` left
//! out), with modes, owners and links as they are, up to a size the installer's RAM can carry.
//! The installer finds it at [`PACKED_FLAKE_DIR`] and the host flake takes it in as
//! `./configuration`.

use super::cpio::Archive;
use crate::error::user_error;
use crate::input::flake::{UserFlake, PACKED_FLAKE_DIR};
use crate::input::gitignore::GitIgnore;
use crate::input::tree::{Tree, TreeSummary, Walk};
use crate::installer::storage::MIB;
use anyhow::Result;
use std::path::Path;

/// The archive is unpacked into the installer's RAM, next to the whole bundle: a configuration
/// is text, and anything near this size is a build result or a disk image that slipped past
/// `.gitignore`.
pub const MAX_BYTES: u64 = 32 * MIB;

#[derive(Debug)]
pub struct PackedFlake {
    pub summary: TreeSummary,
    /// Files only their owner may read: Nix copies the whole flake into the world-readable
    /// store, so they do not stay private there.
    pub private_files: Vec<String>,
}

/// Packs `dir`, the directory of `flake`, into `archive` under [`PACKED_FLAKE_DIR`].
pub fn pack(flake: &UserFlake, dir: &Path, archive: &mut Archive) -> Result<PackedFlake> {
    pack_under(flake, dir, archive, PACKED_FLAKE_DIR)
}

/// [`pack`] under `under` (`deploy` sends the flake to the rescue system so).
pub fn pack_under(flake: &UserFlake, dir: &Path, archive: &mut Archive, under: &str) -> Result<PackedFlake> {
    crate::installer::steps::flake::check_flake_directory(flake, dir)?;
    let gitignore = GitIgnore::new(dir)?;
    let name = format!("--flake {}", dir.display());
    let ignored = |path: &str, is_dir: bool| gitignore.is_ignored(path, is_dir);
    let tree = Tree::walk(
        dir,
        &Walk {
            name: &name,
            max_bytes: MAX_BYTES,
            why_limited: "after .gitignore, it travels in the installer's RAM.",
            too_large_fix: Some(
                "add what the configuration does not need (build results, images) to .gitignore, or push the flake to a repository and pass --flake github:OWNER/REPO#NAME.",
            ),
            skip: Some(&ignored),
        },
    )?;
    if !tree.entries.iter().any(|entry| entry.path == "flake.nix") {
        return Err(user_error(
            format!("{name}: its flake.nix is left out by a .gitignore (of the directory, a directory above it in the same git repository, or .git/info/exclude), so the installer would get no flake."),
            "take flake.nix out of that .gitignore (`git check-ignore -v flake.nix` names the line).",
        ));
    }
    let private_files = tree
        .entries
        .iter()
        .filter(|entry| entry.is_secret())
        .map(|entry| entry.path.clone())
        .collect();
    Ok(PackedFlake {
        summary: archive.tree(&tree, under)?,
        private_files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn flake() -> UserFlake {
        UserFlake::parse("./cfg#web1").unwrap()
    }

    fn paths(archive: &Archive) -> Vec<String> {
        archive
            .entries()
            .iter()
            .filter(|e| e.mode & 0o170000 == 0o100000)
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
        std::fs::write(
            root.join(".gitignore"),
            "/result-data\n*.qcow2\n!keep.qcow2\n/result\n",
        )
        .unwrap();
        symlink("hosts/web1.nix", root.join("web1.nix")).unwrap();
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
        let summary = packed.summary;
        assert_eq!((summary.files, summary.links, summary.secrets), (6, 1, 1));
        assert_eq!(packed.private_files, ["secrets/age.key"]);
        let link = archive
            .entries()
            .iter()
            .find(|e| e.path.ends_with("/web1.nix") && !e.path.contains("hosts"))
            .unwrap();
        assert_eq!(link.data.as_bytes(), b"hosts/web1.nix");
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
    fn a_flake_nix_left_out_by_gitignore_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("flake.nix"), "{ }").unwrap();
        // As a home directory kept in git does: everything left out, then taken back in.
        std::fs::write(dir.path().join(".gitignore"), "*\n!.gitignore\n").unwrap();
        let err = pack(&flake(), dir.path(), &mut Archive::default()).unwrap_err();
        let user = crate::error::as_user_error(&err).unwrap();
        assert!(
            user.problem.contains("flake.nix is left out by a .gitignore"),
            "{}",
            user.problem
        );
        assert!(user.fix.contains("git check-ignore -v flake.nix"), "{}", user.fix);
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
            user.problem
                .contains("more than 32 MiB of files (the limit was crossed at nixos.img, 32.0 MiB)"),
            "{}",
            user.problem
        );
        assert!(user.fix.contains(".gitignore"), "{}", user.fix);
        assert!(archive.is_empty(), "nothing is packed when refused");
    }
}
