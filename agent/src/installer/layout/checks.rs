//! The checks of names, mount points and mount options that every part of the layout uses,
//! and the error that says where in `storage` the problem is.

use crate::error::user_error;
use anyhow::Result;

pub(super) fn err_at(at: &str, problem: impl Into<String>, fix: impl Into<String>) -> anyhow::Error {
    user_error(format!("storage: {at}: {}", problem.into()), fix)
}

pub(super) fn check_name(at: &str, what: &str, text: &str, max: usize, extra: &str) -> Result<()> {
    let ok = !text.is_empty()
        && text.len() <= max
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c) || extra.contains(c));
    if ok {
        Ok(())
    } else {
        Err(err_at(
            at,
            format!("{what} {text:?} is not allowed"),
            format!(
                "use 1 to {max} letters, digits, '_', '.' or '-'{}.",
                if extra.is_empty() {
                    String::new()
                } else {
                    format!(" or {extra:?}")
                }
            ),
        ))
    }
}

/// A name the installer hands on as a path component or a program's argument: a btrfs
/// subvolume (a directory at the filesystem's top) or a LUKS mapping (`/dev/mapper/<name>`,
/// a positional argument of cryptsetup). [`check_name`]'s characters (so no `/`, NUL or
/// space), and not `.` or `..`, which name directories that exist, nor a leading `-`, which
/// reads as an option.
pub(super) fn check_component(at: &str, what: &str, text: &str, max: usize, extra: &str) -> Result<()> {
    check_name(at, what, text, max, extra)?;
    if text == "." || text == ".." || text.starts_with('-') {
        return Err(err_at(
            at,
            format!("{what} {text:?} is not allowed: it would name a directory that exists or read as an option"),
            "start the name with a letter or digit, e.g. \"data\" or \"@data\" for a subvolume, \"cryptdata\" for a LUKS container.",
        ));
    }
    Ok(())
}

pub(super) fn check_mountpoint(at: &str, path: &str) -> Result<()> {
    let ok = path == "/"
        || (path.starts_with('/')
            && !path.ends_with('/')
            && path[1..].split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-@+".contains(c))
            }));
    if ok {
        Ok(())
    } else {
        Err(err_at(
            at,
            format!("mount point {path:?} is not an absolute path"),
            "write mount points like /, /boot or /var/lib (letters, digits, '_', '.', '-', '@', '+').",
        ))
    }
}

pub(super) fn check_options(at: &str, options: &[String]) -> Result<()> {
    for option in options {
        let ok = !option.is_empty()
            && option
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_=.:/@+%-".contains(c));
        if !ok {
            return Err(err_at(
                at,
                format!("mount option {option:?} is not allowed"),
                "give each option as its own list item, e.g. [\"noatime\", \"compress=zstd\"], without commas or spaces.",
            ));
        }
        if option.starts_with("subvol=") || option.starts_with("subvolid=") {
            return Err(err_at(
                at,
                format!("mount option {option:?} is set by the installer"),
                "describe btrfs subvolumes in \"subvolumes\"; their subvol= option is added for you.",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installer::layout::tests::{esp, refusal};

    #[test]
    fn names_mount_points_and_options() {
        assert!(check_name("x", "label", "nixos", 16, "").is_ok());
        assert!(check_name("x", "subvolume name", "@home", 255, "@").is_ok());
        for bad in ["", "a b", "seventeen-letters", "@home"] {
            assert!(check_name("x", "label", bad, 16, "").is_err(), "{bad}");
        }
        for good in ["@", "@home", "data.1", "a-b", "_x"] {
            assert!(
                check_component("x", "subvolume name", good, 255, "@").is_ok(),
                "{good}"
            );
        }
        for bad in [".", "..", "-x", "--help", "a/b", "", "a\0b"] {
            let err = check_component("x", "LUKS name", bad, 32, "").unwrap_err();
            assert!(format!("{err:#}").contains("LUKS name"), "{bad}: {err:#}");
        }
        for good in ["/", "/boot", "/var/lib/@data+x"] {
            assert!(check_mountpoint("x", good).is_ok(), "{good}");
        }
        for bad in ["", "boot", "/boot/", "//boot", "/a/../b", "/a b"] {
            assert!(check_mountpoint("x", bad).is_err(), "{bad}");
        }
        assert!(check_options("x", &["compress=zstd".into(), "noatime".into()]).is_ok());
        let err = check_options("x", &["subvol=@".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("set by the installer"), "{err:#}");
    }

    #[test]
    fn declarative_errors_name_the_problem() {
        let comma = serde_json::json!({"partitions": [esp(), {"size": "rest", "filesystem": {"type": "ext4",
            "mountpoint": "/", "mount_options": ["noatime,nodev"]}}]});
        let text = refusal(comma);
        assert!(
            text.contains("storage: partitions[1].filesystem: mount option"),
            "{text}"
        );
    }
}
