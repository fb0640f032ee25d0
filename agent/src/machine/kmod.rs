//! Loading kernel modules without a modprobe of the system's: `modules.dep` and
//! `modules.alias` resolved here, each module loaded with `finit_module`.
//!
//! The same code serves the kernel's own requests: the installer points
//! `/proc/sys/kernel/modprobe` at this binary under the name `modprobe`, so what a booted system
//! loads on demand (`crypto-ecb` for `xts(aes)` on a CPU without AES-NI, `fs-vfat`, NLS tables,
//! `net-pf-38` for cryptsetup's kernel crypto API) loads here too.

use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// `modules.dep`: module name -> (path, dependencies as paths in load-last-first order), plus
/// `modules.alias` as (glob pattern, module name) in file order.
pub struct ModuleIndex {
    dir: PathBuf,
    entries: BTreeMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
    aliases: Vec<(String, String)>,
}

/// `kernel/fs/ext4/ext4.ko` and `dm-crypt` both become names like `ext4`, `dm_crypt`.
pub fn module_name(path_or_name: &str) -> String {
    let file = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleIndex {
    pub fn load(dir: &Path) -> Result<ModuleIndex> {
        let dep_path = dir.join("modules.dep");
        let text =
            std::fs::read_to_string(&dep_path).with_context(|| format!("reading {}", dep_path.display()))?;
        let mut entries = BTreeMap::new();
        for line in text.lines() {
            let Some((module, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(str::to_string).collect();
            entries.insert(module_name(module), (module.to_string(), deps));
        }
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .map(module_name)
            .collect();
        // Without modules.alias only real module names resolve; depmod writes it next to .dep.
        let aliases = std::fs::read_to_string(dir.join("modules.alias"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                (words.next()? == "alias").then_some(())?;
                Some((words.next()?.to_string(), module_name(words.next()?)))
            })
            .collect();
        Ok(ModuleIndex {
            dir: dir.to_path_buf(),
            entries,
            builtin,
            aliases,
        })
    }

    /// The index of the running kernel, under /lib/modules/<release>.
    pub fn for_running_kernel() -> Result<ModuleIndex> {
        let release = nix::sys::utsname::uname()
            .context("uname")?
            .release()
            .to_string_lossy()
            .into_owned();
        ModuleIndex::load(&Path::new("/lib/modules").join(release))
    }

    /// The modules a request names, as modprobe resolves it: a module's own name (or a
    /// built-in one, which needs nothing), else every module with a matching alias.
    pub fn resolve(&self, request: &str) -> Vec<String> {
        let name = module_name(request);
        if self.entries.contains_key(&name) || self.builtin.contains(&name) {
            return vec![name];
        }
        let mut modules: Vec<String> = Vec::new();
        for (pattern, module) in &self.aliases {
            if glob_matches(pattern, request) && !modules.contains(module) {
                modules.push(module.clone());
            }
        }
        modules
    }

    /// Paths to load for `name`, dependencies first. Empty for built-in modules.
    pub fn load_order(&self, name: &str) -> Result<Vec<String>> {
        let name = module_name(name);
        if self.builtin.contains(&name) {
            return Ok(vec![]);
        }
        let (path, deps) = self
            .entries
            .get(&name)
            .with_context(|| format!("module {name} is neither in modules.dep nor built in"))?;
        // modules.dep lists a module's dependencies so that loading them in reverse works.
        let mut order: Vec<String> = deps.iter().rev().cloned().collect();
        order.push(path.clone());
        Ok(order)
    }

    /// Loads `name` and its dependencies; modules already loaded are fine.
    pub fn insert(&self, name: &str) -> Result<()> {
        for relative in self.load_order(name)? {
            let path = self.dir.join(&relative);
            let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            let no_params = CString::default();
            match nix::kmod::finit_module(&file, &no_params, nix::kmod::ModuleInitFlags::empty()) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(e).with_context(|| format!("loading {}", path.display())),
            }
        }
        Ok(())
    }
}

/// `modprobe [-q] [-b] [-v] [--] NAME`, as the kernel calls it for `request_module` (with `-q
/// --`). Exit status 0 when something was loaded or is built in.
pub fn modprobe_main(args: &[String]) -> i32 {
    let mut quiet = false;
    let mut names = Vec::new();
    let mut options_done = false;
    for arg in args {
        match arg.as_str() {
            "--" if !options_done => options_done = true,
            "-q" | "--quiet" if !options_done => quiet = true,
            flag if flag.starts_with('-') && !options_done => {}
            name => names.push(name.to_string()),
        }
    }
    // modprobe NAME [param=value...]: only the first word is a module.
    let Some(request) = names.first() else {
        eprintln!("modprobe: no module named");
        return 1;
    };
    let index = match ModuleIndex::for_running_kernel() {
        Ok(index) => index,
        Err(e) => {
            if !quiet {
                eprintln!("modprobe: {e:#}");
            }
            return 1;
        }
    };
    let modules = index.resolve(request);
    if modules.is_empty() {
        if !quiet {
            eprintln!("modprobe: module {request} not found in modules.dep or modules.alias");
        }
        return 1;
    }
    let mut loaded_any = false;
    for module in &modules {
        match index.insert(module) {
            Ok(()) => loaded_any = true,
            Err(e) if !quiet => eprintln!("modprobe: {e:#}"),
            Err(_) => {}
        }
    }
    i32::from(!loaded_any)
}

/// fnmatch(3) without flags, as modules.alias patterns need it: `*`, `?`, `[...]` with ranges
/// and `!`/`^` negation.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    glob_at(&pattern, &text)
}

fn glob_at(pattern: &[char], text: &[char]) -> bool {
    match pattern.first() {
        None => text.is_empty(),
        Some('*') => (0..=text.len()).any(|skip| glob_at(&pattern[1..], &text[skip..])),
        Some('?') => !text.is_empty() && glob_at(&pattern[1..], &text[1..]),
        Some('[') => {
            let Some((&c, rest)) = text.split_first() else {
                return false;
            };
            match bracket(&pattern[1..], c) {
                Some((true, after)) => glob_at(after, rest),
                Some((false, _)) => false,
                // An unclosed `[` is a literal character.
                None => c == '[' && glob_at(&pattern[1..], rest),
            }
        }
        Some(&p) => text.first() == Some(&p) && glob_at(&pattern[1..], &text[1..]),
    }
}

/// Matches `c` against a bracket expression starting after its `[`; returns whether it
/// matched and the pattern after the closing `]`.
fn bracket(pattern: &[char], c: char) -> Option<(bool, &[char])> {
    let (negated, mut i) = match pattern.first() {
        Some('!') | Some('^') => (true, 1),
        _ => (false, 0),
    };
    let mut matched = false;
    let mut first = true;
    while let Some(&p) = pattern.get(i) {
        if p == ']' && !first {
            return Some((matched != negated, &pattern[i + 1..]));
        }
        first = false;
        if pattern.get(i + 1) == Some(&'-') && pattern.get(i + 2).is_some_and(|&e| e != ']') {
            let end = pattern[i + 2];
            matched |= p <= c && c <= end;
            i += 3;
        } else {
            matched |= p == c;
            i += 1;
        }
    }
    None
}

/// Module names from `modules-load.d`-style files: one per line, `#` comments.
pub fn names_from_load_d(dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "conf"))
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_dependencies_first_and_skips_builtins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko\nkernel/lib/crc16.ko:\nkernel/drivers/md/dm-crypt.ko: kernel/drivers/md/dm-mod.ko\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/block/virtio_blk.ko\n",
        )
        .unwrap();
        let index = ModuleIndex::load(dir.path()).unwrap();
        assert_eq!(
            index.load_order("ext4").unwrap(),
            [
                "kernel/lib/crc16.ko",
                "kernel/fs/mbcache.ko",
                "kernel/fs/jbd2/jbd2.ko",
                "kernel/fs/ext4/ext4.ko"
            ]
        );
        assert_eq!(index.load_order("dm-crypt").unwrap().len(), 2);
        assert!(index.load_order("virtio_blk").unwrap().is_empty());
        assert!(index.load_order("nope").is_err());
    }

    #[test]
    fn requests_resolve_through_names_builtins_and_aliases() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/crypto/ecb.ko:\nkernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\nkernel/fs/fat/fat.ko:\nkernel/drivers/usb/storage/uas.ko:\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/crypto/aes_generic.ko\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("modules.alias"),
            "# Aliases extracted from modules themselves.\nalias crypto-ecb ecb\nalias fs-vfat vfat\nalias usb:v13FDp3940d0[0-2]*dc*dsc*dp*ic*isc*ip*in* uas\n",
        )
        .unwrap();
        let index = ModuleIndex::load(dir.path()).unwrap();
        assert_eq!(index.resolve("crypto-ecb"), ["ecb"]);
        assert_eq!(index.resolve("fs-vfat"), ["vfat"]);
        assert_eq!(index.resolve("vfat"), ["vfat"]);
        assert_eq!(index.resolve("aes-generic"), ["aes_generic"]);
        assert!(index.load_order("aes_generic").unwrap().is_empty());
        assert_eq!(
            index.resolve("usb:v13FDp3940d0150dc00dsc00dp00ic08isc06ip62in00"),
            ["uas"]
        );
        assert!(index
            .resolve("usb:v13FDp3940d0350dc00dsc00dp00ic08isc06ip62in00")
            .is_empty());
        assert!(index.resolve("crypto-xts(aes)").is_empty());
    }

    #[test]
    fn glob_follows_fnmatch() {
        for (pattern, text, expected) in [
            ("crypto-ecb", "crypto-ecb", true),
            ("crypto-ecb", "crypto-ecb(aes)", false),
            ("pci:v00001AF4d*sv*", "pci:v00001AF4d00001000sv00001AF4", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("d0[0-2]*", "d01x", true),
            ("d0[!0-2]*", "d01x", false),
            ("d0[^0-2]*", "d05", true),
            ("[]]", "]", true),
            ("x[", "x[", true),
            ("*", "", true),
            ("*b*", "aXbY", true),
        ] {
            assert_eq!(glob_matches(pattern, text), expected, "{pattern} vs {text}");
        }
    }

    #[test]
    fn modprobe_takes_the_kernels_arguments() {
        // No /lib/modules for this test process's kernel here: a clean failure, never a panic.
        assert_eq!(modprobe_main(&[]), 1);
        assert_eq!(
            modprobe_main(&["-q".into(), "--".into(), "no-such-module-anywhere".into()]),
            1
        );
    }
}
