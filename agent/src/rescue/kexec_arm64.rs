//! Loading the installer with the old kexec_load syscall on arm64, natively, for kernels built
//! without kexec_file_load (Debian's arm64 kernels: `CONFIG_KEXEC_FILE` is off), so a rescue
//! system needs no kexec-tools.
//!
//! kexec_load takes ready-made memory segments, so this does what kexec_file_load does in the
//! kernel (arch/arm64/kernel/kexec_image.c, machine_kexec_file.c): the `Image` at a 2 MiB
//! aligned base plus its text offset in usable RAM, the initrd and the device tree after it,
//! the device tree's `/chosen` naming the new command line and initrd. The device tree is the
//! running kernel's (`/sys/firmware/fdt`): under UEFI it carries the EFI system table and
//! memory map the new kernel needs. arm64's relocation code jumps to the entry point without
//! a device tree argument for kexec_load, so the entry is a five-instruction purgatory that
//! loads the device tree's address into x0 and branches to the kernel, as the boot protocol
//! (Documentation/arm64/booting.rst) asks.

// Only `load` uses the rest, and it exists on aarch64 only; the unit tests run everywhere.
#![cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;

const PAGE: u64 = 4096;
const KERNEL_ALIGN: u64 = 2 << 20;
const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// What the loader needs from an arm64 `Image` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Where in its 2 MiB aligned region the image goes.
    pub text_offset: u64,
    /// The memory the kernel occupies, BSS included; 0 in kernels before 3.17 (then the file
    /// size is all that is known).
    pub image_size: u64,
}

impl ImageHeader {
    /// Reads the header of an uncompressed arm64 `Image` (booting.rst: `ARM\x64` at 56,
    /// little-endian fields).
    pub fn parse(image: &[u8]) -> Result<ImageHeader> {
        ensure!(
            image.len() >= 64 && &image[56..60] == b"ARM\x64",
            "not an uncompressed arm64 Image (no ARM\\x64 magic at offset 56)"
        );
        let field = |at: usize| u64::from_le_bytes(image[at..at + 8].try_into().unwrap_or_default());
        let flags = field(24);
        ensure!(
            flags & 1 == 0,
            "the Image is big-endian; this machine is little-endian"
        );
        Ok(ImageHeader {
            text_offset: field(8),
            image_size: field(16),
        })
    }
}

/// The RAM the new kernel's pieces may be placed in: `System RAM` in /proc/iomem less
/// everything marked `reserved` (EFI runtime services, the firmware's memory map, the running
/// kernel's device tree, which the new kernel still reads), as half-open ranges, sorted.
pub fn usable_ram(iomem: &str) -> Vec<(u64, u64)> {
    let mut ram = Vec::new();
    let mut reserved = Vec::new();
    for line in iomem.lines() {
        let Some((range, name)) = line.trim_start().split_once(" : ") else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else {
            continue;
        };
        match name.trim() {
            "System RAM" => ram.push((start, end.saturating_add(1))),
            "reserved" => reserved.push((start, end.saturating_add(1))),
            _ => {}
        }
    }
    let mut usable = Vec::new();
    for (start, end) in ram {
        let mut pieces = vec![(start, end)];
        for &(r_start, r_end) in &reserved {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    if r_end <= s || r_start >= e {
                        vec![(s, e)]
                    } else {
                        [(s, r_start.max(s)), (r_end.min(e), e)]
                            .into_iter()
                            .filter(|(a, b)| a < b)
                            .collect()
                    }
                })
                .collect();
        }
        usable.extend(pieces);
    }
    usable.sort_unstable();
    usable
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

/// One kexec segment: bytes and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub dest: u64,
    /// Page-aligned, at least the bytes' length.
    pub mem_size: u64,
}

/// Where the kernel, initrd, device tree and purgatory go: the kernel at the lowest 2 MiB
/// aligned base (plus its text offset) where it fits, the others each in the first page-aligned
/// gap after it in usable RAM, none overlapping.
pub fn place(
    usable: &[(u64, u64)],
    header: ImageHeader,
    kernel_len: u64,
    sizes_after: &[u64],
) -> Result<Vec<Placed>> {
    let kernel_size = align_up(header.image_size.max(kernel_len), PAGE);
    let kernel = usable
        .iter()
        .find_map(|&(start, end)| {
            let dest = align_up(start.saturating_sub(header.text_offset), KERNEL_ALIGN) + header.text_offset;
            let dest = if dest < start { dest + KERNEL_ALIGN } else { dest };
            (dest + kernel_size <= end).then_some(Placed {
                dest,
                mem_size: kernel_size,
            })
        })
        .context("no usable RAM region holds the installer kernel")?;
    let mut placed = vec![kernel.clone()];
    let mut cursor = kernel.dest + kernel.mem_size;
    for &size in sizes_after {
        let mem_size = align_up(size.max(1), PAGE);
        let spot = usable
            .iter()
            .filter(|&&(_, end)| end > cursor)
            .find_map(|&(start, end)| {
                let dest = align_up(start.max(cursor), PAGE);
                (dest + mem_size <= end).then_some(dest)
            })
            .context("no usable RAM left for the installer's initrd and device tree")?;
        placed.push(Placed { dest: spot, mem_size });
        cursor = spot + mem_size;
    }
    Ok(placed)
}

/// The purgatory: `x0` = the device tree, `x1`-`x3` = 0, branch to the kernel.
pub fn purgatory(dtb: u64, kernel: u64) -> Vec<u8> {
    let words: [u32; 6] = [
        0x5800_00C0, // ldr x0, #24 (the first literal)
        0xAA1F_03E1, // mov x1, xzr
        0xAA1F_03E2, // mov x2, xzr
        0xAA1F_03E3, // mov x3, xzr
        0x5800_0084, // ldr x4, #16 (the second literal)
        0xD61F_0080, // br x4
    ];
    let mut code: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    code.extend(dtb.to_le_bytes());
    code.extend(kernel.to_le_bytes());
    code
}

/// A flattened device tree node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub props: Vec<(String, Vec<u8>)>,
    pub children: Vec<Node>,
}

impl Node {
    pub fn set(&mut self, name: &str, value: Vec<u8>) {
        match self.props.iter_mut().find(|(n, _)| n == name) {
            Some(prop) => prop.1 = value,
            None => self.props.push((name.to_string(), value)),
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.props.retain(|(n, _)| n != name);
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.props
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The child of that name, made when missing.
    pub fn child_mut(&mut self, name: &str) -> &mut Node {
        let index = match self.children.iter().position(|c| c.name == name) {
            Some(index) => index,
            None => {
                self.children.push(Node {
                    name: name.to_string(),
                    ..Node::default()
                });
                self.children.len() - 1
            }
        };
        &mut self.children[index]
    }
}

/// A device tree blob: its memory reservations, boot CPU and root node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fdt {
    pub reservations: Vec<(u64, u64)>,
    pub boot_cpuid: u32,
    pub root: Node,
}

fn be32(bytes: &[u8], at: usize) -> Result<u32> {
    let word = bytes.get(at..at + 4).context("the device tree ends early")?;
    Ok(u32::from_be_bytes(word.try_into()?))
}

impl Fdt {
    pub fn parse(blob: &[u8]) -> Result<Fdt> {
        ensure!(
            be32(blob, 0)? == FDT_MAGIC,
            "not a flattened device tree (bad magic)"
        );
        let off_struct = be32(blob, 8)? as usize;
        let off_strings = be32(blob, 12)? as usize;
        let off_rsvmap = be32(blob, 16)? as usize;
        ensure!(
            be32(blob, 24)? <= 17,
            "device tree versions after 17 are not known here"
        );
        let boot_cpuid = be32(blob, 28)?;
        let strings = blob
            .get(off_strings..)
            .context("device tree strings out of range")?;
        let mut reservations = Vec::new();
        let mut at = off_rsvmap;
        loop {
            let address = (u64::from(be32(blob, at)?) << 32) | u64::from(be32(blob, at + 4)?);
            let size = (u64::from(be32(blob, at + 8)?) << 32) | u64::from(be32(blob, at + 12)?);
            at += 16;
            if address == 0 && size == 0 {
                break;
            }
            reservations.push((address, size));
        }
        let mut stack: Vec<Node> = Vec::new();
        let mut root = None;
        let mut at = off_struct;
        loop {
            let token = be32(blob, at)?;
            at += 4;
            match token {
                FDT_BEGIN_NODE => {
                    let rest = blob.get(at..).context("device tree node out of range")?;
                    let len = rest
                        .iter()
                        .position(|&b| b == 0)
                        .context("unterminated node name")?;
                    let name = String::from_utf8_lossy(&rest[..len]).into_owned();
                    at = align_up((at + len + 1) as u64, 4) as usize;
                    stack.push(Node {
                        name,
                        ..Node::default()
                    });
                }
                FDT_END_NODE => {
                    let node = stack.pop().context("unbalanced device tree nodes")?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => root = Some(node),
                    }
                }
                FDT_PROP => {
                    let len = be32(blob, at)? as usize;
                    let name_off = be32(blob, at + 4)? as usize;
                    at += 8;
                    let value = blob
                        .get(at..at + len)
                        .context("device tree property out of range")?
                        .to_vec();
                    at = align_up((at + len) as u64, 4) as usize;
                    let name_bytes = strings.get(name_off..).context("property name out of range")?;
                    let name_len = name_bytes
                        .iter()
                        .position(|&b| b == 0)
                        .context("unterminated property name")?;
                    let name = String::from_utf8_lossy(&name_bytes[..name_len]).into_owned();
                    stack
                        .last_mut()
                        .context("a device tree property outside any node")?
                        .props
                        .push((name, value));
                }
                FDT_NOP => {}
                FDT_END => break,
                other => bail!("unknown device tree token {other:#x}"),
            }
        }
        Ok(Fdt {
            reservations,
            boot_cpuid,
            root: root.context("the device tree has no root node")?,
        })
    }

    /// The blob (version 17), with a strings table of its own.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut structure = Vec::new();
        let mut strings = Vec::new();
        let mut offsets = BTreeMap::new();
        fn pad(out: &mut Vec<u8>) {
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        }
        fn node(n: &Node, out: &mut Vec<u8>, strings: &mut Vec<u8>, offsets: &mut BTreeMap<String, u32>) {
            out.extend(FDT_BEGIN_NODE.to_be_bytes());
            out.extend(n.name.as_bytes());
            out.push(0);
            pad(out);
            for (name, value) in &n.props {
                let offset = *offsets.entry(name.clone()).or_insert_with(|| {
                    let at = strings.len() as u32;
                    strings.extend(name.as_bytes());
                    strings.push(0);
                    at
                });
                out.extend(FDT_PROP.to_be_bytes());
                out.extend((value.len() as u32).to_be_bytes());
                out.extend(offset.to_be_bytes());
                out.extend(value);
                pad(out);
            }
            for child in &n.children {
                node(child, out, strings, offsets);
            }
            out.extend(FDT_END_NODE.to_be_bytes());
        }
        node(&self.root, &mut structure, &mut strings, &mut offsets);
        structure.extend(FDT_END.to_be_bytes());
        let mut rsvmap = Vec::new();
        for &(address, size) in self.reservations.iter().chain([(0, 0)].iter()) {
            rsvmap.extend(address.to_be_bytes());
            rsvmap.extend(size.to_be_bytes());
        }
        let off_rsvmap = 40u32;
        let off_struct = off_rsvmap + rsvmap.len() as u32;
        let off_strings = off_struct + structure.len() as u32;
        let total = off_strings + strings.len() as u32;
        let mut blob = Vec::with_capacity(total as usize);
        for word in [
            FDT_MAGIC,
            total,
            off_struct,
            off_strings,
            off_rsvmap,
            17,
            16,
            self.boot_cpuid,
            strings.len() as u32,
            structure.len() as u32,
        ] {
            blob.extend(word.to_be_bytes());
        }
        blob.extend(rsvmap);
        blob.extend(structure);
        blob.extend(strings);
        blob
    }
}

/// The running kernel's device tree with `/chosen` for the installer: its command line and
/// initrd; without what only a crash kernel gets.
pub fn installer_fdt(running: &[u8], cmdline: &str, initrd: (u64, u64)) -> Result<Vec<u8>> {
    let mut fdt = Fdt::parse(running).context("reading the running kernel's device tree")?;
    let chosen = fdt.root.child_mut("chosen");
    let mut bootargs = cmdline.as_bytes().to_vec();
    bootargs.push(0);
    chosen.set("bootargs", bootargs);
    chosen.set("linux,initrd-start", initrd.0.to_be_bytes().to_vec());
    chosen.set("linux,initrd-end", (initrd.0 + initrd.1).to_be_bytes().to_vec());
    for crash_only in ["linux,elfcorehdr", "linux,usable-memory-range"] {
        chosen.remove(crash_only);
    }
    Ok(fdt.to_bytes())
}

/// `struct kexec_segment` of include/uapi/linux/kexec.h (the libc crate has none).
#[cfg(target_arch = "aarch64")]
#[repr(C)]
struct KexecSegment {
    buf: *const libc::c_void,
    bufsz: libc::size_t,
    mem: *const libc::c_void,
    memsz: libc::size_t,
}

/// kexec_load with the segments for `kernel` (an arm64 `Image`), `initrd` and `cmdline`.
#[cfg(target_arch = "aarch64")]
pub fn load(kernel: &[u8], initrd: &[u8], cmdline: &str) -> Result<()> {
    let header = ImageHeader::parse(kernel)?;
    let iomem = std::fs::read_to_string("/proc/iomem").context("reading /proc/iomem")?;
    let usable = usable_ram(&iomem);
    ensure!(
        !usable.is_empty(),
        "/proc/iomem shows no System RAM (addresses are hidden from non-root users)"
    );
    let running = std::fs::read("/sys/firmware/fdt")
        .context("reading the running kernel's device tree /sys/firmware/fdt")?;
    // The device tree grows by the command line and a few properties.
    let dtb_room = running.len() as u64 + cmdline.len() as u64 + 4096;
    let placed = place(
        &usable,
        header,
        kernel.len() as u64,
        &[initrd.len() as u64, dtb_room, PAGE],
    )?;
    let (kernel_at, initrd_at, dtb_at, purgatory_at) = (&placed[0], &placed[1], &placed[2], &placed[3]);
    let dtb = installer_fdt(&running, cmdline, (initrd_at.dest, initrd.len() as u64))?;
    ensure!(
        dtb.len() as u64 <= dtb_at.mem_size,
        "the device tree outgrew its room"
    );
    let code = purgatory(dtb_at.dest, kernel_at.dest);
    let segment = |bytes: &[u8], at: &Placed| KexecSegment {
        buf: bytes.as_ptr().cast(),
        bufsz: bytes.len(),
        mem: at.dest as *const libc::c_void,
        memsz: at.mem_size as usize,
    };
    let segments = [
        segment(kernel, kernel_at),
        segment(initrd, initrd_at),
        segment(&dtb, dtb_at),
        segment(&code, purgatory_at),
    ];
    // SAFETY: the segments point at buffers that live until the call returns; the kernel
    // copies them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_load,
            purgatory_at.dest as libc::c_ulong,
            segments.len() as libc::c_ulong,
            segments.as_ptr(),
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("kexec_load");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_header_of_an_arm64_image() {
        let mut image = vec![0u8; 64];
        image[8..16].copy_from_slice(&0u64.to_le_bytes());
        image[16..24].copy_from_slice(&(40u64 << 20).to_le_bytes());
        image[24..32].copy_from_slice(&0b1010u64.to_le_bytes());
        image[56..60].copy_from_slice(b"ARM\x64");
        assert_eq!(
            ImageHeader::parse(&image).unwrap(),
            ImageHeader {
                text_offset: 0,
                image_size: 40 << 20
            }
        );
        image[56] = b'X';
        assert!(ImageHeader::parse(&image).is_err());
        assert!(ImageHeader::parse(&[0u8; 10]).is_err());
    }

    /// /proc/iomem of QEMU's virt machine under AAVMF with 1 GiB (6.1, trimmed).
    const IOMEM: &str = "\
09000000-09000fff : pl011@9000000
40000000-bfffffff : System RAM
  40210000-4188ffff : Kernel code
  41890000-41c3ffff : reserved
  41c40000-41fbffff : Kernel data
  48000000-480fffff : reserved
  b8000000-b9ffffff : reserved
  bfe00000-bfffffff : reserved
";

    #[test]
    fn usable_ram_leaves_out_the_reserved_parts() {
        assert_eq!(
            usable_ram(IOMEM),
            [
                (0x4000_0000, 0x4189_0000),
                (0x41c4_0000, 0x4800_0000),
                (0x4810_0000, 0xb800_0000),
                (0xba00_0000, 0xbfe0_0000),
            ]
        );
    }

    #[test]
    fn placement_is_aligned_in_usable_ram_and_disjoint() {
        let usable = usable_ram(IOMEM);
        let header = ImageHeader {
            text_offset: 0,
            image_size: 34 << 20,
        };
        let placed = place(&usable, header, 33 << 20, &[10 << 20, 8192, PAGE]).unwrap();
        assert_eq!(placed[0].dest % KERNEL_ALIGN, 0);
        let mut previous_end = 0;
        for p in &placed {
            assert_eq!(p.dest % PAGE, 0);
            assert_eq!(p.mem_size % PAGE, 0);
            assert!(p.dest >= previous_end, "{placed:?}");
            assert!(
                usable
                    .iter()
                    .any(|&(s, e)| p.dest >= s && p.dest + p.mem_size <= e),
                "{p:?} outside usable RAM"
            );
            previous_end = p.dest + p.mem_size;
        }
        // 34 MiB do not fit below the reservation at 0x41890000: the kernel goes after it, at
        // the next 2 MiB boundary.
        assert_eq!(placed[0].dest, 0x41e0_0000);
        assert!(place(
            &usable,
            ImageHeader {
                text_offset: 0,
                image_size: 4 << 30
            },
            1,
            &[]
        )
        .is_err());
    }

    #[test]
    fn purgatory_loads_both_addresses() {
        let code = purgatory(0x4800_0000, 0x4020_0000);
        assert_eq!(code.len(), 40);
        assert_eq!(&code[24..32], &0x4800_0000u64.to_le_bytes());
        assert_eq!(&code[32..40], &0x4020_0000u64.to_le_bytes());
    }

    fn sample_fdt() -> Fdt {
        Fdt {
            reservations: vec![(0x4800_0000, 0x1000)],
            boot_cpuid: 0,
            root: Node {
                name: String::new(),
                props: vec![("#address-cells".into(), 2u32.to_be_bytes().to_vec())],
                children: vec![Node {
                    name: "chosen".into(),
                    props: vec![
                        (
                            "linux,uefi-system-table".into(),
                            0xbf6f_0018u64.to_be_bytes().to_vec(),
                        ),
                        ("bootargs".into(), b"console=ttyAMA0\0".to_vec()),
                        ("linux,elfcorehdr".into(), vec![0; 16]),
                    ],
                    children: vec![],
                }],
            },
        }
    }

    #[test]
    fn device_tree_round_trips() {
        let fdt = sample_fdt();
        assert_eq!(Fdt::parse(&fdt.to_bytes()).unwrap(), fdt);
    }

    #[test]
    fn installer_device_tree_names_the_command_line_and_initrd_and_keeps_uefi() {
        let blob = installer_fdt(
            &sample_fdt().to_bytes(),
            "console=ttyAMA0 nixos_kexec.info=x",
            (0x4400_0000, 0x10_0000),
        )
        .unwrap();
        let fdt = Fdt::parse(&blob).unwrap();
        let chosen = fdt.root.children.iter().find(|c| c.name == "chosen").unwrap();
        assert_eq!(
            chosen.get("bootargs").unwrap(),
            b"console=ttyAMA0 nixos_kexec.info=x\0"
        );
        assert_eq!(
            chosen.get("linux,initrd-start").unwrap(),
            0x4400_0000u64.to_be_bytes()
        );
        assert_eq!(
            chosen.get("linux,initrd-end").unwrap(),
            0x4410_0000u64.to_be_bytes()
        );
        assert_eq!(
            chosen.get("linux,uefi-system-table").unwrap(),
            0xbf6f_0018u64.to_be_bytes()
        );
        assert!(chosen.get("linux,elfcorehdr").is_none());
        assert_eq!(fdt.reservations, [(0x4800_0000, 0x1000)]);
        // A tree without /chosen gets one.
        let mut bare = sample_fdt();
        bare.root.children.clear();
        let fdt = Fdt::parse(&installer_fdt(&bare.to_bytes(), "x", (1 << 30, 4096)).unwrap()).unwrap();
        assert!(fdt.root.children[0].get("bootargs").is_some());
    }

    #[test]
    fn garbage_is_not_a_device_tree() {
        assert!(Fdt::parse(b"not a device tree at all, really not one").is_err());
        let mut blob = sample_fdt().to_bytes();
        blob.truncate(60);
        assert!(Fdt::parse(&blob).is_err());
    }
}
