//! nixos-kexec: installs NixOS from a kexec'd minimal initrd.
//!
//! The folders are the stages of the flow, in order:
//!
//! - [`deploy`]: on the operator's machine, drive all that follows over SSH (`deploy`).
//! - [`rescue`]: on the live rescue system, gather runtime info, pack it and kexec (`run`).
//! - [`input`]: inside the installer, read the kernel command line, runtime info, initrd files
//!   and `config_url` once, into one [`input::config::Config`].
//! - [`network`]: bring the network back as the rescue system had it (or DHCP), and describe
//!   it for the installed system.
//! - [`machine`]: what the machine is and how the agent talks to its kernel: disk and firmware
//!   facts, udev's device links, module loading, PID 1 duties, and the one command runner.
//! - [`installer`]: the pure [`installer::plan::Plan`] made from config and facts, then the
//!   steps that carry it out, ending in the report.
//!
//! [`app`] strings the stages together; [`console`], [`error`] and [`secret`] serve them all.

pub mod app;
pub mod console;
pub mod deploy;
pub mod error;
pub mod input;
pub mod installer;
pub mod machine;
pub mod network;
pub mod rescue;
pub mod secret;
