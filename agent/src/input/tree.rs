//! A directory tree to be copied elsewhere as it is: directories, regular files and symbolic
//! links, each with its permission bits (setuid, setgid and sticky included) and numeric owner.
//! Walked once at the edge into a [`Tree`], which the appended archive packs (`nixos-kexec run
//! --extra-files`) and the installer copies onto the target. Anything else (device nodes,
//! FIFOs, sockets) is refused: the installed system makes its own. Nothing here reads a file's
//! contents into a log.

use crate::error::user_error;
use crate::secret::Secret;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntryKind {
    Dir,
    File,
    /// The link's target as written: kept, never followed.
    Symlink {
        target: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// Relative to the tree's root, `/`-separated; never `.`, `..` or empty.
    pub path: String,
    #[serde(flatten)]
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky (`0o7777`), written in octal.
    #[serde(with = "octal")]
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// A file's size in bytes; 0 for directories and links.
    pub size: u64,
}

impl TreeEntry {
    /// A file nobody but its owner may read or write (0600, 0400, 0700): what ssh, sops and age
    /// keys use. Its contents are masked wherever the tree is listed.
    pub fn is_secret(&self) -> bool {
        self.kind == EntryKind::File && self.mode & 0o077 == 0
    }
}

/// What a tree holds, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeSummary {
    pub dirs: usize,
    pub files: usize,
    pub links: usize,
    /// Of `files`, those [`TreeEntry::is_secret`] says are secrets.
    pub secrets: usize,
    /// The files' bytes.
    pub bytes: u64,
}

impl TreeSummary {
    pub fn add(&mut self, entry: &TreeEntry) {
        match entry.kind {
            EntryKind::Dir => self.dirs += 1,
            EntryKind::File => self.files += 1,
            EntryKind::Symlink { .. } => self.links += 1,
        }
        if entry.is_secret() {
            self.secrets += 1;
        }
        self.bytes += entry.size;
    }
}

impl std::fmt::Display for TreeSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let secrets = if self.secrets > 0 {
            format!(" ({} secret)", self.secrets)
        } else {
            String::new()
        };
        write!(
            f,
            "{}{secrets}, {}, {}; {} bytes",
            plural(self.files, "file", "files"),
            plural(self.dirs, "directory", "directories"),
            plural(self.links, "link", "links"),
            self.bytes
        )
    }
}

/// How to walk a tree, and what to call it when refusing.
pub struct Walk<'a> {
    /// How the operator named the tree, at the start of every error: `--extra-files /root/extra`.
    pub name: &'a str,
    /// The most file bytes the tree may hold; the walk stops as soon as it holds more.
    pub max_bytes: u64,
    /// Why there is a limit, for the error that refuses a bigger tree.
    pub why_limited: &'a str,
    /// The fix that error gives, when not the generic one (take the large files out).
    pub too_large_fix: Option<&'a str>,
    /// Entries to leave out with all they hold (e.g. what a .gitignore names); `None` keeps
    /// everything.
    pub skip: Option<Skip<'a>>,
}

/// Whether to leave an entry out, by its relative path and whether it is a directory. It is
/// asked about a directory before anything in it, and never about what a left-out directory
/// holds.
pub type Skip<'a> = &'a dyn Fn(&str, bool) -> Result<bool>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Where the tree is read from. The root itself is no entry: its own mode and owner are
    /// not copied (a 0700 directory in a home would otherwise make the target's `/` 0700).
    pub root: PathBuf,
    /// Parents before what they hold, each directory's entries in byte order of their names.
    pub entries: Vec<TreeEntry>,
}

impl Tree {
    /// Reads the tree under `root`, refusing what cannot be copied as it is.
    pub fn walk(root: &Path, rules: &Walk) -> Result<Tree> {
        let name = rules.name;
        let fix = "pass a directory that holds the files as they should be under / on the target (e.g. DIR/etc/machine-id).";
        match std::fs::metadata(root) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(user_error(
                    format!("{name}: {} does not exist.", root.display()),
                    fix,
                ))
            }
            Err(e) => {
                return Err(user_error(
                    format!("{name}: cannot read {} ({e}).", root.display()),
                    fix,
                ))
            }
            Ok(meta) if !meta.is_dir() => {
                return Err(user_error(
                    format!("{name}: {} is not a directory.", root.display()),
                    fix,
                ))
            }
            Ok(_) => {}
        }
        let mut tree = Tree {
            root: root.to_path_buf(),
            entries: Vec::new(),
        };
        let mut bytes = 0;
        tree.visit(root, "", rules, &mut bytes)?;
        Ok(tree)
    }

    fn visit(&mut self, dir: &Path, relative: &str, rules: &Walk, bytes: &mut u64) -> Result<()> {
        let name = rules.name;
        let unreadable = |path: &Path, e: std::io::Error| {
            user_error(
                format!("{name}: cannot read {} ({e}).", path.display()),
                format!("make it readable, or take it out of {name}."),
            )
        };
        let mut children = Vec::new();
        for child in std::fs::read_dir(dir).map_err(|e| unreadable(dir, e))? {
            children.push(child.map_err(|e| unreadable(dir, e))?);
        }
        children.sort_by_key(|child| child.file_name());
        for child in children {
            let path = child.path();
            let file_name = child.file_name();
            let file_name = printable(file_name.to_str()).ok_or_else(|| {
                user_error(
                    format!(
                        "{name}: {} has a name that is not printable UTF-8.",
                        path.display()
                    ),
                    format!("rename it, or take it out of {name}."),
                )
            })?;
            let entry_path = if relative.is_empty() {
                file_name.to_string()
            } else {
                format!("{relative}/{file_name}")
            };
            let meta = std::fs::symlink_metadata(&path).map_err(|e| unreadable(&path, e))?;
            let file_type = meta.file_type();
            if let Some(skip) = rules.skip {
                if skip(&entry_path, file_type.is_dir())
                    .with_context(|| format!("{name}: deciding whether to leave out {entry_path}"))?
                {
                    continue;
                }
            }
            let kind = if file_type.is_dir() {
                EntryKind::Dir
            } else if file_type.is_file() {
                EntryKind::File
            } else if file_type.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| unreadable(&path, e))?;
                let target = printable(target.to_str()).ok_or_else(|| {
                    user_error(
                        format!(
                            "{name}: the link {} points at a name that is not printable UTF-8.",
                            path.display()
                        ),
                        format!("point it elsewhere, or take it out of {name}."),
                    )
                })?;
                EntryKind::Symlink {
                    target: target.to_string(),
                }
            } else {
                let what = if file_type.is_block_device() || file_type.is_char_device() {
                    "a device node"
                } else if file_type.is_fifo() {
                    "a FIFO"
                } else {
                    "a socket"
                };
                return Err(user_error(
                    format!(
                        "{name}: {} is {what}; only directories, regular files and symbolic links are copied.",
                        path.display()
                    ),
                    format!("take it out of {name}: the installed system makes its own device nodes, FIFOs and sockets."),
                ));
            };
            let size = if kind == EntryKind::File { meta.len() } else { 0 };
            *bytes += size;
            if *bytes > rules.max_bytes {
                return Err(user_error(
                    format!(
                        "{name} holds more than {} MiB of files (the limit was crossed at {entry_path}, {:.1} MiB), the most it may: {}",
                        rules.max_bytes >> 20,
                        size as f64 / (1 << 20) as f64,
                        rules.why_limited
                    ),
                    rules.too_large_fix.map_or_else(
                        || format!("take the large files out of {name} and let the installed system fetch or build them."),
                        str::to_string,
                    ),
                ));
            }
            let is_dir = kind == EntryKind::Dir;
            self.entries.push(TreeEntry {
                path: entry_path.clone(),
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                size,
            });
            if is_dir {
                self.visit(&path, &entry_path, rules, bytes)?;
            }
        }
        Ok(())
    }

    pub fn summary(&self) -> TreeSummary {
        let mut summary = TreeSummary::default();
        for entry in &self.entries {
            summary.add(entry);
        }
        summary
    }

    /// Where an entry is read from.
    pub fn source_of(&self, entry: &TreeEntry) -> PathBuf {
        self.root.join(&entry.path)
    }

    /// Opens one of the tree's files, never through a link: a file that became a link since the
    /// walk is refused rather than followed out of the tree.
    pub fn open(&self, entry: &TreeEntry) -> Result<File> {
        let path = self.source_of(entry);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| {
                user_error(
                    format!("cannot read {} ({e}).", path.display()),
                    "make it readable by root and leave the tree alone while it is copied.",
                )
            })?;
        let meta = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        if !meta.is_file() || meta.len() != entry.size {
            return Err(user_error(
                format!("{} changed while it was being copied.", path.display()),
                "leave the tree alone while it is copied, and try again.",
            ));
        }
        Ok(file)
    }

    /// One of the tree's files, whole: held as a [`Secret`], since any file may be one.
    pub fn read(&self, entry: &TreeEntry) -> Result<Secret> {
        use std::io::Read;
        let path = self.source_of(entry);
        let mut file = self.open(entry)?;
        // One buffer of the final size: growing would leave copies behind.
        let mut bytes = Vec::with_capacity(usize::try_from(entry.size).unwrap_or(0).saturating_add(1));
        file.read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        let data = Secret::new(bytes);
        if data.len() as u64 != entry.size {
            return Err(user_error(
                format!("{} changed while it was being copied.", path.display()),
                "leave the tree alone while it is copied, and try again.",
            ));
        }
        Ok(data)
    }
}

/// `name` when it is text that prints as one piece: no control characters (a newline in a name
/// would break the listing's lines).
fn printable(name: Option<&str>) -> Option<&str> {
    name.filter(|n| !n.chars().any(char::is_control))
}

/// Modes as people write them (`"0755"`), not as decimal numbers.
mod octal {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mode: &u32, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{mode:04o}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
        let text = String::deserialize(deserializer)?;
        u32::from_str_radix(&text, 8).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub const RULES: Walk = Walk {
        name: "--extra-files DIR",
        max_bytes: 1 << 20,
        why_limited: "a test limit.",
        too_large_fix: None,
        skip: None,
    };

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A tree like the operator's: a key only its owner (uid 1000) reads, a script, a setuid
    /// helper, a sticky directory, a nested directory and a link that must not be followed.
    pub fn sample(root: &Path) {
        std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
        std::fs::create_dir_all(root.join("home/alice/.ssh")).unwrap();
        std::fs::create_dir_all(root.join("srv/shared")).unwrap();
        std::fs::write(root.join("home/alice/.ssh/id_ed25519"), b"PRIVATE-KEY-BYTES\n").unwrap();
        set_mode(&root.join("home/alice/.ssh/id_ed25519"), 0o600);
        set_mode(&root.join("home/alice/.ssh"), 0o700);
        std::os::unix::fs::chown(root.join("home/alice/.ssh/id_ed25519"), Some(1000), Some(100)).unwrap();
        std::os::unix::fs::lchown(root.join("home/alice/.ssh"), Some(1000), Some(100)).unwrap();
        std::os::unix::fs::lchown(root.join("home/alice"), Some(1000), Some(100)).unwrap();
        std::fs::write(root.join("etc/hello.sh"), b"#!/bin/sh\necho hello\n").unwrap();
        set_mode(&root.join("etc/hello.sh"), 0o755);
        std::fs::write(root.join("etc/helper"), b"setuid").unwrap();
        set_mode(&root.join("etc/helper"), 0o4755);
        set_mode(&root.join("srv/shared"), 0o1777);
        std::os::unix::fs::symlink("/run/keys/missing", root.join("etc/ssh/dangling")).unwrap();
        std::os::unix::fs::lchown(root.join("etc/ssh/dangling"), Some(1000), Some(100)).unwrap();
    }

    #[test]
    fn walks_parents_first_with_modes_owners_and_links() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        let tree = Tree::walk(dir.path(), &RULES).unwrap();
        let paths: Vec<&str> = tree.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "etc",
                "etc/hello.sh",
                "etc/helper",
                "etc/ssh",
                "etc/ssh/dangling",
                "home",
                "home/alice",
                "home/alice/.ssh",
                "home/alice/.ssh/id_ed25519",
                "srv",
                "srv/shared",
            ]
        );
        let entry = |path: &str| tree.entries.iter().find(|e| e.path == path).unwrap();
        let key = entry("home/alice/.ssh/id_ed25519");
        assert_eq!((key.mode, key.uid, key.gid, key.size), (0o600, 1000, 100, 18));
        assert!(key.is_secret());
        assert_eq!(entry("etc/helper").mode, 0o4755);
        assert_eq!(entry("srv/shared").mode, 0o1777);
        assert!(!entry("etc/hello.sh").is_secret());
        assert!(
            !entry("home/alice/.ssh").is_secret(),
            "a directory has no contents to mask"
        );
        let link = entry("etc/ssh/dangling");
        assert_eq!(
            link.kind,
            EntryKind::Symlink {
                target: "/run/keys/missing".into()
            }
        );
        assert_eq!((link.uid, link.size), (1000, 0));
        let summary = tree.summary();
        assert_eq!(
            summary.to_string(),
            "3 files (1 secret), 7 directories, 1 link; 45 bytes"
        );
        let plain = TreeSummary {
            secrets: 0,
            files: 1,
            ..summary
        };
        assert_eq!(plain.to_string(), "1 file, 7 directories, 1 link; 45 bytes");
        assert_eq!(tree.read(key).unwrap().as_bytes(), b"PRIVATE-KEY-BYTES\n");
        // The plan shows it: modes in octal, the link's target beside it.
        let json = serde_json::to_string(link).unwrap();
        assert_eq!(
            json,
            r#"{"path":"etc/ssh/dangling","kind":"symlink","target":"/run/keys/missing","mode":"0777","uid":1000,"gid":100,"size":0}"#
        );
        let back: Tree = serde_json::from_str(&serde_json::to_string(&tree).unwrap()).unwrap();
        assert_eq!(back, tree);
    }

    fn refusal(root: &Path, rules: &Walk) -> crate::error::UserError {
        let err = Tree::walk(root, rules).unwrap_err();
        crate::error::as_user_error(&err)
            .unwrap_or_else(|| panic!("not a user error: {err:#}"))
            .clone()
    }

    #[test]
    fn refuses_what_cannot_be_copied_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let missing = refusal(&dir.path().join("absent"), &RULES);
        assert!(missing.problem.contains("does not exist"), "{missing}");
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let not_dir = refusal(&dir.path().join("file"), &RULES);
        assert!(not_dir.problem.contains("is not a directory"), "{not_dir}");

        let fifo = dir.path().join("fifo");
        std::fs::create_dir_all(fifo.join("run")).unwrap();
        nix::unistd::mkfifo(&fifo.join("run/pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let refused = refusal(&fifo, &RULES);
        assert!(refused.problem.contains("run/pipe is a FIFO"), "{refused}");
        // A tree that leaves it out is fine.
        let skip_pipes = |path: &str, _dir: bool| Ok(path.ends_with("pipe"));
        let skipping = Walk {
            skip: Some(&skip_pipes),
            ..RULES
        };
        assert_eq!(Tree::walk(&fifo, &skipping).unwrap().entries.len(), 1);

        let device = dir.path().join("device");
        std::fs::create_dir_all(&device).unwrap();
        nix::sys::stat::mknod(
            &device.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        let refused = refusal(&device, &RULES);
        assert!(refused.problem.contains("is a device node"), "{refused}");

        let socket = dir.path().join("socket");
        std::fs::create_dir_all(&socket).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(socket.join("agent.sock")).unwrap();
        let refused = refusal(&socket, &RULES);
        assert!(refused.problem.contains("is a socket"), "{refused}");

        let big = dir.path().join("big");
        std::fs::create_dir_all(&big).unwrap();
        std::fs::write(big.join("a"), vec![0u8; 600 << 10]).unwrap();
        std::fs::write(big.join("b"), vec![0u8; 600 << 10]).unwrap();
        let refused = refusal(&big, &RULES);
        assert!(
            refused.problem.contains("more than 1 MiB") && refused.problem.contains("a test limit"),
            "{refused}"
        );

        let odd = dir.path().join("odd");
        std::fs::create_dir_all(&odd).unwrap();
        std::fs::write(odd.join("two\nlines"), b"x").unwrap();
        let refused = refusal(&odd, &RULES);
        assert!(refused.problem.contains("not printable"), "{refused}");
    }

    /// Root reads everything, so the unreadable case is made on a thread whose filesystem uid
    /// is nobody's (setfsuid(2) is per thread and drops the capability to read any file).
    #[test]
    fn an_unreadable_file_is_refused_when_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), b"secret").unwrap();
        set_mode(&dir.path().join("key"), 0o600);
        let tree = Tree::walk(dir.path(), &RULES).unwrap();
        let entry = tree.entries[0].clone();
        let outcome = std::thread::spawn(move || {
            // SAFETY: a raw syscall on this thread alone, which ends right after.
            unsafe { libc::syscall(libc::SYS_setfsuid, 65534) };
            tree.read(&entry).map(|_| ())
        })
        .join()
        .unwrap();
        let err = outcome.unwrap_err();
        let user = crate::error::as_user_error(&err).unwrap();
        assert!(
            user.problem.contains("cannot read") && user.problem.contains("Permission denied"),
            "{user}"
        );
    }

    #[test]
    fn a_file_changed_since_the_walk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"short").unwrap();
        let tree = Tree::walk(dir.path(), &RULES).unwrap();
        std::fs::write(dir.path().join("a"), b"longer now").unwrap();
        let err = tree.read(&tree.entries[0]).unwrap_err();
        assert!(crate::error::one_line(&err).contains("changed"), "{err}");
        // Swapped for a link: not followed.
        std::fs::remove_file(dir.path().join("a")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("a")).unwrap();
        let err = tree.read(&tree.entries[0]).unwrap_err();
        assert!(crate::error::one_line(&err).contains("cannot read"), "{err}");
    }
}
