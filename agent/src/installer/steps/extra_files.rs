//! The operator's extra files (`nixos-kexec run --extra-files DIR`), copied onto the target
//! after the keys and the host flake and before the install, so the installed system sees them.
//!
//! The tree lands under `/`, or under the persist path when `/` is a tmpfs (where the files
//! outlive a reboot). Files and links keep their mode, owner and link target. What wins where
//! the tree and the installer name the same path:
//! - a file or link replaces what the installer wrote there (a host key, a file in
//!   /etc/nixos): the operator's file wins, and the console line names each one replaced;
//! - a directory that is there already (`/etc`, a mount point) keeps its own mode and owner;
//!   only directories the tree brings get the tree's;
//! - a file or link where the installer needs a directory (a mount point, /etc/nixos), or
//!   anything under the FAT ESP (no owners, modes or links there), is refused while planning.
//!
//! Afterwards the tree is wiped from the installer's RAM, as the secrets are: any file in it
//! may be one.

use super::Execution;
use crate::error::user_error;
use crate::input::tree::{EntryKind, Tree, TreeEntry, TreeSummary};
use crate::installer::plan::Plan;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Directories nixos-install and nixos-enter write into or mount over from outside the target's
/// chroot: a link there would lead them out of the target.
const INSTALL_DIRS: [&str; 7] = ["/nix/store", "/tmp", "/dev", "/proc", "/sys", "/run", "/etc"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraFiles {
    /// Where the tree's root lands on the installed system: the plan's state directory.
    pub destination: String,
    pub tree: Tree,
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    pub summary: TreeSummary,
    /// Paths on the installed system where the installer had written a file the tree's replaced.
    pub replaced: Vec<String>,
}

impl ExtraFiles {
    /// Where `entry` lands on the installed system.
    pub fn target_path(&self, entry: &TreeEntry) -> String {
        format!("{}/{}", self.destination.trim_end_matches('/'), entry.path)
    }

    /// Refuses, before the wipe, what the copy could not do or would break: a file or link where
    /// the installer needs a directory, anything inside the FAT ESP.
    pub fn check(&self, plan: &Plan) -> Result<()> {
        let mut needed_dirs: Vec<String> = plan.mounts.iter().map(|m| m.mountpoint.clone()).collect();
        needed_dirs.extend(INSTALL_DIRS.map(String::from));
        needed_dirs.extend(
            ["etc/nixos", "etc/ssh", crate::installer::report::REPORT_DIR]
                .into_iter()
                .map(|dir| plan.state_path(dir)),
        );
        if let Some(initrd) = &plan.initrd_ssh {
            needed_dirs.extend(
                Path::new(&initrd.host_key)
                    .parent()
                    .map(|d| d.display().to_string()),
            );
        }
        let fat: Vec<&str> = plan
            .mounts
            .iter()
            .filter(|m| m.fstype == "vfat")
            .map(|m| m.mountpoint.as_str())
            .collect();
        for entry in &self.tree.entries {
            let target = self.target_path(entry);
            if let Some(esp) = fat.iter().find(|esp| {
                target
                    .strip_prefix(**esp)
                    .is_some_and(|rest| rest.starts_with('/'))
            }) {
                return Err(user_error(
                    format!(
                        "The extra file {target} would go onto the FAT filesystem at {esp}, which keeps no owners, modes or links."
                    ),
                    "take it out of --extra-files; let the NixOS configuration put files on the ESP (boot.loader options).",
                ));
            }
            let under_needed = needed_dirs
                .iter()
                .any(|dir| *dir == target || dir.starts_with(&format!("{target}/")));
            if entry.kind != EntryKind::Dir && under_needed {
                return Err(user_error(
                    format!(
                        "The extra file {target} is not a directory, but the installer needs a directory there."
                    ),
                    "take it out of --extra-files, or make it a directory holding the files.",
                ));
            }
        }
        Ok(())
    }

    /// Copies the tree under `target_root` (the mounted target's path for `destination`).
    pub fn copy(&self, target_root: &Path) -> Result<Copied> {
        let mut copied = Copied::default();
        for entry in &self.tree.entries {
            let target = target_root.join(&entry.path);
            let existing = match std::fs::symlink_metadata(&target) {
                Ok(meta) => Some(meta),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("looking at {}", target.display())),
            };
            match (&entry.kind, existing) {
                (EntryKind::Dir, Some(meta)) if meta.is_dir() => {}
                (_, Some(meta)) if meta.is_dir() => anyhow::bail!(
                    "the extra file {} would replace a directory on the target",
                    self.target_path(entry)
                ),
                (EntryKind::Dir, Some(_)) => anyhow::bail!(
                    "the extra directory {} would replace a file on the target",
                    self.target_path(entry)
                ),
                (_, existing) => {
                    if existing.is_some() {
                        std::fs::remove_file(&target)
                            .with_context(|| format!("replacing {}", target.display()))?;
                        copied.replaced.push(self.target_path(entry));
                    }
                    match &entry.kind {
                        EntryKind::Dir => make_dir(entry, &target)?,
                        EntryKind::File => self.copy_file(entry, &target)?,
                        EntryKind::Symlink { target: link } => {
                            std::os::unix::fs::symlink(link, &target)
                                .with_context(|| format!("creating the link {}", target.display()))?;
                            std::os::unix::fs::lchown(&target, Some(entry.uid), Some(entry.gid))
                                .with_context(|| format!("setting the owner of {}", target.display()))?;
                        }
                    }
                }
            }
            copied.summary.add(entry);
        }
        Ok(copied)
    }

    /// Made readable only by root until it has its owner, then given its mode: chown(2) clears
    /// the setuid and setgid bits, so the mode comes last.
    fn copy_file(&self, entry: &TreeEntry, target: &Path) -> Result<()> {
        let mut source = self.tree.open(entry)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(target)
            .with_context(|| format!("creating {}", target.display()))?;
        std::io::copy(&mut source, &mut file).with_context(|| format!("writing {}", target.display()))?;
        std::os::unix::fs::fchown(&file, Some(entry.uid), Some(entry.gid))
            .with_context(|| format!("setting the owner of {}", target.display()))?;
        file.set_permissions(std::fs::Permissions::from_mode(entry.mode))
            .with_context(|| format!("setting the mode of {}", target.display()))
    }
}

fn make_dir(entry: &TreeEntry, target: &Path) -> Result<()> {
    std::fs::create_dir(target).with_context(|| format!("creating {}", target.display()))?;
    std::os::unix::fs::lchown(target, Some(entry.uid), Some(entry.gid))
        .with_context(|| format!("setting the owner of {}", target.display()))?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(entry.mode))
        .with_context(|| format!("setting the mode of {}", target.display()))
}

pub fn run(plan: &Plan, execution: &mut Execution) -> Result<()> {
    let Some(extra) = &plan.extra_files else {
        return Ok(());
    };
    let root = execution
        .target_path(&extra.destination)
        .context("the target root is not mounted")?;
    let copied = extra.copy(&root)?;
    wipe_source(&extra.tree.root);
    let mut line = format!(
        "extra files: {} copied to {} on the target",
        copied.summary, extra.destination
    );
    if !copied.replaced.is_empty() {
        line += &format!(
            "; they replaced what the installer wrote at {}",
            copied.replaced.join(", ")
        );
    }
    crate::console::line(&line);
    Ok(())
}

/// Overwrites every file of the tree in the installer's RAM and removes the tree: what it held
/// is on the target now (or, after a failure, comes again with the next kexec).
pub fn wipe_source(root: &Path) {
    fn wipe(dir: &Path) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => wipe(&entry.path()),
                Ok(kind) if kind.is_file() => super::keys::wipe_file(&entry.path()),
                _ => {}
            }
        }
    }
    wipe(root);
    let _ = std::fs::remove_dir_all(root);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config::{Config, Layout};
    use crate::input::tree::tests::{sample, RULES};
    use crate::installer::plan::tests::{disk, facts, ids};
    use std::os::unix::fs::MetadataExt;

    fn plan_with(layout: Layout, tree: Tree) -> Result<Plan> {
        let mut config = Config {
            disk_auto: true,
            layout,
            extra_files: Some(tree),
            ..Config::default()
        };
        config.runtime_info.ssh_authorized_keys = vec!["ssh-ed25519 AAAA me".into()];
        config.disk_passphrase_given = layout.encrypts();
        crate::installer::plan::make(&config, &facts(vec![disk("vda", 8 << 30, 512, "A")]), &ids())
    }

    /// The plan says where each entry lands: under `/`, or under /persist when `/` is a tmpfs;
    /// the step runs between flake and install, and only when there are extra files.
    #[test]
    fn the_plan_puts_the_tree_under_the_state_directory() {
        let source = tempfile::tempdir().unwrap();
        sample(source.path());
        let tree = Tree::walk(source.path(), &RULES).unwrap();
        let ext4 = plan_with(Layout::Ext4, tree.clone()).unwrap();
        let extra = ext4.extra_files.as_ref().unwrap();
        assert_eq!(extra.destination, "/");
        let key = tree.entries.iter().find(|e| e.is_secret()).unwrap();
        assert_eq!(extra.target_path(key), "/home/alice/.ssh/id_ed25519");
        let names: Vec<&str> = ext4.steps.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "wipe",
                "partition",
                "format",
                "mount",
                "keys",
                "flake",
                "extra_files",
                "install",
                "verify",
                "finish"
            ]
        );
        let json = serde_json::to_value(&ext4).unwrap();
        let listed = &json["extra_files"]["tree"]["entries"];
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["path"] == "home/alice/.ssh/id_ed25519"
                    && e["mode"] == "0600"
                    && e["uid"] == 1000
                    && e["kind"] == "file"),
            "{listed}"
        );
        assert!(!json.to_string().contains("PRIVATE-KEY"));

        for layout in [Layout::BtrfsImpermanence, Layout::LuksBtrfsImpermanence] {
            let plan = plan_with(layout, tree.clone()).unwrap();
            let extra = plan.extra_files.as_ref().unwrap();
            assert_eq!(extra.destination, "/persist", "{layout:?}");
            assert_eq!(extra.target_path(key), "/persist/home/alice/.ssh/id_ed25519");
        }

        let mut without = Config {
            disk_auto: true,
            ..Config::default()
        };
        without.runtime_info.ssh_authorized_keys = vec!["ssh-ed25519 AAAA me".into()];
        let plan =
            crate::installer::plan::make(&without, &facts(vec![disk("vda", 8 << 30, 512, "A")]), &ids())
                .unwrap();
        assert!(plan.extra_files.is_none());
        assert!(!plan.steps.contains(&crate::input::config::Step::ExtraFiles));
        assert!(!serde_json::to_string(&plan).unwrap().contains("extra_files"));
    }

    #[test]
    fn what_the_copy_would_break_is_refused_while_planning() {
        let refused = |layout: Layout, make: &dyn Fn(&Path)| {
            let source = tempfile::tempdir().unwrap();
            make(source.path());
            let tree = Tree::walk(source.path(), &RULES).unwrap();
            let err = plan_with(layout, tree).unwrap_err();
            crate::error::as_user_error(&err)
                .unwrap_or_else(|| panic!("{err:#}"))
                .clone()
        };
        let user = refused(Layout::Ext4, &|root| {
            std::fs::create_dir_all(root.join("boot/EFI")).unwrap();
            std::fs::write(root.join("boot/EFI/x.efi"), b"MZ").unwrap();
        });
        assert!(
            user.problem.contains("/boot/EFI") && user.problem.contains("FAT"),
            "{user}"
        );
        let user = refused(Layout::Ext4, &|root| {
            std::fs::create_dir_all(root.join("etc")).unwrap();
            std::fs::write(root.join("etc/nixos"), b"a file").unwrap();
        });
        assert!(user.problem.contains("/etc/nixos is not a directory"), "{user}");
        let user = refused(Layout::BtrfsImpermanence, &|root| {
            std::os::unix::fs::symlink("/elsewhere", root.join("etc")).unwrap();
        });
        assert!(user.problem.contains("/persist/etc is not a directory"), "{user}");
        // A link called `nix` lands in /persist, not on the store: fine there.
        let source = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/elsewhere", source.path().join("nix")).unwrap();
        let tree = Tree::walk(source.path(), &RULES).unwrap();
        assert!(plan_with(Layout::BtrfsImpermanence, tree.clone()).is_ok());
        let err = plan_with(Layout::Ext4, tree).unwrap_err();
        assert!(
            crate::error::one_line(&err).contains("/nix is not a directory"),
            "{err}"
        );
    }

    /// Onto a target where the installer has written: modes (setuid, sticky), owners and links
    /// kept; the operator's file replaces the installer's and is named; directories that were
    /// there keep theirs; the source is wiped afterwards.
    #[test]
    fn copies_onto_the_target_and_the_operators_file_wins() {
        let source = tempfile::tempdir().unwrap();
        sample(source.path());
        std::fs::write(
            source.path().join("etc/ssh/ssh_host_ed25519_key"),
            b"OPERATOR KEY",
        )
        .unwrap();
        std::fs::set_permissions(
            source.path().join("etc/ssh/ssh_host_ed25519_key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let tree = Tree::walk(source.path(), &RULES).unwrap();
        let target = tempfile::tempdir().unwrap();
        let root = target.path();
        std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
        std::fs::set_permissions(root.join("etc"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("etc/ssh/ssh_host_ed25519_key"), b"INSTALLER KEY").unwrap();
        let extra = ExtraFiles {
            destination: "/".into(),
            tree,
        };
        let copied = extra.copy(root).unwrap();
        assert_eq!(copied.replaced, ["/etc/ssh/ssh_host_ed25519_key"]);
        assert_eq!(copied.summary, extra.tree.summary());
        assert_eq!(
            std::fs::read(root.join("etc/ssh/ssh_host_ed25519_key")).unwrap(),
            b"OPERATOR KEY"
        );
        let meta = |path: &str| std::fs::symlink_metadata(root.join(path)).unwrap();
        let key = meta("home/alice/.ssh/id_ed25519");
        assert_eq!((key.mode() & 0o7777, key.uid(), key.gid()), (0o600, 1000, 100));
        let dir = meta("home/alice/.ssh");
        assert_eq!((dir.mode() & 0o7777, dir.uid()), (0o700, 1000));
        assert_eq!(meta("etc/helper").mode() & 0o7777, 0o4755);
        assert_eq!(meta("srv/shared").mode() & 0o7777, 0o1777);
        assert_eq!(meta("etc/hello.sh").mode() & 0o7777, 0o755);
        assert_eq!(
            meta("etc").mode() & 0o7777,
            0o755,
            "an existing directory keeps its mode"
        );
        assert_eq!(meta("etc/ssh/dangling").uid(), 1000);
        assert_eq!(
            std::fs::read_link(root.join("etc/ssh/dangling")).unwrap(),
            Path::new("/run/keys/missing")
        );
        // Copied again: everything is there, files and links are replaced, nothing breaks.
        assert_eq!(extra.copy(root).unwrap().replaced.len(), 5);

        wipe_source(&extra.tree.root);
        assert!(!extra.tree.root.exists());
    }
}
