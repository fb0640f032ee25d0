//! Looking at disk images after a run, with tools nobody here wrote: sfdisk, sgdisk,
//! fsck.fat, e2fsck, debugfs, mtools, blkid, btrfs, cryptsetup, ssh-keygen, nix-instantiate.
//!
//! The host kernel cannot attach images as block devices, so everything works on image
//! files. sfdisk and sgdisk assume 512-byte sectors on files; for a GPT written with 4096-byte
//! sectors (detected from where the `EFI PART` header is) [`sfdisk_json`] and
//! [`sgdisk_verify`] run the same tools inside a QEMU guest that sees the image as a 4Kn disk.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::tool::run_tool;

/// The data extents (offset, length) of a sparse file, from `lseek(SEEK_DATA/SEEK_HOLE)`;
/// holes read as zeros. Without SEEK_DATA support the whole file is one extent.
pub fn data_extents(file: &File) -> Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let size = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        // SAFETY: lseek on a descriptor the caller keeps open; no memory is passed.
        let start = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENXIO) => break, // only a hole after `offset`
                Some(libc::EINVAL) if extents.is_empty() => return Ok(vec![(0, size)]),
                _ => return Err(err).context("lseek(SEEK_DATA)"),
            }
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error()).context("lseek(SEEK_HOLE)");
        }
        extents.push((start as u64, (end - start) as u64));
        offset = end as u64;
    }
    Ok(extents)
}

/// A fingerprint of a (sparse) image, to show that a run did not write to it: SHA-256 over the
/// image size and each data extent's offset, length and bytes (see [`data_extents`]). Any
/// guest write reaches the image as changed bytes or a new extent (QEMU allocates even written
/// zeros), yet only the few MiB of data are read, where `sha256sum` over a 3 GiB image takes
/// half a minute on a busy 2-core machine.
pub fn sparse_digest(path: &Path) -> Result<String> {
    use std::process::Stdio;
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let extents = data_extents(&file).with_context(|| format!("listing the data of {}", path.display()))?;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting sha256sum")?;
    {
        let mut stdin = child.stdin.take().context("sha256sum stdin")?;
        writeln!(stdin, "size {size}")?;
        let mut buf = vec![0u8; 1 << 20];
        for (start, len) in &extents {
            writeln!(stdin, "extent {start} {len}")?;
            file.seek(SeekFrom::Start(*start))?;
            let mut left = *len;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                file.read_exact(&mut buf[..n])
                    .with_context(|| format!("reading {}", path.display()))?;
                stdin.write_all(&buf[..n])?;
                left -= n as u64;
            }
        }
    }
    let out = child.wait_with_output().context("waiting for sha256sum")?;
    ensure!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(format!(
        "{} ({} data extents)",
        text.split_whitespace().next().unwrap_or(""),
        extents.len()
    ))
}

/// The logical sector size a GPT on this image was written with: 512 when the GPT header
/// signature is at byte 512, 4096 when it is at byte 4096; `None` without a GPT.
pub fn gpt_sector_size(disk: &Path) -> Result<Option<u32>> {
    let mut f = File::open(disk).with_context(|| format!("opening disk image {}", disk.display()))?;
    let mut sig = [0u8; 8];
    for ss in [512u32, 4096] {
        f.seek(SeekFrom::Start(ss as u64))
            .with_context(|| format!("seeking in {}", disk.display()))?;
        if f.read_exact(&mut sig).is_ok() && &sig == b"EFI PART" {
            return Ok(Some(ss));
        }
    }
    Ok(None)
}

/// `sfdisk --json DISK`, parsed. The table is in `["partitiontable"]`, with `label`,
/// `sectorsize`, and `partitions[]` (`start`/`size` in sectors, `type`, `uuid`, `name`).
/// For a 4096-byte-sector GPT this runs sfdisk inside a QEMU guest (about 10 s, cached
/// per image state).
pub fn sfdisk_json(disk: &Path) -> Result<Value> {
    if gpt_sector_size(disk)? == Some(4096) {
        let report = guest_report(disk)?;
        return Ok(report.sfdisk_json.clone());
    }
    let out = run_tool(Command::new("sfdisk").arg("--json").arg(disk))?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing the JSON of `{}`\n{}", out.command, out.describe()))
}

/// The partitions of [`sfdisk_json`]: `(number, start_byte, size_bytes, entry)`, with the
/// number taken from the end of `node` (`...img2`, `/dev/vda2` -> 2).
pub fn partitions(disk: &Path) -> Result<Vec<(u32, u64, u64, Value)>> {
    let json = sfdisk_json(disk)?;
    let table = json
        .get("partitiontable")
        .with_context(|| format!("no partitiontable in sfdisk JSON: {json}"))?;
    let ss = table.get("sectorsize").and_then(Value::as_u64).unwrap_or(512);
    let parts = table
        .get("partitions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for p in parts {
        let node = p
            .get("node")
            .and_then(Value::as_str)
            .with_context(|| format!("partition without node: {p}"))?;
        let digits: String = node.chars().rev().take_while(|c| c.is_ascii_digit()).collect();
        let num: u32 = digits
            .chars()
            .rev()
            .collect::<String>()
            .parse()
            .with_context(|| format!("no number at the end of {node}"))?;
        let start = p
            .get("start")
            .and_then(Value::as_u64)
            .with_context(|| format!("partition without start: {p}"))?;
        let size = p
            .get("size")
            .and_then(Value::as_u64)
            .with_context(|| format!("partition without size: {p}"))?;
        out.push((num, start * ss, size * ss, p));
    }
    Ok(out)
}

/// `sgdisk -v DISK`; fails unless it reports "No problems found" about a GPT that exists
/// (sgdisk itself exits 0 on problems and on a disk without GPT). Returns its output.
/// For a 4096-byte-sector GPT this runs sgdisk inside a QEMU guest.
pub fn sgdisk_verify(disk: &Path) -> Result<String> {
    let ss = gpt_sector_size(disk)?;
    let (command, text) = if ss == Some(4096) {
        let r = guest_report(disk)?;
        (
            "sgdisk -v /dev/vda (in a QEMU guest, 4096-byte sectors)".to_string(),
            r.sgdisk_v.clone(),
        )
    } else {
        let out = run_tool(Command::new("sgdisk").arg("-v").arg(disk))?;
        (out.command.clone(), out.combined())
    };
    check_sgdisk_output(&command, &text)?;
    Ok(text)
}

fn check_sgdisk_output(command: &str, text: &str) -> Result<()> {
    let bad = [
        "Creating new GPT entries",
        "Problem:",
        "Caution",
        "Warning! Main and backup",
        "don't match",
        "ERROR",
        "Identified",
    ];
    let found: Vec<&str> = bad.iter().copied().filter(|b| text.contains(b)).collect();
    if !text.contains("No problems found") || !found.is_empty() {
        bail!("`{command}` did not verify the GPT (found {found:?}, expected \"No problems found\")\n--- output ---\n{text}");
    }
    Ok(())
}

/// Copies partition `number` (its byte range from [`sfdisk_json`]) into the sparse file
/// `<disk>.p<number>` beside the image and returns its path.
pub fn extract_partition(disk: &Path, number: u32) -> Result<PathBuf> {
    let parts = partitions(disk)?;
    let (_, start, size, _) = parts.iter().find(|(n, ..)| *n == number).with_context(|| {
        format!(
            "{} has no partition {number} (has {:?})",
            disk.display(),
            parts.iter().map(|p| p.0).collect::<Vec<_>>()
        )
    })?;
    let out = PathBuf::from(format!("{}.p{number}", disk.display()));
    copy_range_sparse(disk, *start, *size, &out).with_context(|| {
        format!(
            "extracting partition {number} (bytes {start}+{size}) of {} to {}",
            disk.display(),
            out.display()
        )
    })?;
    Ok(out)
}

/// Copies `len` bytes from `offset` of `src` into a new sparse file `dst` (zero blocks are
/// skipped, not written).
pub fn copy_range_sparse(src: &Path, offset: u64, len: u64, dst: &Path) -> Result<()> {
    let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let src_len = input.metadata()?.len();
    ensure!(
        offset + len <= src_len,
        "range {offset}+{len} is beyond the end of {} ({src_len} bytes)",
        src.display()
    );
    let mut output = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    // Only the allocated regions of the image can hold anything but zeros: reading gigabytes of
    // holes (and looking at each byte) is what would make this slow.
    let end = offset + len;
    for (start, length) in data_regions(src)? {
        let from = start.max(offset);
        let to = (start + length).min(end);
        if from >= to {
            continue;
        }
        // Whole 4 KiB blocks of the output, so the zero test below is per block.
        let mut at = offset + (from - offset) / 4096 * 4096;
        let stop = (to - offset).div_ceil(4096) * 4096 + offset;
        let stop = stop.min(end);
        input.seek(SeekFrom::Start(at))?;
        while at < stop {
            let n = ((stop - at) as usize).min(CHUNK);
            input
                .read_exact(&mut buf[..n])
                .with_context(|| format!("reading {} at {at}", src.display()))?;
            // Write only the non-zero 4 KiB blocks.
            for (i, block) in buf[..n].chunks(4096).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    output.seek(SeekFrom::Start(at - offset + (i * 4096) as u64))?;
                    output
                        .write_all(block)
                        .with_context(|| format!("writing {}", dst.display()))?;
                }
            }
            at += n as u64;
        }
    }
    output
        .set_len(len)
        .with_context(|| format!("sizing {}", dst.display()))?;
    Ok(())
}

/// `fsck.fat -n PART`; fails when it exits non-zero and also on any message beyond its
/// summary, warnings included (e.g. "FAT32 ... less than the required minimum of 65525
/// clusters": firmware that follows the spec would take such a volume for FAT16). One
/// message is accepted: "Free cluster summary uninitialized" (an FSInfo free count of
/// 0xFFFFFFFF means "unknown" in the FAT spec). Returns its output.
pub fn fsck_fat(part: &Path) -> Result<String> {
    let out = run_tool(Command::new("fsck.fat").arg("-n").arg(part))?;
    let text = out.combined();
    // fsck.fat -n exits 0 even after some messages it would fix; be strict about them.
    let suspicious: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.trim();
            !(l.is_empty()
                || l.starts_with("fsck.fat ")
                || l.contains("files,")
                || l.starts_with(&*part.to_string_lossy())
                // FSInfo free count 0xFFFFFFFF means "unknown" in the FAT spec: legal.
                || l.starts_with("Free cluster summary uninitialized"))
        })
        .collect();
    if !suspicious.is_empty() {
        bail!(
            "`{}` reported problems: {suspicious:?}\n{}",
            out.command,
            out.describe()
        );
    }
    Ok(text)
}

/// `e2fsck -fn PART`; fails unless the filesystem is clean. Returns its output.
pub fn e2fsck(part: &Path) -> Result<String> {
    Ok(run_tool(Command::new("e2fsck").arg("-fn").arg(part))?.combined())
}

fn debugfs(part: &Path, request: &str) -> Result<crate::tool::ToolOutput> {
    let out = run_tool(Command::new("debugfs").arg("-R").arg(request).arg(part))?;
    // debugfs exits 0 even when the request fails; its errors go to stderr after the banner.
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    if !errors.is_empty() {
        bail!(
            "`{}` failed: {}\n{}",
            out.command,
            errors.join("; "),
            out.describe()
        );
    }
    Ok(out)
}

fn debugfs_quote(path: &str) -> Result<String> {
    ensure!(
        !path.contains('"') && !path.contains('\n'),
        "path {path:?} cannot be passed to debugfs"
    );
    Ok(format!("\"{path}\""))
}

/// The contents of the file at `path` (absolute, inside the filesystem) of an ext2/3/4 image.
pub fn ext4_read_file(part: &Path, path: &str) -> Result<Vec<u8>> {
    // `cat` on a missing file only complains on stderr; `stat` first gives a clear error.
    let st = ext4_stat(part, path)?;
    ensure!(
        st.file_type == "regular",
        "{path} in {} is a {}, not a regular file",
        part.display(),
        st.file_type
    );
    Ok(debugfs(part, &format!("cat {}", debugfs_quote(path)?))?.stdout)
}

/// The target of the symbolic link at `path` in an ext2/3/4 image, as `debugfs stat` shows it
/// (`Fast link dest:`: targets under 60 bytes, stored in the inode, are all this reads).
pub fn ext4_read_link(part: &Path, path: &str) -> Result<String> {
    let st = ext4_stat(part, path)?;
    ensure!(
        st.file_type == "symlink",
        "{path} in {} is a {}, not a symbolic link",
        part.display(),
        st.file_type
    );
    st.raw
        .lines()
        .find_map(|l| l.trim().strip_prefix("Fast link dest: \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .map(str::to_string)
        .with_context(|| format!("no fast link target for {path} in:\n{}", st.raw))
}

/// What `debugfs stat` says about an inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Stat {
    /// `regular`, `directory`, `symlink`, ...
    pub file_type: String,
    /// Permission bits (e.g. 0o600).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// The whole `debugfs stat` output.
    pub raw: String,
}

/// Type, mode, owner and size of `path` in an ext2/3/4 image.
pub fn ext4_stat(part: &Path, path: &str) -> Result<Ext4Stat> {
    let out = debugfs(part, &format!("stat {}", debugfs_quote(path)?))?;
    let raw = out.stdout_str();
    let field = |name: &str| -> Option<String> {
        let tokens: Vec<&str> = raw.split_whitespace().collect();
        tokens
            .iter()
            .position(|t| *t == name)
            .and_then(|i| tokens.get(i + 1))
            .map(|s| s.to_string())
    };
    let parse = || -> Option<Ext4Stat> {
        Some(Ext4Stat {
            file_type: field("Type:")?,
            mode: u32::from_str_radix(&field("Mode:")?, 8).ok()?,
            uid: field("User:")?.parse().ok()?,
            gid: field("Group:")?.parse().ok()?,
            size: field("Size:")?.parse().ok()?,
            raw: raw.clone(),
        })
    };
    parse().with_context(|| format!("cannot parse the output of `{}`\n{}", out.command, out.describe()))
}

/// One entry of [`ext4_ls_long`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4DirEntry {
    pub name: String,
    pub inode: u64,
    /// Full mode including the file type bits (e.g. 0o100644).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
}

/// Entries of directory `dir` in an ext2/3/4 image (without `.` and `..`).
pub fn ext4_ls_long(part: &Path, dir: &str) -> Result<Vec<Ext4DirEntry>> {
    let st = ext4_stat(part, dir)?;
    ensure!(
        st.file_type == "directory",
        "{dir} in {} is a {}, not a directory",
        part.display(),
        st.file_type
    );
    let out = debugfs(part, &format!("ls -p {}", debugfs_quote(dir)?))?;
    let mut entries = Vec::new();
    for line in out.stdout_str().lines().filter(|l| !l.trim().is_empty()) {
        // /inode/mode/uid/gid/name/size/
        let f: Vec<&str> = line.trim().split('/').collect();
        let parsed = (|| -> Option<Ext4DirEntry> {
            Some(Ext4DirEntry {
                inode: f.get(1)?.parse().ok()?,
                mode: u32::from_str_radix(f.get(2)?, 8).ok()?,
                uid: f.get(3)?.parse().ok()?,
                gid: f.get(4)?.parse().ok()?,
                name: f.get(5)?.to_string(),
                size: f.get(6)?.parse().unwrap_or(0),
            })
        })()
        .with_context(|| format!("cannot parse `{line}` from `{}`", out.command))?;
        if parsed.name != "." && parsed.name != ".." {
            entries.push(parsed);
        }
    }
    Ok(entries)
}

/// Names in directory `dir` of an ext2/3/4 image (without `.` and `..`), sorted.
pub fn ext4_ls(part: &Path, dir: &str) -> Result<Vec<String>> {
    let mut names: Vec<String> = ext4_ls_long(part, dir)?.into_iter().map(|e| e.name).collect();
    names.sort();
    Ok(names)
}

fn mtools(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("MTOOLS_SKIP_CHECK", "1");
    c
}

/// Names in directory `dir` (e.g. `/EFI/BOOT`) of a FAT image, via `mdir -b` (mtools).
pub fn fat_ls(part: &Path, dir: &str) -> Result<Vec<String>> {
    let target = format!(
        "::{}",
        if dir.starts_with('/') {
            dir.to_string()
        } else {
            format!("/{dir}")
        }
    );
    let out = run_tool(mtools("mdir").arg("-b").arg("-i").arg(part).arg(&target))?;
    let mut names: Vec<String> = out
        .stdout_str()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or(l)
                .to_string()
        })
        .filter(|n| n != "." && n != "..")
        .collect();
    names.sort();
    Ok(names)
}

/// The contents of `path` in a FAT image, via `mtype`-like `mcopy -n ... -` (mtools).
pub fn fat_read_file(part: &Path, path: &str) -> Result<Vec<u8>> {
    let target = format!(
        "::{}",
        if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        }
    );
    Ok(run_tool(
        mtools("mcopy")
            .arg("-n")
            .arg("-i")
            .arg(part)
            .arg(&target)
            .arg("-"),
    )?
    .stdout)
}

/// `blkid -p -o export PART` as a map (`TYPE`, `UUID`, `LABEL`, `PARTLABEL`, ...). Fails when
/// blkid recognises nothing.
pub fn blkid(part: &Path) -> Result<BTreeMap<String, String>> {
    let out = run_tool(Command::new("blkid").args(["-p", "-o", "export"]).arg(part))?;
    Ok(out
        .stdout_str()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// `btrfs check --readonly PART`; fails on errors. Returns its output.
pub fn btrfs_check(part: &Path) -> Result<String> {
    Ok(run_tool(Command::new("btrfs").args(["check", "--readonly"]).arg(part))?.combined())
}

/// `cryptsetup luksDump PART`; fails when it is not a LUKS volume. Returns its output.
pub fn luks_dump(part: &Path) -> Result<String> {
    Ok(run_tool(Command::new("cryptsetup").arg("luksDump").arg(part))?.combined())
}

/// The allocated regions `(offset, length)` of a sparse image file, so the tests read the few
/// MiB an install wrote instead of gigabytes of holes.
pub fn data_regions(path: &Path) -> Result<Vec<(u64, u64)>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    data_extents(&file).with_context(|| format!("listing the data of {}", path.display()))
}

/// The 4 KiB blocks of an image that are not all zero, by offset: two images hold the same
/// bytes exactly when these are equal (holes read as zeros). Reads allocated regions only.
pub fn nonzero_blocks(path: &Path) -> Result<BTreeMap<u64, Vec<u8>>> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut blocks = BTreeMap::new();
    for (start, len) in data_regions(path)? {
        let first = start / 4096 * 4096;
        let end = (start + len).div_ceil(4096) * 4096;
        file.seek(SeekFrom::Start(first))?;
        let mut buf = vec![0u8; (end - first) as usize];
        let read = read_up_to(&mut file, &mut buf)?;
        buf.truncate(read);
        for (i, block) in buf.chunks(4096).enumerate() {
            if block.iter().any(|&b| b != 0) {
                blocks.insert(first + i as u64 * 4096, block.to_vec());
            }
        }
    }
    Ok(blocks)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        let n = file.read(&mut buf[total..])?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok(total)
}

/// How often `needle` occurs in an image's bytes (in its allocated regions; holes are zeros).
pub fn count_in_image(path: &Path, needle: &[u8]) -> Result<usize> {
    ensure!(!needle.is_empty(), "empty needle");
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut count = 0;
    for (start, len) in data_regions(path)? {
        file.seek(SeekFrom::Start(start))?;
        let mut buf = vec![0u8; len as usize];
        let read = read_up_to(&mut file, &mut buf)?;
        let hay = &buf[..read];
        let mut at = 0;
        while let Some(pos) = hay[at..].iter().position(|&b| b == needle[0]) {
            let i = at + pos;
            if hay[i..].starts_with(needle) {
                count += 1;
            }
            at = i + 1;
        }
    }
    Ok(count)
}

/// Whether `passphrase` opens the LUKS volume in `part` (`cryptsetup open --test-passphrase`,
/// which reads the key slots on an image file and activates nothing, so no dm-crypt is needed).
/// The passphrase goes in on stdin.
pub fn luks_test_passphrase(part: &Path, passphrase: &[u8]) -> Result<bool> {
    let out = crate::tool::run_tool_with_input(
        Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file", "-"])
            .arg(part),
        passphrase,
    )?;
    match out.status.code() {
        Some(0) => Ok(true),
        // "No key available with this passphrase."
        Some(2) => Ok(false),
        _ => bail!("cryptsetup failed\n{}", out.describe()),
    }
}

/// The subvolumes of a btrfs image as `(id, name)`, read from its root tree
/// (`btrfs inspect-internal dump-tree -t root`: works on a file, nothing is mounted).
pub fn btrfs_subvolumes(part: &Path) -> Result<Vec<(u64, String)>> {
    let out = run_tool(
        Command::new("btrfs")
            .args(["inspect-internal", "dump-tree", "-t", "root"])
            .arg(part),
    )?;
    let text = out.stdout_str();
    let mut found = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        // item 4 key (FS_TREE ROOT_REF 256) itemoff 14927 itemsize 22
        //     root ref key dirid 256 sequence 2 name @nix
        let Some(rest) = line.split("(FS_TREE ROOT_REF ").nth(1) else {
            continue;
        };
        let id: u64 = rest
            .split(')')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no subvolume id in `{line}`"))?;
        let name = lines
            .next()
            .and_then(|l| l.split(" name ").nth(1))
            .with_context(|| format!("no name after `{line}` in `{}`", out.command))?;
        found.push((id, name.trim().to_string()));
    }
    Ok(found)
}

/// Copies the files of btrfs subvolume `name` out of the image into `dest` with their modes,
/// owners (when run as root) and symbolic links (`btrfs restore -m -S -r ID`: works on a file,
/// nothing is mounted).
pub fn btrfs_restore(part: &Path, name: &str, dest: &Path) -> Result<()> {
    let subvolumes = btrfs_subvolumes(part)?;
    let (id, _) = subvolumes
        .iter()
        .find(|(_, n)| n == name)
        .with_context(|| format!("{} has no subvolume {name} (has {subvolumes:?})", part.display()))?;
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    run_tool(
        Command::new("btrfs")
            .args(["restore", "-m", "-S", "-r", &id.to_string()])
            .arg(part)
            .arg(dest),
    )?;
    Ok(())
}

/// Runs `script` (busybox sh) in a guest that boots the dev bundle with the test tools
/// (`inspect-tools.cpio`: sgdisk, sfdisk, btrfs) and `files` added, with `disks` attached as
/// virtio disks of the given sector size on a QEMU snapshot (the images do not change). The
/// installer's own tools are there too (cryptsetup, e2fsck, busybox). Modules for virtio, NVMe,
/// dm-crypt, ext4 and btrfs are loaded first. Returns what the script printed; fails when it
/// exits non-zero. Use it to look where the host cannot: inside LUKS containers.
pub fn guest_shell(disks: &[(&Path, u32)], files: &[(&str, u32, &[u8])], script: &str) -> Result<String> {
    let bundle = crate::dev_bundle()?;
    let tools = bundle.dir.join("inspect-tools.cpio");
    ensure!(
        tools.is_file(),
        "{} is missing (made by kexec-bundle/build-dev)",
        tools.display()
    );
    let dir = tempfile::tempdir().context("temp dir for the guest")?;
    let init = format!(
        r#"#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin DM_DISABLE_UDEV=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /run
# Kernel messages on the console would land in the middle of the script's output.
dmesg -n 1
for m in virtio_pci virtio_blk dm_crypt xts algif_skcipher ext4 btrfs vfat nls_ascii nls_cp437; do
    modprobe $m 2>/dev/null
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
cat > /script.sh <<'NIXOS_KEXEC_TEST_SCRIPT'
{script}
NIXOS_KEXEC_TEST_SCRIPT
echo "=== guest-shell begin ==="
sh -e /script.sh 2>&1
echo "=== guest-shell end rc=$? ==="
poweroff -f
"#
    );
    let mut cpio = crate::Cpio::new().file("init", 0o755, init);
    for (path, mode, data) in files {
        cpio = cpio.file(path, *mode, data);
    }
    let archive = dir.path().join("guest.cpio");
    cpio.write_to(&archive)?;
    let mut vm = crate::Vm::new(&bundle)
        .name("guest-shell")
        .extra_initrd(&tools)
        .extra_initrd(&archive)
        .qemu_args(["-snapshot"])
        .echo(std::env::var_os("NIXOS_KEXEC_ECHO_INSPECT").is_some())
        .timeout(Duration::from_secs(240));
    for (i, (disk, sector)) in disks.iter().enumerate() {
        vm = vm.disk_image(disk, crate::DiskBus::Virtio, *sector, &format!("GUEST{i}"));
    }
    let out = vm.run()?;
    let (text, rc) = between(&out.log, "=== guest-shell begin ===", "=== guest-shell end rc=")
        .with_context(|| format!("no output from the guest script\n{}", out.tail(60)))?;
    ensure!(rc == 0, "the guest script failed (rc {rc}):\n{text}");
    Ok(text.to_string())
}

/// The text between `=== NAME ===` and `=== end NAME ===` in `output` (what a guest script
/// printed around a file it showed).
pub fn section<'a>(output: &'a str, name: &str) -> Result<&'a str> {
    let begin = format!("=== {name} ===\n");
    let end = format!("\n=== end {name} ===");
    let start = output
        .find(&begin)
        .with_context(|| format!("no section {name} in:\n{output}"))?
        + begin.len();
    let len = output[start..]
        .find(&end)
        .with_context(|| format!("section {name} does not end in:\n{output}"))?;
    Ok(&output[start..start + len])
}

/// A new passphrase-less key pair at `path` (+ `.pub`) made by `ssh-keygen`; `key_type` is
/// what follows `-t` and may carry more options (`&["rsa", "-b", "4096"]`).
pub fn ssh_keygen_new(path: &Path, key_type: &[&str], comment: &str) -> Result<()> {
    run_tool(
        Command::new("ssh-keygen")
            .args(["-q", "-N", "", "-C", comment, "-t"])
            .args(key_type)
            .arg("-f")
            .arg(path),
    )?;
    Ok(())
}

/// `ssh-keygen -l -f KEY` (fingerprint line); fails when it is not a key.
pub fn ssh_keygen_fingerprint(key: &Path) -> Result<String> {
    Ok(run_tool(Command::new("ssh-keygen").arg("-l").arg("-f").arg(key))?
        .stdout_str()
        .trim()
        .to_string())
}

/// `nix-instantiate --parse FILE`: fails unless it is syntactically valid Nix.
pub fn nix_parse(file: &Path) -> Result<String> {
    Ok(run_tool(Command::new("nix-instantiate").arg("--parse").arg(file))?.stdout_str())
}

/// [`nix_parse`] for text.
pub fn nix_parse_str(text: &str) -> Result<String> {
    let dir = tempfile::tempdir().context("temp dir for nix_parse_str")?;
    let f = dir.path().join("expr.nix");
    fs::write(&f, text).context("writing expr.nix")?;
    nix_parse(&f).with_context(|| format!("parsing Nix text:\n{text}"))
}

// ---------------------------------------------------------------- in-guest inspection

/// What the inspection guest reported about one image.
#[derive(Debug, Clone)]
struct GuestReport {
    sfdisk_json: Value,
    sgdisk_v: String,
}

type CacheKey = (PathBuf, u64, u128);

static GUEST_CACHE: Mutex<Option<HashMap<CacheKey, GuestReport>>> = Mutex::new(None);

fn cache_key(disk: &Path) -> Result<CacheKey> {
    let md = fs::metadata(disk).with_context(|| format!("stat {}", disk.display()))?;
    let mtime = md
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok((fs::canonicalize(disk)?, md.len(), mtime))
}

const GUEST_INIT: &str = r#"#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
modprobe virtio_pci
modprobe virtio_blk
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "inspect: logical_block_size=$(cat /sys/block/vda/queue/logical_block_size)"
echo "=== sgdisk-v begin ==="
sgdisk -v /dev/vda 2>&1
echo "=== sgdisk-v end rc=$? ==="
echo "=== sfdisk-json begin ==="
sfdisk --json /dev/vda 2>&1
echo "=== sfdisk-json end rc=$? ==="
poweroff -f
"#;

fn between<'a>(log: &'a str, begin: &str, end_prefix: &str) -> Option<(&'a str, i32)> {
    let b = log.find(begin)? + begin.len();
    let rest = &log[b..];
    let e = rest.find(end_prefix)?;
    let tail = &rest[e + end_prefix.len()..];
    let rc: i32 = tail
        .split_whitespace()
        .next()?
        .trim_end_matches("===")
        .parse()
        .ok()?;
    Some((rest[..e].trim_matches('\n'), rc))
}

fn guest_report(disk: &Path) -> Result<GuestReport> {
    let key = cache_key(disk)?;
    if let Some(r) = GUEST_CACHE
        .lock()
        .ok()
        .and_then(|c| c.as_ref().and_then(|m| m.get(&key).cloned()))
    {
        return Ok(r);
    }
    let r = guest_report_uncached(disk).with_context(|| {
        format!(
            "inspecting {} as a 4096-byte-sector disk inside QEMU",
            disk.display()
        )
    })?;
    if let Ok(mut c) = GUEST_CACHE.lock() {
        c.get_or_insert_with(HashMap::new).insert(key, r.clone());
    }
    Ok(r)
}

fn guest_report_uncached(disk: &Path) -> Result<GuestReport> {
    let bundle = crate::dev_bundle()?;
    let tools = bundle.dir.join("inspect-tools.cpio");
    ensure!(
        tools.is_file(),
        "{} is missing (made by kexec-bundle/build-dev)",
        tools.display()
    );
    let dir = tempfile::tempdir().context("temp dir for the inspection guest")?;
    let init = dir.path().join("init.cpio");
    crate::Cpio::new()
        .file("init", 0o755, GUEST_INIT)
        .write_to(&init)?;
    // Work on a snapshot so the guest cannot change the image under inspection.
    let out = crate::Vm::new(&bundle)
        .name("inspect")
        .extra_initrd(&tools)
        .extra_initrd(&init)
        .disk_image(disk, crate::DiskBus::Virtio, 4096, "INSPECT")
        .qemu_args(["-snapshot"])
        .echo(std::env::var_os("NIXOS_KEXEC_ECHO_INSPECT").is_some())
        .timeout(Duration::from_secs(120))
        .run()?;
    let log = &out.log;
    ensure!(
        log.contains("inspect: logical_block_size=4096"),
        "the guest did not see a 4096-byte-sector disk\n{}",
        out.tail(60)
    );
    let (sg, _) = between(log, "=== sgdisk-v begin ===", "=== sgdisk-v end rc=")
        .with_context(|| format!("no sgdisk output from the guest\n{}", out.tail(60)))?;
    let (sf, rc) = between(log, "=== sfdisk-json begin ===", "=== sfdisk-json end rc=")
        .with_context(|| format!("no sfdisk output from the guest\n{}", out.tail(60)))?;
    ensure!(
        rc == 0,
        "`sfdisk --json /dev/vda` failed in the guest (rc {rc}):\n{sf}"
    );
    let sfdisk_json: Value = serde_json::from_str(sf)
        .with_context(|| format!("parsing `sfdisk --json /dev/vda` from the guest:\n{sf}"))?;
    Ok(GuestReport {
        sfdisk_json,
        sgdisk_v: sg.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn sparse_images_are_read_by_their_data() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let img = dir.path().join("sparse.img");
        let mut f = File::create(&img)?;
        f.set_len(1 << 30)?;
        f.seek(SeekFrom::Start(300 << 20))?;
        f.write_all(b"xx needle yy needle")?;
        f.sync_all()?;
        assert_eq!(count_in_image(&img, b"needle")?, 2);
        assert_eq!(count_in_image(&img, b"absent")?, 0);
        let blocks = nonzero_blocks(&img)?;
        assert_eq!(blocks.keys().copied().collect::<Vec<_>>(), [300 << 20]);
        Ok(())
    }

    /// A 512-byte-sector GPT image made by the host tools: 1 = FAT32 ESP (64 MiB),
    /// 2 = ext4 populated from a directory.
    fn make_image(dir: &Path) -> Result<PathBuf> {
        let img = dir.join("disk.img");
        File::create(&img)?.set_len(300 << 20)?;
        let mut child = Command::new("sfdisk")
            .arg("-q")
            .arg(&img)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        child
            .stdin
            .as_mut()
            .context("stdin")?
            .write_all(b"label: gpt\nsize=64MiB, type=U, name=\"ESP\"\ntype=L, name=\"root\"\n")?;
        ensure!(child.wait()?.success(), "sfdisk failed");
        let parts = partitions(&img)?;
        let (_, esp_start, esp_size, _) = parts[0].clone();
        let (_, root_start, root_size, _) = parts[1].clone();
        run_tool(
            Command::new("mkfs.fat")
                .args(["-F", "32", "-s", "1", "-n", "ESP"])
                .arg(format!("--offset={}", esp_start / 512))
                .arg(&img)
                .arg((esp_size / 1024).to_string()),
        )?;
        let src = dir.join("root");
        fs::create_dir_all(src.join("etc/nixos"))?;
        fs::write(src.join("etc/nixos/flake.nix"), "{ outputs = _: { }; }\n")?;
        fs::write(src.join("etc/secret key"), "s")?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(src.join("etc/secret key"), fs::Permissions::from_mode(0o600))?;
        run_tool(
            Command::new("mke2fs")
                .args(["-q", "-t", "ext4", "-L", "nixos", "-d"])
                .arg(&src)
                .arg("-E")
                .arg(format!("offset={root_start},root_owner=0:0"))
                .arg(&img)
                .arg(format!("{}k", root_size / 1024)),
        )?;
        Ok(img)
    }

    #[test]
    fn host_image_round_trip() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let img = make_image(dir.path())?;
        assert_eq!(gpt_sector_size(&img)?, Some(512));
        sgdisk_verify(&img)?;
        let json = sfdisk_json(&img)?;
        assert_eq!(json["partitiontable"]["label"], "gpt");
        assert_eq!(json["partitiontable"]["partitions"][0]["name"], "ESP");

        let esp = extract_partition(&img, 1)?;
        assert_eq!(fs::metadata(&esp)?.len(), 64 << 20);
        fsck_fat(&esp)?;
        assert_eq!(blkid(&esp)?.get("TYPE").map(String::as_str), Some("vfat"));
        assert_eq!(fat_ls(&esp, "/")?, Vec::<String>::new());
        let conf = dir.path().join("loader.conf");
        fs::write(&conf, "timeout 3\n")?;
        run_tool(
            mtools("mmd")
                .arg("-i")
                .arg(&esp)
                .args(["::/loader", "::/loader/entries"]),
        )?;
        run_tool(
            mtools("mcopy")
                .arg("-i")
                .arg(&esp)
                .arg(&conf)
                .arg("::/loader/loader.conf"),
        )?;
        fsck_fat(&esp)?;
        assert_eq!(
            fat_ls(&esp, "/loader")?,
            vec!["entries".to_string(), "loader.conf".to_string()]
        );
        assert_eq!(fat_read_file(&esp, "/loader/loader.conf")?, b"timeout 3\n");
        assert!(fat_read_file(&esp, "/loader/nope").is_err());

        let root = extract_partition(&img, 2)?;
        // sparse: far fewer blocks allocated than the partition's size
        use std::os::unix::fs::MetadataExt;
        assert!(fs::metadata(&root)?.blocks() * 512 < fs::metadata(&root)?.len() / 4);
        e2fsck(&root)?;
        assert_eq!(blkid(&root)?.get("LABEL").map(String::as_str), Some("nixos"));
        assert_eq!(
            ext4_read_file(&root, "/etc/nixos/flake.nix")?,
            b"{ outputs = _: { }; }\n"
        );
        let st = ext4_stat(&root, "/etc/secret key")?;
        assert_eq!(
            (st.file_type.as_str(), st.mode, st.uid, st.size),
            ("regular", 0o600, 0, 1)
        );
        assert_eq!(
            ext4_ls(&root, "/etc")?,
            vec!["nixos".to_string(), "secret key".to_string()]
        );
        let long = ext4_ls_long(&root, "/etc/nixos")?;
        assert_eq!(long.len(), 1);
        assert_eq!(long[0].mode, 0o100644);

        let err = format!("{:#}", ext4_read_file(&root, "/etc/nope").unwrap_err());
        assert!(err.contains("debugfs") && err.contains("/etc/nope"), "{err}");
        assert!(extract_partition(&img, 3).is_err());
        let err = format!("{:#}", e2fsck(&esp).unwrap_err());
        assert!(err.contains("e2fsck -fn"), "{err}");
        let nix = dir.path().join("flake.nix");
        fs::write(&nix, ext4_read_file(&root, "/etc/nixos/flake.nix")?)?;
        nix_parse(&nix)?;
        assert!(nix_parse_str("{ broken").is_err());
        Ok(())
    }

    #[test]
    fn sgdisk_verify_rejects_missing_and_damaged_gpt() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let blank = dir.path().join("blank.img");
        File::create(&blank)?.set_len(64 << 20)?;
        assert!(sgdisk_verify(&blank).is_err());
        let img = make_image(dir.path())?;
        // grow the image: the backup header is no longer at the end
        let f = fs::OpenOptions::new().write(true).open(&img)?;
        f.set_len((300 << 20) + (1 << 20))?;
        let err = format!("{:#}", sgdisk_verify(&img).unwrap_err());
        assert!(err.contains("Problem"), "{err}");
        Ok(())
    }

    #[test]
    fn sgdisk_output_check() {
        assert!(check_sgdisk_output("x", "No problems found. 2015 free sectors").is_ok());
        assert!(check_sgdisk_output("x", "Creating new GPT entries in memory.\nNo problems found.").is_err());
        assert!(check_sgdisk_output("x", "Problem: The CRC ...\nIdentified 1 problems!").is_err());
    }

    #[test]
    fn between_markers() {
        let log = "a\n=== x begin ===\nhello\nworld\n=== x end rc=3 ===\n";
        assert_eq!(
            between(log, "=== x begin ===", "=== x end rc="),
            Some(("hello\nworld", 3))
        );
    }
}
