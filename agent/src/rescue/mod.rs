//! The rescue side: gather runtime info about the running system and kexec into the installer.

pub mod cpio;
pub mod download;
pub mod gather;
pub mod kexec;
pub mod kexec_arm64;
pub mod local_flake;
pub mod run;
