//! A minimal newc cpio writer for the archive appended to the installer's initrd at kexec
//! time (the kernel unpacks concatenated archives; later files win, and it keeps each entry's
//! mode, owner and link target). Secrets travel only here, so nothing here ever logs file
//! contents.
//!
//! Its reader, [`unpack`], is the other end of `deploy`'s upload: the rescue system may have
//! neither cpio nor tar, but it has the agent that `deploy` copied there first.

use crate::input::tree::{EntryKind, Tree, TreeEntry, TreeSummary};
use crate::secret::Secret;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Component, Path};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    /// File type and permission bits, as in `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// A file's bytes or a link's target. Every file's bytes are held as a [`Secret`]: the
    /// archive is where secrets travel.
    pub data: Secret,
    /// Masked in dry-run listings.
    pub secret: bool,
}

#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: Vec<Entry>,
    /// The directories among `entries`, so parents are added once.
    dirs: BTreeSet<String>,
}

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

impl Archive {
    /// Adds a file owned by root, and its parent directories if not yet added.
    pub fn file(&mut self, path: &str, mode: u32, data: impl Into<Secret>, secret: bool) {
        self.push(Entry {
            path: path.trim_start_matches('/').to_string(),
            mode: S_IFREG | mode,
            uid: 0,
            gid: 0,
            data: data.into(),
            secret,
        });
    }

    /// Adds `tree`'s entries under the directory `under` (made 0700, root's: in the installer
    /// only root reads them), with their modes, owners and link targets, files read whole now.
    pub fn tree(&mut self, tree: &Tree, under: &str) -> Result<TreeSummary> {
        let under = under.trim_matches('/');
        self.push(Entry {
            path: under.to_string(),
            mode: S_IFDIR | 0o700,
            uid: 0,
            gid: 0,
            data: Secret::new(Vec::new()),
            secret: false,
        });
        let mut summary = TreeSummary::default();
        for entry in &tree.entries {
            let (kind, data) = match &entry.kind {
                EntryKind::Dir => (S_IFDIR, Secret::new(Vec::new())),
                EntryKind::File => (S_IFREG, tree.read(entry)?),
                EntryKind::Symlink { target } => (S_IFLNK, Secret::new(target.as_bytes().to_vec())),
            };
            self.push(Entry {
                path: format!("{under}/{}", entry.path),
                mode: kind | entry.mode,
                uid: entry.uid,
                gid: entry.gid,
                data,
                secret: entry.is_secret(),
            });
            summary.add(entry);
        }
        Ok(summary)
    }

    /// The tree the installer finds under `under` once the kernel has unpacked the archive, as
    /// [`Tree::walk`] would read it there; `None` when nothing is there.
    pub fn tree_at(&self, under: &str) -> Option<Tree> {
        let prefix = format!("{}/", under.trim_matches('/'));
        let entries: Vec<TreeEntry> = self
            .entries
            .iter()
            .filter_map(|e| {
                let path = e.path.strip_prefix(&prefix)?;
                let kind = match e.mode & S_IFMT {
                    S_IFDIR => EntryKind::Dir,
                    S_IFLNK => EntryKind::Symlink {
                        target: String::from_utf8_lossy(e.data.as_bytes()).into_owned(),
                    },
                    _ => EntryKind::File,
                };
                let size = if kind == EntryKind::File {
                    e.data.len() as u64
                } else {
                    0
                };
                Some(TreeEntry {
                    path: path.to_string(),
                    kind,
                    mode: e.mode & 0o7777,
                    uid: e.uid,
                    gid: e.gid,
                    size,
                })
            })
            .collect();
        (!entries.is_empty()).then(|| Tree {
            root: format!("/{}", under.trim_matches('/')).into(),
            entries,
        })
    }

    /// Adds an entry after its parent directories (0755, root's) that are not there yet.
    fn push(&mut self, entry: Entry) {
        let mut parent = String::new();
        let components: Vec<&str> = entry.path.split('/').collect();
        for component in components.split_last().map(|(_, dirs)| dirs).unwrap_or(&[]) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            if self.dirs.insert(parent.clone()) {
                self.entries.push(Entry {
                    path: parent.clone(),
                    mode: S_IFDIR | 0o755,
                    uid: 0,
                    gid: 0,
                    data: Secret::new(Vec::new()),
                    secret: false,
                });
            }
        }
        if entry.mode & S_IFMT == S_IFDIR {
            self.dirs.insert(entry.path.clone());
        }
        self.entries.push(entry);
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The archive's size in bytes, as [`Archive::to_bytes`] makes it.
    pub fn size(&self) -> usize {
        self.entries
            .iter()
            .map(|e| entry_size(&e.path, e.data.len()))
            .sum::<usize>()
            .saturating_add(entry_size("TRAILER!!!", 0))
            .next_multiple_of(512)
    }

    /// A listing for `--dry-run`: paths, modes, owners and sizes, secret contents never shown.
    pub fn listing(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| {
                let owner = format!("owner {}:{}", e.uid, e.gid);
                let path = &e.path;
                match e.mode & S_IFMT {
                    S_IFLNK => format!(
                        "link /{path} -> {}, {owner}",
                        String::from_utf8_lossy(e.data.as_bytes())
                    ),
                    kind => {
                        let kind = if kind == S_IFDIR { "dir " } else { "file" };
                        let what = if e.secret {
                            " (secret, contents not shown)"
                        } else {
                            ""
                        };
                        format!(
                            "{kind} /{path} mode {:o}, {owner}, {} bytes{what}",
                            e.mode & 0o7777,
                            e.data.len()
                        )
                    }
                }
            })
            .collect()
    }

    /// The archive, in one buffer of its final size (growing would leave copies of the
    /// secrets behind).
    pub fn to_bytes(&self) -> Secret {
        let mut out = Vec::with_capacity(self.size());
        for (index, entry) in self.entries.iter().enumerate() {
            write_entry(&mut out, index as u32 + 1, entry);
        }
        write_entry(
            &mut out,
            0,
            &Entry {
                path: "TRAILER!!!".into(),
                mode: 0,
                uid: 0,
                gid: 0,
                data: Secret::new(Vec::new()),
                secret: false,
            },
        );
        pad(&mut out, 512);
        Secret::new(out)
    }
}

/// Header, name and data of one entry, each padded to 4 bytes as newc wants.
fn entry_size(path: &str, data: usize) -> usize {
    (110 + path.len() + 1).next_multiple_of(4) + data.next_multiple_of(4)
}

fn pad(out: &mut Vec<u8>, to: usize) {
    while !out.len().is_multiple_of(to) {
        out.push(0);
    }
}

fn write_entry(out: &mut Vec<u8>, inode: u32, entry: &Entry) {
    let Entry {
        path,
        mode,
        uid,
        gid,
        data,
        ..
    } = entry;
    let nlink = if mode & S_IFMT == S_IFDIR { 2 } else { 1 };
    let name_size = path.len() + 1;
    let header = format!(
        "070701{inode:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{name_size:08X}{:08X}",
        0, // mtime: fixed, so the same input gives the same archive
        data.len(),
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        0, // check
    );
    let _ = out.write_all(header.as_bytes());
    let _ = out.write_all(path.as_bytes());
    out.push(0);
    pad(out, 4);
    let _ = out.write_all(data.as_bytes());
    pad(out, 4);
}

/// Unpacks a newc archive as [`Archive::to_bytes`] writes it into `dir` (which must exist),
/// keeping modes, owners and link targets; returns how many entries it made. Every path stays
/// inside `dir`: absolute paths, `..`, and a path that passes through a link are refused.
pub fn unpack(input: impl Read, dir: &Path) -> Result<usize> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut input = std::io::BufReader::new(input);
    let mut read_so_far = 0usize;
    let mut made = 0;
    loop {
        let mut header = [0u8; 110];
        input
            .read_exact(&mut header)
            .context("reading an archive entry's header")?;
        if &header[..6] != b"070701" {
            bail!(
                "not a newc cpio archive (magic {:?})",
                String::from_utf8_lossy(&header[..6])
            );
        }
        let field = |index: usize| -> Result<u32> {
            let text = std::str::from_utf8(&header[6 + index * 8..14 + index * 8])
                .context("an archive header field is not ASCII")?;
            u32::from_str_radix(text, 16).with_context(|| format!("archive header field {text:?}"))
        };
        let (mode, uid, gid) = (field(1)?, field(2)?, field(3)?);
        let (data_size, name_size) = (field(6)? as usize, field(11)? as usize);
        if name_size > MAX_NAME {
            bail!("an archive entry's name claims {name_size} bytes");
        }
        let mut name = vec![0u8; name_size];
        input
            .read_exact(&mut name)
            .context("reading an archive entry's name")?;
        read_so_far += 110 + name_size;
        skip_padding(&mut input, &mut read_so_far)?;
        let name = String::from_utf8(name.strip_suffix(&[0]).unwrap_or(&name).to_vec())
            .context("an archive entry's name is not UTF-8")?;
        if data_size > MAX_UNPACKED_ENTRY {
            bail!("archive entry {name} claims {data_size} bytes, more than an upload holds");
        }
        let mut data = Secret::new(vec![0u8; data_size]);
        input
            .read_exact(data.as_mut_bytes())
            .with_context(|| format!("reading {name} from the archive"))?;
        read_so_far += data_size;
        skip_padding(&mut input, &mut read_so_far)?;
        if name == "TRAILER!!!" {
            return Ok(made);
        }
        let target = inside(dir, &name)?;
        let permissions = std::fs::Permissions::from_mode(mode & 0o7777);
        match mode & S_IFMT {
            S_IFDIR => {
                std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
            }
            S_IFLNK => {
                let link = std::str::from_utf8(data.as_bytes())
                    .with_context(|| format!("the target of link {name} is not UTF-8"))?;
                std::os::unix::fs::symlink(link, &target)
                    .with_context(|| format!("creating link {}", target.display()))?;
            }
            S_IFREG => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .with_context(|| format!("creating {}", target.display()))?;
                file.write_all(data.as_bytes())
                    .with_context(|| format!("writing {}", target.display()))?;
            }
            other => bail!("{name}: entries of type {other:o} are not unpacked"),
        }
        std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
            .with_context(|| format!("setting the owner of {}", target.display()))?;
        // After the owner: chown clears setuid and setgid.
        if mode & S_IFMT != S_IFLNK {
            std::fs::set_permissions(&target, permissions)
                .with_context(|| format!("setting the mode of {}", target.display()))?;
        }
        made += 1;
    }
}

/// Any file `deploy` uploads this way (the extra files are at most 64 MiB in all).
const MAX_UNPACKED_ENTRY: usize = 64 << 20;
/// Longer than any path Linux takes (PATH_MAX).
const MAX_NAME: usize = 4096;

/// Reads the zeros that pad what was read so far to 4 bytes.
fn skip_padding(input: &mut impl Read, read_so_far: &mut usize) -> Result<()> {
    let padding = read_so_far.next_multiple_of(4) - *read_so_far;
    let mut zeros = [0u8; 3];
    input
        .read_exact(&mut zeros[..padding])
        .context("reading the archive's padding")?;
    *read_so_far += padding;
    Ok(())
}

/// `name` under `dir`, refused when it would leave `dir` or pass through a link.
fn inside(dir: &Path, name: &str) -> Result<std::path::PathBuf> {
    let relative = Path::new(name);
    if name.is_empty() || !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("archive entry {name:?} is not a plain relative path");
    }
    let target = dir.join(relative);
    if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!(
            "archive entry {name:?} passes through the link {}",
            target.display()
        );
    }
    let mut parent = target.parent();
    while let Some(path) = parent.filter(|p| *p != dir) {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            bail!(
                "archive entry {name:?} passes through the link {}",
                path.display()
            );
        }
        parent = path.parent();
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::tree::tests::{sample, RULES};
    use std::os::unix::fs::MetadataExt;

    /// What GNU cpio unpacks from the archive, as root (so it keeps owners) and with `-m`.
    fn unpack_with_gnu_cpio(archive: &Archive) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-idm", "--quiet"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("cpio (Debian: cpio) is needed for this test");
        let bytes = archive.to_bytes();
        assert_eq!(bytes.len(), archive.size());
        child.stdin.take().unwrap().write_all(bytes.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        dir
    }

    #[test]
    fn gnu_cpio_reads_it_back() {
        let mut archive = Archive::default();
        archive.file(
            "/etc/nixos-kexec/runtime-info.json",
            0o644,
            b"{\"version\":1}".to_vec(),
            false,
        );
        archive.file(
            "/etc/nixos-kexec/secrets/disk-passphrase",
            0o600,
            b"hunter2".to_vec(),
            true,
        );
        let dir = unpack_with_gnu_cpio(&archive);
        let secret = dir.path().join("etc/nixos-kexec/secrets/disk-passphrase");
        assert_eq!(std::fs::read(&secret).unwrap(), b"hunter2");
        let mode = std::fs::metadata(&secret).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/nixos-kexec/runtime-info.json")).unwrap(),
            "{\"version\":1}"
        );
        let listing = archive.listing().join("\n");
        assert!(!listing.contains("hunter2"));
        assert!(listing.contains("secret, contents not shown"));
    }

    /// A tree packed under a directory comes out of GNU cpio as it went in: modes with setuid
    /// and sticky bits, numeric owners, links with their targets (dangling ones too), contents;
    /// what GNU cpio unpacks walks to the same tree, and is what `tree_at` says the installer
    /// will find.
    #[test]
    fn a_tree_round_trips_through_gnu_cpio() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "owners can only be kept as root");
        let source = tempfile::tempdir().unwrap();
        sample(source.path());
        let tree = Tree::walk(source.path(), &RULES).unwrap();
        let mut archive = Archive::default();
        archive.file(
            "/etc/nixos-kexec/secrets/disk-passphrase",
            0o600,
            b"pw".to_vec(),
            true,
        );
        let summary = archive.tree(&tree, "/etc/nixos-kexec/extra-files").unwrap();
        assert_eq!(summary, tree.summary());
        let dir = unpack_with_gnu_cpio(&archive);
        let unpacked_root = dir.path().join("etc/nixos-kexec/extra-files");
        let unpacked = Tree::walk(&unpacked_root, &RULES).unwrap();
        assert_eq!(unpacked.entries, tree.entries);
        assert_eq!(
            std::fs::read(unpacked_root.join("home/alice/.ssh/id_ed25519")).unwrap(),
            b"PRIVATE-KEY-BYTES\n"
        );
        let container = std::fs::metadata(&unpacked_root).unwrap();
        assert_eq!(container.mode() & 0o7777, 0o700);
        assert_eq!(
            std::fs::read_link(unpacked_root.join("etc/ssh/dangling")).unwrap(),
            std::path::Path::new("/run/keys/missing")
        );
        let found = archive.tree_at("/etc/nixos-kexec/extra-files").unwrap();
        assert_eq!(found.entries, tree.entries);
        assert_eq!(found.root, std::path::Path::new("/etc/nixos-kexec/extra-files"));
        assert!(archive.tree_at("/etc/nixos-kexec/elsewhere").is_none());

        let listing = archive.listing().join("\n");
        assert!(!listing.contains("PRIVATE-KEY"), "{listing}");
        for line in [
            "file /etc/nixos-kexec/extra-files/home/alice/.ssh/id_ed25519 mode 600, owner 1000:100, 18 bytes (secret, contents not shown)",
            "file /etc/nixos-kexec/extra-files/etc/helper mode 4755, owner 0:0, 6 bytes",
            "dir  /etc/nixos-kexec/extra-files/srv/shared mode 1777, owner 0:0, 0 bytes",
            "link /etc/nixos-kexec/extra-files/etc/ssh/dangling -> /run/keys/missing, owner 1000:100",
            "dir  /etc/nixos-kexec/extra-files mode 700, owner 0:0, 0 bytes",
        ] {
            assert!(listing.lines().any(|l| l == line), "{line} not in:\n{listing}");
        }
    }

    /// What `deploy` uploads comes out of [`unpack`] as GNU cpio unpacks it.
    #[test]
    fn unpack_reads_back_what_gnu_cpio_reads() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "owners can only be kept as root");
        let source = tempfile::tempdir().unwrap();
        sample(source.path());
        let tree = Tree::walk(source.path(), &RULES).unwrap();
        let mut archive = Archive::default();
        archive.file("host-keys/ssh_host_ed25519_key", 0o600, b"key".to_vec(), true);
        archive.tree(&tree, "extra-files").unwrap();
        let ours = tempfile::tempdir().unwrap();
        let made = unpack(archive.to_bytes().as_bytes(), ours.path()).unwrap();
        assert_eq!(made, archive.entries().len());
        let gnu = unpack_with_gnu_cpio(&archive);
        let walk = |root: &Path| Tree::walk(root, &RULES).unwrap().entries;
        assert_eq!(walk(ours.path()), walk(gnu.path()));
        assert_eq!(
            std::fs::read(ours.path().join("host-keys/ssh_host_ed25519_key")).unwrap(),
            b"key"
        );
    }

    #[test]
    fn unpack_stays_inside_its_directory() {
        let outside = |path: &str| {
            let mut archive = Archive::default();
            archive.push(Entry {
                path: path.into(),
                mode: S_IFREG | 0o644,
                uid: 0,
                gid: 0,
                data: Secret::new(b"x".to_vec()),
                secret: false,
            });
            let dir = tempfile::tempdir().unwrap();
            let error = unpack(archive.to_bytes().as_bytes(), dir.path()).unwrap_err();
            format!("{error:#}")
        };
        assert!(outside("../escape").contains("not a plain relative path"));
        let mut archive = Archive::default();
        archive.push(Entry {
            path: "link".into(),
            mode: S_IFLNK | 0o777,
            uid: 0,
            gid: 0,
            data: Secret::new(b"/tmp".to_vec()),
            secret: false,
        });
        archive.file("link/through", 0o644, b"x".to_vec(), false);
        let dir = tempfile::tempdir().unwrap();
        let error = unpack(archive.to_bytes().as_bytes(), dir.path()).unwrap_err();
        assert!(
            format!("{error:#}").contains("passes through the link"),
            "{error:#}"
        );
        assert!(unpack(&b"garbage"[..], dir.path()).is_err());
    }
}
