//! Loading kernel modules as PID 1 without modprobe: `modules.dep` resolved here, each module
//! loaded with `finit_module`.

use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// `modules.dep`: module name -> (path, dependencies as paths in load-last-first order).
pub struct ModuleIndex {
    dir: PathBuf,
    entries: BTreeMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
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
        Ok(ModuleIndex {
            dir: dir.to_path_buf(),
            entries,
            builtin,
        })
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
}
